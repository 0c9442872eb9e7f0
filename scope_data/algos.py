"""The training algorithms: one record each, read by the round loop, the stages, train and report.

An algorithm decides which stages a round runs (`scope run`), which responses the PRM scores,
how `scope correct` picks and rewrites failed rollouts, which tables `scope train` may read and
whether it uses their corrections. The registry's order is the order of runs, plots and tables.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Algo:
    """One training algorithm (see the module docstring)."""

    name: str
    description: str
    prm_scores: str | None  # responses the PRM must score: None (no PRM), "failed" or "all"
    correction_mode: str | None  # `scope correct --mode` whose corrections it trains on, or None
    trains_from: tuple[str, ...]  # tables `scope train` accepts; the first is what a round feeds
    dense_rewards: bool = False  # advantages get per-token terms from the PRM's step scores

    @property
    def uses_prm(self) -> bool:
        return self.prm_scores is not None

    @property
    def uses_corrections(self) -> bool:
        return self.correction_mode is not None


ALGOS: dict[str, Algo] = {a.name: a for a in (
    Algo("grpo", "GRPO on the policy's own rollouts: no PRM, no teacher",
         None, None, ("rollouts", "scored", "corrected")),
    Algo("luffy", "LUFFY: a failed rollout is replaced by a whole teacher solution (no PRM)",
         None, "luffy", ("corrected",)),
    Algo("prm_dense", "GRPO plus dense step rewards from PRM scores of every response",
         "all", None, ("scored", "corrected"), dense_rewards=True),
    Algo("scope", "SCOPE: the policy's prefix up to the PRM's first error + a teacher suffix",
         "failed", "scope", ("corrected",)),
)}
ALGO_NAMES = tuple(ALGOS)
CORRECTION_MODES = tuple(a.correction_mode for a in ALGOS.values() if a.correction_mode)
# score_status of rows the PRM never scored: `skipped` (a correct response under only_failed),
# `not_scored` (a corrected table built from a rollouts table: no PRM ran)
UNSCORED_STATUSES = ("skipped", "not_scored")


def get_algo(name: str) -> Algo:
    """The record of `name`; ValueError lists the known algorithms."""
    try:
        return ALGOS[name]
    except KeyError:
        raise ValueError(f"unknown algo {name!r}; use one of {', '.join(ALGO_NAMES)}") from None


def mode_needs_scores(mode: str) -> bool:
    """Whether `scope correct --mode` needs a scored table (it reads rollouts directly if not)."""
    if mode not in CORRECTION_MODES:
        raise ValueError(f"unknown correction mode {mode!r}; valid: {', '.join(CORRECTION_MODES)}")
    return any(a.uses_prm for a in ALGOS.values() if a.correction_mode == mode)


def training_input_error(algo: str, table: str, correction_mode: str | None = None,
                         unscored_rows: int = 0) -> str | None:
    """Why `algo` cannot train from a `table` table, or None when it can.

    `correction_mode`: the `--mode` a corrected table was made with (None: not recorded);
    `unscored_rows`: its policy rows without PRM scores (score_status in UNSCORED_STATUSES).
    """
    a = get_algo(algo)
    if table not in a.trains_from:
        return (f"a {table!r} table cannot train algo {algo!r}; expected one of "
                f"{sorted(a.trains_from)}")
    if table == "corrected" and a.uses_corrections and correction_mode not in (
            None, a.correction_mode):
        return (f"the corrected table was made by `scope correct --mode {correction_mode}`; "
                f"algo {algo!r} trains on `--mode {a.correction_mode}` corrections")
    if a.prm_scores == "all" and unscored_rows:
        return (f"algo {algo!r} needs PRM scores on every response, {unscored_rows} rows have "
                "none; score them with only_failed off (`scope score --all`)")
    return None
