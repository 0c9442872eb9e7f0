"""The `transformers.Trainer` subclass behind `scope train` (see `pipelines.training.train`).

`MixedPolicyTrainer.compute_loss` is `training.loss.mixed_policy_loss` on the response tokens
of a `pipelines.training.data.Collator` batch. Loss scaling: `get_batch_samples` counts the
divisor (tokens for token_mean, sequences otherwise) over all micro-batches of the optimizer
step and all processes; each micro-batch's loss is its sum over that global count, times the
number of processes because DDP/DeepSpeed average gradients; `loss_is_scaled_for_ga` stops the
Trainer from dividing again. With old_logprobs='recompute' or beta > 0, the first training step
first computes the round-start (old) and reference log-probs of every row with the wrapped
model, so it also works under DeepSpeed ZeRO-3. With recompute, every step also measures the
engine/trainer mismatch (`loss.behaviour_weights`) and, with
`vllm_importance_sampling_correction`, weights the on-policy loss by it; rows sampled with
top-k/top-p get their recomputed log-probs renormalised over the replayed kept set
(`data.replayed_logprobs`) for that weight.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from pipelines.console import progress
from pipelines.training.data import replayed_logprobs, response_logprobs
from pipelines.training.loss import (
    METRIC_KEYS,
    METRIC_REDUCE,
    aggregation_of,
    behaviour_weights,
    combine_sums,
    empty_is_sums,
    metrics_from_sums,
    mixed_policy_loss,
)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; nothing is saved."""


class MixedPolicyTrainer(Trainer):
    """A Trainer whose compute_loss is the mixed on/off-policy objective (subclass it to change
    a piece, as with TRL's trainers); `train_cfg` is the `TrainConfig`."""

    def __init__(self, *args: Any, train_cfg: Any, ref_model: Any = None, carried: Any = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.cfg = train_cfg
        self.carried = carried  # pipelines.training.state.Carried: state of an earlier call
        self.start_step = carried.global_step if carried else 0
        self.ref_model = ref_model
        self.loss_is_scaled_for_ga = True  # we divide by the optimizer step's global count
        self.needs_precompute = train_cfg.old_logprobs == "recompute" or (
            train_cfg.beta != 0.0)
        self.old_store: list[Any] | None = None
        self.replay_store: list[Any] | None = None  # old, renormalised over top-k/top-p
        self.ref_store: list[Any] | None = None
        self.metric_rows: list[dict[str, Any]] = []
        self._sums: dict[str, Any] = {}

    def _init_training_state(self, max_steps: int, *args: Any, **kwargs: Any) -> Any:
        """Steps continue from the carried global step (logged steps and the stop test); the
        carried RNG states replace the seeded ones."""
        out = super()._init_training_state(max_steps, *args, **kwargs)
        if self.carried:
            self.state.global_step = self.start_step
            self.state.max_steps = self.start_step + max_steps
            self.carried.restore_rng()
        return out

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        """The LR schedule spans cfg.schedule_steps (-1: to the end of this call), counted from
        the first call's first step; a carried optimizer and scheduler state is loaded here."""
        if self.lr_scheduler is not None:
            return self.lr_scheduler
        end = self.start_step + num_training_steps
        span = self.cfg.schedule_steps if self.cfg.schedule_steps > 0 else end
        if end > span:
            raise ValueError(
                f"schedule_steps {span} is less than the steps trained by the end of this call "
                f"({self.start_step} carried + {num_training_steps}); raise schedule_steps")
        super().create_scheduler(span, optimizer)
        if self.carried:
            self.carried.restore(self.optimizer, self.lr_scheduler)
        return self.lr_scheduler

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        # `run` shuffles rows with cfg.seed; a fixed order makes N processes see the same
        # global batches as one process.
        return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
        samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        key = "response_mask"
        if aggregation_of(self.cfg.loss_type) == "token_mean":
            count = sum(b[key].sum() for b in samples)
        else:
            count = sum(float(b[key].shape[0]) for b in samples)
        count = torch.as_tensor(count, dtype=torch.float32, device=device)
        if self.accelerator.num_processes > 1:
            count = self.accelerator.reduce(count, reduction="sum")
        return samples, count

    @torch.no_grad()
    def _precompute(self, model: Any) -> None:
        """Round-start log-probs of every row: old (recompute) and reference (beta)."""
        policy = self.accelerator.unwrap_model(model)
        was_training = policy.training
        policy.eval()
        old, ref, replay = [], [], []
        truncated = any(r.top_p < 1 or r.top_k > 0 for r in self.train_dataset.rows)
        if self.ref_model is not None:
            self.ref_model.to(self.args.device)
        ds, bs = self.train_dataset, self.args.per_device_train_batch_size
        for start in range(0, len(ds), bs):
            batch = self.data_collator([ds[i] for i in range(start, min(start + bs, len(ds)))])
            batch = self._prepare_inputs(batch)
            n = batch["response_mask"].sum(-1).long().tolist()
            if self.cfg.old_logprobs == "recompute" and truncated:
                with self.compute_loss_context_manager():
                    lp, lq = replayed_logprobs(policy, batch, self.cfg.temperature,
                                               chunk_rows=self.cfg.logprob_chunk_rows)
                old += [lp[b, : n[b]].float().cpu() for b in range(len(n))]
                replay += [lq[b, : n[b]].float().cpu() for b in range(len(n))]
            elif self.cfg.old_logprobs == "recompute":
                with self.compute_loss_context_manager():
                    lp, _ = response_logprobs(policy, batch, self.cfg.temperature,
                                              chunk_rows=self.cfg.logprob_chunk_rows)
                old += [lp[b, : n[b]].float().cpu() for b in range(len(n))]
            if self.ref_model is not None:
                with self.compute_loss_context_manager():
                    lp, _ = response_logprobs(self.ref_model, batch, self.cfg.temperature,
                                              chunk_rows=self.cfg.logprob_chunk_rows)
                ref += [lp[b, : n[b]].float().cpu() for b in range(len(n))]
        self.old_store = old or None
        self.replay_store = replay or None
        self.ref_store = ref or None
        self.ref_model = None  # frees its memory
        policy.train(was_training)
        self.needs_precompute = False

    def _stored(self, store: list[Any], batch: dict[str, Any]) -> Any:
        out = torch.zeros_like(batch["response_mask"])
        for b, i in enumerate(batch["row_idx"].tolist()):
            out[b, : len(store[i])] = store[i].to(out.device)
        return out

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        if self.needs_precompute:
            self._precompute(model)
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        cfg = self.cfg
        logp, entropy = response_logprobs(
            model, inputs, cfg.temperature, with_entropy=True,
            entropy_grad=cfg.entropy_coef != 0.0, chunk_rows=cfg.logprob_chunk_rows)
        old = inputs["old_logp"] if self.old_store is None else self._stored(
            self.old_store, inputs)
        ref = None if self.ref_store is None else self._stored(self.ref_store, inputs)
        weight, is_sums = self._mismatch(old, inputs)
        loss, sums = mixed_policy_loss(
            logp, old, inputs["advantages"], inputs["response_mask"], inputs["off_mask"],
            epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
            shaping_gamma=cfg.shaping_gamma, aggregation=cfg.loss_type,
            importance_sampling_level=cfg.importance_sampling_level,
            max_length=cfg.max_length, num_items=num_items_in_batch, ref_logp=ref,
            beta=cfg.beta, entropy=entropy, entropy_coef=cfg.entropy_coef, is_weight=weight)
        bad = torch.as_tensor(float(not torch.isfinite(loss)), device=loss.device)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item():
            ds = self.train_dataset
            ids = [ds.rows[i].rollout_id for i in inputs["row_idx"].tolist()]
            raise NonFiniteLossError(
                f"non-finite loss at optimizer step {self.state.global_step + 1}; "
                f"rollout ids in the batch (this process): {ids}; nothing was saved")
        self._sums = combine_sums(self._sums, {**sums, **is_sums})
        # DDP/DeepSpeed average gradients over processes; the divisor is already global.
        loss = loss * self.accelerator.num_processes
        return (loss, {"logp": logp}) if return_outputs else loss

    def _mismatch(self, old: Any, inputs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """(IS weight or None, mismatch sums) of a batch: measured whenever old log-probs are
        recomputed, applied only with vllm_importance_sampling_correction."""
        cfg = self.cfg
        if cfg.old_logprobs != "recompute":
            return None, empty_is_sums(old.device)
        on = inputs["response_mask"].bool() & ~inputs["off_mask"].bool()
        target = old if self.replay_store is None else self._stored(self.replay_store, inputs)
        weight, sums = behaviour_weights(
            target, inputs["behaviour_logp"], on, cfg.vllm_importance_sampling_mode,
            cfg.vllm_importance_sampling_clip_min, cfg.vllm_importance_sampling_clip_max,
            full_logp=old)
        return (weight if cfg.vllm_importance_sampling_correction else None), sums

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._sums:
            sums = torch.stack([torch.as_tensor(self._sums.get(k, 0.0), dtype=torch.float32,
                                                 device=self.args.device)
                                for k in METRIC_KEYS])
            if self.accelerator.num_processes > 1:  # add, or max/min (METRIC_REDUCE)
                every = self.accelerator.gather(sums[None])
                sums = torch.stack([getattr(every[:, j], METRIC_REDUCE.get(k, "sum"))()
                                    for j, k in enumerate(METRIC_KEYS)])
            self._sums = {}
            stats = metrics_from_sums(dict(zip(METRIC_KEYS, sums.tolist(), strict=True)))
            logs.update(stats)
            self.metric_rows.append({
                "step": self.state.global_step, "epoch": float(self.state.epoch or 0),
                "loss": float(logs["loss"]), "grad_norm": float(logs.get("grad_norm", 0.0)),
                "learning_rate": float(logs.get("learning_rate", 0.0)), **stats})
        super().log(logs, start_time)


class RichProgress(TrainerCallback):
    """Shows the optimizer steps (and the last loss) as a progress bar or line."""

    def __init__(self, description: str = "train") -> None:
        self.description = description

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.bar = progress() if state.is_world_process_zero else None
        self.start = state.global_step  # carried steps: the bar counts this call's
        if self.bar:
            self.bar.start()
            self.task = self.bar.add_task(self.description, total=state.max_steps - self.start)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if self.bar and logs and "loss" in logs:
            self.bar.update(self.task, completed=state.global_step - self.start,
                            description=f"{self.description} loss={logs['loss']:.4g}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.bar:
            self.bar.stop()
