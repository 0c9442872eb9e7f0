"""A tiny learned `hf-tag` PRM for the arith task, trained on CPU in about two minutes, cached.

The tokenizer is the tiny kit's character tokenizer plus the step tag ``ки`` (one added token;
``+`` and ``-`` are already characters). The model is a small Qwen2 causal LM trained from
scratch on arith responses labelled by the exact checker (``arith.check_steps``): canonical
solutions and solutions with one injected slip (a wrong result, a wrong operand, or a line that
does not continue from the previous result), each continued consistently. Input and read-out
are exactly those of :class:`pipelines.engines.prm_hf.HFTagPRM`::

    text = problem + " " + "\\n".join(step + " ки" for step in steps)
    loss = CE(softmax([z_+, z_-]) at each tag, label "+" if the step is correct else "-")

over the steps up to and including the first error (later steps carry no first-error signal;
"-" labels weighted by n(+)/n(-), at most 5), plus ``lm_weight`` times the next-character loss on
the correct steps before the first error (it teaches the modular arithmetic the tags judge), so
the built folder loads as ``hf-tag:<folder>``. Builds are cached under
``$SCOPE_CACHE/tiny-prm/<config hash>`` (written to a temporary folder, then renamed).
:func:`init_tiny_prm` makes random-init PRMs of both families for tests and benchmarks.
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
from pipelines.tiny.cache import META_FILE, cache_root, cached_build, torch_threads
from scope_data.first_error import locate, subset_metrics
from scope_data.tasks import arith

TAG = "ки"
STEP_TOKEN = " " + TAG
SEPARATOR = "<extra_0>"
RECIPE_VERSION = 2


def prm_tokenizer(extra_tokens: tuple[str, ...] = (TAG,), model_max_length: int = 512) -> Any:
    """The tiny kit's char tokenizer with `extra_tokens` added (right padding for scoring)."""
    from pipelines.tiny.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(model_max_length)
    tok.add_tokens(list(extra_tokens))
    tok.padding_side = "right"
    return tok


def init_tiny_prm(
    out_dir: str | Path,
    kind: str = "tag",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    head_dim: int = 32,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> Path:
    """Save a random-init tiny PRM: kind "tag" (Qwen2ForCausalLM, tag ``ки``) or "cls"
    (Qwen2ForTokenClassification, 2 labels, separator ``<extra_0>``)."""
    import torch
    from transformers import Qwen2ForCausalLM, Qwen2ForTokenClassification

    if kind not in ("tag", "cls"):
        raise ValueError(f"kind must be 'tag' or 'cls', got {kind!r}")
    out = Path(out_dir)
    tok = prm_tokenizer((TAG,) if kind == "tag" else (SEPARATOR,), max_position_embeddings)
    size = ModelSize(num_layers, hidden_size, num_heads, head_dim, intermediate_size)
    cfg = qwen2_config(tok, size, max_position_embeddings)
    torch.manual_seed(seed)
    if kind == "cls":
        cfg.num_labels = 2
        model = Qwen2ForTokenClassification(cfg)
    else:
        model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def optimizer_step(model: Any, lr: float, max_steps: int) -> Any:
    """The tiny PRMs' update: AdamW, 30 warmup steps then a linear decay to 5% of ``lr``,
    gradients clipped at norm 1. Returns ``step(loss) -> float`` (one update; the loss value)."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 30) * max(0.05, 1 - s / max_steps))

    def step(loss: Any) -> float:
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        return float(loss.item())

    return step


def padded_batch(encoded: list[tuple[Any, ...]], rng: random.Random, size: int, pad_id: int
                 ) -> tuple[list[tuple[Any, ...]], Any]:
    """``size`` examples drawn with replacement (token ids first) and their ids right-padded
    to the longest."""
    import torch

    batch = [encoded[rng.randrange(len(encoded))] for _ in range(size)]
    input_ids = torch.full((size, max(len(x[0]) for x in batch)), pad_id, dtype=torch.long)
    for r, x in enumerate(batch):
        input_ids[r, : len(x[0])] = torch.tensor(x[0])
    return batch, input_ids


# -- training data ---------------------------------------------------------------------------
def slipped_solution(problem: arith.ArithProblem, rng: random.Random) -> str:
    """A solution with one slip at a random step, continued consistently from it."""
    kind = rng.choice(["result", "operand", "carry"])
    if kind == "result":
        return arith.inject_error(problem, rng)[0]
    m = problem.modulus
    j = rng.randrange(len(problem.ops))
    lines, value = [], problem.start
    for i, (op, operand) in enumerate(problem.ops):
        if i == j and kind == "operand":
            operand = rng.choice([b for b in range(max(m, operand + 2)) if b != operand])
        if i == j and kind == "carry":
            value = rng.choice([v for v in range(m) if v != value])
        result = arith.apply_op(value, op, operand, m)
        lines.append(arith.step_line(value, op, operand, result))
        value = result
    lines.append(f"Answer: {value}")
    return "\n".join(lines)


def labelled_responses(
    count: int, seed: int, steps: tuple[int, int], modulus: int, error_share: float
) -> list[tuple[str, list[str], list[bool]]]:
    """(prompt, step lines, rule-checker verdicts) for `count` synthetic responses."""
    rng = random.Random(f"tiny-prm:{seed}")
    rows = []
    for p in arith.generate_problems(count, seed=seed, steps=steps, modulus=modulus):
        text = slipped_solution(p, rng) if rng.random() < error_share else p.solution
        lines = arith.response_lines(text)
        rows.append((p.prompt, lines, arith.check_steps(p, text)))
    return rows


@dataclass(frozen=True)
class TinyPRMConfig(ModelSize):
    """Everything that determines a tiny PRM build (hashed into its cache key)."""

    steps: tuple[int, int] = (3, 6)
    modulus: int = 10
    error_share: float = 0.5
    seed: int = 0
    num_examples: int = 20_000
    max_position_embeddings: int = 320
    max_steps: int = 400
    batch_size: int = 32
    learning_rate: float = 3e-3
    lm_weight: float = 1.0  # auxiliary next-character loss on the correct steps
    balance: bool = True  # weight "-" labels by n(+)/n(-) (at most 5)
    eval_examples: int = 500

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "steps": list(self.steps)}

    def hash(self) -> str:
        from scope_data.hashing import config_hash

        return config_hash({"v": RECIPE_VERSION, "kind": "tiny-prm", **self.to_dict()})


def build_tiny_prm(
    out_dir: str | Path | None = None, *, force: bool = False, num_threads: int | None = 2,
    verbose: bool = False, **overrides: Any,
) -> Path:
    """Train (or reuse from the cache) the tiny hf-tag PRM and return its folder.

    `overrides` set :class:`TinyPRMConfig` fields. The folder's ``scope_tiny.json`` holds the
    config, training figures and the held-out arith first-error metrics.
    """
    if "steps" in overrides:
        overrides["steps"] = tuple(overrides["steps"])
    cfg = TinyPRMConfig(**overrides)
    cached = cache_root() / "tiny-prm" / cfg.hash()
    target = Path(out_dir) if out_dir is not None else cached
    return cached_build(target, cached, cfg.hash(),
                        lambda tmp: _train(cfg, tmp, num_threads, verbose), force)


def _train(cfg: TinyPRMConfig, out: Path, num_threads: int | None, verbose: bool) -> None:
    with torch_threads(num_threads):
        _fit(cfg, out, verbose)


def _fit(cfg: TinyPRMConfig, out: Path, verbose: bool) -> None:
    """Train and evaluate the PRM; save model, tokenizer and ``scope_tiny.json`` into ``out``."""
    import torch
    import torch.nn.functional as F
    from transformers import Qwen2ForCausalLM

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    tok = prm_tokenizer((TAG,), cfg.max_position_embeddings)
    model = Qwen2ForCausalLM(qwen2_config(tok, cfg, cfg.max_position_embeddings))
    tag_id = tok.convert_tokens_to_ids(TAG)
    good_bad = torch.tensor([tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-")])
    rows = labelled_responses(cfg.num_examples, cfg.seed, cfg.steps, cfg.modulus, cfg.error_share)
    encoded = []
    n_labels = [0, 0]
    for prompt, lines, verdicts in rows:
        text = prompt + " " + "\n".join(s + STEP_TOKEN for s in lines)
        enc = tok(text, return_offsets_mapping=True)
        # labels up to the first error only: later steps are wrong by definition of the
        # running values, but first-error location never reads them (PRM800K phase 2 style)
        first = next((k for k, ok in enumerate(verdicts) if not ok), len(verdicts))
        labels = [0 if ok else 1 for ok in verdicts[: first + 1]]
        for y in labels:
            n_labels[y] += 1
        # auxiliary LM targets: the characters of the correct steps before the first error
        spans, cursor = [], len(prompt) + 1
        for k, line in enumerate(lines):
            if k < first:
                spans.append((cursor, cursor + len(line)))
            cursor += len(line) + len(STEP_TOKEN) + 1
        lm = [t for t, (a, _) in enumerate(enc["offset_mapping"])
              if t > 0 and any(x <= a < y for x, y in spans)]
        encoded.append((enc["input_ids"], labels, lm))
    bad_weight = min(5.0, n_labels[0] / max(1, n_labels[1])) if cfg.balance else 1.0
    class_weight = torch.tensor([1.0, bad_weight])
    step_fn = optimizer_step(model, cfg.learning_rate, cfg.max_steps)
    rng = random.Random(cfg.seed)
    model.train()
    losses = []
    for step in range(cfg.max_steps):
        batch, input_ids = padded_batch(encoded, rng, cfg.batch_size, tok.pad_token_id)
        mask = torch.zeros_like(input_ids)
        rows, cols, targets, lm_rows, lm_cols = [], [], [], [], []
        for r, (ids, ys, lm) in enumerate(batch):
            mask[r, : len(ids)] = 1
            tags = [t for t, x in enumerate(ids) if x == tag_id][: len(ys)]
            rows += [r] * len(tags)
            cols += tags
            targets += ys
            lm_rows += [r] * len(lm)
            lm_cols += lm
        hidden = model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        z = hidden[rows, cols] @ model.lm_head.weight[good_bad].T
        loss = F.cross_entropy(z, torch.tensor(targets), weight=class_weight)
        if cfg.lm_weight and lm_rows:
            prev = torch.tensor(lm_cols) - 1
            logits = model.lm_head(hidden[torch.tensor(lm_rows), prev])
            loss = loss + cfg.lm_weight * F.cross_entropy(
                logits, input_ids[torch.tensor(lm_rows), torch.tensor(lm_cols)]
            )
        losses.append(step_fn(loss))
        if verbose and step % 50 == 0:
            print(f"step {step} loss {losses[-1]:.4f}", flush=True)
    train_seconds = time.time() - t0
    model.eval()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    metrics = evaluate_tiny_prm(out, cfg)
    meta = {
        "format": "scope-tiny-prm", "recipe_version": RECIPE_VERSION, "config_hash": cfg.hash(),
        "config": cfg.to_dict(), "loads_as": "hf-tag:<this folder>",
        "train": {"steps": cfg.max_steps, "seconds": round(train_seconds, 1),
                  "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
                  "num_parameters": sum(p.numel() for p in model.parameters())},
        "eval": metrics, "build_seconds": round(time.time() - t0, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def evaluate_tiny_prm(model_dir: str | Path, cfg: TinyPRMConfig) -> dict[str, Any]:
    """Held-out arith first-error metrics (ProcessBench protocol, threshold 0.5)."""
    from pipelines.engines.prm_hf import HFTagPRM
    from pipelines.engines.spec import EngineSpec

    prm = HFTagPRM(EngineSpec("hf-tag", str(model_dir), role="prm"), device="cpu", dtype="float32")
    rows = labelled_responses(
        cfg.eval_examples, cfg.seed + 7_000_001, cfg.steps, cfg.modulus, cfg.error_share
    )
    scores = prm.score_batch([(p, lines) for p, lines, _ in rows])
    gold = [next((k for k, ok in enumerate(v) if not ok), -1) for _, _, v in rows]
    preds = [locate(s, 0.5) for s in scores]
    return subset_metrics("arith-synthetic", preds, gold).as_dict()
