"""The `sample` stage: loss-landscape slices on a grid, resumable and distributed.

A slice is the plane through a center checkpoint spanned by two directions (PCA of
the checkpoints, filter-normalised random, run endpoints, top Hessian
eigenvectors, coordinate axes, or a file). Each grid point (alpha[i], beta[j]) is
the parameter vector ``center + alpha[i] * d0 + beta[j] * d1``, evaluated on the
whole evaluation set.

The grid is evaluated in fixed chunks of CHUNK_POINTS consecutive cells (in
row-major order). A chunk is always evaluated as a whole by the same code, so the
value of a cell does not depend on which run, resume or rank computed it. An
interrupted run therefore resumes with the unfinished chunks and ends with the
grid of an uninterrupted one, bit for bit, on the same machine and thread count.
The grid is evaluated into a partial file next to landscape.h5 (see
`doodl3_cli.artifacts.landscape.partial_path`) that replaces landscape.h5 only
when it is complete, and the writer lock of landscape.h5 makes a second
concurrent sample of the run folder fail at once.
Under ``torchrun`` (WORLD_SIZE > 1) the ranks take turns over the chunks, and
rank 0 gathers the results and is the only writer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import torch
import torch.distributed as dist
from scipy.interpolate import RegularGridInterpolator

from doodl3_cli.artifacts import landscape as art
from doodl3_cli.artifacts._common import (
    WriterLock,
    attr_json,
    check_schema,
    new_content_id,
    read_content_id,
    remove_stale_temporaries,
    temporary_path,
    utc_now,
    write_root_attrs,
)
from doodl3_cli.artifacts.trajectory import Layout, Trajectory, read_all_trajectories, read_layouts
from doodl3_cli.directions import (
    MIN_PCA_CHECKPOINTS,
    axis_directions,
    axis_name,
    endpoint_directions,
    file_digest,
    file_directions,
    hessian_directions,
    pca_directions,
    project,
    random_directions,
)
from doodl3_cli.errors import AnalysisError, ArtifactError, UsageError
from doodl3_cli.evaluate import BATCHNORM_POLICIES, EvaluationSetup, Evaluator, build_setup
from doodl3_cli.runfolder import RunConfig, RunFolder

log = logging.getLogger(__name__)

DIRECTION_METHODS = ("pca", "random", "endpoints", "hessian", "axes", "file")
SLICE_NAME = "pca"
CHUNK_POINTS = 256


@dataclass
class SampleOptions:
    """Options of `doodl3 sample`.

    Attributes
    ----------
    resolution : int
        Grid points per axis (at least 2); points of a line (``line``) between its two runs.
    margin : float
        Extra extent on each side, as a fraction of the span of the projected
        trajectories along that axis (of the distance between the runs, for a line).
    center : str or None
        ``TRAJECTORY`` (its final checkpoint) or ``TRAJECTORY:INDEX``; by default the
        final checkpoint of the run with the lowest evaluation loss. Ignored by
        ``endpoints``, whose center is the final state of its first run.
    extent : tuple of four floats or None
        ``(alpha_min, alpha_max, beta_min, beta_max)``, overriding the automatic extent.
    device : str or None
        Overrides ``[evaluation].device`` of doodl3.toml.
    points_per_pass : int
        Grid points evaluated in one vectorised forward pass.
    directions : {"pca", "random", "endpoints", "hessian", "axes", "file"}
        How the plane's two directions are chosen; the slice is named after it.
    seed : int
        Seed of random directions, of the Lanczos start vector and of the
        BatchNorm recompute subset.
    bias : {"zero", "scale"}
        Rule for one-dimensional tensors in filter-normalised random directions.
    runs : tuple of str or None
        Trajectories whose final states span ``endpoints`` (two or three; default:
        the first three recorded, or two and a random direction).
    axes : tuple of two str or None
        Coordinate axes for ``axes``, e.g. ``("0.weight[3,7]", "2.bias[0]")``;
        default: the two scalar parameters whose final values spread most across runs.
    directions_file : Path or None
        A .npy array or .h5 file (dataset ``directions``) of shape (2, P) for ``file``.
    batchnorm : {"fixed", "recompute"}
        BatchNorm policy; see `doodl3_cli.evaluate.Evaluator`.
    recompute_samples : int
        Samples used to re-estimate BatchNorm statistics under ``recompute``.
    line : str or None
        ``A:B``: also sample the line through the final states of trajectories A and B.
    """

    resolution: int = 41
    margin: float = 0.25
    center: str | None = None
    extent: tuple[float, float, float, float] | None = None
    device: str | None = None
    points_per_pass: int = 16
    directions: str = "pca"
    seed: int = 0
    bias: str = "zero"
    runs: tuple[str, ...] | None = None
    axes: tuple[str, str] | None = None
    directions_file: Path | None = None
    batchnorm: str = "fixed"
    recompute_samples: int = 256
    line: str | None = None


@dataclass
class Plane:
    """A slice plane before it is sampled: center, directions and their provenance."""

    center: np.ndarray
    center_buffers: np.ndarray
    center_trajectory: str
    center_index: int
    directions: np.ndarray
    explained_variance: np.ndarray
    normalisation: str
    recipe: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)


def _parse_center(spec: str, trajectories: list[Trajectory]) -> tuple[int, int]:
    name, sep, index_text = spec.partition(":")
    traj_index = _trajectory_index(name, trajectories, option="--center")
    rows = trajectories[traj_index].params.shape[0]
    if not sep:
        return traj_index, rows - 1
    try:
        index = int(index_text)
    except ValueError as exc:
        raise UsageError(f"--center {spec!r}: the checkpoint index must be an integer, e.g. {name}:-1") from exc
    if not -rows <= index < rows:
        raise UsageError(
            f"--center {spec!r}: index {index} out of range for {rows} checkpoints; "
            f"use 0 to {rows - 1}, or -1 to -{rows} counted from the last"
        )
    return traj_index, index % rows


def _trajectory_index(name: str, trajectories: list[Trajectory], *, option: str) -> int:
    names = [t.name for t in trajectories]
    if name not in names:
        raise UsageError(f"{option}: trajectory '{name}' not found; recorded: {', '.join(names)}")
    return names.index(name)


def grid_axes(coords: np.ndarray, *, resolution: int, margin: float, extent) -> tuple[np.ndarray, np.ndarray]:
    """Return (alpha [nx], beta [ny]) covering `coords` [N, 2] with a margin, or the given extent.

    An axis along which every point has the same coordinate gets the extent [-1, 1]
    around that coordinate.
    """
    if extent is not None:
        a0, a1, b0, b1 = extent
    else:
        low = coords.min(axis=0)
        high = coords.max(axis=0)
        span = high - low
        flat = span <= 1e-12 * np.maximum(np.abs(high), 1.0)
        pad = np.where(flat, 1.0, margin * span)
        a0, b0 = low - pad
        a1, b1 = high + pad
    return np.linspace(a0, a1, resolution), np.linspace(b0, b1, resolution)


def line_positions(resolution: int, margin: float) -> np.ndarray:
    """Return positions t of a line: `resolution` points from 0 to 1 exactly, plus margin points at the same step.

    Returns
    -------
    ndarray of shape (resolution + 2 m,), float64
        With m = ceil(margin * (resolution - 1)); t = 0 and t = 1 are included exactly.
    """
    steps = resolution - 1
    extra = int(np.ceil(margin * steps - 1e-9))
    return np.arange(-extra, steps + extra + 1, dtype=np.float64) / steps


def loss_barrier(t: np.ndarray, loss: np.ndarray) -> tuple[float, float]:
    """Return the loss barrier along a line and where it is reached.

    The barrier is max over t in [0, 1] of L(t) - ((1 - t) L(0) + t L(1)): the
    largest excess of the loss over the straight line between the two end losses
    (0 when the loss lies on or below that line; never negative, because t = 0 counts).

    Parameters
    ----------
    t : ndarray of shape (n,), containing 0.0 and 1.0
    loss : ndarray of shape (n,)

    Returns
    -------
    barrier : float
        NaN when a loss on [0, 1] is not finite.
    barrier_t : float
    """
    inside = (t >= 0) & (t <= 1)
    start = loss[np.flatnonzero(t == 0.0)[0]]
    end = loss[np.flatnonzero(t == 1.0)[0]]
    excess = loss[inside] - ((1 - t[inside]) * start + t[inside] * end)
    if not np.isfinite(excess).all():
        return float("nan"), float("nan")
    k = int(np.argmax(excess))
    return float(excess[k]), float(t[inside][k])


class _World:
    """The torchrun process group, when WORLD_SIZE > 1: rank 0 writes, every rank evaluates."""

    def __init__(self):
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owned = False

    def start(self, device: torch.device) -> None:
        if self.size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.owned = True
        if self.size > 1:
            log.info("sampling as rank %d of %d", self.rank, self.size)

    def device(self, requested: str) -> str:
        """Give each rank its own CUDA device when CUDA is requested under torchrun."""
        if self.size > 1 and requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested

    def broadcast(self, value: Any) -> Any:
        if self.size == 1:
            return value
        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any] | None:
        if self.size == 1:
            return [value]
        boxes = [None] * self.size if self.rank == 0 else None
        dist.gather_object(value, boxes, dst=0)
        return boxes

    def stop(self) -> None:
        if self.size > 1:
            dist.barrier()
        if self.owned:
            dist.destroy_process_group()


def run_sample(
    run: RunFolder,
    options: SampleOptions,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Sample one slice of the run's landscape (and optionally a line) into landscape.h5.

    Returns
    -------
    Path
        landscape.h5.

    Raises
    ------
    ArtifactError
        When trajectory.h5 is missing or contains no checkpoint, landscape.h5 cannot be
        written, or another process is sampling the same run folder.
    ConfigError
        When doodl3.toml cannot build the model, data or loss.
    UsageError
        When an option is invalid or names a trajectory that is not recorded.
    AnalysisError
        When the chosen directions do not span a plane.
    """
    _validate(options)
    run.require_exists()
    world = _World()
    with contextlib.ExitStack() as stack:
        # Only rank 0 writes, so only rank 0 takes the writer lock.
        if world.rank == 0:
            stack.enter_context(WriterLock(run.landscape, writer="sample"))
        layout, buffer_layout = read_layouts(run.trajectory)
        trajectories = [t for t in read_all_trajectories(run.trajectory) if t.params.shape[0] > 0]
        if not trajectories:
            raise ArtifactError(
                f"{run.trajectory}: contains no checkpoint; run `doodl3 record {run.path} --from DIR` first"
            )
        recorded = sum(t.params.shape[0] for t in trajectories)
        if options.directions == "pca" and recorded < MIN_PCA_CHECKPOINTS:
            counts = ", ".join(f"{t.name}: {t.params.shape[0]}" for t in trajectories)
            raise ArtifactError(
                f"{run.trajectory}: PCA directions need at least {MIN_PCA_CHECKPOINTS} recorded checkpoints, "
                f"found {recorded} ({counts}); record more checkpoints, or sample with --directions random"
            )
        if options.line is not None:
            # Checked before the slice is sampled, so that a misspelt name leaves landscape.h5 as it was.
            _line_ends(options.line, trajectories)
        config = run.load_config()
        setup = build_setup(
            config, base=run.path, device=world.device(options.device or config.device), recorded=run.trajectory
        )
        world.start(setup.device)
        try:
            return _sample(run, options, progress, layout, buffer_layout, trajectories, config, setup, world)
        finally:
            world.stop()


def _validate(options: SampleOptions) -> None:
    if options.directions not in DIRECTION_METHODS:
        raise UsageError(f"--directions {options.directions!r}: invalid method; use one of {', '.join(DIRECTION_METHODS)}")
    if options.batchnorm not in BATCHNORM_POLICIES:
        raise UsageError(f"--batchnorm {options.batchnorm!r}: invalid policy; use one of {', '.join(BATCHNORM_POLICIES)}")
    if options.directions == "file" and options.directions_file is None:
        raise UsageError("--directions file needs --directions-file PATH (.npy or .h5 of shape (2, P))")
    if options.resolution < 2:
        raise UsageError(f"--resolution {options.resolution}: must be at least 2")


def _sample(run, options, progress, layout, buffer_layout, trajectories, config, setup, world) -> Path:
    final_params = np.stack([t.params[-1] for t in trajectories])
    probe = Evaluator(setup, layout, buffer_layout, trajectories[0].buffers[-1], points_per_pass=options.points_per_pass)
    final_losses = probe.evaluate(final_params)["loss"]

    plane = world.broadcast(_plane(options, trajectories, layout, final_losses, setup, buffer_layout))
    log.info("slice %s: center %s checkpoint %d", options.directions, plane.center_trajectory, plane.center_index)
    projections = {t.name: project(t.params, plane.center, plane.directions) for t in trajectories}
    all_coords = np.concatenate([c for c, _ in projections.values()])
    alpha, beta = grid_axes(all_coords, resolution=options.resolution, margin=options.margin, extent=options.extent)

    trajectory_id = read_content_id(run.trajectory)
    recipe = {
        **plane.recipe,
        "method": options.directions,
        "center_trajectory": plane.center_trajectory,
        "center_index": int(plane.center_index),
        "resolution": options.resolution,
        "margin": options.margin,
        "extent": list(options.extent) if options.extent else None,
        "batchnorm": options.batchnorm,
        "recompute_samples": options.recompute_samples if options.batchnorm == "recompute" else None,
        "evaluation": _evaluation_recipe(config),
        "chunk_points": CHUNK_POINTS,
        "trajectory_content_id": trajectory_id,
    }
    evaluator = Evaluator(
        setup, layout, buffer_layout, plane.center_buffers, points_per_pass=options.points_per_pass,
        batchnorm=options.batchnorm, recompute_samples=options.recompute_samples, seed=options.seed,
    )

    if world.rank != 0:
        # NOTE: when rank 0 fails before this broadcast (landscape.h5 not writable), the
        # other ranks wait here until torch.distributed's timeout ends them.
        todo = world.broadcast(None)
        _evaluate_chunks(None, evaluator, plane, alpha, beta, todo, world=world, progress=None, flush=None)
        return run.landscape

    settings = _settings(options, setup)
    partial = art.partial_path(run.landscape)
    with _open_partial(run, options.directions, recipe, settings, trajectory_id) as f:
        group = f["slices"].get(options.directions)
        if group is None:
            group = art.create_slice(
                f, options.directions, center=plane.center, directions=plane.directions, alpha=alpha, beta=beta,
                metric_names=_metric_names(evaluator, plane.center),
                explained_variance=plane.explained_variance,
                attrs={
                    **plane.attrs,
                    "method": options.directions, "center_trajectory": plane.center_trajectory,
                    "center_index": int(plane.center_index), "normalisation": plane.normalisation,
                    "batchnorm_policy": options.batchnorm,
                    "batchnorm_samples": evaluator.recompute_samples if options.batchnorm == "recompute" else 0,
                    "split": json.dumps(config.data.kwargs), "samples": int(setup.inputs.shape[0]),
                    "batches": evaluator.batch_count,
                    "device": str(setup.device), "dtype": "float32 (losses accumulated in float64)",
                    "recipe": json.dumps(recipe, sort_keys=True), "nonfinite_cells": 0,
                },
            )
            f.flush()
        todo = _unfinished_chunks(group["evaluated"][()])
        if todo.size < -(-group["evaluated"].size // CHUNK_POINTS):
            log.info("resuming %s: %d of %d grid points already evaluated", partial,
                     int(group["evaluated"][()].sum()), group["evaluated"].size)
        world.broadcast(todo)
        _evaluate_chunks(group, evaluator, plane, alpha, beta, todo, world=world, progress=progress, flush=f.flush)

        _write_projections(group, evaluator, trajectories, projections, alpha, beta)
        if options.line is not None:
            _sample_line(f, options, trajectories, probe_setup=(setup, layout, buffer_layout), recipe=recipe)
        f.attrs["content_id"] = new_content_id()
        f.attrs["created"] = utc_now()
    os.replace(partial, run.landscape)
    log.info("wrote %s", run.landscape)
    return run.landscape


def _evaluation_recipe(config: RunConfig) -> dict[str, Any]:
    return {
        section: {"factory": spec.factory, "kwargs": spec.kwargs}
        for section, spec in (("model", config.model), ("data", config.data), ("loss", config.loss))
    } | {"batch_size": config.batch_size}


def _settings(options: SampleOptions, setup: EvaluationSetup) -> dict[str, Any]:
    return {
        "resolution": options.resolution, "margin": options.margin, "center": options.center,
        "extent": list(options.extent) if options.extent else None, "device": str(setup.device),
        "points_per_pass": options.points_per_pass, "directions": options.directions, "seed": options.seed,
        "bias": options.bias, "runs": list(options.runs) if options.runs else None,
        "axes": list(options.axes) if options.axes else None,
        "directions_file": str(options.directions_file) if options.directions_file else None,
        "batchnorm": options.batchnorm, "recompute_samples": options.recompute_samples, "line": options.line,
    }


def _metric_names(evaluator: Evaluator, center: np.ndarray) -> list[str]:
    result = evaluator.evaluate(center[None, :])
    return ["loss", "loss_stderr"] + (["accuracy"] if "accuracy" in result else [])


def _default_center(options: SampleOptions, trajectories: list[Trajectory], final_losses: np.ndarray) -> tuple[int, int]:
    if options.center is not None:
        return _parse_center(options.center, trajectories)
    finite = np.where(np.isfinite(final_losses), final_losses, np.inf)
    best = int(np.argmin(finite))
    return best, trajectories[best].params.shape[0] - 1


def _plane(options, trajectories, layout: Layout, final_losses, setup, buffer_layout) -> Plane:
    """Compute the center and the two directions of the requested method."""
    method = options.directions
    if method == "endpoints":
        return _endpoint_plane(options, trajectories, layout)

    traj_index, ckpt_index = _default_center(options, trajectories, final_losses)
    traj = trajectories[traj_index]
    center = traj.params[ckpt_index].astype(np.float64)
    plane = Plane(
        center=center, center_buffers=traj.buffers[ckpt_index], center_trajectory=traj.name,
        center_index=int(ckpt_index), directions=np.empty((2, 0)), explained_variance=np.full(2, np.nan),
        normalisation="",
    )

    if method == "pca":
        pca = pca_directions([t.params for t in trajectories])
        plane.directions, plane.explained_variance = pca.directions, pca.explained_variance
        plane.normalisation = "none (orthonormal PCA directions)"
    elif method == "random":
        plane.directions = random_directions(center, layout, seed=options.seed, bias=options.bias)
        plane.normalisation = f"filter (Li et al. 2018); one-dimensional tensors: {options.bias}"
        plane.recipe = {"seed": options.seed, "bias": options.bias}
    elif method == "hessian":
        evaluator = Evaluator(setup, layout, buffer_layout, plane.center_buffers)
        eigenvalues, plane.directions = hessian_directions(evaluator.loss_function(), center, seed=options.seed)
        plane.normalisation = "none (orthonormal Hessian eigenvectors)"
        plane.recipe = {"seed": options.seed}
        plane.attrs = {"eigenvalues": json.dumps(eigenvalues.tolist())}
        log.info("top Hessian eigenvalues at the center: %.6g, %.6g", *eigenvalues)
    elif method == "axes":
        finals = np.stack([t.params[-1] for t in trajectories])
        plane.directions, indices = axis_directions(layout, axes=options.axes, finals=finals)
        names = [axis_name(i, layout) for i in indices]
        plane.normalisation = "none (unit coordinate axes)"
        plane.recipe = {"axes": names}
        plane.attrs = {"axes": json.dumps(names)}
    elif method == "file":
        plane.directions = file_directions(options.directions_file, layout)
        plane.normalisation = "as supplied"
        plane.recipe = {"directions_file": str(options.directions_file), "file_sha256": file_digest(options.directions_file)}
    else:
        raise UsageError(f"--directions {method!r}: invalid method; use one of {', '.join(DIRECTION_METHODS)}")
    return plane


def _endpoint_plane(options: SampleOptions, trajectories: list[Trajectory], layout: Layout) -> Plane:
    names = list(options.runs) if options.runs else [t.name for t in trajectories[:3]]
    if not 2 <= len(names) <= 3:
        raise UsageError(f"--runs {','.join(names)}: endpoint directions need two or three trajectories")
    if len(set(names)) != len(names):
        raise UsageError(f"--runs {','.join(names)}: name each trajectory once")
    chosen = [trajectories[_trajectory_index(n, trajectories, option="--runs")] for n in names]
    endpoints = np.stack([t.params[-1] for t in chosen]).astype(np.float64)

    extra = None
    if len(chosen) == 2:
        extra = random_directions(endpoints[0], layout, seed=options.seed, bias=options.bias)[0]
    directions = endpoint_directions(endpoints, random_direction=extra)
    return Plane(
        center=endpoints[0], center_buffers=chosen[0].buffers[-1], center_trajectory=chosen[0].name,
        center_index=int(chosen[0].params.shape[0] - 1), directions=directions, explained_variance=np.full(2, np.nan),
        normalisation="none (orthonormal, through the final states)",
        recipe={"runs": names, "seed": options.seed if extra is not None else None,
                "bias": options.bias if extra is not None else None},
        attrs={"runs": json.dumps(names)},
    )


def _open_partial(run: RunFolder, slice_name: str, recipe: dict, settings: dict, trajectory_id: str | None) -> h5py.File:
    """Open the partial landscape file that this recipe is evaluated into.

    The grid is evaluated into ``.landscape.h5.partial`` next to landscape.h5, and
    landscape.h5 is replaced only when every cell is evaluated, so a killed sample
    leaves the previous landscape.h5 intact. A partial file whose recipe matches is
    resumed. Otherwise landscape.h5 is copied into a new partial file when its
    recipe matches, because it is a finished grid or one that an older doodl3 left
    unfinished in place. Otherwise an empty partial file replaces any other. The
    caller holds the writer lock of landscape.h5.
    """
    partial = art.partial_path(run.landscape)
    expected = json.loads(json.dumps(recipe, sort_keys=True))
    remove_stale_temporaries(run.landscape)

    stored = _stored_recipe(partial, slice_name)
    if stored == expected:
        return h5py.File(partial, "a")
    if stored is not None:
        log.info("%s was sampled with other settings, directions or checkpoints; sampling anew", partial)

    tmp = temporary_path(run.landscape)
    try:
        if _stored_recipe(run.landscape, slice_name) == expected:
            shutil.copyfile(run.landscape, tmp)
        else:
            with h5py.File(tmp, "w") as f:
                write_root_attrs(
                    f, schema=art.SCHEMA, schema_version=art.SCHEMA_VERSION, settings=settings,
                    upstream={"trajectory.h5": trajectory_id} if trajectory_id else {},
                )
                f.create_group("slices")
        # Renamed into place, so a kill while it is made leaves no half-made partial file.
        os.replace(tmp, partial)
    finally:
        tmp.unlink(missing_ok=True)
    return h5py.File(partial, "a")


def _stored_recipe(path: Path, slice_name: str) -> dict | None:
    """Return the recipe of slice `slice_name` in `path`, {} when it has no such slice, or None without a readable file.

    A file that cannot be read (for example after a kill while projections were
    written), or that is not a landscape of the current schema version, is logged
    and returns None, because nothing in it can be resumed.
    """
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r", locking=False) as f:
            version = check_schema(f, schema=art.SCHEMA, max_version=art.SCHEMA_VERSION, command=art.COMMAND)
            if version != art.SCHEMA_VERSION:
                log.warning("%s has schema version %d, not %d; it is not resumed", path, version, art.SCHEMA_VERSION)
                return None
            slices = f.get("slices", {})
            return attr_json(slices[slice_name], "recipe", {}) if slice_name in slices else {}
    except (OSError, KeyError, ArtifactError) as exc:
        log.warning("%s cannot be read (%s); it is not resumed", path, exc)
        return None


def _unfinished_chunks(evaluated: np.ndarray) -> np.ndarray:
    flat = evaluated.reshape(-1)
    count = -(-flat.size // CHUNK_POINTS)
    return np.array([c for c in range(count) if not flat[c * CHUNK_POINTS : (c + 1) * CHUNK_POINTS].all()], dtype=np.int64)


def _evaluate_chunk(evaluator: Evaluator, plane: Plane, alpha: np.ndarray, beta: np.ndarray, chunk: int) -> dict[str, np.ndarray]:
    cells = np.arange(chunk * CHUNK_POINTS, min((chunk + 1) * CHUNK_POINTS, alpha.size * beta.size))
    i, j = np.divmod(cells, beta.size)
    coefficients = np.stack([alpha[i], beta[j]], axis=1)
    return evaluator.evaluate_plane(plane.center, plane.directions, coefficients)


def _evaluate_chunks(group, evaluator, plane, alpha, beta, todo, *, world: _World, progress, flush) -> None:
    """Evaluate the unfinished chunks; ranks take turns, rank 0 writes each round and flushes."""
    total = alpha.size * beta.size
    if group is not None:
        evaluated = group["evaluated"][()]
        metrics = [name for name in ("loss", "loss_stderr", "accuracy") if name in group]
        grids = {name: group[name][()] for name in metrics}
        done = int(evaluated.sum())
        if progress is not None:
            progress(done, total)

    for round_start in range(0, todo.size, world.size):
        mine = round_start + world.rank
        result = _evaluate_chunk(evaluator, plane, alpha, beta, int(todo[mine])) if mine < todo.size else None
        gathered = world.gather(result)
        if group is None:
            continue

        for offset, values in enumerate(gathered):
            if values is None:
                continue
            cells = np.arange(todo[round_start + offset] * CHUNK_POINTS, min((todo[round_start + offset] + 1) * CHUNK_POINTS, total))
            i, j = np.divmod(cells, beta.size)
            finite = np.isfinite(values["loss"])
            for name in metrics:
                grids[name][i, j] = np.where(finite, values.get(name, np.full(cells.size, np.nan)), np.nan)
            evaluated[i, j] = True

        # Metrics reach the disk before the mask that marks them evaluated.
        for name in metrics:
            group[name][...] = grids[name]
        flush()
        group["evaluated"][...] = evaluated
        flush()
        done = int(evaluated.sum())
        if progress is not None:
            progress(done, total)


def _write_projections(group, evaluator: Evaluator, trajectories, projections, alpha, beta) -> None:
    loss_grid = group["loss"][()]
    interpolator = RegularGridInterpolator((alpha, beta), loss_grid, bounds_error=False, fill_value=np.nan)
    for traj in trajectories:
        coords, residual = projections[traj.name]
        own = evaluator.evaluate(traj.params)["loss"]
        art.write_projection(group, traj.name, art.Projection(coords, residual, own, interpolator(coords), traj.step))

    nonfinite = int((~np.isfinite(loss_grid)).sum())
    group.attrs["nonfinite_cells"] = nonfinite
    if nonfinite:
        log.warning("%d of %d grid points have a non-finite loss; they stay NaN", nonfinite, loss_grid.size)


def _line_ends(line: str, trajectories: list[Trajectory]) -> tuple[int, int]:
    """Return the indices of the two trajectories that ``--line A:B`` names."""
    first, sep, second = line.partition(":")
    if not sep or not first or not second or first == second:
        raise UsageError(f"--line {line!r}: expected A:B with two different trajectory names")
    return _trajectory_index(first, trajectories, option="--line"), _trajectory_index(second, trajectories, option="--line")


def _sample_line(f: h5py.File, options: SampleOptions, trajectories, *, probe_setup, recipe: dict) -> None:
    """Sample the line between the final states of two runs into /lines/<A>--<B> and store its loss barrier."""
    setup, layout, buffer_layout = probe_setup
    start_index, end_index = _line_ends(options.line, trajectories)
    start, end = trajectories[start_index], trajectories[end_index]
    first, second = start.name, end.name
    t = line_positions(options.resolution, options.margin)
    name = f"{first}--{second}"
    line_recipe = {
        "start": first, "end": second, "resolution": options.resolution, "margin": options.margin,
        "batchnorm": options.batchnorm, "evaluation": recipe["evaluation"],
        "trajectory_content_id": recipe["trajectory_content_id"],
    }
    lines = f.get("lines")
    if lines is not None and name in lines and attr_json(lines[name], "recipe", {}) == json.loads(json.dumps(line_recipe, sort_keys=True)) and lines[name]["evaluated"][()].all():
        log.info("line %s is already sampled", name)
        return

    a = start.params[-1].astype(np.float64)
    b = end.params[-1].astype(np.float64)
    evaluator = Evaluator(
        setup, layout, buffer_layout, start.buffers[-1], points_per_pass=options.points_per_pass,
        batchnorm=options.batchnorm, recompute_samples=options.recompute_samples, seed=options.seed,
    )
    result = evaluator.evaluate_plane(a, np.stack([b - a, np.zeros_like(a)]), np.stack([t, np.zeros_like(t)], axis=1))
    barrier, barrier_t = loss_barrier(t, result["loss"])
    group = art.create_line(
        f, name, t=t, metric_names=list(result),
        attrs={
            "start": first, "end": second, "distance": float(np.linalg.norm(b - a)),
            "barrier": barrier, "barrier_t": barrier_t, "batchnorm_policy": options.batchnorm,
            "recipe": json.dumps(line_recipe, sort_keys=True),
        },
    )
    for metric, values in result.items():
        group[metric][...] = values
    group["evaluated"][...] = True
    log.info("line %s: loss barrier %.6g at t = %.3f", name, barrier, barrier_t)


def evaluator_is_classifier(evaluator: Evaluator, center: np.ndarray) -> bool:
    """Evaluate the center once and report whether accuracy is defined for this model."""
    return "accuracy" in evaluator.evaluate(center[None, :])
