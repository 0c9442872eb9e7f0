"""`scope tiny-prm`: train (or reuse) a tiny learned PRM: hf-tag for arith, hf-cls for countdown."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cli.common import user_errors


def register(app: typer.Typer) -> None:
    app.command("tiny-prm")(tiny_prm)


@user_errors
def tiny_prm(
    out: Annotated[str | None, typer.Option(
        help="model folder to write (default: the cache, $SCOPE_CACHE/tiny-prm/<hash>)")] = None,
    task: Annotated[str, typer.Option(
        help="arith (hf-tag, synthetic slips) | countdown (hf-cls, the tiny countdown policy's "
        "own rollouts labelled by the process oracle)")] = "arith",
    max_steps: Annotated[int | None, typer.Option(
        help="training steps (default: 400 arith, 1200 countdown)")] = None,
    seed: Annotated[int, typer.Option(help="data and init seed")] = 0,
    modulus: Annotated[int, typer.Option(help="arith modulus (countdown: 10 only)")] = 10,
    num_threads: Annotated[int, typer.Option(help="torch CPU threads")] = 2,
    force: Annotated[bool, typer.Option(help="rebuild even if cached")] = False,
    verbose: Annotated[bool, typer.Option(help="print the training loss")] = False,
) -> None:
    """Train a tiny PRM on responses labelled by the task's exact process oracle."""
    from pipelines.console import print_summary
    from pipelines.tiny.policy import load_meta

    steps = {} if max_steps is None else {"max_steps": max_steps}
    if task == "countdown":
        from pipelines.tiny.countdown_prm import build_countdown_prm

        if modulus != 10:
            raise typer.BadParameter("--modulus applies to arith; the countdown PRM learns "
                                     "from the default tiny countdown policy (modulus 10)")
        path = build_countdown_prm(out, seed=seed, num_threads=num_threads, force=force,
                                   verbose=verbose, **steps)
        family = "hf-cls"
    elif task == "arith":
        from pipelines.tiny.prm import build_tiny_prm

        path = build_tiny_prm(out, seed=seed, modulus=modulus, num_threads=num_threads,
                              force=force, verbose=verbose, **steps)
        family = "hf-tag"
    else:
        raise typer.BadParameter(f"--task must be arith or countdown, got {task!r}")
    meta = load_meta(path)
    ev = meta["eval"]
    print_summary("scope tiny-prm", [
        ("model", str(path)), ("spec", f"{family}:{path}"),
        ("train steps / seconds", f"{meta['train']['steps']} / {meta['train']['seconds']}"),
        (f"held-out {task} F1", ev["f1"]), ("acc. erroneous", ev["acc_erroneous"]),
        ("acc. correct", ev["acc_correct"]),
    ])
    if verbose:
        typer.echo(json.dumps(meta["eval"]))
