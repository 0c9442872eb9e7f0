"""Hostile recipes and interrupts: secrets never written, alias bombs and wrong types refused
with one line, Ctrl-C says what stopped and that a rerun resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from pipelines.loop.recipe import load_recipe

BASE = """name: t
algo: grpo
policy: hf:/nowhere
problems: {arith: {count: 4, seed: 1}}
eval: {name: h, arith: {count: 4, seed: 2}}
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    bomb = BASE + 'generate: {}\ntiny:\n  a: &a ["x", "x", "x", "x", "x", "x", "x", "x"]\n' + \
        "".join(f"  {c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                for p, c in zip("abcdefgh", "bcdefghi", strict=True))
    assert len(bomb) < 1000
    with pytest.raises(ValueError, match="YAML aliases .* are not allowed"):
        load_recipe(write(tmp_path, bomb))
    big = tmp_path / "big.yaml"
    big.write_text(BASE + "# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ValueError, match="a recipe is at most"):
        load_recipe(str(big))


@pytest.mark.parametrize("line, message", [
    ("rounds: [1]", "rounds must be int, got list"),
    ("rounds: true", "rounds must be int, got bool"),
    ("rounds: 2.9", "rounds must be int, got float"),
    ("seed: {a: 1}", "seed must be int, got dict"),
    ("prm: 123", "prm must be str, got int"),
])
def test_wrong_recipe_types_are_refused_not_coerced(tmp_path: Path, line: str,
                                                    message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_recipe(write(tmp_path, BASE + line + "\n"))


def test_storage_options_never_reach_the_run_folder(tmp_path: Path) -> None:
    from pipelines.loop.round_loop import _check_run_dir

    recipe = load_recipe(write(tmp_path, BASE + "generate: {storage_options: {key: AKIAX, "
                                               "secret: s3cr3t}, n: 2}\n"))
    _check_run_dir(tmp_path / "run", recipe, resume=False)
    text = (tmp_path / "run" / "recipe.json").read_text()
    assert "s3cr3t" not in text and "AKIAX" not in text
    assert json.loads(text)["generate"] == {"n": 2}


def test_ctrl_c_exits_130_with_a_resume_hint(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import scope_data.problems as problems

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(problems, "write_arith", interrupted)
    result = CliRunner().invoke(app, ["problems", "arith", "--count", "2", "--out",
                                      str(tmp_path / "p")])
    assert result.exit_code == 130
    assert "interrupted: scope problems stopped" in result.output
    assert "rerun of the same command resumes" in " ".join(result.output.split())


def test_pickled_weights_are_never_loaded(tmp_path: Path) -> None:
    """A model folder with only pytorch_model.bin is refused by scope train (one line)."""
    import torch

    from pipelines.training.train import _load_weights
    from tests.helpers_engines import build_random_tiny

    folder = build_random_tiny(tmp_path / "m")
    from safetensors.torch import load_file

    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="never loads pickled .bin weights"):
        _load_weights(str(folder), False)


@pytest.mark.parametrize("args, message", [
    (["score", "--rollouts", "r", "--out", "o", "--prm", "rule:arith", "--threshold", "nan"],
     "--threshold must be in \\[0, 1\\]"),
    (["generate", "--problems", "p", "--policy", "hf:x", "--out", "o", "--temperature", "nan"],
     "--temperature must be a finite number"),
])
def test_nan_options_are_refused(args: list[str], message: str) -> None:
    import re

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and re.search(message, " ".join(result.output.split()))


def test_a_table_never_makes_scope_download_a_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id in a (tampered) table's policy column is looked up offline only: one clear
    line, no network attempt."""
    import time

    from pipelines.engines.spec import load_tokenizer

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError, match="never makes scope download"):
        load_tokenizer("someone/not-a-cached-model", local_only=True)
    assert time.monotonic() - t0 < 10


def test_inspect_never_passes_table_values_to_the_terminal(tmp_path: Path) -> None:
    """Escape sequences and rich markup inside table values print as inert text."""
    hostile = "\x1b]0;TITLE\x07\x1b[2J[link=http://x]click[/link]"
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"problem": hostile, "answer": "1"}) + "\n")
    runner = CliRunner()
    made = runner.invoke(app, ["problems", str(data), "--out", str(tmp_path / "t"),
                               "--source", hostile])
    assert made.exit_code == 0, made.output
    shown = runner.invoke(app, ["inspect", str(tmp_path / "t")])
    assert shown.exit_code == 0, shown.output
    assert "\x1b" not in shown.output and "\x07" not in shown.output
    assert "[link=http://x]" in shown.output  # markup printed literally, not rendered


def test_metadata_reads_are_bounded(tmp_path: Path) -> None:
    """A manifest linked to /dev/zero, or a huge legacy one, is refused naming the file, after
    reading at most the bound (never the whole thing)."""
    import os

    from scope_data.layout import LEGACY_MANIFEST, MANIFEST
    from scope_data.shards import METADATA_LIMIT, ShardError, read_manifest

    table = tmp_path / "t"
    (table / MANIFEST).parent.mkdir(parents=True)
    os.symlink("/dev/zero", table / MANIFEST)
    with pytest.raises(ShardError, match=f"manifest.*larger than {METADATA_LIMIT} bytes"):
        read_manifest(str(table))
    legacy = tmp_path / "old"
    legacy.mkdir()
    with open(legacy / LEGACY_MANIFEST, "wb") as f:
        f.truncate(METADATA_LIMIT + 10)  # sparse: 64 MiB of zeros on disk costs nothing
    with pytest.raises(ShardError, match=f"{LEGACY_MANIFEST}.*larger than"):
        read_manifest(str(legacy))
