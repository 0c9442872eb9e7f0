"""`scope train`: train the policy on the corrected table with the mixed on/off-policy loss.

Multi-process: `accelerate launch [--config_file zero3.yaml] -m cli.main train ...`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import STORAGE_OPTIONS_HELP, storage_options, user_errors


def register(app: typer.Typer) -> None:
    app.command("train")(train)


@user_errors
def train(
    data: Annotated[str, typer.Option(help="corrected table folder (rollouts/scored for grpo)")],
    policy: Annotated[str, typer.Option(help="policy to train: hf:<path> or a model folder")],
    out: Annotated[str, typer.Option(help="output model folder (HF format + train metrics)")],
    algo: Annotated[str, typer.Option(help="scope | luffy | grpo | prm_dense")] = "scope",
    advantage: Annotated[str, typer.Option(help="grpo: (r-mean)/(std+eps) | dr_grpo: r-mean")]
    = "grpo",
    scale_rewards: Annotated[str | None, typer.Option(
        help="group | batch | none (default: group for grpo, none for dr_grpo)")] = None,
    prm_alpha: Annotated[float, typer.Option(help="prm_dense: weight of the step-score term")]
    = 1.0,
    lr: Annotated[float, typer.Option("--lr", help="learning rate")] = 1e-6,
    epochs: Annotated[float, typer.Option("--epochs", help="passes over the round's data")] = 1.0,
    max_steps: Annotated[int, typer.Option(help="optimizer steps (overrides --epochs; -1 off)")]
    = -1,
    per_device_batch_size: Annotated[int, typer.Option(
        "--per-device-batch-size", help="responses per micro-batch per process")] = 8,
    grad_accum: Annotated[int, typer.Option(
        "--grad-accum", help="micro-batches per optimizer step")] = 1,
    epsilon: Annotated[float, typer.Option(help="PPO clip (low side)")] = 0.2,
    epsilon_high: Annotated[float | None, typer.Option(
        help="PPO clip high side (default: epsilon)")] = None,
    beta: Annotated[float, typer.Option(help="KL (k3) coefficient to the reference")] = 0.0,
    ref_policy: Annotated[str | None, typer.Option(
        help="reference model for the KL term (default: --policy)")] = None,
    entropy_coef: Annotated[float, typer.Option(help="entropy bonus coefficient")] = 0.0,
    loss_type: Annotated[str, typer.Option(
        help="aggregation: token_mean | seq_mean | constant (Dr. GRPO)")] = "token_mean",
    shaping_gamma: Annotated[float, typer.Option(
        help="off-policy shaping f(p) = p/(p+gamma)")] = 0.1,
    temperature: Annotated[float, typer.Option(help="temperature of the log-probs")] = 1.0,
    max_length: Annotated[int, typer.Option(
        help="max response tokens (longer responses are truncated and counted)")] = 1024,
    old_logprobs: Annotated[str, typer.Option(
        help="behaviour (from the rollouts) | recompute (model at round start)")] = "behaviour",
    bf16: Annotated[bool, typer.Option(help="bf16 autocast")] = False,
    seed: Annotated[int, typer.Option(help="seed (data order, init of LoRA)")] = 0,
    lora: Annotated[bool, typer.Option(help="train LoRA adapters (needs peft); merged on save")]
    = False,
    lora_r: Annotated[int, typer.Option(help="LoRA rank")] = 16,
    max_grad_norm: Annotated[float, typer.Option(help="gradient clipping norm")] = 1.0,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay")] = 0.0,
    gradient_checkpointing: Annotated[bool, typer.Option(help="recompute activations")] = False,
    use_cpu: Annotated[bool, typer.Option(help="train on CPU even if a GPU is present")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="allow custom model code")] = False,
    storage: Annotated[str | None, typer.Option("--storage-options", help=STORAGE_OPTIONS_HELP)]
    = None,
) -> None:
    """Assemble groups from the corrected table and train the policy (saves an HF model)."""
    from pipelines.training.train import TrainConfig, run

    run(TrainConfig(
        data=data, policy=policy, output_dir=out, algo=algo, advantage=advantage,
        scale_rewards=scale_rewards, prm_alpha=prm_alpha, learning_rate=lr,
        num_train_epochs=epochs, max_steps=max_steps,
        per_device_train_batch_size=per_device_batch_size,
        gradient_accumulation_steps=grad_accum, epsilon=epsilon, epsilon_high=epsilon_high,
        beta=beta, ref_policy=ref_policy, entropy_coef=entropy_coef, loss_type=loss_type,
        shaping_gamma=shaping_gamma, temperature=temperature, max_length=max_length,
        old_logprobs=old_logprobs, bf16=bf16, seed=seed, lora=lora, lora_r=lora_r,
        lora_alpha=2 * lora_r, max_grad_norm=max_grad_norm, weight_decay=weight_decay,
        gradient_checkpointing=gradient_checkpointing, use_cpu=use_cpu,
        trust_remote_code=trust_remote_code, storage_options=storage_options(storage),
    ))
