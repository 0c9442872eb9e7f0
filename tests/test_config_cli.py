"""Config dataclasses drive the CLI: every field has an option with the same default and help,
the dry-run commands parse back to the same config, and `identity` decides what is hashed."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import typer.main

from cli.main import app
from cli.options import build_config, command_args, field_options
from pipelines.config import default_of, identity, manifest_config, meta
from pipelines.loop.demo import DemoConfig
from pipelines.loop.round_loop import RunConfig
from pipelines.stages.correct import CorrectConfig
from pipelines.stages.evaluate import EvalConfig
from pipelines.stages.generate import GenerateConfig
from pipelines.stages.prm_eval import PRMEvalConfig
from pipelines.stages.score import ScoreConfig
from pipelines.training.train import TrainConfig

COMMANDS = {"generate": GenerateConfig, "score": ScoreConfig, "correct": CorrectConfig,
            "train": TrainConfig, "eval": EvalConfig, "prm-eval": PRMEvalConfig,
            "run": RunConfig, "demo": DemoConfig}
# fields that only the Python API sets (`scope run --algo/--seed` fill RunConfig.overrides)
API_ONLY = {("run", "overrides"), ("run", "verbose"), ("demo", "overrides"),
            ("demo", "only_seeds")}
REQUIRED = {"generate": {"problems": "p", "policy": "hf:/m", "out": "o"},
            "score": {"rollouts": "r", "out": "o"},
            "correct": {"scored": "s", "out": "o", "teacher": "oracle:arith"},
            "train": {"data": "d", "policy": "hf:/m", "output_dir": "o"},
            "eval": {"model": "hf:/m", "problems": "p", "out": "o"},
            "prm-eval": {"benchmarks": ["a.json", "b"]}}


def _command(name: str) -> Any:
    return typer.main.get_command(app).commands[name]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_config_field_is_an_option_with_its_default_and_help(name: str) -> None:
    cls = COMMANDS[name]
    params = {p.name: p for p in _command(name).params}
    by_name = {o.name: o for o in field_options(cls)}
    for f in dataclasses.fields(cls):
        if not meta(f, "cli"):
            assert (name, f.name) in API_ONLY, f"{name}: {f.name} has no CLI option"
            continue
        option = by_name[f.name]
        for sub in (option, *option.subs):
            param = params[sub.name]
            assert param.help == meta(sub.field, "help"), (name, sub.name)
            default = default_of(sub.field)
            if default is dataclasses.MISSING:
                assert param.required, (name, sub.name)
                continue
            value = sub.to_config(param.default)
            assert (default if value is dataclasses.MISSING else value) == default, \
                (name, sub.name, param.default, default)


def test_a_command_line_gives_the_same_config_as_the_recipe_path() -> None:
    """`scope train --lora-r 8` keeps the dataclass' lora_alpha (32), like a recipe does."""
    cmd = _command("train")
    args = ["--data", "d", "--policy", "hf:/m", "--out", "o", "--lora-r", "8"]
    cfg = build_config(TrainConfig, cmd.make_context("train", args).params)
    assert cfg == TrainConfig(data="d", policy="hf:/m", output_dir="o", lora_r=8)
    assert cfg.lora_alpha == 32


def _other(option: Any, value: Any) -> Any:
    """A value of the option's type that differs from `value`."""
    if option.shape == "bool":
        return not value
    if option.shape == "json":
        return {"k": [1, "x"]}
    if option.shape == "seq":
        return ("accepted", "x") if option.base is str else (2, 4)
    if option.shape == "text":
        return 0.25
    base = option.base
    if base is int:
        return (value or 0) + 3
    if base is float:
        return (value or 0.0) + 0.375
    return f"v-{option.name}"


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_dry_run_words_parse_back_to_the_same_config(name: str) -> None:
    cls = COMMANDS[name]
    changes: dict[str, Any] = {}
    for option in field_options(cls):
        if option.name in REQUIRED[name] or meta(option.field, "secret"):
            continue
        if option.subs:  # flags for some keys, the JSON object for the others
            changes[option.name] = {"tensor_parallel_size": 2, **{
                s.name: _other(s, default_of(s.field)) for s in option.subs}}
        else:
            changes[option.name] = _other(option, default_of(option.field))
    cfg = cls(**REQUIRED[name], **changes, storage_options={"key": "secret"})
    words, notes = command_args(cfg)
    assert notes == [] and "secret" not in " ".join(words)
    parsed = build_config(cls, _command(name).make_context(name, words).params)
    assert parsed == dataclasses.replace(cfg, storage_options=None)


def test_problems_config_words_are_scope_problems_arith_options() -> None:
    from pipelines.loop.round_inputs import ProblemsConfig

    cfg = ProblemsConfig(out="o", count=5, seed=2, steps=(2, 4), modulus=7, exclude_from="t")
    words, notes = command_args(cfg)
    assert notes == ['exclude_from="t"']
    params = _command("problems").make_context("problems", ["arith", *words]).params
    assert (params["out"], params["count"], params["seed"], params["steps"],
            params["modulus"]) == ("o", 5, 2, "2-4", 7)


def test_identity_decides_what_is_hashed() -> None:
    """The options that rerun a stage (pinned: a change here changes resume behaviour)."""
    gen = GenerateConfig(**REQUIRED["generate"], storage_options={"secret": "x"})
    assert set(identity(gen)) == {"policy", "n", "round", "temperature", "top_p", "top_k",
                                  "max_new_tokens", "seed", "limit", "template", "dtype",
                                  "prompts_per_round", "prompt_seed", "policy_version",
                                  "prompt_batch"}
    corr = CorrectConfig(**REQUIRED["correct"])
    assert set(identity(corr)) == {
        "teacher", "mode", "min_prefix_steps", "max_corrections_per_group", "only_all_failed",
        "require_correct", "attempts", "max_new_tokens", "temperature", "top_p", "seed",
        "template", "policy_tokenizer", "max_response_tokens", "split_mode", "dtype"}
    score = ScoreConfig(**REQUIRED["score"])
    assert set(identity(score)) == {"prm", "threshold", "only_failed", "step_mode", "tokenizer",
                                    "tune_on", "prm_options"}
    train = TrainConfig(**REQUIRED["train"])
    assert set(identity(train)) == {f.name for f in dataclasses.fields(TrainConfig)} - {
        "data", "output_dir", "use_cpu", "trust_remote_code", "logprob_chunk_rows",
        "gradient_checkpointing", "storage_options", "report_to", "run_name", "logging_dir"}
    assert identity(train)["accepted_statuses"] == list(train.accepted_statuses)  # JSON values
    for name, cls in COMMANDS.items():
        if name in REQUIRED:
            assert "storage_options" not in identity(cls(**REQUIRED[name]))
    assert manifest_config("score", score) == {"stage": "score", **identity(score),
                                               "prm_fingerprint": None}  # rule:arith: no weights
    assert "teacher_fingerprint" in manifest_config("correct", corr)
    # how to run (devices, batch sizes, shards) never reruns a stage; what comes out does
    assert identity(dataclasses.replace(gen, device="cuda", batch_size=8, num_shards=4,
                                        out="elsewhere")) == identity(gen)
    assert identity(dataclasses.replace(gen, temperature=0.5)) != identity(gen)


def test_training_arguments_come_from_the_config() -> None:
    cfg = TrainConfig(**REQUIRED["train"], learning_rate=3e-4, per_device_train_batch_size=3,
                      gradient_accumulation_steps=2, num_train_epochs=2.0, max_steps=5,
                      weight_decay=0.1, lr_scheduler_type="linear", warmup_steps=2,
                      optim="adamw_torch", max_grad_norm=0.5, seed=7,
                      gradient_checkpointing=True, use_cpu=True)
    args = cfg.training_arguments("scratch")
    for name in ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
                 "num_train_epochs", "max_steps", "weight_decay", "warmup_steps", "optim",
                 "max_grad_norm", "bf16", "seed", "gradient_checkpointing", "use_cpu"):
        assert getattr(args, name) == getattr(cfg, name), name
    assert args.lr_scheduler_type == "linear" and args.data_seed == 7
    assert args.output_dir == "scratch" and args.save_strategy == "no"
    assert args.report_to == [] and not args.remove_unused_columns
