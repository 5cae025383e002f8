"""The `sample` stage: loss-landscape slices on a grid, resumable.

The slice is the plane through a center checkpoint spanned by the joint PCA
directions of every recorded checkpoint. Each grid point (alpha[i], beta[j]) is the
parameter vector ``center + alpha[i] * d0 + beta[j] * d1``, evaluated on the whole
evaluation set. Grid results are flushed in blocks with an `evaluated` mask, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
from scipy.interpolate import RegularGridInterpolator

from doodl3_cli.artifacts import landscape as art
from doodl3_cli.artifacts._common import attr_json, new_content_id, read_content_id, utc_now, write_root_attrs
from doodl3_cli.artifacts.trajectory import Trajectory, read_all_trajectories, read_layouts
from doodl3_cli.directions import pca_directions, project
from doodl3_cli.errors import AnalysisError, ArtifactError
from doodl3_cli.evaluate import Evaluator, build_setup
from doodl3_cli.runfolder import RunFolder

log = logging.getLogger(__name__)

SLICE_NAME = "pca"
BLOCK_POINTS = 512


@dataclass
class SampleOptions:
    """Options of `doodl3 sample`.

    Attributes
    ----------
    resolution : int
        Grid points per axis (at least 2).
    margin : float
        Extra extent on each side, as a fraction of the span of the projected
        trajectories along that axis.
    center : str or None
        ``TRAJECTORY`` (its final checkpoint) or ``TRAJECTORY:INDEX``; by default the
        final checkpoint of the run with the lowest evaluation loss.
    extent : tuple of four floats or None
        ``(alpha_min, alpha_max, beta_min, beta_max)``, overriding the automatic extent.
    device : str or None
        Overrides ``[evaluation].device`` of doodl3.toml.
    points_per_pass : int
        Grid points evaluated in one vectorised forward pass.
    """

    resolution: int = 41
    margin: float = 0.25
    center: str | None = None
    extent: tuple[float, float, float, float] | None = None
    device: str | None = None
    points_per_pass: int = 64


def _parse_center(spec: str, trajectories: list[Trajectory]) -> tuple[int, int]:
    name, sep, index_text = spec.partition(":")
    names = [t.name for t in trajectories]
    if name not in names:
        raise AnalysisError(f"--center {spec!r}: trajectory '{name}' not found; recorded: {', '.join(names)}")
    traj_index = names.index(name)
    rows = trajectories[traj_index].params.shape[0]
    if not sep:
        return traj_index, rows - 1
    try:
        index = int(index_text)
    except ValueError as exc:
        raise AnalysisError(f"--center {spec!r}: the checkpoint index must be an integer, e.g. {name}:-1") from exc
    if not -rows <= index < rows:
        raise AnalysisError(f"--center {spec!r}: index {index} out of range for {rows} checkpoints")
    return traj_index, index % rows


def grid_axes(coords: np.ndarray, *, resolution: int, margin: float, extent) -> tuple[np.ndarray, np.ndarray]:
    """Return (alpha [nx], beta [ny]) covering `coords` [N, 2] with a margin, or the given extent."""
    if extent is not None:
        a0, a1, b0, b1 = extent
    else:
        low = coords.min(axis=0)
        high = coords.max(axis=0)
        span = np.maximum(high - low, 1e-12)
        pad = margin * span
        a0, b0 = low - pad
        a1, b1 = high + pad
    return np.linspace(a0, a1, resolution), np.linspace(b0, b1, resolution)


def run_sample(
    run: RunFolder,
    options: SampleOptions,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Sample the PCA slice of the run's landscape into landscape.h5.

    Returns
    -------
    Path
        landscape.h5.

    Raises
    ------
    ArtifactError
        When trajectory.h5 is missing or holds no checkpoint.
    ConfigError
        When doodl3.toml cannot build the model, data or loss.
    """
    run.require_exists()
    layout, buffer_layout = read_layouts(run.trajectory)
    trajectories = read_all_trajectories(run.trajectory)
    trajectories = [t for t in trajectories if t.params.shape[0] > 0]
    if not trajectories:
        raise ArtifactError(f"{run.trajectory}: holds no checkpoint; run `doodl3 record {run.path} --from DIR` first")
    config = run.load_config()
    setup = build_setup(config, base=run.path, device=options.device)

    final_params = np.stack([t.params[-1] for t in trajectories])
    final_buffers = np.stack([t.buffers[-1] for t in trajectories])
    probe = Evaluator(setup, layout, buffer_layout, final_buffers[0], points_per_pass=options.points_per_pass)
    final_losses = probe.evaluate(final_params)["loss"]
    if options.center is None:
        finite = np.where(np.isfinite(final_losses), final_losses, np.inf)
        traj_index, ckpt_index = int(np.argmin(finite)), trajectories[int(np.argmin(finite))].params.shape[0] - 1
    else:
        traj_index, ckpt_index = _parse_center(options.center, trajectories)
    center_traj = trajectories[traj_index]
    center = center_traj.params[ckpt_index].astype(np.float64)
    center_buffers = center_traj.buffers[ckpt_index]
    log.info("slice center: %s checkpoint %d (step %d)", center_traj.name, ckpt_index, center_traj.step[ckpt_index])

    plane = pca_directions([t.params for t in trajectories])
    projections = {t.name: project(t.params, center, plane.directions) for t in trajectories}
    all_coords = np.concatenate([c for c, _ in projections.values()])
    alpha, beta = grid_axes(all_coords, resolution=options.resolution, margin=options.margin, extent=options.extent)

    trajectory_id = read_content_id(run.trajectory)
    recipe = {
        "method": "pca",
        "center_trajectory": center_traj.name,
        "center_index": int(ckpt_index),
        "resolution": options.resolution,
        "margin": options.margin,
        "extent": list(options.extent) if options.extent else None,
        "trajectory_content_id": trajectory_id,
    }
    settings = {
        "resolution": options.resolution, "margin": options.margin, "center": options.center,
        "extent": list(options.extent) if options.extent else None, "device": str(setup.device),
        "points_per_pass": options.points_per_pass,
    }
    evaluator = Evaluator(setup, layout, buffer_layout, center_buffers, points_per_pass=options.points_per_pass)

    with _open_landscape(run, recipe, settings, trajectory_id) as f:
        group = f["slices"].get(SLICE_NAME) if "slices" in f else None
        if group is None:
            group = art.create_slice(
                f, SLICE_NAME, center=center, directions=plane.directions, alpha=alpha, beta=beta,
                metric_names=["loss", "accuracy"] if evaluator_is_classifier(evaluator, center) else ["loss"],
                explained_variance=plane.explained_variance,
                attrs={
                    "method": "pca", "center_trajectory": center_traj.name, "center_index": int(ckpt_index),
                    "normalisation": "none (orthonormal PCA directions)", "batchnorm_policy": "fixed",
                    "split": json.dumps(config.data.kwargs), "samples": int(setup.inputs.shape[0]),
                    "device": str(setup.device), "dtype": "float32 (losses accumulated in float64)",
                    "recipe": json.dumps(recipe, sort_keys=True), "nonfinite_cells": 0,
                },
            )
            f.flush()
        else:
            log.info("resuming %s: %d of %d grid points already evaluated", run.landscape,
                     int(group["evaluated"][()].sum()), group["evaluated"].size)

        _evaluate_grid(group, evaluator, center, plane.directions, progress=progress, flush=f.flush)

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
        f.attrs["content_id"] = new_content_id()
        f.attrs["created"] = utc_now()

    return run.landscape


def evaluator_is_classifier(evaluator: Evaluator, center: np.ndarray) -> bool:
    """Evaluate the center once and report whether accuracy is defined for this model."""
    return "accuracy" in evaluator.evaluate(center[None, :])


def _open_landscape(run: RunFolder, recipe: dict, settings: dict, trajectory_id: str | None) -> h5py.File:
    """Open landscape.h5 for resuming when its recipe matches, else start a new file."""
    path = run.landscape
    if path.exists():
        try:
            with h5py.File(path, "r", locking=False) as f:
                stored = attr_json(f["slices"][SLICE_NAME], "recipe", {}) if SLICE_NAME in f.get("slices", {}) else {}
        except (OSError, KeyError) as exc:
            raise ArtifactError(
                f"{path}: cannot be read ({exc}); delete it and rerun `doodl3 sample {run.path}`"
            ) from exc
        if stored == json.loads(json.dumps(recipe, sort_keys=True)):
            return h5py.File(path, "a")
        log.info("%s was sampled with other settings or checkpoints; sampling anew", path)
        path.unlink()

    f = h5py.File(path, "w")
    write_root_attrs(
        f, schema=art.SCHEMA, schema_version=art.SCHEMA_VERSION, settings=settings,
        upstream={"trajectory.h5": trajectory_id} if trajectory_id else {},
    )
    f.create_group("slices")
    return f


def _evaluate_grid(group: h5py.Group, evaluator: Evaluator, center: np.ndarray, directions: np.ndarray, *, progress, flush) -> None:
    alpha = group["alpha"][()]
    beta = group["beta"][()]
    evaluated = group["evaluated"][()]
    metrics = [name for name in ("loss", "accuracy") if name in group]
    todo = np.flatnonzero(~evaluated.reshape(-1))
    total = evaluated.size
    done = total - todo.size
    if progress is not None:
        progress(done, total)

    ny = beta.shape[0]
    for start in range(0, todo.size, BLOCK_POINTS):
        block = todo[start : start + BLOCK_POINTS]
        i, j = np.divmod(block, ny)
        points = center[None, :] + alpha[i, None] * directions[0][None, :] + beta[j, None] * directions[1][None, :]
        result = evaluator.evaluate(points)

        for name in metrics:
            grid = group[name][()]
            values = result.get(name, np.full(block.size, np.nan))
            grid[i, j] = np.where(np.isfinite(result["loss"]), values, np.nan)
            group[name][...] = grid
        evaluated[i, j] = True
        group["evaluated"][...] = evaluated
        flush()

        done += block.size
        if progress is not None:
            progress(done, total)
