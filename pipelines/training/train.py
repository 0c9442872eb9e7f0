"""`scope train`: the mixed-policy trainer (DESIGN.md sections 1.5-1.6 and 5).

`run(cfg)` reads the corrected table, assembles groups and advantages
(`scope_data.assembly`), and trains the policy with `MixedPolicyTrainer`, a
`transformers.Trainer` whose `compute_loss` is `pipelines.training.loss.mixed_policy_loss`. Several
optimizer steps per round: the assembled responses are split into global batches of
per_device_train_batch_size * gradient_accumulation_steps * num_processes responses.
`accelerate launch` (DDP, DeepSpeed, FSDP) works unchanged: the loss divisor is counted over
the whole optimizer step across micro-batches and processes, so N processes give the same
updates as one process with the same global batch.

Output folder: a normal Hugging Face model folder (safetensors + tokenizer), plus
`train_metrics.parquet` (one row per optimizer step) and `train_manifest.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

OLD_LOGPROBS = ("behaviour", "recompute")


@dataclass
class TrainConfig:
    """Options of `scope train`; names follow TRL's GRPOConfig where one exists."""

    data: str
    policy: str
    output_dir: str
    algo: str = "scope"  # scope | luffy | grpo | prm_dense
    advantage: str = "grpo"  # grpo | dr_grpo
    scale_rewards: str | None = None  # group | batch | none (default: group; dr_grpo: none)
    prm_alpha: float = 1.0  # prm_dense shaping weight
    learning_rate: float = 1e-6
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1
    epsilon: float = 0.2
    epsilon_high: float | None = None  # default: epsilon
    beta: float = 0.0
    ref_policy: str | None = None  # reference for the KL term (default: policy)
    entropy_coef: float = 0.0
    loss_type: str = "token_mean"  # aggregation: token_mean | seq_mean | constant
    shaping_gamma: float = 0.1
    temperature: float = 1.0
    max_length: int = 1024  # max response tokens (longer ones are truncated and counted)
    old_logprobs: str = "behaviour"  # behaviour | recompute
    bf16: bool = False
    seed: int = 0
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    optim: str = "adamw_torch"
    gradient_checkpointing: bool = False
    logprob_chunk_rows: int = 4
    accepted_statuses: tuple[str, ...] = ("accepted", "truncated", "rejected_wrong")
    use_cpu: bool = False
    trust_remote_code: bool = False
    storage_options: dict[str, Any] | None = field(default=None, repr=False)

    def check(self) -> None:
        from pipelines.training.loss import AGGREGATIONS
        from scope_data.assembly import ALGOS

        if self.algo not in ALGOS:
            raise ValueError(f"unknown algo {self.algo!r}; use one of {ALGOS}")
        if self.loss_type not in AGGREGATIONS:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; use one of {AGGREGATIONS}")
        if self.old_logprobs not in OLD_LOGPROBS:
            raise ValueError(f"unknown old_logprobs {self.old_logprobs!r}; use {OLD_LOGPROBS}")
        if self.max_length < 1 or self.per_device_train_batch_size < 1:
            raise ValueError("max_length and per_device_train_batch_size must be >= 1")
        if self.shaping_gamma <= 0 or self.temperature <= 0 or self.epsilon < 0:
            raise ValueError("shaping_gamma and temperature must be > 0, epsilon >= 0")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("storage_options")
        d["accepted_statuses"] = list(self.accepted_statuses)
        return d


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    tokens: int
    metrics: pl.DataFrame
    summary: dict[str, Any]


def model_path(spec: str) -> str:
    """`hf:<path>`, `vllm:<path>` or a bare path/hub id -> the weights to load."""
    kind, sep, target = spec.partition(":")
    if sep and kind in ("hf", "vllm") and target:
        return target
    if sep and kind in ("rule", "oracle", "openai", "reference", "hf-cls", "hf-tag"):
        raise ValueError(f"policy spec {spec!r} has no trainable weights; use hf:<path>")
    return spec


def load_rows(cfg: TrainConfig) -> tuple[Any, Any]:
    """Read the input table and assemble its groups -> (Assembly, input Manifest).

    A `rollouts` or `scored` table is accepted for algo grpo (and scored for prm_dense): every
    row is then a policy row. Empty tables and tables whose every group has zero advantage
    raise ValueError (nothing to train).
    """
    from scope_data.assembly import assemble
    from scope_data.shards import read_arrow, read_manifest

    manifest = read_manifest(cfg.data, cfg.storage_options)
    table = read_arrow(cfg.data, cfg.storage_options)
    kind = manifest.table
    allowed = {"corrected"} | ({"rollouts", "scored"} if cfg.algo == "grpo" else set()) | (
        {"scored"} if cfg.algo == "prm_dense" else set())
    if kind not in allowed:
        raise ValueError(f"{cfg.data}: a {kind!r} table cannot train algo {cfg.algo!r}; "
                         f"expected one of {sorted(allowed)}")
    if table.num_rows == 0:
        raise ValueError(f"{cfg.data}: the {kind} table is empty; nothing to train")
    df = pl.from_arrow(table)
    if kind != "corrected":
        df = df.with_columns(
            kind=pl.lit("policy"), source_rollout_id=pl.lit(None, pl.String),
            off_policy_start=pl.lit(None, pl.Int32), correct_status=pl.lit("not_corrected"))
    assembly = assemble(df, cfg.algo, cfg.advantage, cfg.scale_rewards, cfg.prm_alpha,
                        tuple(cfg.accepted_statuses))
    if assembly.rows.height == 0:
        s = assembly.stats
        raise ValueError(
            f"{cfg.data}: every group has zero advantage ({s.get('groups_zero_advantage', 0)} "
            f"of {s.get('groups', 0)} groups: all responses equally rewarded) or no response "
            "has tokens; nothing to train, no checkpoint written")
    return assembly, manifest


def _check_output(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / "train_manifest.json").is_file():
        raise ValueError(f"{out} exists and is not an earlier `scope train` output; "
                         "refusing to overwrite it")


def run(cfg: TrainConfig) -> TrainResult:
    """Assemble the corrected table `cfg.data` and train `cfg.policy` into `cfg.output_dir`."""
    cfg.check()
    _check_output(Path(cfg.output_dir))
    assembly, manifest = load_rows(cfg)
    return fit(cfg, assembly.rows, assembly.stats, [manifest])


def fit(cfg: TrainConfig, rows: pl.DataFrame, stats: dict[str, Any] | None = None,
        inputs: list[Any] | None = None) -> TrainResult:
    """Train on assembled rows (`scope_data.assembly.ROW_SCHEMA`) and save the model."""
    import tempfile

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from pipelines.console import print_summary
    from pipelines.training.data import Collator, ResponseDataset
    from pipelines.training.trainer import NonFiniteLossError, progress_callback, trainer_class
    from scope_data.provenance import versions

    cfg.check()
    out = Path(cfg.output_dir)
    _check_output(out)
    if rows.height == 0:
        raise ValueError("no training rows: nothing to train, no checkpoint written")
    transformers.set_seed(cfg.seed)
    rows = rows.sample(fraction=1.0, shuffle=True, seed=cfg.seed)
    dataset = ResponseDataset(rows, cfg.max_length, cfg.old_logprobs)
    path = model_path(cfg.policy)
    trust = cfg.trust_remote_code
    from pipelines.engines.base import check_remote_code

    check_remote_code(path, trust)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust)
    ref_model = None
    if cfg.beta != 0.0:
        ref_model = AutoModelForCausalLM.from_pretrained(
            model_path(cfg.ref_policy or cfg.policy), dtype=torch.float32,
            trust_remote_code=trust).eval().requires_grad_(False)
    if cfg.lora:
        try:
            import peft
        except ImportError:
            raise RuntimeError("lora=True needs peft: pip install 'scope-rlvr[peft]'") from None
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM"))
    scratch = tempfile.mkdtemp(prefix="scope-train-")
    args = TrainingArguments(
        output_dir=scratch, per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_train_epochs, max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_steps, optim=cfg.optim,
        max_grad_norm=cfg.max_grad_norm, bf16=cfg.bf16, seed=cfg.seed, data_seed=cfg.seed,
        use_cpu=cfg.use_cpu or not _has_accelerator(),
        gradient_checkpointing=cfg.gradient_checkpointing,
        logging_steps=1, save_strategy="no", report_to="none", remove_unused_columns=False,
        disable_tqdm=True, dataloader_num_workers=0, logging_nan_inf_filter=False,
        dataloader_pin_memory=torch.cuda.is_available(), ddp_find_unused_parameters=False)
    from transformers import PrinterCallback, ProgressCallback

    trainer = trainer_class()(
        model=model, args=args, train_dataset=dataset, data_collator=Collator(dataset, pad),
        processing_class=tok, train_cfg=cfg, ref_model=ref_model,
        callbacks=[progress_callback()])
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    try:
        trainer.train()
        if not all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters()):
            raise NonFiniteLossError(f"weights became NaN/inf by step {trainer.state.global_step}"
                                     "; nothing was saved")
        metrics = pl.DataFrame(trainer.metric_rows)
        summary = _summary(metrics, dataset, stats or {})
        _save(trainer, cfg, out, metrics, summary, inputs or [], versions())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if trainer.accelerator.is_main_process:
        print_summary(f"scope train ({cfg.algo}) -> {out}", list(summary.items()))
    return TrainResult(str(out), trainer.state.global_step, int(summary["tokens"]), metrics,
                       summary)


def _has_accelerator() -> bool:
    """CUDA or MPS present; without one, use_cpu makes `accelerate launch` use gloo DDP."""
    import torch

    return torch.cuda.is_available() or torch.backends.mps.is_available()


def _summary(metrics: pl.DataFrame, dataset: Any, stats: dict[str, Any]) -> dict[str, Any]:
    m = metrics
    tokens = float(m["tokens"].sum()) if m.height else 0.0

    def wmean(col: str, weight: str) -> float:
        w = m[weight].sum() if m.height else 0
        return float((m[col] * m[weight]).sum() / w) if w else 0.0

    return {
        "steps": m.height, "responses": len(dataset), "tokens": int(tokens),
        "truncated_responses": dataset.truncated,
        "groups_trained": stats.get("groups_trained", 0),
        "groups_zero_advantage": stats.get("groups_zero_advantage", 0),
        "corrections_used": stats.get("corrections_used", 0),
        "first_loss": float(m["loss"][0]) if m.height else 0.0,
        "last_loss": float(m["loss"][-1]) if m.height else 0.0,
        "clip_fraction": wmean("clip_fraction", "tokens"),
        "off_policy_share": wmean("off_policy_share", "tokens"),
        "mean_entropy": wmean("entropy", "tokens"),
    }


def _save(trainer: Any, cfg: TrainConfig, out: Path, metrics: pl.DataFrame,
          summary: dict[str, Any], inputs: list[Any], found_versions: dict[str, str]) -> None:
    """Model + tokenizer + metrics + manifest into a temporary sibling, then renamed into place."""
    import datetime as dt

    acc = trainer.accelerator
    tmp = out.parent / f".{out.name}.tmp-train"
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    if cfg.lora:
        if acc.is_main_process:
            acc.unwrap_model(trainer.model).merge_and_unload().save_pretrained(str(tmp))
            trainer.processing_class.save_pretrained(str(tmp))
    else:
        trainer.save_model(str(tmp))
    if acc.is_main_process:
        metrics.write_parquet(tmp / "train_metrics.parquet")
        body = {
            "kind": "scope-train", "config": cfg.to_dict(),
            "inputs": [m.as_input() for m in inputs], "summary": summary,
            "seeds": {"seed": cfg.seed, "data_order_seed": cfg.seed},
            "num_processes": acc.num_processes, "versions": found_versions,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        (tmp / "train_manifest.json").write_text(json.dumps(body, indent=1, default=str))
        for leftover in ("training_args.bin",):
            if (tmp / leftover).exists():
                os.remove(tmp / leftover)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    acc.wait_for_everyone()
