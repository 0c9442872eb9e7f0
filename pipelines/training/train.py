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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from pipelines.config import identity, meta, option, storage_options_field
from scope_data.algos import ALGO_NAMES, UNSCORED_STATUSES, get_algo, training_input_error
from scope_data.correction import CORRECTED_ROW_STATUSES

OLD_LOGPROBS = ("behaviour", "recompute")


@dataclass
class TrainConfig:
    """Options of `scope train`; names follow TRL's GRPOConfig where one exists.

    Fields marked `trainer` go to `transformers.TrainingArguments` under the same name.
    """

    data: str = option(help="corrected table folder (rollouts/scored for grpo)", identity=False)
    policy: str = option(help="policy to train: hf:<path> or a model folder")
    output_dir: str = option(flags="--out", identity=False,
                             help="output model folder (HF format + train metrics)")
    algo: str = option("scope", help="one of scope_data.algos: " + " | ".join(ALGO_NAMES))
    advantage: str = option("grpo", help="grpo: (r-mean)/(std+eps) | dr_grpo: r-mean")
    scale_rewards: str | None = option(
        None, help="group | batch | none (default: group for grpo, none for dr_grpo)")
    prm_alpha: float = option(1.0, help="prm_dense: weight of the step-score term")
    learning_rate: float = option(1e-6, flags="--lr", help="learning rate", trainer=True)
    per_device_train_batch_size: int = option(
        8, flags="--per-device-batch-size", help="responses per micro-batch per process",
        trainer=True)
    gradient_accumulation_steps: int = option(
        1, flags="--grad-accum", help="micro-batches per optimizer step", trainer=True)
    num_train_epochs: float = option(1.0, flags="--epochs", help="passes over the round's data",
                                     trainer=True)
    max_steps: int = option(-1, help="optimizer steps (overrides --epochs; -1 off)",
                            trainer=True)
    epsilon: float = option(0.2, help="PPO clip (low side)")
    epsilon_high: float | None = option(None, help="PPO clip high side (default: epsilon)")
    beta: float = option(0.0, help="KL (k3) coefficient to the reference")
    ref_policy: str | None = option(
        None, help="reference model for the KL term (default: --policy)")
    entropy_coef: float = option(0.0, help="entropy bonus coefficient")
    loss_type: str = option(
        "token_mean", help="aggregation: token_mean | seq_mean | constant, or TRL's names "
        "grpo (seq_mean) | bnpo, dapo (token_mean) | dr_grpo (constant)")
    importance_sampling_level: str = option(
        "token", help="on-policy ratio per token (PPO) or per sequence (GSPO: sequence)")
    shaping_gamma: float = option(0.1, help="off-policy shaping f(p) = p/(p+gamma)")
    temperature: float = option(1.0, help="temperature of the log-probs")
    max_length: int = option(
        1024, help="max response tokens (longer responses are truncated and counted)")
    old_logprobs: str = option(
        "behaviour", help="behaviour (from the rollouts) | recompute (model at round start)")
    bf16: bool = option(False, help="bf16 autocast", trainer=True)
    seed: int = option(0, help="seed (data order, init of LoRA)", trainer=True)
    lora: bool = option(False, help="train LoRA adapters (needs peft); merged on save")
    lora_r: int = option(16, help="LoRA rank")
    lora_alpha: int = option(32, help="LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = option(0.0, help="LoRA dropout")
    lora_target_modules: str = option("all-linear", help="LoRA target modules (peft)")
    max_grad_norm: float = option(1.0, help="gradient clipping norm", trainer=True)
    weight_decay: float = option(0.0, help="AdamW weight decay", trainer=True)
    lr_scheduler_type: str = option("constant", help="learning-rate schedule (transformers "
                                    "lr_scheduler_type)", trainer=True)
    warmup_steps: int = option(0, help="learning-rate warmup steps", trainer=True)
    optim: str = option("adamw_torch", help="optimizer (transformers optim)", trainer=True)
    gradient_checkpointing: bool = option(False, help="recompute activations", identity=False,
                                          trainer=True)
    logprob_chunk_rows: int = option(
        4, help="sequences per chunk of the log-prob computation (memory)", identity=False)
    accepted_statuses: tuple[str, ...] = option(
        CORRECTED_ROW_STATUSES, sep=",",
        help="correct_status values of corrected rows trained as corrections")
    use_cpu: bool = option(False, help="train on CPU even if a GPU is present", identity=False)
    trust_remote_code: bool = option(False, help="allow custom model code", identity=False)
    storage_options: dict[str, Any] | None = storage_options_field()

    def check(self) -> None:
        from pipelines.training.loss import IMPORTANCE_SAMPLING_LEVELS, aggregation_of

        get_algo(self.algo)
        try:
            aggregation_of(self.loss_type)
        except ValueError as e:
            raise ValueError(f"loss_type (--loss-type): {e}") from None
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"unknown importance_sampling_level {self.importance_sampling_level!r}"
                             f"; use one of {IMPORTANCE_SAMPLING_LEVELS}")
        if self.old_logprobs not in OLD_LOGPROBS:
            raise ValueError(f"unknown old_logprobs {self.old_logprobs!r}; use {OLD_LOGPROBS}")
        if self.max_length < 1 or self.per_device_train_batch_size < 1:
            raise ValueError("max_length and per_device_train_batch_size must be >= 1")
        if self.shaping_gamma <= 0 or self.temperature <= 0 or self.epsilon < 0:
            raise ValueError("shaping_gamma and temperature must be > 0, epsilon >= 0")

    def training_arguments(self, output_dir: str) -> Any:
        """The `transformers.TrainingArguments` of this config; trainer files (none are kept:
        the model is saved by `scope train` itself) go to `output_dir`."""
        import torch
        from transformers import TrainingArguments

        same = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if meta(f, "trainer")}
        return TrainingArguments(
            output_dir=output_dir, **same, data_seed=self.seed,
            use_cpu=self.use_cpu or not _has_accelerator(), logging_steps=1, save_strategy="no",
            report_to="none", remove_unused_columns=False, disable_tqdm=True,
            dataloader_num_workers=0, logging_nan_inf_filter=False,
            dataloader_pin_memory=torch.cuda.is_available(), ddp_find_unused_parameters=False)


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    tokens: int
    metrics: pl.DataFrame
    summary: dict[str, Any]


def load_rows(cfg: TrainConfig) -> tuple[Any, Any]:
    """Read the input table and assemble its groups -> (Assembly, input Manifest).

    The algo's registry record (`scope_data.algos`) says which tables it trains from (a
    `rollouts` or `scored` table's rows are all policy rows), which correction mode a corrected
    table must have been made with (its manifest config's `mode`) and whether every response
    needs PRM scores. A mismatch, an empty table, or a table whose every group has zero
    advantage raises ValueError.
    """
    from scope_data.assembly import assemble
    from scope_data.shards import read_arrow, read_manifest
    from scope_data.validate import check_table

    manifest = read_manifest(cfg.data, cfg.storage_options)
    check_table(manifest, cfg.storage_options)
    kind = manifest.table
    df = pl.from_arrow(read_arrow(cfg.data, cfg.storage_options))
    unscored = (df.filter(pl.col("score_status").is_in(UNSCORED_STATUSES)).height
                if "score_status" in df.columns else 0)
    error = training_input_error(cfg.algo, kind, manifest.config.get("mode"), unscored)
    if error:
        raise ValueError(f"{cfg.data}: {error}")
    if df.height == 0:
        raise ValueError(f"{cfg.data}: the {kind} table is empty; nothing to train")
    if cfg.old_logprobs == "behaviour":
        check_sampling(df, cfg.temperature, cfg.data)
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


def check_sampling(df: pl.DataFrame, temperature: float, where: str) -> None:
    """Refuse behaviour log-probs the trainer's ratio cannot use as pi_old.

    The ratio pi_theta / pi_old needs pi_old at the trainer's temperature over the full
    vocabulary. Rows sampled at another temperature carry log-probs of another distribution;
    rows sampled with top_p < 1 carry log-probs of the renormalised nucleus (biased by the kept
    mass, TRL issue 6789). Both ask for `--old-logprobs recompute` (or the sampling temperature).
    """
    sampled = df.select("temperature", "top_p").unique().sort("temperature", "top_p")
    for t, top_p in sampled.iter_rows():
        if abs(t - temperature) > 1e-6:
            raise ValueError(
                f"{where}: rows were sampled at temperature {t:g} but the trainer computes "
                f"log-probs at {temperature:g}; their behaviour log-probs are not pi_old: pass "
                f"--temperature {t:g} or --old-logprobs recompute")
        if top_p < 1.0:
            raise ValueError(
                f"{where}: rows were sampled with top_p {top_p:g}: their behaviour log-probs are "
                "of the renormalised nucleus, not of the policy (the ratio would be biased by "
                "the kept mass); pass --old-logprobs recompute")


def _load_weights(path: str, trust_remote_code: bool) -> Any:
    """The causal LM at `path`, from safetensors only (pickled .bin weights can run code)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True)
    except OSError as e:
        raise FileNotFoundError(
            f"cannot load {path!r} as safetensors weights (scope never loads pickled .bin "
            f"weights: they can run code; convert them to safetensors first): {e}") from None


def _check_output(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / "train_manifest.json").is_file():
        raise ValueError(f"{out} exists and is not an earlier `scope train` output; "
                         "refusing to overwrite it")


def run(cfg: TrainConfig) -> TrainResult:
    """Assemble the corrected table `cfg.data` and train `cfg.policy` into `cfg.output_dir`."""
    cfg.check()
    from scope_data.ownership import refuse_overlap

    refuse_overlap(cfg.output_dir, [cfg.data], cfg.storage_options, flag="--output-dir")
    _check_output(Path(cfg.output_dir))
    assembly, manifest = load_rows(cfg)
    return fit(cfg, assembly.rows, assembly.stats, [manifest])


def fit(cfg: TrainConfig, rows: pl.DataFrame, stats: dict[str, Any] | None = None,
        inputs: list[Any] | None = None) -> TrainResult:
    """Train on assembled rows (`scope_data.assembly.ROW_SCHEMA`) and save the model."""
    import tempfile

    import torch
    import transformers

    from pipelines.console import print_summary
    from pipelines.training.data import Collator, ResponseDataset
    from pipelines.training.trainer import (
        MixedPolicyTrainer,
        NonFiniteLossError,
        RichProgress,
    )
    from scope_data.provenance import versions

    cfg.check()
    out = Path(cfg.output_dir)
    _check_output(out)
    if rows.height == 0:
        raise ValueError("no training rows: nothing to train, no checkpoint written")
    transformers.set_seed(cfg.seed)
    rows = rows.sample(fraction=1.0, shuffle=True, seed=cfg.seed)
    dataset = ResponseDataset(rows, cfg.max_length, cfg.old_logprobs)
    from pipelines.engines.base import check_remote_code
    from pipelines.engines.spec import load_tokenizer, trainable_path

    path = trainable_path(cfg.policy)
    trust = cfg.trust_remote_code
    check_remote_code(path, trust)
    tok = load_tokenizer(path, trust)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = _load_weights(path, trust)
    from scope_data.validate import check_token_range

    check_token_range(rows, model.get_input_embeddings().num_embeddings,
                      f"{cfg.data} (training rows)")
    ref_model = None
    if cfg.beta != 0.0:
        ref_model = _load_weights(trainable_path(cfg.ref_policy or cfg.policy),
                                  trust).eval().requires_grad_(False)
    if cfg.lora:
        try:
            import peft
        except ImportError:
            raise RuntimeError("lora=True needs peft: pip install 'scope-rlvr[peft]'") from None
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM"))
    scratch = tempfile.mkdtemp(prefix="scope-train-")
    args = cfg.training_arguments(scratch)
    from transformers import PrinterCallback, ProgressCallback

    trainer = MixedPolicyTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=Collator(dataset, pad),
        processing_class=tok, train_cfg=cfg, ref_model=ref_model,
        callbacks=[RichProgress()])
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
            "kind": "scope-train", "config": identity(cfg),
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
