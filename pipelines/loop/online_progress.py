"""The launcher's view of an online run (`scope run --online`), read off the stage markers.

Each finished stage prints one line (a terminal or a log file alike) with where every worker
role stands: the last round it finished, the policy version that sampled the generate worker's
round, how many rounds each later role lags the generate worker (eval: the trainer), the
trainer's period (seconds per round) and the run's generation throughput. At the end,
`summary_rows` gives one row per role for the closing summary. A marker that does not parse
(an odd folder name, a body that is not an object) still prints its line; it never stops the
launcher.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.console import printable
from pipelines.loop.runner import ROLES, marker_output, read_marker, stage_role

ROUND = re.compile(r"round-(\d+)")


@dataclass
class _Done:
    seconds: float  # the stage's own wall time (its marker)
    at: float       # when the launcher saw it, since the launch
    rows: int | None = None  # generate: rollouts written


@dataclass
class OnlineProgress:
    """Stage markers seen so far, by (round, role); `update` prints a line per new one."""

    run_dir: Path
    max_staleness: int
    roles: list[str]
    read_marker: Callable[[str], dict[str, Any] | None]  # relative name -> its JSON body
    t0: float = field(default_factory=time.monotonic)
    clock: Callable[[], float] = time.monotonic
    done: dict[tuple[int, str], list[_Done]] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)

    def update(self, markers: list[str], echo: Any) -> None:
        """Record markers (`round-XXXX/_stages/<stage>.json`, relative to the run folder) not
        seen before and `echo` a status line for each."""
        for marker in sorted(set(markers) - self.seen, key=_plan_order):
            self.seen.add(marker)
            where, _, name = marker.partition("/_stages/")
            name = name.removesuffix(".json")
            if m := ROUND.fullmatch(where):
                body = self.read_marker(marker) or {}
                role = stage_role(where, name)
                rows = _rows(self.run_dir, body) if role == "generate" else None
                seconds = body.get("seconds")
                self.done.setdefault((int(m.group(1)), role), []).append(_Done(
                    float(seconds) if isinstance(seconds, (int, float)) else 0.0,
                    self.elapsed(), rows))
            echo(f"[{self.elapsed():7.1f}s] {printable(where)}/{printable(name)} done | "
                 f"{self.status()}")

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def last_round(self, role: str) -> int | None:
        rounds = [r for r, rr in self.done if rr == role]
        return max(rounds) if rounds else None

    def status(self) -> str:
        """generate r3 (v2) · score r3 · correct r2 (lag 1) · train r2 · eval r2 | 2.4 s/round,
        51 rollouts/s: each role's last finished round, the version that sampled generate's,
        rounds behind generate (eval: behind train), trainer period, generation throughput."""
        gen, trained = self.last_round("generate"), self.last_round("train") or 0
        parts = []
        for role in self.roles:
            r = self.last_round(role)
            if r is None:
                parts.append(f"{role} -")
            elif role == "generate":  # the policy version that sampled round r
                parts.append(f"generate r{r} (v{max(0, r - 1 - self.max_staleness)})")
            else:
                lag = (gen or 0) - r if role != "eval" else trained - r
                parts.append(f"{role} r{r}" + (f" (lag {lag})" if lag > 0 else ""))
        figures = []
        if (period := self.period()) is not None:
            figures.append(f"{period:.1f} s/round")
        if (rate := self.rollouts_per_second()) is not None:
            figures.append(f"{rate:.0f} rollouts/s")
        return " · ".join(parts) + (" | " + ", ".join(figures) if figures else "")

    def period(self, last: int = 3) -> float | None:
        """The trainer's seconds per round over its last `last` rounds."""
        ends = sorted(d.at for (r, role), ds in self.done.items() if role == "train" for d in ds)
        if len(ends) < 2:
            return None
        ends = ends[-(last + 1):]
        return (ends[-1] - ends[0]) / (len(ends) - 1)

    def rollouts_per_second(self) -> float | None:
        """Rollouts generated per second of the run's wall time since the first generate
        stage finished (start-up excluded; several generate workers count together)."""
        gens = sorted((d.at, d.rows) for (_, role), ds in self.done.items() if role == "generate"
                      for d in ds if d.rows is not None)
        if len(gens) < 2 or gens[-1][0] <= gens[0][0]:
            return None
        return sum(rows for _, rows in gens[1:]) / (gens[-1][0] - gens[0][0])

    def summary_rows(self, workers: dict[str, Any]) -> list[tuple[str, Any]]:
        """One row per role: rounds finished, busy share of the run's wall time (a role split
        over several workers: their count instead; a marker holds one worker's time), restarts.
        `workers`: worker name (role, or role-i) -> {"restarts": n}."""
        wall = max(self.elapsed(), 1e-9)
        rows = []
        for role in self.roles:
            mine = [d for (_, rr), ds in self.done.items() if rr == role for d in ds]
            names = [name for name in workers if name.split("-")[0] == role]
            restarts = sum(workers[name].get("restarts", 0) for name in names)
            busy = (f"busy {100 * sum(d.seconds for d in mine) / wall:.0f}%" if len(names) <= 1
                    else f"{len(names)} workers")
            rows.append((f"{role} worker", f"{len({r for r, rr in self.done if rr == role})} "
                         f"rounds, {busy}, {restarts} restarts"))
        if (period := self.period(last=10**6)) is not None:
            rows.append(("seconds per round (trainer)", round(period, 2)))
        return rows


def _plan_order(marker: str) -> tuple[str, int, str]:
    """Markers seen in one poll, in the order the plan runs them (not by name: generate before
    correct), so the view never shows a stage done before its input."""
    where, _, name = marker.partition("/_stages/")
    role = stage_role(where, name.removesuffix(".json"))
    return where, ROLES.index(role) if role in ROLES else -1, name


def read_local(run_dir: Path) -> Callable[[str], dict[str, Any] | None]:
    """A marker reader for a run folder on this machine."""
    return lambda name: read_marker(run_dir / name)


def _rows(run_dir: Path, marker: dict[str, Any]) -> int | None:
    """Rows of the table a generate marker names, when it is readable here (a launcher on an
    object store mirrors only the markers)."""
    from scope_data.shards import ShardError, read_manifest

    out = marker_output(run_dir, marker)
    try:
        return read_manifest(out).rows if out else None
    except (ShardError, OSError):
        return None
