"""Recording trajectories: the in-process `Recorder` and directory ingest.

Both write the same trajectory.h5 layout (see `doodl3_cli.artifacts.trajectory`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from doodl3_cli.artifacts.trajectory import Layout, TrajectoryWriter, read_layouts
from doodl3_cli.checkpoints import (
    CHECKPOINT_SUFFIXES,
    STEP_KEYS,
    file_digest,
    flatten_model,
    load_checkpoint,
    match_layout,
    model_layouts,
    natural_key,
    step_from_name,
)
from doodl3_cli.errors import CheckpointError, RunFolderError
from doodl3_cli.runfolder import RunFolder, call_factory

log = logging.getLogger(__name__)


class Recorder:
    """Record a model's parameters from inside a training loop.

    Parameters
    ----------
    run : Path or str
        The run folder (created when missing); checkpoints go to its trajectory.h5.
    model : torch.nn.Module
        The model being trained. Its floating-point parameters and buffers are read
        at every `record` call.
    trajectory : str
        Name of this training run in trajectory.h5, e.g. ``"seed0"``.
    attrs : dict, optional
        What distinguishes the run (seed, learning rate, ...), stored on its group.

    Examples
    --------
    >>> with Recorder("runs/exp1", model, trajectory="seed0", attrs={"seed": 0}) as rec:
    ...     for step in range(steps):
    ...         loss = train_step()
    ...         if step % 10 == 0:
    ...             rec.record(step, loss=loss.item(), lr=lr)
    """

    def __init__(self, run: Path | str, model: nn.Module, *, trajectory: str, attrs: dict[str, Any] | None = None):
        self.run = RunFolder(run)
        self.run.path.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.trajectory = trajectory
        self.attrs = dict(attrs or {})
        self.layout, self.buffer_layout = model_layouts(model)
        self._writer: TrajectoryWriter | None = None

    def record(self, step: int, *, epoch: float = float("nan"), **metrics: float) -> None:
        """Append the model's current parameters as the checkpoint at `step`.

        Parameters
        ----------
        step : int
            Training step (optimizer updates so far).
        epoch : float, optional
            Fractional epoch, NaN when unknown.
        **metrics : float
            Scalars logged with the checkpoint (train loss, learning rate, ...). The
            keys of the first call fix which metrics the trajectory stores.
        """
        if self._writer is None:
            self._writer = TrajectoryWriter(
                self.run.trajectory,
                layout=self.layout,
                buffer_layout=self.buffer_layout,
                trajectory=self.trajectory,
                attrs=self.attrs,
                settings={"source": "Recorder"},
                metric_keys=sorted(metrics),
            )
        with torch.no_grad():
            params, buffers = flatten_model(self.model, self.layout, self.buffer_layout)
        self._writer.append(
            params, buffers, step=step, epoch=epoch,
            metrics={k: float(v) for k, v in metrics.items()}, source="live",
        )

    def close(self) -> None:
        """Close trajectory.h5 and store its content id."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass
class IngestResult:
    """Outcome of `record_directory`."""

    trajectory: str
    added: int
    skipped: int
    total: int


def find_checkpoints(source: Path) -> list[Path]:
    """Return the checkpoint files directly inside `source`, in natural name order."""
    if not source.is_dir():
        raise RunFolderError(f"--from {source}: not a directory; pass the folder that holds the checkpoints")
    files = [p for p in source.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES]
    if not files:
        raise CheckpointError(
            f"--from {source}: no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)}) found; "
            "point --from at the folder the training loop saves into"
        )
    return sorted(files, key=lambda p: natural_key(p.name))


def _checkpoint_step(path: Path, meta: dict[str, Any]) -> tuple[int | None, float]:
    epoch = float(meta["epoch"]) if "epoch" in meta else float("nan")
    for key in STEP_KEYS:
        if key in meta:
            return int(meta[key]), epoch
    return step_from_name(path.name), epoch


def _layouts_for(run: RunFolder, first_state: dict[str, torch.Tensor]) -> tuple[Layout, Layout]:
    if run.trajectory.is_file():
        return read_layouts(run.trajectory)
    if run.config_path.is_file():
        config = run.load_config()
        model = call_factory(config.model, base=run.path)
        if not isinstance(model, nn.Module):
            from doodl3_cli.errors import ConfigError

            raise ConfigError(f"{config.path}: [model] factory returned {type(model).__name__}, not a torch.nn.Module")
        return model_layouts(model)
    log.info("no doodl3.toml in %s: taking the layout from the first checkpoint", run.path)
    params = {k: v for k, v in first_state.items() if v.is_floating_point() and not _is_buffer_name(k)}
    buffers = {k: v for k, v in first_state.items() if v.is_floating_point() and _is_buffer_name(k)}
    return Layout.from_tensors(params), Layout.from_tensors(buffers, {n: "buffer" for n in buffers})


def _is_buffer_name(name: str) -> bool:
    return name.rpartition(".")[2] in ("running_mean", "running_var")


def record_directory(
    run_path: Path,
    source: Path,
    *,
    trajectory: str | None = None,
    attrs: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> IngestResult:
    """Ingest a folder of PyTorch state_dict checkpoints as one trajectory.

    Checkpoints are ordered by the step stored in them (``global_step``, ``step``,
    ``iteration``), else by the last number in the file name. Files whose content
    digest is already recorded in the trajectory are skipped, so an interrupted
    ingest resumes where it stopped.

    Parameters
    ----------
    run_path : Path
        The run folder; created when missing. When it holds doodl3.toml, keys are
        matched against the model it builds.
    source : Path
        Folder with ``.pt``/``.pth`` files.
    trajectory : str, optional
        Name of the trajectory; the folder name by default.
    attrs : dict, optional
        Run attributes (seed, learning rate, ...).
    progress : callable, optional
        Called as ``progress(done, total)`` after each file.

    Raises
    ------
    CheckpointError
        When a file cannot be loaded, does not match the layout, or the order is ambiguous.
    """
    run = RunFolder(run_path)
    files = find_checkpoints(source)
    name = trajectory or source.resolve().name

    loaded = []
    for path in files:
        state, meta = load_checkpoint(path)
        step, epoch = _checkpoint_step(path, meta)
        if step is None:
            raise CheckpointError(
                f"{path}: no training step stored in the checkpoint and no number in the file name; "
                "rename the files with their step (e.g. step-100.pt)"
            )
        loaded.append((step, epoch, path))
        del state

    steps = [s for s, _, _ in loaded]
    if len(set(steps)) != len(steps):
        duplicates = sorted({s for s in steps if steps.count(s) > 1})[:5]
        raise CheckpointError(
            f"--from {source}: several checkpoints have the same step {duplicates}; "
            "record each training run into its own trajectory (--trajectory NAME)"
        )
    loaded.sort(key=lambda item: item[0])

    first_state, _ = load_checkpoint(loaded[0][2])
    layout, buffer_layout = _layouts_for(run, first_state)

    # Check the first checkpoint before the writer creates trajectory.h5, because a file created
    # with the wrong model's layout would make every later ingest compare against that layout.
    match_layout(first_state, layout, path=loaded[0][2])
    match_layout(first_state, buffer_layout, path=loaded[0][2], what="buffers")
    del first_state

    run.path.mkdir(parents=True, exist_ok=True)
    with TrajectoryWriter(
        run.trajectory, layout=layout, buffer_layout=buffer_layout, trajectory=name, attrs=attrs or {},
        settings={"source": str(source)}, metric_keys=(),
    ) as writer:
        pending = [(step, epoch, path, file_digest(path)) for step, epoch, path in loaded]
        new = [item for item in pending if not writer.has_digest(item[3])]
        if new and writer.rows and new[0][0] <= writer.last_step:
            raise CheckpointError(
                f"{new[0][2]}: step {new[0][0]} is not after step {writer.last_step}, the last one recorded in "
                f"trajectory '{name}'; record these checkpoints into a new trajectory (--trajectory NAME)"
            )

        skipped = len(pending) - len(new)
        for done, (step, epoch, path, digest) in enumerate(new, start=1):
            state, _ = load_checkpoint(path)
            params = match_layout(state, layout, path=path)
            buffers = match_layout(state, buffer_layout, path=path, what="buffers") if buffer_layout.entries else np.empty(0, np.float32)
            writer.append(params, buffers, step=step, epoch=epoch, source=str(path), source_digest=digest)
            log.debug("recorded %s as step %d", path, step)
            if progress is not None:
                progress(skipped + done, len(pending))
        added = len(new)
        total = writer.rows

    log.info("trajectory %s: %d checkpoints added, %d already recorded", name, added, skipped)
    return IngestResult(name, added, skipped, total)
