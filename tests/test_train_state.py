"""Trainer state carried across rounds (`--resume-from`, pipelines/training/state.py): two calls
equal one Trainer run, a SIGKILLed call leaves nothing and reruns to the same weights, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from tests.helpers_engines import build_random_tiny
from tests.helpers_train import scope_group, to_table

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]
BATCH = 3  # one group (2 failed + 1 correction) per optimizer step


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame, pl.DataFrame]:
    """A random tiny policy and two rounds of assembled rows (3 optimizer steps each)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scope_data.assembly import assemble

    torch.set_num_threads(1)
    path = build_random_tiny(tmp_path_factory.mktemp("tiny") / "policy")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)

    def rows(problems: list[str]) -> pl.DataFrame:
        table = to_table([r for p in problems for r in scope_group(tok, model, p)])
        return assemble(table, "scope").rows

    return path, rows(["1", "2", "3"]), rows(["4", "5", "6"])


def cfg(policy: Path, out: Path, **kw: object):  # noqa: ANN201
    from pipelines.training.train import TrainConfig

    opts = {"per_device_train_batch_size": BATCH, "learning_rate": 1e-3, "seed": 0,
            "lr_scheduler_type": "cosine", "warmup_steps": 2, "schedule_steps": 6,
            "max_length": 64, "use_cpu": True, **kw}
    return TrainConfig(data="-", policy=f"hf:{policy}", output_dir=str(out), **opts)


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def max_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


@pytest.fixture(scope="module")
def rounds(tiny, tmp_path_factory) -> dict[str, Path]:
    """One run over both rounds' rows, and the same as two calls with carried state."""
    from pipelines.training.train import fit

    path, r1, r2 = tiny
    tmp = tmp_path_factory.mktemp("rounds")
    fit(cfg(path, tmp / "one"), pl.concat([r1, r2]), shuffle=False)
    fit(cfg(path, tmp / "r1"), r1, shuffle=False)
    fit(cfg(tmp / "r1", tmp / "r2", resume_from=str(tmp / "r1")), r2, shuffle=False)
    return {"one": tmp / "one", "r1": tmp / "r1", "r2": tmp / "r2", "tmp": tmp}


def test_two_carried_calls_equal_one_run(rounds) -> None:
    assert max_diff(rounds["one"], rounds["r2"]) < 1e-6
    one = pl.read_parquet(rounds["one"] / "train_metrics.parquet")
    two = pl.concat([pl.read_parquet(rounds[r] / "train_metrics.parquet") for r in ("r1", "r2")])
    assert two["step"].to_list() == one["step"].to_list() == [1, 2, 3, 4, 5, 6]
    # warmup 2 then cosine over 6 steps: the carried call continues the schedule
    assert two["learning_rate"].to_list() == pytest.approx(one["learning_rate"].to_list())
    assert one["learning_rate"][0] == pytest.approx(0.0) and one["learning_rate"][1] > 0
    manifest = json.loads((rounds["r2"] / "train_manifest.json").read_text())
    assert manifest["trainer_state"] == {"saved": True, "resume_from": str(rounds["r1"]),
                                         "start_step": 3, "global_step": 6}
    meta = json.loads((rounds["r2"] / "trainer_state" / "state.json").read_text())
    assert meta["global_step"] == 6 and meta["schedule"]["schedule_steps"] == 6
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):  # plain tensors: no allow-listing
        torch.load(rounds["r2"] / "trainer_state" / name, weights_only=True)


def test_fresh_state_differs_from_carried(tiny, rounds) -> None:
    """Without --resume-from round 2 restarts the optimizer and schedule (the old behaviour):
    its steps count from 1 and its weights differ from the carried run's."""
    from pipelines.training.train import fit

    path, _, r2 = tiny
    res = fit(cfg(rounds["r1"], rounds["tmp"] / "fresh", schedule_steps=-1), r2, shuffle=False)
    assert res.metrics["step"].to_list() == [1, 2, 3] and res.steps == 3
    assert max_diff(rounds["tmp"] / "fresh", rounds["r2"]) > 1e-4


KILL_SCRIPT = """
import os, signal, sys
import polars as pl, torch
from transformers import TrainerCallback
from pipelines.training.train import fit
from tests.test_train_state import cfg

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 5:  # the second step of round 2
            os.kill(os.getpid(), signal.SIGKILL)

torch.set_num_threads(1)
r1 = sys.argv[1]
fit(cfg(r1, sys.argv[2], resume_from=r1), pl.read_parquet(sys.argv[3]), shuffle=False,
    callbacks=[Kill()])
"""



def test_session_keeps_model_and_states_in_memory_with_the_same_results(tiny, rounds) -> None:
    """`training_session()` (the online train worker): the second call takes the first call's
    model, optimizer, scheduler and RNG from memory, not from r1's folder, and gives the bits of
    the disk path; each call still writes its folder and trainer_state/."""
    from pipelines.training.session import training_session
    from pipelines.training.state import OPTIMIZER, has_state
    from pipelines.training.train import fit

    path, r1, r2 = tiny
    tmp = rounds["tmp"] / "session"
    with training_session() as session:
        fit(cfg(path, tmp / "r1"), r1, shuffle=False)
        kept = session.kept
        assert kept is not None and kept.global_step == 3
        moment = next(iter(kept.states[OPTIMIZER]["state"].values()))["exp_avg"]
        state_file = tmp / "r1" / "trainer_state" / OPTIMIZER
        state_file.rename(state_file.with_suffix(".moved"))  # memory, not disk, is read
        fit(cfg(tmp / "r1", tmp / "r2", resume_from=str(tmp / "r1")), r2, shuffle=False)
        assert session.stats == {"loads": 1, "reuses": 1}
        assert session.kept.model is kept.model  # the same model object, trained on
        now = next(iter(session.kept.states[OPTIMIZER]["state"].values()))["exp_avg"]
        assert now.data_ptr() == moment.data_ptr()  # the same optimizer state tensors
        # a call that does not continue the kept one loads from disk
        fit(cfg(path, tmp / "other"), r1, shuffle=False)
        assert session.stats == {"loads": 2, "reuses": 1}
    assert has_state(str(tmp / "r2"))
    assert max_diff(rounds["r2"], tmp / "r2") == 0.0
    for r in ("r1", "r2"):
        assert pl.read_parquet(tmp / r / "train_metrics.parquet").equals(
            pl.read_parquet(rounds[r] / "train_metrics.parquet"))
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        a = torch.load(rounds["r2"] / "trainer_state" / name, weights_only=True)
        b = torch.load(tmp / "r2" / "trainer_state" / name, weights_only=True)
        assert repr(a) == repr(b), name


@pytest.mark.slow
def test_sigkilled_call_then_rerun_equals_uninterrupted(tiny, rounds) -> None:
    from pipelines.training.train import fit

    _, _, r2 = tiny
    tmp = rounds["tmp"]
    r2.write_parquet(tmp / "rows2.parquet")
    out = tmp / "killed"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(rounds["r1"]), str(out),
         str(tmp / "rows2.parquet")],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()  # nothing renamed into place; the input state is untouched
    assert json.loads((rounds["r1"] / "trainer_state" / "state.json").read_text())[
        "global_step"] == 3
    fit(cfg(rounds["r1"], out, resume_from=str(rounds["r1"])), r2, shuffle=False)
    assert max_diff(out, rounds["r2"]) < 1e-6


def test_refusals(tiny, rounds) -> None:
    from pipelines.training.state import load_carried
    from pipelines.training.train import fit

    path, _, r2 = tiny
    tmp, r1 = rounds["tmp"], str(rounds["r1"])
    with pytest.raises(ValueError, match=r"resume_from .*policy: no trainer_state/state.json"):
        fit(cfg(path, tmp / "x", resume_from=str(path)), r2)
    with pytest.raises(ValueError, match="schedule_steps is 8 here but 6 in its trainer_state"):
        fit(cfg(rounds["r1"], tmp / "x", resume_from=r1, schedule_steps=8), r2)
    with pytest.raises(ValueError, match="lora is True here but False"):
        load_carried(r1, cfg(rounds["r1"], tmp / "x", lora=True))
    with pytest.raises(ValueError, match=r"schedule_steps 2 is less than .*\(0 carried \+ 3\)"):
        fit(cfg(path, tmp / "y", schedule_steps=2), r2)
    assert not (tmp / "x").exists() and not (tmp / "y").exists()
    # an optimizer state for other trainable parameters (here: a frozen embedding)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(r1)
    model.get_input_embeddings().requires_grad_(False)
    with pytest.raises(ValueError, match="another set of trainable parameters"):
        load_carried(r1, cfg(rounds["r1"], tmp / "x")).check_model(model)


def test_cli_refusal_is_one_line(tiny, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from cli.main import app
    from tests.helpers_train import write_corrected

    path = tiny[0]
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    data = write_corrected(tmp_path / "corrected", scope_group(tok, model, "7"))
    res = CliRunner().invoke(app, ["train", "--data", data, "--policy", f"hf:{path}", "--out",
                                   str(tmp_path / "out"), "--resume-from", str(path),
                                   "--use-cpu"])
    assert res.exit_code == 1
    assert "no trainer_state/state.json" in " ".join(res.output.split())
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()
