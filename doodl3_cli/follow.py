"""Following a folder that a training job is still writing checkpoints into.

A checkpoint is ingested only once it is complete: its size and modification time
(for a checkpoint folder, those of every file in it) must stay the same over
`settle_polls` polls. A file renamed into place is complete when it appears, so it
only waits those polls. A checkpoint that fails to load is retried after it settles
again, and reported by name after `retries` failed attempts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from doodl3_cli.artifacts.trajectory import TrajectoryWriter
from doodl3_cli.checkpoints import (
    CHECKPOINT_SUFFIXES,
    checkpoint_digest,
    is_checkpoint_folder,
    natural_key,
    read_checkpoint,
    read_training_fields,
    step_from_name,
)
from doodl3_cli.errors import CheckpointError, RunFolderError, UsageError
from doodl3_cli.record import ModelLayouts, PlannedCheckpoint, append_checkpoint, resolve_layouts, stored_step
from doodl3_cli.runfolder import RunFolder

log = logging.getLogger(__name__)


@dataclass
class FollowResult:
    """Outcome of `record_follow`.

    Attributes
    ----------
    failed : dict of str to str
        Checkpoint path to the error of its last attempt, for every checkpoint given up on.
    """

    trajectory: str
    added: int
    skipped: int
    total: int
    failed: dict[str, str] = field(default_factory=dict)


class FolderWatcher:
    """Report the checkpoints in a folder that have stopped changing.

    Parameters
    ----------
    source : Path
        The folder the training job saves into.
    settle_polls : int
        Number of consecutive polls after the first sighting that must see a
        checkpoint unchanged before it counts as complete.
    retries : int
        Failed load attempts after which a checkpoint is given up on.
    """

    def __init__(self, source: Path, *, settle_polls: int = 2, retries: int = 3):
        self.source = source
        self.settle_polls = settle_polls
        self.retries = retries
        self.done: set[Path] = set()
        self.failed: dict[Path, str] = {}
        self._seen: dict[Path, tuple[tuple, int]] = {}
        self._attempts: dict[Path, int] = {}

    def poll(self) -> tuple[list[Path], bool]:
        """Return the checkpoints that are complete and not yet handled, and whether anything changed."""
        ready = []
        changed = False
        for path in self._candidates():
            if path in self.done or path in self.failed:
                continue
            signature = _signature(path)
            previous = self._seen.get(path)
            if previous is None or previous[0] != signature:
                self._seen[path] = (signature, 0)
                changed = True
                continue
            unchanged = previous[1] + 1
            self._seen[path] = (signature, unchanged)
            if unchanged >= self.settle_polls:
                ready.append(path)
        return sorted(ready, key=lambda p: natural_key(p.name)), changed

    def attempt_failed(self, path: Path, error: Exception) -> None:
        """Count a failed load; retry once the checkpoint settles again, or give up after `retries`."""
        self._attempts[path] = self._attempts.get(path, 0) + 1
        self._seen.pop(path, None)
        if self._attempts[path] >= self.retries:
            self.failed[path] = str(error)
            log.error("%s: giving up after %d failed attempts: %s", path, self._attempts[path], error)
        else:
            log.warning("%s: attempt %d of %d failed, retrying: %s", path, self._attempts[path], self.retries, error)

    def give_up(self, path: Path, reason: str) -> None:
        """Report `path` as failed without retrying."""
        self.failed[path] = reason
        log.error("%s: %s", path, reason)

    def _candidates(self) -> list[Path]:
        try:
            entries = list(self.source.iterdir())
        except FileNotFoundError as exc:
            raise RunFolderError(f"--from {self.source}: folder disappeared while following it") from exc
        return [
            p for p in entries
            if not p.name.startswith(".")
            and ((p.is_file() and p.suffix in CHECKPOINT_SUFFIXES) or is_checkpoint_folder(p))
        ]


def _signature(path: Path) -> tuple:
    """Return (name, size, mtime in ns) of a file, or of every file inside a folder."""
    try:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            return tuple((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        status = path.stat()
        return ((path.name, status.st_size, status.st_mtime_ns),)
    except FileNotFoundError:
        # Deleted or renamed between listing and stat: an empty signature never settles into a load.
        return ()


def record_follow(
    run_path: Path,
    source: Path,
    *,
    trajectory: str | None = None,
    attrs: dict[str, Any] | None = None,
    trust: bool = False,
    poll_interval: float = 1.0,
    until_idle: float | None = None,
    settle_polls: int = 2,
    retries: int = 3,
    on_record: Callable[[PlannedCheckpoint], None] | None = None,
) -> FollowResult:
    """Record checkpoints into one trajectory as a training job writes them into `source`.

    Runs until Ctrl-C (KeyboardInterrupt) or until nothing in `source` has changed for
    `until_idle` seconds, and closes trajectory.h5 cleanly in both cases. Each
    checkpoint's step is the one stored in it, else the last number in its name. A
    checkpoint whose step is not after the last one recorded is reported, not recorded.
    Checkpoints already recorded (same content digest) are skipped, so following again
    after a stop resumes.

    Parameters
    ----------
    run_path, source, trajectory, attrs, trust
        As in `record_directory`.
    poll_interval : float
        Seconds between two looks at `source`.
    until_idle : float, optional
        Stop after this many seconds without a new or changed checkpoint; run until
        interrupted when None.
    settle_polls, retries : int
        See `FolderWatcher`.
    on_record : callable, optional
        Called with each checkpoint after it is recorded.

    Raises
    ------
    UsageError
        When `source` is missing or is a file.
    RunFolderError
        When `source` disappears while it is followed.
    CheckpointError
        When the first checkpoint does not match the model layout.
    """
    if not source.exists():
        raise UsageError(f"--from {source}: folder not found; pass the folder the training job saves into")
    if not source.is_dir():
        raise UsageError(f"--from {source}: is a file, not a folder; pass the folder the training job saves into")
    run = RunFolder(run_path)
    name = trajectory or source.resolve().name
    watcher = FolderWatcher(source, settle_polls=settle_polls, retries=retries)
    session = _FollowSession(run, name, attrs or {}, trust, watcher, on_record)

    log.info("following %s into trajectory '%s' of %s", source, name, run.trajectory)
    last_change = time.monotonic()
    try:
        while True:
            ready, changed = watcher.poll()
            if changed or ready:
                last_change = time.monotonic()
            session.ingest(ready)
            if until_idle is not None and time.monotonic() - last_change >= until_idle:
                log.info("no new checkpoint in %s for %.1f s: stopping", source, until_idle)
                break
            time.sleep(poll_interval)
    except KeyboardInterrupt:
        log.info("interrupted: closing %s", run.trajectory)
    finally:
        session.close()

    return FollowResult(
        name, session.added, session.skipped, session.total, {str(p): reason for p, reason in watcher.failed.items()}
    )


class _FollowSession:
    """The writer and layouts of one follow run, opened at the first complete checkpoint."""

    def __init__(self, run: RunFolder, name: str, attrs: dict[str, Any], trust: bool, watcher: FolderWatcher, on_record):
        self.run = run
        self.name = name
        self.attrs = attrs
        self.trust = trust
        self.watcher = watcher
        self.on_record = on_record
        self.writer: TrajectoryWriter | None = None
        self.layouts: ModelLayouts | None = None
        self.added = 0
        self.skipped = 0
        self.total = 0

    def ingest(self, ready: list[Path]) -> None:
        """Record the complete checkpoints `ready`, in step order."""
        planned = []
        for path in ready:
            try:
                planned.append(self._plan(path))
            except CheckpointError as exc:
                self.watcher.attempt_failed(path, exc)
        for item in sorted(planned, key=lambda c: c.step):
            self._ingest_one(item)

    def _plan(self, path: Path) -> PlannedCheckpoint:
        fields = read_training_fields(path, trust=self.trust)
        step = stored_step(fields)
        if step is None:
            step = step_from_name(path.name)
        if step is None:
            raise CheckpointError(
                f"{path}: no training step stored in the checkpoint and no number in its name; "
                "save checkpoints with their step in the name (e.g. step-100.pt)"
            )
        return PlannedCheckpoint(path, step, float(fields.get("epoch", float("nan"))))

    def _ingest_one(self, item: PlannedCheckpoint) -> None:
        try:
            if self.writer is None:
                self._open(item.path)
            digest = checkpoint_digest(item.path)
            if self.writer.has_digest(digest):
                self.skipped += 1
                self.watcher.done.add(item.path)
                return
            if self.writer.rows and item.step <= self.writer.last_step:
                self.watcher.give_up(
                    item.path,
                    f"step {item.step} is not after step {self.writer.last_step}, the last one recorded in "
                    f"trajectory '{self.name}'; record it into another trajectory (--trajectory NAME)",
                )
                return
            append_checkpoint(self.writer, item, digest, self.layouts, trust=self.trust)
        except CheckpointError as exc:
            self.watcher.attempt_failed(item.path, exc)
            return
        self.added += 1
        self.total = self.writer.rows
        self.watcher.done.add(item.path)
        if self.on_record is not None:
            self.on_record(item)

    def _open(self, first: Path) -> None:
        layouts = resolve_layouts(self.run, first, trust=self.trust)
        checkpoint = read_checkpoint(first, trust=self.trust, model_names=layouts.names)
        layouts.flatten(checkpoint, first)
        attrs = {**checkpoint.hparams, **self.attrs}
        if checkpoint.stripped:
            attrs["stripped_prefix"] = checkpoint.stripped
        if checkpoint.dtypes != ["float32"]:
            attrs["checkpoint_dtypes"] = checkpoint.dtypes
        self.run.path.mkdir(parents=True, exist_ok=True)
        self.writer = TrajectoryWriter(
            self.run.trajectory, layout=layouts.layout, buffer_layout=layouts.buffer_layout, trajectory=self.name,
            attrs=attrs, settings={"source": str(self.watcher.source), "follow": True}, metric_keys=(),
        )
        self.layouts = layouts
        self.total = self.writer.rows

    def close(self) -> None:
        """Close trajectory.h5 if it was opened."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
