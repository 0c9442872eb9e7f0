"""`scope tiny-prm`: train (or reuse) the tiny hf-tag PRM of the arith task."""

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
    max_steps: Annotated[int, typer.Option(help="training steps")] = 400,
    seed: Annotated[int, typer.Option(help="data and init seed")] = 0,
    modulus: Annotated[int, typer.Option(help="arith modulus")] = 10,
    num_threads: Annotated[int, typer.Option(help="torch CPU threads")] = 2,
    force: Annotated[bool, typer.Option(help="rebuild even if cached")] = False,
    verbose: Annotated[bool, typer.Option(help="print the training loss")] = False,
) -> None:
    """Train a tiny Math-Shepherd-style PRM on arith responses labelled by the exact checker."""
    from pipelines.console import print_summary
    from pipelines.tiny.policy import load_meta
    from pipelines.tiny.prm import build_tiny_prm

    path = build_tiny_prm(out, max_steps=max_steps, seed=seed, modulus=modulus,
                          num_threads=num_threads, force=force, verbose=verbose)
    meta = load_meta(path)
    ev = meta["eval"]
    print_summary("scope tiny-prm", [
        ("model", str(path)), ("spec", f"hf-tag:{path}"),
        ("train steps / seconds", f"{meta['train']['steps']} / {meta['train']['seconds']}"),
        ("held-out arith F1", ev["f1"]), ("acc. erroneous", ev["acc_erroneous"]),
        ("acc. correct", ev["acc_correct"]),
    ])
    if verbose:
        typer.echo(json.dumps(meta["eval"]))
