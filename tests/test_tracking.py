"""Experiment tracking: `report_to` names, tensorboard event files and an offline wandb run,
read back and checked against train_metrics.parquet and the round metrics."""

from __future__ import annotations

import importlib.util
import json
import re
import struct
from pathlib import Path

import polars as pl
import pytest

from tests.helpers_engines import build_random_tiny
from tests.helpers_train import scope_group, write_corrected

torch = pytest.importorskip("torch")
pytest.importorskip("tensorboard")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    path = build_random_tiny(tmp_path_factory.mktemp("tiny") / "policy")
    return path, AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """wandb's own files in tmp_path, quiet, and no WANDB_MODE: scope's default (offline)."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in (("WANDB_CONFIG_DIR", "cfg"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))


def two_rounds(tiny, tmp_path: Path, report_to: str) -> list[pl.DataFrame]:
    """Two `scope train` rounds (round 2 trains round 1's checkpoint) logging into one folder;
    returns each round's train_metrics."""
    from pipelines.training.train import TrainConfig, run

    path, tok, model = tiny
    data = write_corrected(tmp_path / "corrected",
                           scope_group(tok, model, "3") + scope_group(tok, model, "12"))
    policy, frames = f"hf:{path}", []
    for r in (1, 2):
        out = tmp_path / f"round-{r:04d}" / "train"
        run(TrainConfig(data=data, policy=policy, output_dir=str(out), max_steps=2,
                        per_device_train_batch_size=4, learning_rate=1e-3, seed=r,
                        report_to=report_to, run_name="t", logging_dir=str(tmp_path / "tracking")))
        frames.append(pl.read_parquet(out / "train_metrics.parquet"))
        policy = f"hf:{out}"
    return frames


def round_metrics(tmp_path: Path) -> pl.DataFrame:
    """metrics.parquet rows of rounds 0..2 as `scope run` writes them (one eval set), and the
    eval folders' metrics.json `round_tracking` reads the eval figures' names from."""
    rows = []
    for r, acc in enumerate((0.25, 0.5, 0.625)):
        eval_m = {"accuracy": acc, "pass@1": acc, "pass@2": min(1.0, acc + 0.25), "n": 2,
                  "self_bleu_div": 0.1 * (r + 1)}
        folder = tmp_path / f"round-{r:04d}" / "eval" / "heldout"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps({**eval_m, "config": {"n": 2}}))
        train = {} if r == 0 else {
            "train_steps": 2, "salvage_rate": 0.5 / r, "off_policy_share": 0.3,
            "clip_fraction": 0.01 * r, "groups_zero_advantage": r, "teacher_tokens": 100 * r,
            "prm_tokens": 50 * r, "first_error_hist": [3, 0, 2 * r, 1]}
        rows.append({"run_name": "t", "algo": "scope", "seed": 0, "round": r,
                     "eval_set": "heldout", **eval_m, **train})
    return pl.DataFrame(rows, infer_schema_length=None)


def log_rounds(tmp_path: Path, report_to: str, metrics: pl.DataFrame) -> None:
    from pipelines.loop.round_tracking import log_round
    from pipelines.training.tracking import Tracker

    for r in range(3):
        log_round(Tracker(report_to, str(tmp_path / "tracking"), "t"), metrics, r,
                  tmp_path / f"round-{r:04d}")


def test_report_to_names_and_missing_package(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app
    from pipelines.training.tracking import Tracker, parse_report_to, trainer_report_to

    assert parse_report_to("none") == () and parse_report_to(None) == ()
    assert parse_report_to(" tensorboard, wandb ,tensorboard") == ("tensorboard", "wandb")
    assert trainer_report_to(("tensorboard",)) == ["none"]
    assert trainer_report_to(("tensorboard", "wandb")) == ["wandb"]
    with pytest.raises(ValueError, match=r"unknown tracker\(s\) \['tensorbord'\]"):
        parse_report_to("tensorbord")
    off = Tracker("none", str(tmp_path / "logs"))
    with off:
        off.log({"a": 1.0}, 0)
    off.mark("round-0000")
    assert not off.active and not (tmp_path / "logs").exists()  # the default writes nothing
    bad = tmp_path / "bad"
    bad.mkdir()
    for text in ("{not json", '{"logged": "round-0000"}', "[1]", " " * (2 << 20)):
        (bad / "tracking.json").write_text(text)
        with pytest.raises(ValueError, match=r"bad/tracking.json: not a tracker state file"):
            Tracker("tensorboard", str(bad)).logged("round-0000")
    from pipelines.loop.recipe import recipe_from_dict
    from pipelines.loop.round_stages import train_config
    from tests.test_run import _recipe

    body = _recipe("hf:x")
    body["train"]["report_to"] = ["tensorboard", "wandb"]
    tcfg = train_config(recipe_from_dict(body), "d", "hf:x", str(tmp_path / "round-0001" / "train"),
                        1)
    assert (tcfg.report_to, tcfg.run_name, tcfg.logging_dir) == (
        "tensorboard,wandb", "t-scope-seed3", str(tmp_path / "tracking"))
    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed")
    res = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "c"), "--policy", "hf:x",
                                   "--out", str(tmp_path / "o"), "--report-to", "mlflow"])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        "error: report_to=mlflow needs the mlflow package: pip install mlflow"]


def test_tensorboard_two_rounds_one_folder_values_read_back(tiny, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    frames = two_rounds(tiny, tmp_path, "tensorboard")
    metrics = round_metrics(tmp_path)
    log_rounds(tmp_path, "tensorboard", metrics)
    log_rounds(tmp_path, "tensorboard", metrics)  # a resumed run logs no round twice
    assert not (tmp_path / "round-0001" / "train-logs").exists()  # the default folder unused

    acc = EventAccumulator(str(tmp_path / "tracking" / "tensorboard"),
                           size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    # the Trainer's steps: both rounds' optimizer steps, our objective's figures included
    for tag in ("loss", "clip_fraction", "off_policy_share", "grad_norm"):
        want = [(s, v) for f in frames for s, v in zip(f["step"], f[tag], strict=True)]
        assert [s for s, _ in series(f"train/{tag}")] == [s for s, _ in want]
        assert [v for _, v in series(f"train/{tag}")] == pytest.approx([v for _, v in want],
                                                                          rel=1e-6, abs=1e-7)
    # the rounds: at the run's optimizer step (0, 2, 4), every figure of the metrics rows
    steps = [0, 2, 4]
    assert series("round/round") == [(0, 0.0), (2, 1.0), (4, 2.0)]
    for col in ("accuracy", "pass@1", "pass@2", "self_bleu_div", "n"):
        assert series(f"eval/heldout/{col}") == [
            (s, pytest.approx(v)) for s, v in zip(steps, metrics[col], strict=True)]
    for col in ("salvage_rate", "off_policy_share", "clip_fraction", "groups_zero_advantage",
                "teacher_tokens", "prm_tokens", "train_steps"):
        assert series(f"round/{col}") == [
            (s, pytest.approx(v)) for s, v in zip(steps[1:], metrics[col][1:], strict=True)]
    hist = acc.Histograms("round/first_error")
    assert [h.step for h in hist] == [2, 4]
    assert [list(h.histogram_value.bucket) for h in hist] == [[3, 0, 2, 1], [3, 0, 4, 1]]
    assert list(hist[1].histogram_value.bucket_limit) == [0.5, 1.5, 2.5, 3.5]
    assert json.loads((tmp_path / "tracking" / "tracking.json").read_text())["logged"] == [
        "round-0000", "round-0001", "round-0002"]


BLOCK = 32 * 1024  # the .wandb file: a LevelDB-style log of protobuf records


def wandb_history(path: Path) -> list[dict[str, object]]:
    """The `history` records (one per wandb.log) of an offline run's .wandb file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, rows = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        buf += data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                             for i in rec.history.item})
    return rows


def test_wandb_offline_one_run_across_rounds(tiny, tmp_path: Path, wandb_env: None) -> None:
    pytest.importorskip("wandb")
    frames = two_rounds(tiny, tmp_path, "wandb")
    metrics = round_metrics(tmp_path)
    log_rounds(tmp_path, "wandb", metrics)

    run_id = json.loads((tmp_path / "tracking" / "tracking.json").read_text())["run_id"]
    runs = sorted((tmp_path / "tracking" / "wandb").glob("offline-run-*"))
    # offline, one run id (wandb adds -1 to a folder name taken in the same second)
    assert runs and all(re.fullmatch(rf"offline-run-\d+_\d+-{run_id}(-\d+)?", r.name)
                        for r in runs)
    history = [row for r in runs for row in wandb_history(r / f"run-{run_id}.wandb")]
    train = [(h["train/global_step"], h["train/loss"], h["train/clip_fraction"])
             for h in history if "train/loss" in h]
    want = [(s, loss, c) for f in frames
            for s, loss, c in zip(f["step"], f["loss"], f["clip_fraction"], strict=True)]
    assert train == [pytest.approx(w, rel=1e-6, abs=1e-7) for w in want]
    rounds = [h for h in history if "round/round" in h]
    assert [(h["train/global_step"], h["round/round"]) for h in rounds] == [
        (0, 0), (2, 1), (4, 2)]
    assert [h["eval/heldout/accuracy"] for h in rounds] == metrics["accuracy"].to_list()
    assert [h["round/salvage_rate"] for h in rounds[1:]] == metrics["salvage_rate"][1:].to_list()
    hists = [h for h in history if "round/first_error/values" in h]
    assert [h["round/first_error/values"] for h in hists] == [[3, 0, 2, 1], [3, 0, 4, 1]]


@pytest.mark.slow
def test_scope_run_logs_each_round_once(tmp_path: Path, tiny_policy: Path) -> None:
    """`scope run` with train.report_to: the trainer's steps and every numeric figure of
    metrics.parquet land in RUN_DIR/tracking/tensorboard; a resumed run logs nothing again."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipelines.loop.recipe import recipe_from_dict
    from pipelines.loop.round_loop import RunConfig, run
    from scope_data.shards import scan
    from tests.test_run import _recipe

    body = _recipe(f"hf:{tiny_policy}", rounds=1)
    body["train"]["report_to"] = "tensorboard"
    out = tmp_path / "run"
    metrics = run(RunConfig(recipe=recipe_from_dict(body), out=str(out), verbose=False)).metrics
    events = sorted((out / "tracking" / "tensorboard").iterdir())
    run(RunConfig(recipe=recipe_from_dict(body), out=str(out), resume=True, verbose=False))
    assert sorted((out / "tracking" / "tensorboard").iterdir()) == events

    acc = EventAccumulator(str(out / "tracking" / "tensorboard"),
                           size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    steps = int(metrics["train_steps"][1])
    train = pl.read_parquet(out / "round-0001" / "train" / "train_metrics.parquet")
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(train["loss"].to_list())
    assert [(e.step, e.value) for e in acc.Scalars("eval/heldout/accuracy")] == [
        (0, pytest.approx(metrics["accuracy"][0])), (steps, pytest.approx(metrics["accuracy"][1]))]
    for col in ("salvage_rate", "off_policy_share", "clip_fraction", "groups_zero_advantage",
                "teacher_tokens", "prm_tokens"):
        assert [(e.step, e.value) for e in acc.Scalars(f"round/{col}")] == [
            (steps, pytest.approx(metrics[col][1]))], col
    scored = scan(str(out / "round-0001" / "score")).collect()
    located = scored.filter(~pl.col("correct") & (pl.col("first_error") >= 0))["first_error"]
    want = [int((located.clip(upper_bound=9) == k).sum()) for k in range(10)]
    assert sum(want) > 0
    assert list(acc.Histograms("round/prm_first_error")[0].histogram_value.bucket) == want
    hist = metrics["first_error_hist"][1].to_list()  # the exact checker's positions
    assert sum(hist) > 0
    assert list(acc.Histograms("round/first_error")[0].histogram_value.bucket) == hist
