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

import contextlib
import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from pipelines.config import identity, meta, option, storage_options_field
from pipelines.training.tracking import parse_report_to, trainer_report_to
from scope_data.algos import ALGO_NAMES, get_algo
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
    max_steps: int = option(-1, help="optimizer steps of this call (overrides --epochs; -1 off)",
                            trainer=True)
    resume_from: str | None = option(
        None, help="continue the optimizer, LR schedule, RNG and step count saved in this earlier "
        "`scope train` output (its trainer_state/); the weights still come from --policy")
    schedule_steps: int = option(
        -1, help="optimizer steps the LR schedule spans, counted from the first call's first "
        "step (-1: up to the end of this call)")
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
    mask_truncated_completions: bool = option(
        False, help="DAPO: drop truncated responses (finish_reason length, or longer than "
        "max_length) from the loss; they still count in their group's advantages")
    soft_punish_cache: int = option(
        0, help="DAPO soft overlong punishment: reward -= up to 1 over the last "
        "soft_punish_cache tokens before max_completion_len (0: off)")
    max_completion_len: int | None = option(
        None, help="Lmax of the soft overlong punishment (default: max_length)")
    overlong_penalty_factor: float = option(
        1.0, help="scale of the soft overlong punishment (verl's penalty_factor)")
    old_logprobs: str = option(
        "behaviour", help="behaviour (from the rollouts) | recompute (model at round start)")
    vllm_importance_sampling_correction: bool = option(
        False, help="with --old-logprobs recompute: weight the on-policy loss by the truncated "
        "importance ratio recomputed/behaviour (TRL's name; docs/training.md)")
    vllm_importance_sampling_mode: str = option(
        "sequence_mask", help="token_truncate | token_mask | sequence_truncate | sequence_mask")
    vllm_importance_sampling_clip_max: float | None = option(
        3.0, help="upper bound C_max of the importance ratio (truncated or masked above)")
    vllm_importance_sampling_clip_min: float | None = option(
        None, help="lower bound C_min of the importance ratio (truncated or masked below)")
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
    report_to: str = option(
        "none", identity=False, help="trackers of the training metrics: none, or a comma list "
        "of tensorboard, wandb, trackio, mlflow (wandb runs offline unless WANDB_MODE is set)")
    run_name: str | None = option(None, identity=False, trainer=True,
                                  help="tracker run name")
    logging_dir: str | None = option(
        None, identity=False, help="tracker files: tensorboard events, wandb run, run id "
        "(default: OUT-logs beside --out; `scope run` uses RUN_DIR/tracking)")
    storage_options: dict[str, Any] | None = storage_options_field()

    def check(self) -> None:
        from pipelines.training.loss import IMPORTANCE_SAMPLING_LEVELS, IS_MODES, aggregation_of

        get_algo(self.algo)
        parse_report_to(self.report_to)
        try:
            aggregation_of(self.loss_type)
        except ValueError as e:
            raise ValueError(f"loss_type (--loss-type): {e}") from None
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"unknown importance_sampling_level {self.importance_sampling_level!r}"
                             f"; use one of {IMPORTANCE_SAMPLING_LEVELS}")
        if self.old_logprobs not in OLD_LOGPROBS:
            raise ValueError(f"unknown old_logprobs {self.old_logprobs!r}; use {OLD_LOGPROBS}")
        self._check_importance_sampling(IS_MODES)
        if self.max_length < 1 or self.per_device_train_batch_size < 1:
            raise ValueError("max_length and per_device_train_batch_size must be >= 1")
        if self.shaping_gamma <= 0 or self.temperature <= 0 or self.epsilon < 0:
            raise ValueError("shaping_gamma and temperature must be > 0, epsilon >= 0")
        if self.schedule_steps == 0 or self.schedule_steps < -1:
            raise ValueError(f"schedule_steps must be >= 1 or -1, got {self.schedule_steps}")
        if self.soft_punish_cache and not 0 < self.soft_punish_cache <= self.completion_len():
            raise ValueError(f"soft_punish_cache must be in 0..{self.completion_len()} "
                             f"(max_completion_len), got {self.soft_punish_cache}")

    def completion_len(self) -> int:
        """Lmax of the soft overlong punishment: max_completion_len, else max_length."""
        return self.max_length if self.max_completion_len is None else self.max_completion_len

    def _check_importance_sampling(self, modes: tuple[str, ...]) -> None:
        """TRL's GRPOConfig checks of the vllm_importance_sampling_* options, plus: the
        correction needs recomputed old log-probs (else pi_old is the behaviour policy)."""
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if self.vllm_importance_sampling_mode not in modes:
            raise ValueError(f"unknown vllm_importance_sampling_mode "
                             f"{self.vllm_importance_sampling_mode!r}; use one of {modes}")
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError(f"vllm_importance_sampling_clip_min ({lo}) must be less than "
                             f"vllm_importance_sampling_clip_max ({hi})")
        if not self.vllm_importance_sampling_correction:
            return
        if self.old_logprobs != "recompute":
            raise ValueError("vllm_importance_sampling_correction needs --old-logprobs recompute "
                             "(with behaviour old log-probs the ratio is 1)")
        if self.vllm_importance_sampling_mode.endswith("truncate") and lo is None and hi is None:
            raise ValueError("a *_truncate vllm_importance_sampling_mode needs "
                             "vllm_importance_sampling_clip_min or _clip_max")

    def tracker(self, main: bool = True) -> Any:
        """The `Tracker` of this run's `report_to` (files under `logging_dir`)."""
        from pipelines.training.tracking import Tracker

        out = Path(self.output_dir)
        return Tracker(self.report_to, self.logging_dir or str(out.with_name(out.name + "-logs")),
                       self.run_name, main=main)

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
            report_to=trainer_report_to(parse_report_to(self.report_to)),
            remove_unused_columns=False, disable_tqdm=True,
            dataloader_num_workers=0, logging_nan_inf_filter=False,
            dataloader_pin_memory=torch.cuda.is_available(), ddp_find_unused_parameters=False)


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    tokens: int
    metrics: pl.DataFrame
    summary: dict[str, Any]


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
    from pipelines.training.inputs import load_rows

    _check_output(Path(cfg.output_dir))
    assembly, manifest = load_rows(cfg)
    return fit(cfg, assembly.rows, assembly.stats, [manifest])


def fit(cfg: TrainConfig, rows: pl.DataFrame, stats: dict[str, Any] | None = None,
        inputs: list[Any] | None = None, *, shuffle: bool = True,
        callbacks: list[Any] | None = None) -> TrainResult:
    """Train on assembled rows (`scope_data.assembly.ROW_SCHEMA`) and save the model.

    `shuffle=False` keeps the rows' order; `callbacks` are extra `TrainerCallback`s."""
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
    from pipelines.training.session import active
    from pipelines.training.state import load_carried

    session = active()  # the online train worker: the previous call's model and states
    kept = session.take(cfg) if session else None
    carried = kept or (load_carried(cfg.resume_from, cfg) if cfg.resume_from else None)
    transformers.set_seed(cfg.seed)
    if shuffle:
        rows = rows.sample(fraction=1.0, shuffle=True, seed=cfg.seed)
    dataset = ResponseDataset(rows, cfg.max_length, cfg.old_logprobs,
                              cfg.mask_truncated_completions)
    from pipelines.engines.base import check_remote_code
    from pipelines.engines.spec import load_tokenizer, trainable_path

    path = trainable_path(cfg.policy)
    trust = cfg.trust_remote_code
    check_remote_code(path, trust)
    tok = load_tokenizer(path, trust)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = kept.model if kept else _load_weights(path, trust)
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
    if carried:
        carried.check_model(model)
    scratch = tempfile.mkdtemp(prefix="scope-train-")
    args = cfg.training_arguments(scratch)
    tracker = cfg.tracker(main=args.process_index == 0)
    from transformers import PrinterCallback, ProgressCallback

    trainer = MixedPolicyTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=Collator(dataset, pad),
        processing_class=tok, train_cfg=cfg, ref_model=ref_model, carried=carried,
        callbacks=[RichProgress(), *tracker.trainer_callbacks(), *(callbacks or [])])
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    try:
        if carried and (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled):
            raise ValueError("resume_from: carried optimizer state needs one process or DDP "
                             "(DeepSpeed and FSDP states are sharded); train without it")
        with tracker:  # the Trainer's integrations log into the folder's tracker run
            seconds = trainer.train().metrics.get("train_runtime", 0.0)
        if not all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters()):
            raise NonFiniteLossError(f"weights became NaN/inf by step {trainer.state.global_step}"
                                     "; nothing was saved")
        metrics = pl.DataFrame(trainer.metric_rows)
        summary = _summary(metrics, dataset, stats or {}, cfg.old_logprobs == "recompute")
        summary["train_seconds"] = round(float(seconds), 3)  # the optimizer steps' wall time
        with session.keeping(cfg, trainer) if session else contextlib.nullcontext():
            _save(trainer, cfg, out, metrics, summary, inputs or [], versions())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if trainer.accelerator.is_main_process:
        print_summary(f"scope train ({cfg.algo}) -> {out}", list(summary.items()))
    return TrainResult(str(out), trainer.state.global_step - trainer.start_step,
                       int(summary["tokens"]), metrics, summary)


def _has_accelerator() -> bool:
    """CUDA or MPS present; without one, use_cpu makes `accelerate launch` use gloo DDP."""
    import torch

    return torch.cuda.is_available() or torch.backends.mps.is_available()


def _summary(metrics: pl.DataFrame, dataset: Any, stats: dict[str, Any],
             mismatch: bool = False) -> dict[str, Any]:
    m = metrics
    tokens = float(m["tokens"].sum()) if m.height else 0.0

    def wmean(col: str, weight: str) -> float:
        w = m[weight].sum() if m.height else 0
        return float((m[col] * m[weight]).sum() / w) if w else 0.0

    extra = {} if not (mismatch and m.height) else {  # token-weighted over steps; min/max
        "is_ratio_mean": wmean("is_ratio_mean", "tokens"),
        "is_ratio_min": float(m["is_ratio_min"].min()),
        "is_ratio_max": float(m["is_ratio_max"].max()),
        "is_outside_fraction": wmean("is_outside_fraction", "tokens"),
        "sampling_logp_difference_mean": wmean("sampling_logp_difference_mean", "tokens"),
        "sampling_logp_difference_max": float(m["sampling_logp_difference_max"].max()),
        "behaviour_kl_k3": wmean("behaviour_kl_k3", "tokens"),
        "kept_mass": wmean("kept_mass", "tokens"),
    }
    return {
        "steps": m.height, "responses": len(dataset), "tokens": int(tokens),
        "truncated_responses": dataset.truncated,
        "truncated_masked": dataset.masked,
        "overlong_penalised": stats.get("responses_overlong_penalised", 0),
        "groups_trained": stats.get("groups_trained", 0),
        "groups_zero_advantage": stats.get("groups_zero_advantage", 0),
        "corrections_used": stats.get("corrections_used", 0),
        "first_loss": float(m["loss"][0]) if m.height else 0.0,
        "last_loss": float(m["loss"][-1]) if m.height else 0.0,
        "clip_fraction": wmean("clip_fraction", "tokens"),
        "off_policy_share": wmean("off_policy_share", "tokens"),
        "mean_entropy": wmean("entropy", "tokens"),
    } | extra


def _save(trainer: Any, cfg: TrainConfig, out: Path, metrics: pl.DataFrame,
          summary: dict[str, Any], inputs: list[Any], found_versions: dict[str, str]) -> None:
    """Model + tokenizer + trainer state + metrics + manifest into a temporary sibling, then
    renamed into place (sharded DeepSpeed/FSDP optimizer states are not saved)."""
    import datetime as dt

    from pipelines.training.state import STATE_DIR, save_state

    acc = trainer.accelerator
    tmp = out.parent / f".{out.name}.tmp-train"
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    saved = not (trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled)
    if saved and acc.is_main_process:  # before a LoRA merge changes the trainable parameters
        save_state(tmp / STATE_DIR, trainer.optimizer, trainer.lr_scheduler,
                   trainer.state.global_step, cfg, acc.unwrap_model(trainer.model))
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
            "trainer_state": {"saved": saved, "resume_from": cfg.resume_from,
                              "start_step": trainer.start_step,
                              "global_step": trainer.state.global_step},
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
