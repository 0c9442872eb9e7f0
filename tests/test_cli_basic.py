"""The `scope` command line: help, `problems`, `inspect`, exit codes and error lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def test_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "problems" in result.output and "inspect" in result.output
    sub = runner.invoke(app, ["problems", "--help"])
    assert sub.exit_code == 0
    for option in ("--out", "--problem-field", "--answer-field", "--skip-invalid", "--limit",
                   "--split", "--count", "--seed", "--steps", "--modulus", "--storage-options"):
        assert option in sub.output


def test_cli_import_stays_light() -> None:
    """`scope --help` must not import torch/transformers/vllm (DESIGN.md section 2)."""
    code = ("import sys, cli.main; heavy = [m for m in ('torch', 'transformers', 'vllm', "
            "'datasets') if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, f"heavy modules imported by the CLI: {proc.stdout}"


def test_problems_then_inspect(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "aime"
    result = runner.invoke(app, ["problems", str(shared_data / "aime24.test.jsonl"),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "aime24.test" in result.output and "30" in result.output
    shown = runner.invoke(app, ["inspect", str(out), "--json", "-n", "2"])
    assert shown.exit_code == 0, shown.output
    info = json.loads(shown.output)
    assert info["table"] == "problems" and info["rows"] == 30 and len(info["head"]) == 2
    assert info["head"][0]["answer"] == "204"
    assert info["stats"] == {"status": {"ok": 30, "skipped_invalid": 0}}
    assert info["schema"]["source_index"] == "Int64"
    assert info["read_with"]["polars"] == f'pl.scan_parquet("{out}")'
    text = runner.invoke(app, ["inspect", str(out)])
    assert text.exit_code == 0 and "problems table" in text.output and "problem_id" in text.output
    assert f'load_dataset("parquet", data_dir="{out}")' in text.output


def test_problems_arith(tmp_path: Path) -> None:
    out = tmp_path / "arith"
    args = ["problems", "arith", "--count", "12", "--seed", "5", "--steps", "2-3", "--modulus",
            "7", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    info = json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).output)
    assert info["rows"] == 12 and info["config"]["modulus"] == 7
    assert info["head"][0]["prompt"].startswith("Mod 7. Start with")
    bad = runner.invoke(app, ["problems", "arith", "--steps", "x", "--out", str(out)])
    assert bad.exit_code == 1 and "--steps must look like 3-6" in bad.output


def test_problems_invalid_row_and_skip(tmp_path: Path) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text('{"problem": "a", "answer": "1"}\n{"problem": "b"}\n')
    failed = runner.invoke(app, ["problems", str(src), "--out", str(tmp_path / "p")])
    assert failed.exit_code == 1
    assert "error:" in failed.output and "line 2: no answer (field 'answer')" in failed.output
    assert "Traceback" not in failed.output
    skipped = runner.invoke(app, ["problems", str(src), "--out", str(tmp_path / "p"),
                                  "--skip-invalid"])
    assert skipped.exit_code == 0, skipped.output
    assert "skipped (invalid)" in skipped.output and "line 2" in skipped.output


def test_missing_inputs_and_tables(tmp_path: Path) -> None:
    missing = runner.invoke(app, ["inspect", str(tmp_path / "nothing")])
    assert missing.exit_code == 1
    assert "no manifest" in missing.output and "Traceback" not in missing.output
    no_file = runner.invoke(app, ["problems", str(tmp_path / "x.jsonl"), "--out",
                                  str(tmp_path / "p")])
    assert no_file.exit_code == 1 and "x.jsonl: no such file" in no_file.output
    no_out = runner.invoke(app, ["problems", "arith"])
    assert no_out.exit_code == 2 and "--out" in no_out.output


@pytest.mark.parametrize("options", ["{bad json", "[1, 2]"])
def test_bad_storage_options(tmp_path: Path, options: str) -> None:
    result = runner.invoke(app, ["inspect", str(tmp_path), "--storage-options", options])
    assert result.exit_code == 2 and "--storage-options" in result.output


def test_user_error_is_one_escaped_line_and_a_bug_keeps_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deliberate error about the input is one line (markup in it printed literally); an error
    raised inside a library or of an unexpected type is a bug and keeps its traceback; --debug
    shows the traceback of every error."""
    import scope_data.problems as problems

    monkeypatch.setenv("SCOPE_DEBUG", "")  # restored after the --debug call below sets it
    bad = tmp_path / "[bold]x.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": ""}\n')
    result = runner.invoke(app, ["problems", str(bad), "--out", str(tmp_path / "p")])
    assert result.exit_code == 1
    assert result.output.startswith("error:") and "[bold]x.jsonl" in result.output
    assert "Traceback" not in result.output

    def broken(*args: object, **kwargs: object) -> None:
        return {}["missing"]  # a bug: KeyError inside our code

    monkeypatch.setattr(problems, "write_arith", broken)
    bug = runner.invoke(app, ["problems", "arith", "--count", "2", "--out", str(tmp_path / "r")])
    assert bug.exit_code != 0 and isinstance(bug.exception, KeyError)

    def library_error(*args: object, **kwargs: object) -> None:
        import json as _json

        _json.loads("{")  # ValueError raised inside a library, not by a `raise` of ours

    monkeypatch.setattr(problems, "write_arith", library_error)
    lib = runner.invoke(app, ["problems", "arith", "--count", "2", "--out", str(tmp_path / "s")])
    assert lib.exit_code != 0 and isinstance(lib.exception, ValueError)

    monkeypatch.undo()
    monkeypatch.setenv("SCOPE_DEBUG", "")
    debug = runner.invoke(app, ["--debug", "problems", str(bad), "--out", str(tmp_path / "q")])
    assert debug.exit_code != 0 and isinstance(debug.exception, ValueError)
