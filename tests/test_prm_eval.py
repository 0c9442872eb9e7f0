"""prm-eval: ProcessBench protocol on the public files and on arith rollout tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.engines.spec import EngineSpec
from pipelines.stages.prm_eval import PRMEvalConfig, run
from scope_data.benchmarks import load_benchmark
from tests.helpers_score import arith_rollout_rows, char_tokenizer_dir, write_rollouts

FILES = ("processbench.gsm8k.json", "processbench.math.json")


class GoldPRM:
    """Returns 1.0 before the gold first error, 0.0 at it, 1.0 after (looked up by content)."""

    spec = EngineSpec("gold", "lookup")
    max_length = 1 << 30

    def __init__(self, paths: list[Path]):
        self.labels = {}
        for path in paths:
            for r in json.loads(path.read_text()):
                self.labels[(r["problem"], tuple(r["steps"]))] = r["label"]

    def score_batch(self, items: list[tuple[str, list[str]]]) -> list[list[float]]:
        out = []
        for problem, steps in items:
            g = self.labels[(problem, tuple(steps))]
            out.append([0.0 if k == g else 1.0 for k in range(len(steps))])
        return out


class ConstantPRM:
    spec = EngineSpec("const", "1")
    max_length = 1 << 30

    def __init__(self, value: float = 0.99):
        self.value = value

    def score_batch(self, items: list[tuple[str, list[str]]]) -> list[list[float]]:
        return [[self.value] * len(steps) for _, steps in items]


class HashPRM:
    """Deterministic pseudo-random scores from the step text."""

    spec = EngineSpec("hash", "x")
    max_length = 1 << 30

    def score_batch(self, items: list[tuple[str, list[str]]]) -> list[list[float]]:
        import hashlib

        return [[int(hashlib.md5(s.encode()).hexdigest()[:6], 16) / 0xFFFFFF for s in steps]
                for _, steps in items]


def test_gold_prm_scores_f1_100_on_both_files(shared_data: Path) -> None:
    paths = [shared_data / f for f in FILES]
    res = run(PRMEvalConfig([str(p) for p in paths]), prm=GoldPRM(paths))
    assert [s.name for s in res.subsets] == ["gsm8k", "math"]
    assert [(s.n_erroneous, s.n_correct) for s in res.subsets] == [(207, 193), (594, 406)]
    for s in res.subsets:
        assert s.f1 == 100.0 and s.acc_erroneous == 100.0 and s.acc_correct == 100.0
    assert res.average_f1 == 100.0


def test_always_correct_prm_has_zero_accuracy_on_erroneous(shared_data: Path) -> None:
    paths = [str(shared_data / f) for f in FILES]
    res = run(PRMEvalConfig(paths), prm=ConstantPRM())
    for s in res.subsets:
        assert s.acc_erroneous == 0.0 and s.acc_correct == 100.0 and s.f1 == 0.0


def independent_f1(path: Path, prm: HashPRM, tau: float) -> float:
    """ProcessBench's own definition, written from the paper: exact-index match, two
    accuracies, harmonic mean."""
    data = json.loads(path.read_text())
    matches_err, matches_cor = [], []
    for r in data:
        scores = prm.score_batch([(r["problem"], r["steps"])])[0]
        pred = next((k for k, x in enumerate(scores) if x < tau), -1)
        (matches_err if r["label"] != -1 else matches_cor).append(pred == r["label"])
    acc1 = sum(matches_err) / len(matches_err) * 100
    acc2 = sum(matches_cor) / len(matches_cor) * 100
    return 2 * acc1 * acc2 / (acc1 + acc2)


def test_f1_matches_independent_computation(shared_data: Path) -> None:
    paths = [shared_data / f for f in FILES]
    prm = HashPRM()
    res = run(PRMEvalConfig([str(p) for p in paths], threshold=0.15), prm=prm)
    for s, path in zip(res.subsets, paths, strict=True):
        assert s.f1 == pytest.approx(independent_f1(path, prm, 0.15), abs=1e-9)
        assert 0 < s.f1 < 100
    # auto: tuned on the first file (gsm8k), applied to both; never worse there than 0.15
    auto = run(PRMEvalConfig([str(p) for p in paths], threshold="auto"), prm=prm)
    assert auto.subsets[0].f1 >= res.subsets[0].f1
    assert auto.subsets[0].f1 == pytest.approx(independent_f1(paths[0], prm, auto.threshold))
    assert auto.subsets[1].f1 == pytest.approx(independent_f1(paths[1], prm, auto.threshold))


def test_rule_prm_on_an_arith_rollouts_table_is_perfect(tmp_path: Path) -> None:
    tok = char_tokenizer_dir(tmp_path / "tok")
    rows = arith_rollout_rows(tok, n_problems=30)
    write_rollouts(str(tmp_path / "rollouts"), rows)
    res = run(PRMEvalConfig([str(tmp_path / "rollouts")], prm="rule:arith"))
    (s,) = res.subsets
    assert s.f1 == 100.0 and s.n_correct == 30 and s.n_erroneous > 30
    assert res.excluded["rollouts"] > 0  # empty and unfinished responses are left out
    # the constant PRM on the same table misses every error
    res = run(PRMEvalConfig([str(tmp_path / "rollouts")]), prm=ConstantPRM())
    assert res.subsets[0].acc_erroneous == 0.0


def test_bad_benchmarks(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"problem": "p", "steps": ["a"]}]))
    with pytest.raises(ValueError, match="record 0 has no label"):
        load_benchmark(str(bad))
    with pytest.raises(FileNotFoundError):
        load_benchmark(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="--threshold"):
        run(PRMEvalConfig([str(bad)], threshold="high"), prm=ConstantPRM())
