"""The PRM engine options offered as CLI flags (`scope score`, `scope prm-eval`).

A config's `prm_options` is a plain dict passed to `load_prm(spec, **prm_options)` (recipes may
set any engine option there); on the command line it is `--prm-options JSON` plus one flag per
field below (given values only, overriding the JSON object's keys).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.config import option

PRM_HELP = ("PRM: rule:arith | rule:countdown | hf-cls:<model> | hf-tag:<model> | vllm:<model> | "
            "noisy:<prm>?f1=F&seed=S")
PRM_OPTIONS_HELP = ("PRM engine options as a JSON object (any load_prm keyword, e.g. "
                    "'{\"tensor_parallel_size\": 2}'); the flags below override its keys")


@dataclass
class PRMOptions:
    step_token: str | None = option(
        None, help="PRM step separator/tag (default: <extra_0> for hf-cls, ' ки' for hf-tag)")
    good_token: str | None = option(None, help="hf-tag: token meaning 'correct' (+)")
    bad_token: str | None = option(None, help="hf-tag: token meaning 'wrong' (-)")
    trust_remote_code: bool = option(False, flags="--trust-remote-code",
                                     help="allow the PRM's own model code (off by default)")
    max_length: int | None = option(
        None, help="PRM context in tokens (default: the model's); longer inputs are truncated")
    batch_tokens: int | None = option(
        None, help="hf PRMs: token budget per length-packed batch (default 8192)")
    device: str | None = option(None, help="hf PRMs: device (cpu, cuda)")
    dtype: str | None = option(None, help="PRM dtype: auto | float32 | bfloat16")
    family: str | None = option(None, help="vllm PRMs: cls (2-label head) | tag")
    gpu_memory_utilization: float | None = option(
        None, help="vllm: share of GPU memory (RAM on CPU)")
