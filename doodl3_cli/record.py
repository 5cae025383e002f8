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
    MAX_KEYS_IN_MESSAGE,
    STEP_KEYS,
    Checkpoint,
    checkpoint_digest,
    flatten_model,
    is_checkpoint_folder,
    match_layout,
    model_layouts,
    natural_key,
    read_checkpoint,
    read_training_fields,
    shared_storage_aliases,
    step_from_name,
    tied_aliases,
)
from doodl3_cli.errors import CheckpointError, ConfigError, UsageError
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


ORDERS = ("auto", "step", "name", "mtime")


@dataclass
class PlannedCheckpoint:
    """One checkpoint file or folder with its place in training."""

    path: Path
    step: int
    epoch: float


@dataclass
class ModelLayouts:
    """Layouts and tied-weight aliases that each checkpoint of a trajectory is matched against."""

    layout: Layout
    buffer_layout: Layout
    aliases: dict[str, list[str]]
    reference: str
    fix: str

    @property
    def names(self) -> list[str]:
        """Parameter and buffer names of the model."""
        return self.layout.names + self.buffer_layout.names

    def flatten(self, checkpoint: Checkpoint, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """Return the checkpoint's float32 (parameters [P], buffers [B]); raise CheckpointError on a mismatch."""
        params = match_layout(
            checkpoint.state, self.layout, path=path, aliases=self.aliases, reference=self.reference, fix=self.fix
        )
        if not self.buffer_layout.entries:
            return params, np.empty(0, np.float32)
        return params, match_layout(
            checkpoint.state, self.buffer_layout, path=path, what="buffers", reference=self.reference, fix=self.fix
        )


def find_checkpoints(source: Path) -> list[Path]:
    """Return the checkpoints directly inside `source`, in natural name order.

    A checkpoint is a file ending in one of `CHECKPOINT_SUFFIXES` or a folder holding
    one model's weights (a Hugging Face ``checkpoint-N/``, a sharded safetensors index).
    """
    if not source.exists():
        raise UsageError(f"--from {source}: folder not found; pass the folder that contains the checkpoints")
    if not source.is_dir():
        raise UsageError(f"--from {source}: is a file, not a folder; pass the folder that contains the checkpoints")
    if is_checkpoint_folder(source):
        raise CheckpointError(
            f"--from {source}: is one checkpoint folder (it contains a model's weights), not a folder of "
            f"checkpoints; pass its parent, --from {source.resolve().parent}"
        )
    found = [p for p in source.iterdir() if _is_checkpoint(p)]
    if not found:
        raise CheckpointError(
            f"--from {source}: no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)}) or checkpoint folders "
            "found; point --from at the folder the training loop saves into"
        )
    return sorted(found, key=lambda p: natural_key(p.name))


def _is_checkpoint(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    return (path.is_file() and path.suffix in CHECKPOINT_SUFFIXES) or is_checkpoint_folder(path)


def stored_step(meta: dict[str, Any]) -> int | None:
    """Return the training step stored under one of `STEP_KEYS` in a checkpoint's fields, or None."""
    for key in STEP_KEYS:
        if key in meta:
            return int(meta[key])
    return None


def plan_order(paths: list[Path], *, order: str = "auto", trust: bool = False) -> list[PlannedCheckpoint]:
    """Put checkpoints in training order and give each its step.

    ``auto`` orders by the step stored in each checkpoint (``global_step``, ``step``,
    ``iteration``, or ``trainer_state.json``), else by the last number in the file
    name, else by a whole-number ``epoch`` field. ``step`` uses only the stored step.
    ``name`` orders by file name with numbers compared as numbers, and ``mtime`` by
    modification time. Their steps are the numbers in the names (``name``) or the
    stored steps (``mtime``) when every checkpoint has one, else the positions 0, 1, ...

    Raises
    ------
    CheckpointError
        When no order applies to every checkpoint, or two checkpoints share a step.
    """
    fields = {p: read_training_fields(p, trust=trust) for p in paths}
    epochs = {p: float(fields[p]["epoch"]) if "epoch" in fields[p] else float("nan") for p in paths}
    stored = {p: stored_step(fields[p]) for p in paths}
    named = {p: step_from_name(p.name) for p in paths}

    if order in ("name", "mtime"):
        if order == "name":
            ordered = sorted(paths, key=lambda p: natural_key(p.name))
            given = named
        else:
            ordered = sorted(paths, key=lambda p: (p.stat().st_mtime_ns, natural_key(p.name)))
            given = stored
        use_given = all(given[p] is not None for p in paths)
        planned = [PlannedCheckpoint(p, given[p] if use_given else i, epochs[p]) for i, p in enumerate(ordered)]
        _check_increasing(planned, "file name" if order == "name" else "modification time")
        return planned
    if order == "step":
        steps, rule = stored, "the step stored in each checkpoint"
    elif order == "auto":
        steps, rule = _auto_steps(paths, stored, named, epochs)
    else:
        raise CheckpointError(f"--order {order!r}: unknown order; expected one of {', '.join(ORDERS)}")

    without = [p.name for p in paths if steps[p] is None]
    if without:
        raise CheckpointError(
            f"{paths[0].parent}: no training step found by {rule} for {without[:MAX_KEYS_IN_MESSAGE]}; "
            "name the files with their step (e.g. step-100.pt), or pass --order name or --order mtime"
        )
    planned = sorted((PlannedCheckpoint(p, int(steps[p]), epochs[p]) for p in paths), key=lambda c: c.step)
    _check_unique(planned, rule)
    return planned


def _auto_steps(paths, stored, named, epochs) -> tuple[dict[Path, int | None], str]:
    if all(stored[p] is not None for p in paths):
        return stored, "the step stored in each checkpoint"
    if all(named[p] is not None for p in paths):
        return named, "the number in each file name"
    if all(np.isfinite(epochs[p]) and float(epochs[p]).is_integer() for p in paths):
        return {p: int(epochs[p]) for p in paths}, "the epoch stored in each checkpoint"
    return {p: stored[p] if stored[p] is not None else named[p] for p in paths}, "stored step or file name"


def _check_unique(planned: list[PlannedCheckpoint], rule: str) -> None:
    for before, after in zip(planned, planned[1:]):
        if before.step == after.step:
            raise CheckpointError(
                f"{after.path.parent}: {before.path.name} and {after.path.name} both have step {after.step} by "
                f"{rule}; pass --order name or --order mtime to set the order, or record each training run into "
                "its own trajectory (--trajectory NAME, --per-subfolder)"
            )


def _check_increasing(planned: list[PlannedCheckpoint], rule: str) -> None:
    for before, after in zip(planned, planned[1:]):
        if after.step <= before.step:
            raise CheckpointError(
                f"{after.path}: step {after.step} follows step {before.step} of {before.path.name} in {rule} order; "
                "pass another --order, or record each training run into its own trajectory (--trajectory NAME)"
            )


def resolve_layouts(run: RunFolder, first: Path, *, trust: bool = False) -> ModelLayouts:
    """Return the layouts that checkpoints of `run` are matched against.

    The layout already in trajectory.h5 wins, then the model that doodl3.toml builds,
    then the floating-point tensors of the first checkpoint (tensors stored under
    several names count once).
    """
    model = _config_model(run)
    aliases = tied_aliases(model) if model is not None else {}
    if run.trajectory.is_file():
        layout, buffer_layout = read_layouts(run.trajectory)
        return ModelLayouts(
            layout, buffer_layout, aliases, f"the layout recorded in {run.trajectory}",
            "record checkpoints of another architecture into another run folder",
        )
    if model is not None:
        return ModelLayouts(
            *model_layouts(model), aliases, f"the model in {run.config_path}",
            "check that [model] builds the architecture that wrote this checkpoint",
        )

    log.info("no doodl3.toml in %s: taking the layout from the first checkpoint %s", run.path, first)
    state = read_checkpoint(first, trust=trust).state
    aliases = shared_storage_aliases(state)
    repeated = {alias for others in aliases.values() for alias in others}
    params = {k: v for k, v in state.items() if v.is_floating_point() and not _is_buffer_name(k) and k not in repeated}
    buffers = {k: v for k, v in state.items() if v.is_floating_point() and _is_buffer_name(k)}
    return ModelLayouts(
        Layout.from_tensors(params), Layout.from_tensors(buffers, {n: "buffer" for n in buffers}), aliases,
        f"the first checkpoint {first} (the run folder has no doodl3.toml)",
        "record checkpoints of one architecture per run folder, or add a doodl3.toml whose [model] builds the model",
    )


def _config_model(run: RunFolder) -> nn.Module | None:
    if not run.config_path.is_file():
        return None
    config = run.load_config()
    model = call_factory(config.model, base=run.path)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{config.path}: [model] factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _is_buffer_name(name: str) -> bool:
    return name.rpartition(".")[2] in ("running_mean", "running_var")


def record_directory(
    run_path: Path,
    source: Path,
    *,
    trajectory: str | None = None,
    attrs: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    order: str = "auto",
    trust: bool = False,
) -> IngestResult:
    """Ingest a folder of checkpoints as one trajectory.

    Checkpoints are put in training order by `plan_order`. Files whose content digest
    is already recorded in the trajectory are skipped, so an interrupted ingest resumes
    where it stopped. Only one checkpoint is in memory at a time.

    Parameters
    ----------
    run_path : Path
        The run folder; created when missing. When it contains doodl3.toml, keys are
        matched against the model it builds.
    source : Path
        Folder of checkpoint files and checkpoint folders (see `read_checkpoint`).
    trajectory : str, optional
        Name of the trajectory; the folder name by default.
    attrs : dict, optional
        Run attributes (seed, learning rate, ...). They override the scalar
        hyper-parameters stored in the first checkpoint, which are recorded too.
    progress : callable, optional
        Called as ``progress(done, total)`` after each checkpoint.
    order : {"auto", "step", "name", "mtime"}
        How to put the checkpoints in training order; see `plan_order`.
    trust : bool
        Allow arbitrary unpickling; only for checkpoints from a trusted source.

    Raises
    ------
    UsageError
        When `source` is missing or is a file.
    CheckpointError
        When a checkpoint cannot be loaded, does not match the layout, or the order is ambiguous.
    """
    run = RunFolder(run_path)
    planned = plan_order(find_checkpoints(source), order=order, trust=trust)
    name = trajectory or source.resolve().name

    layouts = resolve_layouts(run, planned[0].path, trust=trust)
    first = read_checkpoint(planned[0].path, trust=trust, model_names=layouts.names)
    # Check the first checkpoint before the writer creates trajectory.h5, because a file created
    # with the wrong model's layout would make every later ingest compare against that layout.
    layouts.flatten(first, planned[0].path)
    run_attrs = {**first.hparams, **(attrs or {})}
    # Recorded only when they differ from a plain float32 state_dict, so that the attributes
    # of a run stay what distinguishes it from the others.
    if first.stripped:
        run_attrs["stripped_prefix"] = first.stripped
    if first.dtypes != ["float32"]:
        run_attrs["checkpoint_dtypes"] = first.dtypes
    del first

    run.path.mkdir(parents=True, exist_ok=True)
    with TrajectoryWriter(
        run.trajectory, layout=layouts.layout, buffer_layout=layouts.buffer_layout, trajectory=name,
        attrs=run_attrs, settings={"source": str(source), "order": order}, metric_keys=(),
    ) as writer:
        added, skipped = _ingest(writer, planned, layouts, trust=trust, progress=progress)
        total = writer.rows

    log.info("trajectory %s: %d checkpoints added, %d already recorded", name, added, skipped)
    return IngestResult(name, added, skipped, total)


def record_subfolders(
    run_path: Path,
    source: Path,
    *,
    attrs: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    order: str = "auto",
    trust: bool = False,
) -> list[IngestResult]:
    """Ingest every subfolder of `source` that contains checkpoints as its own trajectory, named after it.

    Raises
    ------
    UsageError
        When `source` is missing or is a file.
    CheckpointError
        When no subfolder contains checkpoints, or as `record_directory`.
    """
    if not source.exists():
        raise UsageError(f"--from {source}: folder not found; pass the folder whose subfolders contain the runs")
    if not source.is_dir():
        raise UsageError(f"--from {source}: is a file, not a folder; pass the folder whose subfolders contain the runs")
    runs = []
    for folder in sorted(source.iterdir(), key=lambda p: natural_key(p.name)):
        if not folder.is_dir() or folder.name.startswith(".") or is_checkpoint_folder(folder):
            continue
        if any(_is_checkpoint(p) for p in folder.iterdir()):
            runs.append(folder)
        else:
            log.info("%s: no checkpoints inside, so it is not recorded as a trajectory", folder)
    if not runs:
        raise CheckpointError(
            f"--from {source}: no subfolders with checkpoints found for --per-subfolder; expected one folder per "
            "training run, e.g. seed0/step-100.pt"
        )
    return [
        record_directory(run_path, folder, trajectory=folder.name, attrs=attrs, progress=progress, order=order, trust=trust)
        for folder in runs
    ]


def _ingest(
    writer: TrajectoryWriter,
    planned: list[PlannedCheckpoint],
    layouts: ModelLayouts,
    *,
    trust: bool,
    progress: Callable[[int, int], None] | None,
) -> tuple[int, int]:
    """Append the planned checkpoints not yet in `writer`; return (added, skipped)."""
    digests = [checkpoint_digest(item.path) for item in planned]
    new = [(item, digest) for item, digest in zip(planned, digests) if not writer.has_digest(digest)]
    if new and writer.rows and new[0][0].step <= writer.last_step:
        raise CheckpointError(
            f"{new[0][0].path}: step {new[0][0].step} is not after step {writer.last_step}, the last one recorded in "
            f"trajectory '{writer.trajectory}'; record these checkpoints into a new trajectory (--trajectory NAME)"
        )

    skipped = len(planned) - len(new)
    for done, (item, digest) in enumerate(new, start=1):
        append_checkpoint(writer, item, digest, layouts, trust=trust)
        if progress is not None:
            progress(skipped + done, len(planned))
    return len(new), skipped


def append_checkpoint(
    writer: TrajectoryWriter, item: PlannedCheckpoint, digest: str, layouts: ModelLayouts, *, trust: bool
) -> None:
    """Load one checkpoint, match it against the layouts and append it as one row."""
    checkpoint = read_checkpoint(item.path, trust=trust, model_names=layouts.names)
    params, buffers = layouts.flatten(checkpoint, item.path)
    del checkpoint
    writer.append(params, buffers, step=item.step, epoch=item.epoch, source=str(item.path), source_digest=digest)
    log.debug("recorded %s as step %d", item.path, item.step)
