"""Smoke test of benchmarks/gpu_suite.py's CPU fallback: one JSON object with positive figures,
whose own imports stay within what the lent GPU image has (torch, transformers, accelerate, peft
and their dependencies; polars is blocked, as it is absent there)."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
IMAGE = ("torch", "transformers", "accelerate", "peft")
OURS = ("pipelines", "scope_data", "cli", "__main__")
# Runs the suite as __main__ with polars blocked and lists the top-level packages that our own
# modules import (optional imports inside torch/transformers/accelerate are theirs to handle).
WRAPPER = """
import builtins, json, runpy, sys
OURS, seen, real = tuple(sys.argv[3].split(",")), set(), builtins.__import__

def record(name, globals=None, locals=None, fromlist=(), level=0):
    module = real(name, globals, locals, fromlist, level)
    top = name.split(".")[0]
    if level == 0 and (globals or {}).get("__name__", "").split(".")[0] in OURS:
        if getattr(sys.modules.get(top), "__spec__", None) is not None:  # not a placeholder
            seen.add(top)
    return module

builtins.__import__ = record
sys.modules["polars"] = None
out, sys.argv = sys.argv[1], [sys.argv[2], "--cpu"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open(out, "w") as f:
        json.dump(sorted(seen), f)
"""


def image_closure() -> set[str]:
    """Distributions the image's packages require, recursively (those installed here)."""
    seen: set[str] = set()
    todo = list(IMAGE)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def positive(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x > 0


def test_cpu_fallback_prints_one_json_within_the_image(tmp_path: Path) -> None:
    modules_file = tmp_path / "modules.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(modules_file), str(REPO / "benchmarks/gpu_suite.py"),
         ",".join(OURS)],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert res["device"] == "cpu"
    assert positive(res["matmul_ceiling"]["tflops"])
    train = res["train_step"]
    assert all(positive(train[k]) for k in ("params", "flops_per_token", "speedup_vs_plain"))
    for variant in ("plain_hf", "scope_loss"):
        assert all(positive(train[variant][k])
                   for k in ("step_s", "tokens_per_s", "share_of_ceiling"))
    lp = res["logprobs"]
    assert lp["max_abs_diff"] < 1e-4
    for variant in ("full", "chunked4", "chunked1"):
        assert positive(lp[variant]["time_s"]) and positive(lp[variant]["peak_mb"])
    assert all(positive(lp[v][k]) for v in ("chunked4", "chunked1")
               for k in ("memory_ratio", "time_ratio"))
    assert lp["chunked1"]["peak_mb"] < lp["full"]["peak_mb"]  # float32 logits: 8 MB vs 24 MB
    prm = res["prm_packing"]
    assert all(positive(prm[k]) for k in ("items", "steps", "tokens", "single_s", "speedup"))
    assert positive(prm["packed_8192"]["packed_s"]) and prm["packed_8192"]["max_abs_diff"] < 1e-4
    assert set(res["targets"]) == {"train_speedup_vs_plain", "train_share_of_ceiling",
                                   "logprobs_memory_ratio", "logprobs_time_ratio",
                                   "prm_packing_speedup"}

    dists = md.packages_distributions()
    allowed = image_closure()
    outside = []
    imported = json.loads(modules_file.read_text())
    assert {"torch", "transformers"} <= set(imported)
    for mod in imported:
        if mod in sys.stdlib_module_names or mod in OURS:
            continue
        owners = {canonicalize_name(d) for d in dists.get(mod, [])}
        if not owners & allowed:
            outside.append(f"{mod} ({', '.join(sorted(owners)) or 'no distribution'})")
    assert not outside, f"our modules import packages outside the GPU image: {outside}"
