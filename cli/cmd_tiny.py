"""`scope tiny-policy`: build (or reuse from the cache) a warm-started tiny policy (arith or
countdown)."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import user_errors


def register(app: typer.Typer) -> None:
    app.command("tiny-policy")(tiny_policy)


def _steps(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    try:
        low, high = int(lo), int(hi) if sep else int(lo)
    except ValueError:
        raise typer.BadParameter(f"--steps must look like 3-6 or 4, got {text!r}") from None
    if not 1 <= low <= high:
        raise typer.BadParameter(f"--steps needs 1 <= low <= high, got {text!r}")
    return low, high


@user_errors
def tiny_policy(
    out: Annotated[str | None, typer.Option(
        help="model folder to write (default: the cache, $SCOPE_CACHE/tiny/<hash>)")] = None,
    task: Annotated[str, typer.Option(help="arith | countdown")] = "arith",
    steps: Annotated[str, typer.Option(help="arith: operations per problem, LOW-HIGH")] = "3-6",
    modulus: Annotated[int, typer.Option(help="arithmetic modulus")] = 10,
    numbers: Annotated[int, typer.Option(help="countdown: numbers per problem")] = 4,
    min_solutions: Annotated[int, typer.Option(
        help="countdown: fewest solution paths of a training problem")] = 1,
    max_solutions: Annotated[int | None, typer.Option(
        help="countdown: most solution paths of a training problem (default: no bound)")] = None,
    error_rate: Annotated[float, typer.Option(
        help="share of training solutions with one injected step error")] = 0.3,
    teacher: Annotated[bool, typer.Option(
        "--teacher", help="train on clean solutions only (a model teacher)")] = False,
    seed: Annotated[int, typer.Option(help="training seed")] = 0,
    max_steps: Annotated[int | None, typer.Option(help="SFT optimizer steps")] = None,
    num_threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    force: Annotated[bool, typer.Option("--force", help="rebuild even if cached")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="show training logs")] = False,
) -> None:
    """Build the tiny Qwen2 policy (char tokenizer, SFT warm start) and print its response mix."""
    from pipelines.console import print_summary
    from pipelines.tiny.policy import build_tiny_policy, load_meta

    if not 0 <= error_rate <= 1:
        raise typer.BadParameter(f"--error-rate must be in [0, 1], got {error_rate}")
    if task == "countdown":
        from pipelines.tiny.countdown import build_tiny_countdown_policy

        path = build_tiny_countdown_policy(
            out, numbers=numbers, modulus=modulus, min_solutions=min_solutions,
            max_solutions=max_solutions, error_rate=0.0 if teacher else error_rate, seed=seed,
            max_steps=max_steps, num_threads=num_threads, force=force, verbose=verbose,
        )
    elif task == "arith":
        path = build_tiny_policy(
            out, steps=_steps(steps), modulus=modulus, error_rate=error_rate, teacher=teacher,
            seed=seed, max_steps=max_steps, num_threads=num_threads, force=force,
            verbose=verbose,
        )
    else:
        raise typer.BadParameter(f"--task must be arith or countdown, got {task!r}")
    meta = load_meta(path)
    mix, train = meta.get("mix", {}), meta.get("train", {})
    print_summary("scope tiny-policy", [
        ("model", str(path)), ("spec", f"hf:{path}"), ("config hash", meta.get("config_hash")),
        ("task", task), ("kind", "teacher (clean solutions)" if teacher else "policy"),
        ("parameters", train.get("num_parameters")), ("train steps", train.get("steps")),
        ("final loss", train.get("final_loss")),
        ("held-out problems", mix.get("n")), ("temperature", mix.get("temperature")),
        ("correct share", mix.get("correct_share")),
        ("all steps correct share", mix.get("process_correct_share")),
        ("failed responses", mix.get("failed")),
        ("failed with first error after step 0", mix.get("non_step0_share")),
        ("first-error histogram", mix.get("first_error_hist")),
        ("build seconds", meta.get("build_seconds")),
    ])
