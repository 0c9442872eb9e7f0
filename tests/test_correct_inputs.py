"""What `scope correct` reads and what `scope train` accepts from it: luffy straight from the
rollouts table (no PRM), tables of an `openai:` policy, and the correction mode train checks."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from pipelines.stages.correct import CorrectConfig, run
from pipelines.tiny.tokenizer import save_char_tokenizer
from scope_data.schema import SCHEMAS, SCORED_FIELDS
from scope_data.shards import TableStore, read_arrow, read_manifest
from tests.test_correct import build_scored

SCORED_COLUMNS = [f.name for f in SCORED_FIELDS]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("policy_tok")
    save_char_tokenizer(out, model_max_length=256)
    return out


@pytest.fixture()
def tables(tmp_path: Path, policy_dir: Path) -> tuple[str, str]:
    """(scored, rollouts): the same rows, with and without the scored columns."""
    scored = str(tmp_path / "scored")
    rows = build_scored(scored, policy_dir)
    rollouts = str(tmp_path / "rollouts")
    plain = [{k: v for k, v in r.items() if k not in SCORED_COLUMNS} for r in rows]
    TableStore(rollouts, "rollouts").write(pa.Table.from_pylist(plain, SCHEMAS["rollouts"]), {})
    return scored, rollouts


def read(url: str) -> pl.DataFrame:
    return pl.from_arrow(read_arrow(url))


def test_luffy_reads_rollouts_like_scored(tables: tuple[str, str], tmp_path: Path) -> None:
    scored, rollouts = tables
    opts = {"teacher": "oracle:arith", "mode": "luffy", "max_corrections_per_group": 2, "seed": 3}
    run(CorrectConfig(scored=scored, out=str(tmp_path / "a"), **opts))
    run(CorrectConfig(scored=rollouts, out=str(tmp_path / "b"), **opts))
    a, b = read(str(tmp_path / "a")), read(str(tmp_path / "b"))
    # same rows, statuses, teacher outputs and seeds; only the scoring columns differ
    same = [c for c in a.columns if c not in SCORED_COLUMNS]
    assert a.select(same).equals(b.select(same))
    assert b["correct_status"].to_list() == a["correct_status"].to_list()
    policy = b.filter(pl.col("kind") == "policy")
    assert set(policy["score_status"]) == {"not_scored"} and set(policy["prm"]) == {""}
    assert policy["first_error"].null_count() == policy.height
    assert all(math.isnan(x) for x in b["threshold"]) and b["steps"].list.len().sum() == 0
    assert b.filter(pl.col("kind") == "corrected")["steps"].equals(
        a.filter(pl.col("kind") == "corrected")["steps"])
    sa, sb = ({k: v for k, v in read_manifest(str(tmp_path / t)).stats.items()
               if not k.endswith("_seconds")} for t in "ab")  # timings differ run to run
    assert sa == sb and read_manifest(str(tmp_path / "b")).config["mode"] == "luffy"
    with pytest.raises(ValueError, match="--mode scope reads scored tables"):
        run(CorrectConfig(scored=rollouts, out=str(tmp_path / "c"), teacher="oracle:arith"))


def test_openai_policy_table_is_scored_and_corrected(tmp_path: Path, policy_dir: Path) -> None:
    """The tokenizer of an `openai:` policy is its served model name (or --tokenizer), in
    score and correct alike."""
    from pipelines.stages.score import ScoreConfig
    from pipelines.stages.score import run as score

    rows = build_scored(str(tmp_path / "hf"), policy_dir, n=3)
    remote = f"openai:http://127.0.0.1:9/v1#{policy_dir}"
    plain = [{**{k: v for k, v in r.items() if k not in SCORED_COLUMNS}, "policy": remote}
             for r in rows]
    TableStore(str(tmp_path / "roll"), "rollouts").write(
        pa.Table.from_pylist(plain, SCHEMAS["rollouts"]), {})
    score(ScoreConfig(rollouts=str(tmp_path / "roll"), out=str(tmp_path / "scored")), quiet=True)
    run(CorrectConfig(scored=str(tmp_path / "scored"), out=str(tmp_path / "oa"),
                      teacher="oracle:arith"))
    run(CorrectConfig(scored=str(tmp_path / "hf"), out=str(tmp_path / "ref"),
                      teacher="oracle:arith"))
    oa, ref = read(str(tmp_path / "oa")), read(str(tmp_path / "ref"))
    cols = ["rollout_id", "kind", "correct_status", "response_token_ids", "off_policy_start"]
    assert oa.select(cols).equals(ref.select(cols)) and (oa["kind"] == "corrected").any()
    # a served name that is no tokenizer: --tokenizer / --policy-tokenizer name one, in both
    bad = [{**r, "policy": f"openai:http://127.0.0.1:9/v1#{tmp_path / 'served'}"} for r in plain]
    TableStore(str(tmp_path / "roll2"), "rollouts").write(
        pa.Table.from_pylist(bad, SCHEMAS["rollouts"]), {})
    with pytest.raises(ValueError, match="pass --tokenizer"):
        score(ScoreConfig(rollouts=str(tmp_path / "roll2"), out=str(tmp_path / "s2")),
              quiet=True)
    score(ScoreConfig(rollouts=str(tmp_path / "roll2"), out=str(tmp_path / "s2"),
                      tokenizer=str(policy_dir)), quiet=True)
    with pytest.raises(FileNotFoundError, match="pass --policy-tokenizer"):
        run(CorrectConfig(scored=str(tmp_path / "s2"), out=str(tmp_path / "c2"),
                          teacher="oracle:arith"))
    run(CorrectConfig(scored=str(tmp_path / "s2"), out=str(tmp_path / "c2"),
                      teacher="oracle:arith", policy_tokenizer=str(policy_dir)))
    assert read(str(tmp_path / "c2")).select(cols).equals(ref.select(cols))


def test_train_checks_the_correction_mode(tables: tuple[str, str], tmp_path: Path) -> None:
    from pipelines.training.inputs import load_rows
    from pipelines.training.train import TrainConfig

    scored, rollouts = tables
    for mode, src in (("luffy", rollouts), ("scope", scored)):
        run(CorrectConfig(scored=src, out=str(tmp_path / mode), teacher="oracle:arith",
                          mode=mode))

    def rows(data: str, algo: str):  # noqa: ANN202
        return load_rows(TrainConfig(data=data, policy="hf:/unused", output_dir="x", algo=algo))

    with pytest.raises(ValueError, match=r"made by `scope correct --mode luffy`; algo 'scope' "
                                         r"trains on `--mode scope` corrections$"):
        rows(str(tmp_path / "luffy"), "scope")
    with pytest.raises(ValueError, match="--mode scope`; algo 'luffy'"):
        rows(str(tmp_path / "scope"), "luffy")
    assert rows(str(tmp_path / "luffy"), "luffy")[0].stats["corrections_used"] > 0
    assert rows(str(tmp_path / "scope"), "scope")[0].stats["corrections_used"] > 0
    # corrections are ignored by grpo, whatever their mode; prm_dense needs every score
    assert rows(str(tmp_path / "luffy"), "grpo")[0].stats["corrections_ignored_by_algo"] > 0
    with pytest.raises(ValueError, match="algo 'prm_dense' needs PRM scores on every response"):
        rows(str(tmp_path / "luffy"), "prm_dense")
    with pytest.raises(ValueError, match="a 'rollouts' table cannot train algo 'luffy'"):
        rows(rollouts, "luffy")
