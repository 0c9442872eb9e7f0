"""Tiny-model kit: a small Qwen2 policy warm-started on a synthetic task, built on CPU and cached.

``build_tiny_policy`` makes a character tokenizer (``pipelines.tiny.tokenizer``) and a 2-layer
Qwen2 causal LM, trains it with TRL's ``SFTTrainer`` (completion-only loss, prompt-completion
rows) on canonical arith solutions of which a share ``error_rate`` carries one injected step
error, and saves a normal model folder (safetensors, tokenizer, chat template) plus
``scope_tiny.json`` (config, training figures and the measured response mix). Builds are cached
under ``$SCOPE_CACHE/tiny/<config hash>`` (default ``~/.cache/scope``); a build happens in a
temporary folder renamed into place, so a crashed or concurrent build never leaves a half-written
folder behind. ``evaluate_mix`` measures the share of correct responses and where failed ones go
wrong, on held-out problems. The arith policy's config is :class:`TinyConfig`; the countdown
policy's is ``pipelines.tiny.countdown.CountdownTinyConfig`` (same recipe, its own task fields):
a config names its ``task`` and gives its ``training_texts()`` and ``eval_problems()``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pipelines.tiny.architecture import ModelSize, qwen2_config
from pipelines.tiny.cache import META_FILE, cache_root, cached_build, torch_threads
from pipelines.tiny.cache import quiet as _quiet
from scope_data.tasks import arith, exact_task

RECIPE_VERSION = 1  # bump when the training code changes what a config produces
TEACHER_MAX_STEPS = 2400
EVAL_SEED_OFFSET = 1_000_003  # evaluation problems come from another seed range than training


@dataclass(frozen=True)
class TinyConfig(ModelSize):
    """Everything that determines a tiny build (hashed into its cache key)."""

    steps: tuple[int, int] = (3, 6)
    modulus: int = 10
    max_operand: int | None = None
    error_rate: float = 0.3
    seed: int = 0
    max_position_embeddings: int = 256
    max_steps: int = 1600
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_ratio: float = 0.03
    lr_schedule: str = "constant_with_warmup"  # transformers lr_scheduler_type
    weight_decay: float = 0.0
    num_examples: int = 20_000
    group_by_length: bool = False  # length-sorted batches: less padding, but hurt learning here
    # training problems have train_min_steps..steps[1] operations (None: steps[0]); short
    # problems teach the model to find the k-th operation of the prompt sooner
    train_min_steps: int | None = 1
    task: ClassVar[str] = "arith"  # not a field: arith hashes stay what they were

    def training_texts(self) -> list[tuple[str, str]]:
        """The SFT ``(prompt, completion)`` pairs (:func:`training_texts`)."""
        return training_texts(self)

    def eval_problems(self, n: int, seed: int = 0) -> list[arith.ArithProblem]:
        """``n`` held-out problems: another seed range than training, no training prompt."""
        seen = {p for p, _ in training_texts(self)}
        pool = arith.generate_problems(
            2 * n + 64, seed=EVAL_SEED_OFFSET + self.seed + seed, steps=self.steps,
            modulus=self.modulus, max_operand=self.max_operand,
        )
        return [p for p in pool if p.prompt not in seen][:n]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "steps": list(self.steps)}

    def hash(self) -> str:
        """Short stable hash of the config and recipe version."""
        payload = json.dumps({"v": RECIPE_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def tiny_config(
    *,
    steps: tuple[int, int] = (3, 6),
    modulus: int = 10,
    max_operand: int | None = None,
    error_rate: float = 0.3,
    teacher: bool = False,
    seed: int = 0,
    **overrides: Any,
) -> TinyConfig:
    """The :class:`TinyConfig` of a build; ``teacher=True`` forces ``error_rate`` 0.

    ``overrides`` set any other field. A teacher trains ``TEACHER_MAX_STEPS`` steps unless told
    otherwise: it has no upper accuracy bound to respect, and the extra steps make the sudden
    drop of the loss (around step 700-1400 with this recipe) happen within the budget.
    """
    if teacher:
        overrides.setdefault("max_steps", TEACHER_MAX_STEPS)
    return TinyConfig(
        steps=(int(steps[0]), int(steps[1])),
        modulus=modulus,
        max_operand=max_operand,
        error_rate=0.0 if teacher else error_rate,
        seed=seed,
        **overrides,
    )


def tiny_cache_dir(cfg: TinyConfig) -> Path:
    """Where the cached build of ``cfg`` lives: ``$SCOPE_CACHE/tiny/<hash>``."""
    return cache_root() / "tiny" / cfg.hash()


def build_tiny_policy(
    out_dir: str | Path | None = None,
    *,
    steps: tuple[int, int] = (3, 6),
    modulus: int = 10,
    max_operand: int | None = None,
    error_rate: float = 0.3,
    teacher: bool = False,
    seed: int = 0,
    max_steps: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    eval_problems: int = 256,
    num_threads: int | None = None,
    force: bool = False,
    verbose: bool = False,
    **overrides: Any,
) -> Path:
    """Build (or reuse) a warm-started tiny policy and return its model folder.

    ``teacher=True`` trains on clean solutions only (``error_rate`` 0). ``max_steps``,
    ``batch_size``, ``learning_rate`` and ``overrides`` set :class:`TinyConfig` fields (``None``:
    default). Without ``out_dir`` the build lives in the cache, keyed by the config hash; with
    it, a cached build is copied there, or the build happens there. ``eval_problems`` sizes the
    mix measurement written to ``scope_tiny.json``; ``force`` rebuilds.
    """
    named = {"max_steps": max_steps, "batch_size": batch_size, "learning_rate": learning_rate}
    cfg = tiny_config(
        steps=steps, modulus=modulus, max_operand=max_operand, error_rate=error_rate,
        teacher=teacher, seed=seed, **{k: v for k, v in named.items() if v is not None},
        **overrides,
    )
    return build_policy(cfg, out_dir, eval_problems=eval_problems, num_threads=num_threads,
                        force=force, verbose=verbose)


def build_policy(
    cfg: Any, out_dir: str | Path | None = None, *, eval_problems: int = 256,
    num_threads: int | None = None, force: bool = False, verbose: bool = False,
) -> Path:
    """Build (or reuse) the policy of any task config (see :func:`build_tiny_policy`)."""
    cached = tiny_cache_dir(cfg)
    target = Path(out_dir) if out_dir is not None else cached
    with _quiet(verbose):
        return cached_build(
            target, cached, cfg.hash(),
            lambda tmp: _build(cfg, tmp, eval_problems, num_threads, verbose), force,
        )


def training_texts(cfg: TinyConfig) -> list[tuple[str, str]]:
    """``(prompt, completion)`` pairs: canonical solutions, ``error_rate`` of them corrupted."""
    rng = random.Random(f"tiny-train:{cfg.seed}")
    lo = cfg.steps[0] if cfg.train_min_steps is None else min(cfg.train_min_steps, cfg.steps[0])
    problems = arith.generate_problems(
        cfg.num_examples, seed=cfg.seed, steps=(lo, cfg.steps[1]), modulus=cfg.modulus,
        max_operand=cfg.max_operand,
    )
    pairs = []
    for p in problems:
        text = arith.inject_error(p, rng)[0] if rng.random() < cfg.error_rate else p.solution
        pairs.append((p.prompt, text))
    return pairs


def _threads(num_threads: int | None) -> Any:
    """Torch threads for a build or evaluation (default: up to 4), restored afterwards."""
    return torch_threads(num_threads or min(4, os.cpu_count() or 1))


def _build(
    cfg: Any, out: Path, eval_problems: int, num_threads: int | None, verbose: bool
) -> None:
    """Train the tiny policy into ``out``, measure its mix and write ``scope_tiny.json``."""
    import torch
    import transformers
    import trl

    t0 = time.time()
    with _threads(num_threads):
        train = _train(cfg, out, verbose)
    figures = evaluate_mix(out, n_problems=eval_problems, num_threads=num_threads, _cfg=cfg)
    meta = {
        "format": "scope-tiny",
        "recipe_version": RECIPE_VERSION,
        "config_hash": cfg.hash(),
        "config": cfg.to_dict(),
        "train": train,
        "mix": figures,
        "build_seconds": round(time.time() - t0, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "trl": trl.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if verbose:
        print(json.dumps({k: meta[k] for k in ("mix", "build_seconds")}, indent=2))


def _train(cfg: Any, out: Path, verbose: bool) -> dict[str, Any]:
    """SFT the model from scratch with TRL, save model + tokenizer to ``out``, return figures."""
    import torch
    from datasets import Dataset
    from transformers import GenerationConfig, PrinterCallback, Qwen2ForCausalLM
    from trl import SFTConfig, SFTTrainer

    from pipelines.tiny.tokenizer import save_char_tokenizer
    from pipelines.training.trainer import RichProgress

    tok = save_char_tokenizer(out, model_max_length=cfg.max_position_embeddings)
    torch.manual_seed(cfg.seed)
    model = Qwen2ForCausalLM(qwen2_config(tok, cfg, cfg.max_position_embeddings))
    # prompt-completion rows; the prompt is the rendered chat template, so the completion-only
    # loss covers exactly the response and its <|eos|> (TRL appends the EOS)
    gen_prompt = tok.apply_chat_template(
        [{"role": "user", "content": "{}"}], add_generation_prompt=True, tokenize=False
    )
    rows = [
        {"prompt": gen_prompt.replace("{}", p), "completion": c}
        for p, c in cfg.training_texts()
    ]
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(
            output_dir=scratch,
            max_steps=cfg.max_steps,
            per_device_train_batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            lr_scheduler_type=cfg.lr_schedule,
            warmup_steps=int(cfg.warmup_ratio * cfg.max_steps),
            weight_decay=cfg.weight_decay,
            max_length=cfg.max_position_embeddings,
            completion_only_loss=True,
            gradient_checkpointing=False,
            bf16=False,
            use_cpu=True,
            seed=cfg.seed,
            data_seed=cfg.seed,
            logging_steps=max(1, cfg.max_steps // 10),
            save_strategy="no",
            report_to="none",
            disable_tqdm=not verbose,
            dataloader_num_workers=0,
            train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        )
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok
        )
        if not verbose:
            trainer.remove_callback(PrinterCallback)
            trainer.add_callback(RichProgress("tiny policy build"))
        t_train = time.time()
        result = trainer.train()
        seconds = time.time() - t_train
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    model.config.use_cache = True  # the trainer turns it off
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(str(out))
    return {
        "steps": result.global_step,
        "seconds": round(seconds, 1),
        "steps_per_second": round(result.global_step / seconds, 2),
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
    }


def load_meta(model_dir: str | Path) -> dict[str, Any]:
    """The ``scope_tiny.json`` of a build."""
    return json.loads((Path(model_dir) / META_FILE).read_text())


def sample_responses(
    model: Any,
    tok: Any,
    prompts: list[str],
    *,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 128,
    max_new_tokens: int = 128,
) -> list[str]:
    """Sample one response per prompt with HF ``generate`` (left padding, batched)."""
    import torch

    tok.padding_side = "left"
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                tokenize=False)
        for p in prompts
    ]
    out: list[str] = []
    torch.manual_seed(seed)
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True,
                      add_special_tokens=False)
            sample = temperature > 0
            gen = model.generate(
                **enc,
                do_sample=sample,
                temperature=temperature if sample else None,
                top_k=0 if sample else None,
                top_p=1.0 if sample else None,
                max_new_tokens=max_new_tokens,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            out.extend(tok.batch_decode(new, skip_special_tokens=True))
    return out


def evaluate_mix(
    model_dir: str | Path,
    n_problems: int = 256,
    temperature: float = 1.0,
    seed: int = 0,
    *,
    batch_size: int = 128,
    num_threads: int | None = None,
    _cfg: Any = None,
) -> dict[str, Any]:
    """Response mix of a tiny policy on held-out problems of its task, one sample per problem.

    Returns ``correct_share`` (verifier: final answer right), ``process_correct_share`` (every
    step right), ``non_step0_share`` (among failed responses, the share whose first error by
    the task's ``first_error`` is after step 0), ``first_error_hist`` (failed responses per
    first-error index) and the counts. Problems (``cfg.eval_problems``) come from a seed range
    disjoint from training and exclude any prompt seen in training.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _cfg or config_from_meta(load_meta(model_dir))
    problems = cfg.eval_problems(n_problems, seed)
    task = exact_task(cfg.task)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with _threads(num_threads):
        responses = sample_responses(
            model, tok, [p.prompt for p in problems], temperature=temperature, seed=seed,
            batch_size=batch_size, max_new_tokens=cfg.max_position_embeddings // 2,
        )
    correct = [task.is_correct(p, r) for p, r in zip(problems, responses, strict=True)]
    errors = [task.first_error(p, r) for p, r in zip(problems, responses, strict=True)]
    failed = [e for e, ok in zip(errors, correct, strict=True) if not ok]
    hist = Counter(failed)
    n = len(problems)
    return {
        "n": n,
        "temperature": temperature,
        "correct_share": sum(correct) / n,
        "process_correct_share": sum(e == -1 for e in errors) / n,
        "failed": len(failed),
        "non_step0_share": sum(e != 0 for e in failed) / len(failed) if failed else 0.0,
        "first_error_hist": {str(k): hist[k] for k in sorted(hist)},
    }


def config_from_meta(meta: dict[str, Any]) -> Any:
    """The config of a build from its ``scope_tiny.json`` (arith unless it names a task)."""
    raw = meta["config"]
    if raw.get("task", "arith") == "countdown":
        from pipelines.tiny.countdown import CountdownTinyConfig

        return CountdownTinyConfig.from_dict(raw)
    return TinyConfig(**_config_fields(raw))


def _config_fields(raw: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(TinyConfig)}
    fields = {k: v for k, v in raw.items() if k in known}
    if "steps" in fields:
        fields["steps"] = tuple(fields["steps"])
    return fields
