"""The stage runner of a run folder: runs (or prints, or, for an online worker, waits for) each
stage of the round loop's plan, skipping those whose completion marker holds the same config
hash (`pipelines.loop.round_loop` walks the plan; `pipelines.loop.online` runs it per role)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.config import identity
from scope_data.folder import write_local_atomic
from scope_data.hashing import config_hash

ROLES = ("generate", "score", "correct", "train", "eval")  # online worker roles, in plan order


def stage_role(where: str, name: str) -> str:
    """The worker role that runs a stage (`scope worker ROLE`): problems, generate, score,
    correct, train or eval."""
    return "problems" if where == "problems" else name.split("-")[0]


def read_marker(marker: Path) -> dict[str, Any] | None:
    """A completion marker's body; None when it is absent, half-written or not an object (a
    marker another worker is replacing or removing at this moment)."""
    try:
        body = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def marker_hash(marker: Path) -> str | None:
    """The config hash a completion marker holds; None when there is no readable marker."""
    return (read_marker(marker) or {}).get("config_hash")


def marker_output(run_dir: Path, body: dict[str, Any]) -> str:
    """The output folder a marker names (`$RUN_DIR/...`, see `StageRunner.relative`)."""
    return str(body.get("output", "")).replace("$RUN_DIR", str(run_dir))


def _output(cfg: Any) -> Any:
    """A stage config's output (not part of its hash): `out`, or the trainer's `output_dir`."""
    return getattr(cfg, "out", None) or getattr(cfg, "output_dir", None)


class StageRunner:
    """Runs (or prints) the stages of one run folder, skipping those already done.

    With `role` set (an online worker, `pipelines.loop.online`) it runs only the stages of that
    role and, before each, waits for the markers of the stages it reads (`wait`); with `store`
    (a `run_store.RunStore`: `run_dir` mirrors a run folder on an object store) it takes a stage
    of its role done there, and publishes each stage of its role it finds or completes;
    `mirror_all`: before each of its stages it also waits for every earlier stage of the plan
    (the eval worker: metrics read every table of a round); `share`: one of several workers
    splitting its role's stages by shard (`online.Share`: runs its shards; only one clears a
    stale output)."""

    def __init__(self, run_dir: Path, resume: bool, dry_run: bool, verbose: bool,
                 role: str | None = None, wait: Any = None, store: Any = None,
                 mirror_all: bool = False, share: Any = None):
        self.run_dir, self.resume, self.dry_run, self.verbose = run_dir, resume, dry_run, verbose
        self.role, self.wait, self.store, self.share = role, wait, store, share
        self.mirror_all, self.pending = mirror_all, []
        self.markers: dict[str, Path] = {}  # stage hash -> its completion marker
        self.plan: list[tuple[str, Any]] = []
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def settle(self, digest: str) -> None:
        """An online worker about to read a whole round (its metrics) waits for the stage
        `digest` (the round's training) and every stage still pending; offline: nothing."""
        if self.role is None or self.dry_run:
            return
        if digest in self.markers:
            self.wait(self.markers[digest], digest)
        self._wait_pending()

    def _wait_pending(self) -> None:
        """Wait for the other roles' stages recorded by `mirror_all` (the eval worker)."""
        for earlier in self.pending:
            self.wait(*earlier)
        self.pending.clear()

    def relative(self, config: dict[str, Any]) -> dict[str, Any]:
        """Paths inside the run folder written as $RUN_DIR/...: a moved run still resumes."""
        text = json.dumps(config, default=str)
        return json.loads(text.replace(str(self.run_dir) + "/", "$RUN_DIR/"))

    def stage(self, where: str, name: str, cfg: Any, upstream: list[str], action: Any,
              plan: bool = True) -> str:
        """Run `action(cfg)` unless the marker `where/_stages/name.json` has this config's hash;
        `plan`: list it in the `--dry-run` plan (False: the loop's own steps, no command)."""
        body = {"stage": name, "config": self.relative(identity(cfg)),
                "upstream": upstream}
        digest = config_hash(body)
        label = f"{where}/{name}"
        if plan:
            self.plan.append((stage_role(where, name), cfg))
        if self.dry_run:
            if callable(check := getattr(cfg, "check", None)):
                check()  # option values (NaN, ranges) are refused before anything runs
            return digest
        marker = self.run_dir / where / "_stages" / f"{name}.json"
        self.markers[digest] = marker
        if self.role is not None:
            if stage_role(where, name) != self.role:
                if self.mirror_all:
                    self.pending.append((marker, digest))
                return digest  # another worker's stage, waited for when one of ours reads it
            for up in upstream:
                if up in self.markers:
                    self.wait(self.markers[up], up)
            self._wait_pending()
            if self.store is not None:
                self.store.pull(marker, digest)
        if (old := read_marker(marker)) is not None:
            if old.get("config_hash") == digest and self.resume:
                self.skipped.append(label)
                if self.store is not None:
                    self.store.push(marker)  # a worker killed before it published
                return digest
            if old.get("config_hash") == digest:
                raise FileExistsError(
                    f"{self.run_dir}: {label} is already done; pass --resume to continue this "
                    "run, or choose a new --out"
                )
            if self.share is None or self.share.clears(marker, digest):
                _clear_stale_output(self.run_dir, cfg)  # done with another config: rerun afresh
                marker.unlink(missing_ok=True)
        t0 = time.time()
        from pipelines.console import console

        console.print(f"[bold cyan]>> {label}[/]", highlight=False)
        with (contextlib.nullcontext() if self.verbose  # else stage summaries (stdout) silenced
              else _quiet()):
            if self.share is None:
                action(cfg)
            elif not self.share.run(action, cfg):
                return digest  # our shards are done; the worker finishing the last one marks it
        # two workers of a split stage may both mark it (same content): an atomic rename each
        write_local_atomic(marker, json.dumps({
            **body, "config_hash": digest, "seconds": round(time.time() - t0, 2),
            "output": self.relative({"o": f"{_output(cfg)}"})["o"]}, default=str))
        if self.store is not None:
            self.store.push(marker)
        self.ran.append(label)
        return digest


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """A stage's stdout discarded and its summary tables not even rendered."""
    from pipelines.console import summaries_off

    with contextlib.redirect_stdout(io.StringIO()), summaries_off():
        yield


def _clear_stale_output(run_dir: Path, cfg: Any) -> None:
    """Remove a stage's output that this run folder's stage marker shows the loop wrote with
    another config (stages never write into another config's table: scope_data.ownership)."""
    out = _output(cfg)
    path = Path(out).resolve() if isinstance(out, str) else None
    if path is not None and path.is_relative_to(run_dir) and path != run_dir and path.is_dir():
        shutil.rmtree(path)
