"""Run the vllm engine in its own process (vLLM spawns workers): used by test_engine_vllm.py.

usage: python tests/vllm_generate_script.py MODEL_DIR REQUESTS.json OUT.json [NEW_MODEL_DIR]
REQUESTS.json: a list of GenerationRequest fields; OUT.json: per request, a list of results.
With NEW_MODEL_DIR the engine first generates once on MODEL_DIR (filling the prefix cache), then
loads NEW_MODEL_DIR's weights in place and the results written are those after the update
(`same_llm`: the update kept the running `vllm.LLM`, no restart). Without it, `raw` holds the
token ids and text of plain `llm.generate` with vLLM's own detokenizer (`detokenize=True`) on the
same engine and requests, per request and sample.
"""

from __future__ import annotations

import dataclasses
import json
import sys


def main() -> None:
    model_dir, req_path, out_path = sys.argv[1:4]
    new_model = sys.argv[4] if len(sys.argv) > 4 else None
    from pipelines.engines.base import GenerationRequest, load_generation_engine

    requests = [GenerationRequest(**r) for r in json.load(open(req_path))]
    engine = load_generation_engine(
        f"vllm:{model_dir}", dtype="float32", gpu_memory_utilization=0.3, max_model_len=256,
        enforce_eager=True,
    )
    results = engine.generate(requests)
    llm = engine.llm
    raw = None
    if new_model:
        engine.update_weights(new_model)
        results = engine.generate(requests)
    else:
        from vllm import SamplingParams

        outs = llm.generate(
            [{"prompt_token_ids": r.prompt_token_ids + r.prefix_token_ids} for r in requests],
            [SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                            max_tokens=r.max_new_tokens, seed=r.seed) for r in requests],
            use_tqdm=False)
        raw = [[{"token_ids": list(o.token_ids), "text": o.text}
                for o in sorted(out.outputs, key=lambda o: o.index)] for out in outs]
    import time

    import psutil
    from vllm.platforms import current_platform

    def engine_cpu() -> float:  # the CPU seconds of the engine's processes (core and worker)
        return sum(sum(p.cpu_times()[:2]) for p in psutil.Process().children(recursive=True))

    before = engine_cpu()
    time.sleep(1.5)  # idle after a generate call
    idle_cpu = engine_cpu() - before
    json.dump({"max_model_len": engine.max_model_len, "same_llm": engine.llm is llm,
               "idle_cpu_seconds": idle_cpu, "cpu_platform": current_platform.is_cpu(),
               "own_decode": engine._rust_tokenizer is not None,
               "results": [[dataclasses.asdict(r) for r in rs] for rs in results], "raw": raw},
              open(out_path, "w"))


if __name__ == "__main__":
    main()
