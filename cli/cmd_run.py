"""`scope run RECIPE --out RUN_DIR`: the round loop (generate, score, correct, train, eval)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import shlex
import typing
from typing import Annotated, Any

import typer

from cli.common import user_errors

# stage kind -> (module, function, leading words) of the command that runs it by hand
COMMANDS = {
    "problems": ("cli.cmd_problems", "problems", ["problems", "arith"]),
    "generate": ("cli.cmd_generate", "generate", ["generate"]),
    "score": ("cli.cmd_score", "score", ["score"]),
    "correct": ("cli.cmd_correct", "correct", ["correct"]),
    "train": ("cli.cmd_train", "train", ["train"]),
    "eval": ("cli.cmd_eval", "eval_", ["eval"]),
}
# config field -> command parameter, where the names differ
ALIASES = {
    "train": {"learning_rate": "lr", "num_train_epochs": "epochs", "output_dir": "out",
              "per_device_train_batch_size": "per_device_batch_size",
              "gradient_accumulation_steps": "grad_accum"},
    "generate": {"round": "round_"},
    "eval": {"round": "round_"},
}


def register(app: typer.Typer) -> None:
    app.command("run")(run)


def _flags(kind: str) -> dict[str, str] | None:
    """Parameter name -> its option flag, read from the command's signature (None if absent)."""
    module, func, _ = COMMANDS[kind]
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError):
        return None
    flags = {}
    hints = typing.get_type_hints(fn, include_extras=True)
    for name in inspect.signature(fn).parameters:
        meta = getattr(hints.get(name), "__metadata__", ())
        info = next((m for m in meta if isinstance(m, typer.models.ParameterInfo)), None)
        if isinstance(info, typer.models.OptionInfo):
            decls = [d for d in (info.param_decls or ()) if d.startswith("--")]
            if isinstance(info.default, str) and info.default.startswith("--"):
                decls.insert(0, info.default)  # typer.Option("--flag", ...) inside Annotated
            flags[name] = decls[0] if decls else "--" + name.replace("_", "-")
    return flags


def render_command(kind: str, cfg: Any, launch: dict[str, str] | None = None) -> str:
    """The `scope <stage>` command for a stage config: options that differ from the defaults.

    Config fields the command has no flag for are listed in a trailing comment. `launch` maps a
    stage kind to a launcher prefix replacing `scope` (e.g. train: `accelerate launch ...`).
    """
    _, _, words = COMMANDS[kind]
    flags = _flags(kind)
    launcher = (launch or {}).get(kind)
    aliases = ALIASES.get(kind, {})
    parts, extra = ["scope", *words], []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "storage_options" or value is None:
            continue
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        if f.default_factory is not dataclasses.MISSING and value == f.default_factory():
            continue
        param = aliases.get(f.name, f.name)
        if flags is not None and param not in flags:
            extra.append(f"{f.name}={json.dumps(value, default=str)}")
            continue
        flag = flags[param] if flags is not None else "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, dict):
            parts += [flag, json.dumps(value, separators=(",", ":"))]
        elif isinstance(value, (list, tuple)):
            parts += [flag, "-".join(str(v) for v in value)]
        else:
            parts += [flag, str(value)]
    line = " ".join(shlex.quote(p) for p in parts)
    if launcher:
        line = launcher + line[len("scope"):]
    return line + (f"  # no flag for: {', '.join(extra)}" if extra else "")


@user_errors
def run(
    recipe: Annotated[str, typer.Argument(
        help="recipe YAML file, or a bundled recipe name (arith-tiny, qwen2.5-math-7b)")],
    out: Annotated[str, typer.Option(help="run folder (round-XXXX/<stage>/, metrics.parquet)")],
    rounds: Annotated[int | None, typer.Option(help="rounds (default: the recipe's)")] = None,
    resume: Annotated[bool, typer.Option(
        help="continue a run: skip stages done with the same config")] = False,
    dry_run: Annotated[bool, typer.Option(
        help="print the equivalent `scope <stage>` commands, run nothing")] = False,
    algo: Annotated[str | None, typer.Option(
        help="override the recipe's algo: grpo | luffy | prm_dense | scope")] = None,
    seed: Annotated[int | None, typer.Option(help="override the recipe's seed")] = None,
) -> None:
    """Run (or resume) every round of a recipe and write RUN_DIR/metrics.parquet."""
    from pipelines.loop.round_loop import RunConfig
    from pipelines.loop.round_loop import run as run_loop

    overrides = {k: v for k, v in (("algo", algo), ("seed", seed)) if v is not None}
    result = run_loop(RunConfig(recipe=recipe, out=out, rounds=rounds, resume=resume,
                                dry_run=dry_run, overrides=overrides))
    if dry_run:
        if any("TINY_POLICY" in json.dumps(dataclasses.asdict(c), default=str)
               for _, c in result.plan):
            typer.echo("# first: scope tiny-policy --out TINY_POLICY")
        for kind, cfg in result.plan:
            typer.echo(render_command(kind, cfg, result.launch))
        return
    from pipelines.console import print_summary

    last = result.metrics.filter(result.metrics["round"] == result.metrics["round"].max())
    rows = [("run folder", result.run_dir), ("stages run", len(result.ran)),
            ("stages skipped (done)", len(result.skipped))]
    for r in last.iter_rows(named=True):
        rows.append((f"{r['eval_set']} accuracy (round {r['round']})", r["accuracy"]))
    print_summary("scope run", rows)
