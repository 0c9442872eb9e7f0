"""Score with the `vllm:` PRM engine in its own process (vLLM spawns workers): test_prm_vllm.py.

usage: python tests/vllm_prm_script.py MODEL_DIR ITEMS.json OUT.json
ITEMS.json: [[problem, [steps...]], ...]; OUT.json: {"scores": [[...]], "status": [...]} or
{"error": "<exception type>: <message>"} when vLLM cannot serve the model.
"""

from __future__ import annotations

import json
import sys
import traceback


def main() -> None:
    model_dir, items_path, out_path = sys.argv[1:4]
    from pipelines.engines.base import load_prm, score_with_status

    items = [(p, list(s)) for p, s in json.load(open(items_path))]
    try:
        prm = load_prm(f"vllm:{model_dir}", family="cls", dtype="float32",
                       gpu_memory_utilization=0.3, max_length=256, enforce_eager=True)
        results = score_with_status(prm, items)
    except Exception as e:  # record vLLM's exact error for the test to assert on
        traceback.print_exc()
        json.dump({"error": f"{type(e).__name__}: {e}"}, open(out_path, "w"))
        return
    json.dump({"scores": [r.scores for r in results], "status": [r.status for r in results],
               "max_length": prm.max_length}, open(out_path, "w"))


if __name__ == "__main__":
    main()
