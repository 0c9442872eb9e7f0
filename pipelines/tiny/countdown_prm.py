"""A tiny learned `hf-cls` PRM for countdown, trained on the process oracle's labels of the tiny
countdown policy's own rollouts; cached like the other tiny builds.

Data: the tiny countdown policy (:mod:`pipelines.tiny.countdown`, default build) samples
``samples`` responses at temperature 1 to each of ``problems`` generated training problems, and
``countdown.check_steps`` labels every line: the exact "can this prefix still succeed" label a
Math-Shepherd-style PRM estimates. The model is a Qwen2 token classifier (Qwen2.5-Math-PRM
style, 2 labels) started from the policy's own weights (a new head), as Qwen2.5-Math-PRM starts
from its instruct model; its inputs are built
by the scoring engine's own encoder
(:class:`pipelines.engines.prm_inputs.PRMInput`, family ``cls``), so training and
``hf-cls:<folder>`` scoring read the same positions::

    chat(system, problem, s_1 <extra_0> s_2 <extra_0> ... s_K <extra_0>)
    loss = CE(logits at the k-th separator, label 1 if step k is right else 0)

over the steps up to and including the first error (later steps carry no first-error signal),
"wrong" labels weighted by n(right)/n(wrong), at most 5. Held-out: the same policy's responses
to problems of another seed (about 1% of them may repeat a training prompt); the ProcessBench
first-error metrics (threshold 0.5) go to
``scope_tiny.json`` (``eval``), and ``scope prm-eval`` measures the same on any table.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.tiny.architecture import ModelSize, qwen2_config
from pipelines.tiny.cache import META_FILE, cache_root, cached_build, quiet, torch_threads
from pipelines.tiny.prm import (
    SEPARATOR,
    optimizer_step,
    padded_batch,
    prm_tokenizer,
)
from scope_data.first_error import locate, subset_metrics
from scope_data.tasks import countdown as cd
from scope_data.tasks.arith import first_error_of

RECIPE_VERSION = 2  # 2: a right response labels every line (1 dropped them)
EVAL_SEED_OFFSET = 7_000_001  # held-out problems come from another seed range


@dataclass(frozen=True)
class CountdownPRMConfig(ModelSize):
    """Everything that determines a tiny countdown PRM build (hashed into its cache key)."""

    problems: int = 3000
    samples: int = 4
    seed: int = 0
    max_position_embeddings: int = 320
    max_steps: int = 1200
    batch_size: int = 32
    learning_rate: float = 3e-4  # 2e-3 (800 steps) learned only each position's base rate
    eval_problems: int = 400
    policy: tuple[tuple[str, Any], ...] = ()  # CountdownTinyConfig fields of the policy
    # start from the policy's weights (its vocabulary plus the separator; a new 2-label head);
    # False: random init of the sizes above
    init_from_policy: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "policy": dict(self.policy)}

    def hash(self) -> str:
        from pipelines.tiny.countdown import CountdownTinyConfig
        from scope_data.hashing import config_hash

        policy = CountdownTinyConfig(**dict(self.policy)).hash()
        return config_hash({"v": RECIPE_VERSION, "kind": "tiny-prm-countdown",
                            **self.to_dict(), "policy": policy})


def policy_folder(cfg: CountdownPRMConfig) -> Path:
    """The tiny countdown policy the PRM learns from (built or reused from the cache)."""
    from pipelines.tiny.countdown import build_tiny_countdown_policy

    return build_tiny_countdown_policy(**dict(cfg.policy))


def labelled_rollouts(cfg: CountdownPRMConfig, count: int, seed: int
                      ) -> list[tuple[str, list[str], list[bool]]]:
    """(prompt, response lines, oracle verdicts): ``cfg.samples`` policy responses at T=1 to
    each of ``count`` problems drawn with ``seed``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.tiny.countdown import CountdownTinyConfig
    from pipelines.tiny.policy import sample_responses

    policy_cfg = CountdownTinyConfig(**dict(cfg.policy))
    path = policy_folder(cfg)
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    problems = cd.generate_problems(count, seed=seed, numbers=policy_cfg.numbers,
                                    modulus=policy_cfg.modulus)
    prompts = [p for p in problems for _ in range(cfg.samples)]
    texts = sample_responses(model, tok, [p.prompt for p in prompts], temperature=1.0,
                             seed=seed, batch_size=256,
                             max_new_tokens=policy_cfg.max_position_embeddings // 2)
    return [(p.prompt, cd.response_lines(t), cd.check_steps(p, t))
            for p, t in zip(prompts, texts, strict=True) if cd.response_lines(t)]


def build_countdown_prm(
    out_dir: str | Path | None = None, *, force: bool = False, num_threads: int | None = 2,
    verbose: bool = False, **overrides: Any,
) -> Path:
    """Train (or reuse from the cache) the tiny countdown hf-cls PRM and return its folder.

    ``overrides`` set :class:`CountdownPRMConfig` fields (``policy``: a mapping of the tiny
    policy's config fields).
    """
    if "policy" in overrides:
        overrides["policy"] = tuple(sorted(dict(overrides["policy"]).items()))
    cfg = CountdownPRMConfig(**overrides)
    key = cfg.hash()
    cached = cache_root() / "tiny-prm" / key
    target = Path(out_dir) if out_dir is not None else cached

    def build(tmp: Path) -> None:
        with torch_threads(num_threads):
            _fit(cfg, tmp, verbose)

    with quiet(verbose):
        return cached_build(target, cached, key, build, force)


def _fit(cfg: CountdownPRMConfig, out: Path, verbose: bool) -> None:
    """Sample and label rollouts, train the classifier, evaluate it, write the folder."""
    import torch
    import torch.nn.functional as F
    from transformers import Qwen2ForTokenClassification

    from pipelines.engines.prm_inputs import PRMInput

    t0 = time.time()
    rows = labelled_rollouts(cfg, cfg.problems, cfg.seed)
    sample_seconds = time.time() - t0
    tok = prm_tokenizer((SEPARATOR,), cfg.max_position_embeddings)
    encoder = PRMInput(tok, "cls")
    torch.manual_seed(cfg.seed)
    if cfg.init_from_policy:  # the policy's char vocabulary is the PRM's minus the separator
        model = Qwen2ForTokenClassification.from_pretrained(
            str(policy_folder(cfg)), num_labels=2,
            max_position_embeddings=cfg.max_position_embeddings)
        model.resize_token_embeddings(len(tok))
    else:
        qcfg = qwen2_config(tok, cfg, cfg.max_position_embeddings)
        qcfg.num_labels = 2
        model = Qwen2ForTokenClassification(qcfg)
    encoded, counts = [], [0, 0]  # counts: wrong, right labels
    for prompt, lines, verdicts in rows:
        ids, positions = encoder.encode(prompt, lines)
        first = next((k for k, ok in enumerate(verdicts) if not ok), len(verdicts))
        labels = [int(ok) for ok in verdicts[: first + 1]]  # a right response: every line
        if len(ids) > cfg.max_position_embeddings:
            continue  # a runaway response; scoring would truncate it too
        for y in labels:
            counts[y] += 1
        encoded.append((ids, positions[: len(labels)], labels))
    if not encoded:
        raise ValueError(f"countdown PRM: none of the {len(rows)} sampled responses fits "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    weight = torch.tensor([min(5.0, counts[1] / max(1, counts[0])), 1.0])
    step_fn = optimizer_step(model, cfg.learning_rate, cfg.max_steps)
    rng = random.Random(cfg.seed)
    model.train()
    losses = []
    for step in range(cfg.max_steps):
        batch, input_ids = padded_batch(encoded, rng, cfg.batch_size, tok.pad_token_id)
        rows_idx, cols, targets = [], [], []
        for r, (_, positions, labels) in enumerate(batch):
            rows_idx += [r] * len(positions)
            cols += positions
            targets += labels
        # right padding never changes a causal decoder's outputs at real positions
        logits = model(input_ids=input_ids).logits[rows_idx, cols]
        loss = F.cross_entropy(logits, torch.tensor(targets), weight=weight)
        losses.append(step_fn(loss))
        if verbose and step % 50 == 0:
            print(f"step {step} loss {losses[-1]:.4f}", flush=True)
    model.eval()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    meta = {
        "format": "scope-tiny-prm", "recipe_version": RECIPE_VERSION, "config_hash": cfg.hash(),
        "config": cfg.to_dict(), "task": "countdown", "loads_as": "hf-cls:<this folder>",
        "data": {"responses": len(encoded), "right_labels": counts[1],
                 "wrong_labels": counts[0], "sample_seconds": round(sample_seconds, 1)},
        "train": {"steps": cfg.max_steps, "seconds": round(time.time() - t0 - sample_seconds, 1),
                  "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
                  "num_parameters": sum(p.numel() for p in model.parameters())},
        "eval": evaluate_countdown_prm(out, cfg),
        "build_seconds": round(time.time() - t0, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def evaluate_countdown_prm(model_dir: str | Path, cfg: CountdownPRMConfig) -> dict[str, Any]:
    """First-error metrics on the policy's responses to held-out problems (threshold 0.5)."""
    from pipelines.engines.prm_hf import HFClsPRM
    from pipelines.engines.spec import EngineSpec

    prm = HFClsPRM(EngineSpec("hf-cls", str(model_dir), role="prm"), device="cpu",
                   dtype="float32")
    per_problem = max(1, cfg.samples // 2)
    rows = labelled_rollouts(dataclasses.replace(cfg, samples=per_problem),
                             cfg.eval_problems, cfg.seed + EVAL_SEED_OFFSET)
    scores = prm.score_batch([(p, lines) for p, lines, _ in rows])
    gold = [first_error_of(v, len(v)) for _, _, v in rows]  # -1: every line right
    preds = [locate(s, 0.5) for s in scores]
    return subset_metrics("countdown-policy-rollouts", preds, gold).as_dict()
