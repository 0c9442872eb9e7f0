"""Score with the `vllm:` PRM engine in its own process (vLLM spawns workers): test_prm_vllm.py.

usage: python tests/vllm_prm_script.py ITEMS.json OUT.json MODEL_DIR [MODEL_DIR ...]
ITEMS.json: [[problem, [steps...]], ...]; OUT.json: per model dir, {"scores": [[...]],
"status": [...], "max_length": N} or {"error": "<exception type>: <message>"} when vLLM cannot
serve that model. The models are loaded one after the other in this process.
"""

from __future__ import annotations

import gc
import json
import sys
import traceback


def main() -> None:
    items_path, out_path, *model_dirs = sys.argv[1:]
    from pipelines.engines.base import load_prm, score_with_status

    items = [(p, list(s)) for p, s in json.load(open(items_path))]
    out = {}
    for model_dir in model_dirs:
        try:
            prm = load_prm(f"vllm:{model_dir}", family="cls", dtype="float32",
                           gpu_memory_utilization=0.3, max_length=256, enforce_eager=True)
            results = score_with_status(prm, items)
            out[model_dir] = {"scores": [r.scores for r in results],
                              "status": [r.status for r in results],
                              "max_length": prm.max_length}
            prm.close()
            del prm
            gc.collect()
        except Exception as e:  # record vLLM's exact error for the test to assert on
            traceback.print_exc()
            out[model_dir] = {"error": f"{type(e).__name__}: {e}"}
    json.dump(out, open(out_path, "w"))


if __name__ == "__main__":
    main()
