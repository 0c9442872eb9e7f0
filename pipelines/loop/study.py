"""`scope study`: does SCOPE beat its baselines, and how does the answer move with PRM quality?

Runs every algorithm x seed x PRM setting on the countdown and arith worlds (recipes
`countdown-tiny`, `arith-tiny`) with everything else equal: the same warm-started tiny policy,
training problems, rounds, samples per problem (sample budget) and optimizer steps per round
(`train.fixed_steps_per_round`), the same seeds. PRM settings: `exact` (the task's process
oracle, `rule:<task>`), `noisy-F` (the oracle with seeded label noise calibrated to first-error
F1 = F, `noisy:rule:<task>?f1=F&seed=<seed>`) and `learned` (a tiny trained PRM: the countdown
hf-cls PRM of `scope tiny-prm --task countdown`, the arith hf-tag PRM of `scope tiny-prm`).
`grpo` and `luffy` never read a PRM, so they run once per seed and are every setting's baseline.

Each (task, seed) is a cell; its first run computes round 0 (the initial policy's evaluation),
which the cell's other runs copy (same stage hashes). Runs are spread over `--workers` processes
(one torch thread each) and resume: rerunning the study reuses every finished stage. Held-out
sets: `heldout` (the training distribution, other seed, no training prompt) and `hard` (the
out-of-distribution set: countdown problems with few solution paths, arith problems with more
operations than training); nothing is tuned on either. The analysis (paired bootstrap CIs,
tables, plots, `study.md`) is :mod:`pipelines.loop.study_report`.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipelines.config import option
from scope_data.algos import ALGO_NAMES, get_algo

STUDY_TASKS = ("countdown", "arith")
RECIPES = {"countdown": "countdown-tiny", "arith": "arith-tiny"}
QUICK = {"tasks": ("countdown",), "seeds": 2, "rounds": 2, "noisy_f1": (0.5,)}
INDEX_FILE = "study.json"


@dataclass
class StudyConfig:
    """Options of `scope study`."""

    out: str = option("scope-study", help="output folder (runs, plots, study.md)")
    quick: bool = option(False, help="countdown only, 2 seeds, 2 rounds, PRMs exact, noisy "
                         "F1 0.5 and learned (about 3 minutes on 2 cores)")
    tasks: tuple[str, ...] = option(STUDY_TASKS, sep=",", help="worlds: countdown,arith")
    algos: tuple[str, ...] = option(ALGO_NAMES, sep=",", help="algorithms to compare")
    seeds: int = option(5, help="seeds per configuration")
    rounds: int | None = option(None, help="rounds per run (default: each recipe's)")
    noisy_f1: tuple[float, ...] = option((0.8, 0.5), sep=",",
                                         help="first-error F1 targets of the noisy PRMs")
    learned_prm: bool = option(True, help="include the learned tiny PRM setting")
    workers: int = option(2, help="runs at once, one process each")
    resamples: int = option(2000, help="bootstrap resamples of the confidence intervals")
    target: str = option("scope", help="the algorithm compared with every other")
    overrides: dict[str, Any] = option(default_factory=dict, cli=False,
                                       help="recipe keys set in every run (smaller tests)")

    def resolved(self) -> StudyConfig:
        """The config with --quick applied (its values replace tasks/seeds/rounds/noisy_f1)."""
        if not self.quick:
            return self
        return StudyConfig(**{**asdict(self), **QUICK, "quick": False})


@dataclass(frozen=True)
class StudyRun:
    """One `scope run` of the study."""

    task: str
    algo: str
    setting: str  # PRM setting name; "-" for algorithms without a PRM
    seed: int
    prm: str

    @property
    def config(self) -> str:
        """The configuration a run is a seed of: `algo` or `algo.setting`."""
        return self.algo if self.setting == "-" else f"{self.algo}.{self.setting}"

    @property
    def name(self) -> str:
        return f"{self.config}-s{self.seed}"

    def folder(self, out: Path) -> Path:
        return out / self.task / "runs" / self.name


def prm_settings(cfg: StudyConfig, task: str) -> dict[str, str]:
    """Setting name -> PRM spec template (`{seed}` is the run's seed)."""
    settings = {"exact": f"rule:{task}"}
    for f1 in cfg.noisy_f1:
        if not 0 < f1 <= 1:
            raise ValueError(f"--noisy-f1 values must be in (0, 1], got {f1}")
        settings[f"noisy-{f1:g}"] = f"noisy:rule:{task}?f1={f1:g}&seed={{seed}}"
    if cfg.learned_prm:
        settings["learned"] = learned_prm_spec(task)
    return settings


def learned_prm_spec(task: str) -> str:
    """The learned tiny PRM of a task, built (or reused from the cache) now."""
    if task == "countdown":
        from pipelines.tiny.countdown_prm import build_countdown_prm

        return f"hf-cls:{build_countdown_prm()}"
    from pipelines.tiny.prm import build_tiny_prm

    return f"hf-tag:{build_tiny_prm()}"


def plan(cfg: StudyConfig) -> list[list[StudyRun]]:
    """The study's cells: per (task, seed), its runs (the first computes round 0)."""
    for task in cfg.tasks:
        if task not in STUDY_TASKS:
            raise ValueError(f"unknown study task {task!r}; use {', '.join(STUDY_TASKS)}")
    for algo in cfg.algos:
        get_algo(algo)
    if cfg.target not in cfg.algos:
        raise ValueError(f"--target {cfg.target!r} is not among --algos ({', '.join(cfg.algos)})")
    if cfg.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {cfg.seeds}")
    cells = []
    for task in cfg.tasks:
        settings = prm_settings(cfg, task)
        for seed in range(cfg.seeds):
            runs = []
            for algo in cfg.algos:
                if not get_algo(algo).uses_prm:
                    runs.append(StudyRun(task, algo, "-", seed, f"rule:{task}"))
                    continue
                runs += [StudyRun(task, algo, name, seed, spec.replace("{seed}", str(seed)))
                         for name, spec in settings.items()]
            cells.append(runs)
    return cells


# what the study changes in a world's recipe: equal optimizer updates for every algorithm, and
# an out-of-distribution set where the recipe has none (arith: more operations than training)
ARITH_HARD = {"name": "hard", "arith": {"count": 128, "seed": 20261, "steps": [7, 8],
                                        "modulus": 10}, "every": 0}


def study_recipe(run: StudyRun, extra: dict[str, Any] | None = None) -> Any:
    """The recipe of one study run: the world's recipe with the run's algo, seed and PRM (and
    `extra` recipe keys last)."""
    from pipelines.loop.recipe import load_recipe

    base = load_recipe(RECIPES[run.task])
    overrides: dict[str, Any] = {"algo": run.algo, "seed": run.seed, "prm": run.prm,
                                 "name": run.name}
    if run.task == "countdown":  # its evaluations cost the most: the first and last round only
        overrides["eval"] = [{**e, "every": 0} for e in base.eval]
    if run.task == "arith":
        overrides["train"] = {**base.train, "fixed_steps_per_round": 6}
        overrides["eval"] = [{**base.eval[0], "every": 2}, ARITH_HARD]
        overrides["evaluate"] = {**base.evaluate, "max_new_tokens": 128}
    return load_recipe(RECIPES[run.task], {**overrides, **(extra or {})})


def run_one(run: StudyRun, out: str, rounds: int | None, first: str | None,
            extra: dict[str, Any]) -> dict[str, Any]:
    """One study run in this (worker) process; its console output goes to a log file."""
    import contextlib

    import torch

    from pipelines.loop import round_loop
    from pipelines.loop.round_inputs import share_round0

    torch.set_num_threads(1)
    folder = run.folder(Path(out))
    if first is not None:  # round 0 and the problems are the same for the whole cell
        share_round0(Path(first), folder)
    recipe = study_recipe(run, extra)
    log = Path(out) / "logs" / run.task / f"{run.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.time()
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        round_loop.run(round_loop.RunConfig(recipe=recipe, out=str(folder), rounds=rounds,
                                            resume=True, verbose=False))
    return {"run": str(folder), "seconds": round(time.time() - t, 1)}


def execute(cfg: StudyConfig, cells: list[list[StudyRun]]) -> list[dict[str, Any]]:
    """Run every cell's runs on `cfg.workers` processes; a cell's other runs start once its
    first has written round 0. Prints one line per finished run (also when not a terminal)."""
    from pipelines.console import console

    out = Path(cfg.out)
    total = sum(len(c) for c in cells)
    done: list[dict[str, Any]] = []
    t0 = time.time()
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=max(1, cfg.workers), mp_context=ctx) as pool:
        pending = {pool.submit(run_one, c[0], cfg.out, cfg.rounds, None, cfg.overrides): (c, 0)
                   for c in cells}
        while pending:
            finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                cell, k = pending.pop(fut)
                try:
                    result = fut.result()
                except Exception as e:  # a failed run stops the study (finished runs are kept)
                    pool.shutdown(wait=False, cancel_futures=True)
                    log = out / "logs" / cell[k].task / f"{cell[k].name}.log"
                    raise RuntimeError(f"study run {cell[k].task}/{cell[k].name} failed: {e} "
                                       f"(log: {log}; rerun the study to resume)") from e
                done.append(result)
                elapsed = time.time() - t0
                eta = elapsed / len(done) * (total - len(done))
                console.print(f"[{len(done)}/{total}] {cell[k].task} {cell[k].name} "
                              f"{result['seconds']:.0f} s; elapsed {elapsed / 60:.1f} min, "
                              f"about {eta / 60:.1f} min left", highlight=False)
                if k == 0:
                    first = str(cell[0].folder(out))
                    for j in range(1, len(cell)):
                        job = pool.submit(run_one, cell[j], cfg.out, cfg.rounds, first,
                                          cfg.overrides)
                        pending[job] = (cell, j)
    return done


def run(cfg: StudyConfig) -> Any:
    """Plan, build the models up front, run everything, analyse; returns the report."""
    from pipelines.console import console
    from pipelines.loop.recipe import load_recipe
    from pipelines.loop.round_inputs import initial_policy
    from pipelines.loop.study_report import analyse

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = cfg.resolved()
    t0 = time.time()
    if cfg.learned_prm:
        console.print("learned PRMs: building or reusing (cached)", highlight=False)
    cells = plan(cfg)  # builds the learned PRMs (cached) while checking the options
    for task in cfg.tasks:  # build (or reuse) each world's tiny policy once, visibly
        t = time.time()
        path = initial_policy(load_recipe(RECIPES[task]))
        console.print(f"{task}: policy {path} ready in {time.time() - t:.0f} s", highlight=False)
    runs = [r for cell in cells for r in cell]
    console.print(f"[bold]scope study[/]: {len(runs)} runs ({', '.join(cfg.tasks)}; "
                  f"{cfg.seeds} seeds; algos {', '.join(cfg.algos)}) on {cfg.workers} "
                  f"worker(s)", highlight=False)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    index = {"config": asdict(cfg), "runs": [{**asdict(r), "name": r.name,
                                              "folder": str(r.folder(out))} for r in runs]}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    timings = execute(cfg, cells)
    return analyse(cfg, runs, timings, seconds=time.time() - t0)
