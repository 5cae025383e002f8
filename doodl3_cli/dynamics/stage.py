"""The `dynamics` stage: gradient flow, Morse graphs, training diagnostics and findings.

For every slice of landscape.h5 the stage differentiates the loss grid and builds
the outer approximation of the time-tau map of the negative gradient flow on the
grid of boxes. It decomposes that map into Morse sets with their Conley indices and
attractor regions, repeats that on a resolution pyramid, places every projected
checkpoint in a region and groups the runs by their final region. For every
trajectory of trajectory.h5 it computes step length, speed and update cosines in
full parameter space and flags oscillation, plateaus and divergence. With
doodl3.toml it also rebuilds the model for the top Hessian eigenvalue, the
prediction disagreement and the entropy. Everything is written to dynamics.h5 in
one atomic write.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np

from doodl3_cli.artifacts import dynamics as dynamics_artifact
from doodl3_cli.artifacts import landscape as landscape_artifact
from doodl3_cli.artifacts import trajectory as trajectory_artifact
from doodl3_cli.artifacts._common import WriterLock, atomic_h5, read_content_id, write_root_attrs
from doodl3_cli.artifacts.dynamics import SliceDynamics
from doodl3_cli.artifacts.landscape import LandscapeSlice
from doodl3_cli.dynamics.flow import MAX_STEP_CELLS, TAU_CONTRACTION, choose_tau, gradient_field, time_tau_map
from doodl3_cli.dynamics.ensemble import SHARPNESS_CHECKPOINTS, diagnose_ensemble, slice_ensemble, split_finding
from doodl3_cli.dynamics.morse import REGION_OUTSIDE, box_index, morse_graph, outer_approximation
from doodl3_cli.dynamics.maps import MAPS, ensemble_map, trajectory_map
from doodl3_cli.dynamics.pyramid import MAX_LEVELS, morse_pyramid
from doodl3_cli.errors import AnalysisError
from doodl3_cli.runfolder import RunFolder

log = logging.getLogger(__name__)

MAP = "gradient"
CONFIDENCE = 0.95


def run_dynamics(
    run: RunFolder,
    *,
    tau: float | None = None,
    sharpness_checkpoints: int = SHARPNESS_CHECKPOINTS,
    device: str | None = None,
    map_name: str = MAP,
    confidence: float = CONFIDENCE,
) -> Path:
    """Compute the dynamics of every slice and trajectory of a run into dynamics.h5.

    Parameters
    ----------
    run : RunFolder
        The run folder, which needs trajectory.h5 and landscape.h5. The content id of
        topology.h5 is recorded when that file exists, but its content is not read.
    tau : float, optional
        Time of the gradient-flow map, in coordinate units squared per loss unit,
        for every slice. When None, each slice gets its own tau by the rule of
        `doodl3_cli.dynamics.flow.choose_tau`.
    sharpness_checkpoints : int
        Checkpoints per run, evenly spaced, at which the top Hessian eigenvalue is
        computed. 0 skips it. Needs doodl3.toml, like the prediction disagreement
        and entropy: without that file the three are skipped and logged.
    device : str, optional
        Torch device for the model probes, the [evaluation] device of doodl3.toml
        when None.
    map_name : str
        The map whose Morse graph is computed: ``"gradient"``, ``"ensemble"`` or
        ``"trajectory"`` (see `analyse_slice`).
    confidence : float
        Confidence level mu of the ensemble map, in (0, 1).

    Returns
    -------
    Path
        The dynamics.h5 written.

    Raises
    ------
    ArtifactError
        When trajectory.h5 or landscape.h5 is missing or unreadable.
    AnalysisError
        When tau is not positive and finite, sharpness_checkpoints is negative, or a
        slice cannot be analysed.
    ConfigError
        When doodl3.toml exists but cannot build the model.
    """
    if tau is not None and not (math.isfinite(tau) and tau > 0):
        raise AnalysisError(f"tau must be a positive finite time, got {tau!r}; pass e.g. --tau 0.1 or omit it")
    if map_name not in MAPS:
        raise AnalysisError(f"--map {map_name!r}: unknown map; use one of {', '.join(MAPS)}")
    if not 0.0 < confidence < 1.0:
        raise AnalysisError(f"--confidence must lie strictly between 0 and 1, got {confidence!r}; pass e.g. 0.95")
    if sharpness_checkpoints < 0:
        raise AnalysisError(
            f"sharpness_checkpoints must be 0 or more, got {sharpness_checkpoints}; pass 0 to skip the Hessian"
        )

    slice_names = landscape_artifact.list_slices(run.landscape)
    trajectory_names = trajectory_artifact.list_trajectories(run.trajectory)
    upstream = {
        "trajectory.h5": read_content_id(run.trajectory),
        "landscape.h5": read_content_id(run.landscape),
    }
    if run.topology.is_file():
        upstream["topology.h5"] = read_content_id(run.topology)
    settings = {
        "tau": tau,
        "map": map_name,
        "confidence": confidence,
        "tau_contraction": TAU_CONTRACTION,
        "max_step_cells": MAX_STEP_CELLS,
        "sharpness_checkpoints": sharpness_checkpoints,
    }

    # The lock is held from the start, so a second dynamics on this run fails at once.
    with WriterLock(run.dynamics, writer="dynamics run"):
        trajectories = trajectory_artifact.read_all_trajectories(run.trajectory)
        layout, _ = trajectory_artifact.read_layouts(run.trajectory)
        ensemble = diagnose_ensemble(
            trajectories, layout, _evaluation_setup(run, device), sharpness_checkpoints=sharpness_checkpoints
        )
        final_loss = {d.name: float(d.loss[-1]) if len(d.loss) else float("nan") for d in ensemble.trajectories}

        with atomic_h5(run.dynamics, locked=True) as f:
            write_root_attrs(
                f,
                schema=dynamics_artifact.SCHEMA,
                schema_version=dynamics_artifact.SCHEMA_VERSION,
                settings=settings,
                upstream=upstream,
            )
            for name in slice_names:
                landscape_slice = landscape_artifact.read_slice(run.landscape, name, with_vectors=False)
                try:
                    result = analyse_slice(
                        landscape_slice, tau=tau, map_name=map_name, confidence=confidence, trajectories=trajectory_names
                    )
                except AnalysisError as exc:
                    raise AnalysisError(f"{run.landscape}: {exc}") from exc
                result.ensemble = slice_ensemble(
                    {run_name: result.placements[run_name] for run_name in trajectory_names if run_name in result.placements},
                    final_loss,
                )
                split = split_finding(name, result.ensemble, final_loss)
                if split is not None:
                    ensemble.findings.append(split)
                dynamics_artifact.write_slice(f, result)

            for diagnostics in ensemble.trajectories:
                dynamics_artifact.write_trajectory(f, diagnostics)
            dynamics_artifact.write_ensemble(f, ensemble)
            for finding in ensemble.findings:
                log.info("finding: %s (%s) in %s at steps %s", finding.kind, finding.severity, ", ".join(finding.runs),
                         finding.steps)

    log.info("wrote %s (%d slices, %d trajectories)", run.dynamics, len(slice_names), len(trajectory_names))
    return run.dynamics


def _evaluation_setup(run: RunFolder, device: str | None):
    """Rebuild the model, data and loss from doodl3.toml, or return None when the file is missing."""
    if not run.config_path.is_file():
        log.info("%s not found: skipping the Hessian, the prediction disagreement and the entropy", run.config_path)
        return None
    from doodl3_cli.evaluate import build_setup

    return build_setup(run.load_config(), base=run.path, device=device, recorded=run.trajectory)


def analyse_slice(
    landscape_slice: LandscapeSlice,
    *,
    tau: float | None = None,
    pyramid_levels: int = MAX_LEVELS,
    map_name: str = MAP,
    confidence: float = CONFIDENCE,
    lag: int = 1,
    trajectories: list[str] | None = None,
) -> SliceDynamics:
    """Compute the flow, Morse graph, Conley indices, regions, placements and pyramid of one slice.

    Parameters
    ----------
    landscape_slice : LandscapeSlice
        The slice, with its loss grid and trajectory projections.
    tau : float, optional
        Time of the flow map, chosen by `choose_tau` when None.
    pyramid_levels : int
        Maximum number of coarser levels of the resolution pyramid, 0 for none. Only
        the gradient map gets a pyramid.
    map_name : str
        ``"gradient"`` (the time-tau map of the gradient flow), ``"ensemble"`` or
        ``"trajectory"`` (maps learnt from the runs, see `doodl3_cli.dynamics.maps`).
    confidence : float
        Confidence level of the ensemble map's widened images.
    lag : int
        Recorded checkpoints from a start to its image in the ensemble map.
    trajectories : list of str, optional
        Runs whose projections train the ensemble and trajectory maps, every
        projection on the slice when None.

    Returns
    -------
    SliceDynamics

    Raises
    ------
    AnalysisError
        When the slice grid is too small or not uniform, has no valid cell, or tau
        cannot be chosen. The message names the slice.
    """
    started = time.perf_counter()
    name = landscape_slice.name
    alpha, beta, loss = landscape_slice.alpha, landscape_slice.beta, landscape_slice.loss
    names = list(landscape_slice.projections) if trajectories is None else trajectories
    runs = {run: landscape_slice.projections[run].coords for run in names if run in landscape_slice.projections}
    try:
        field = gradient_field(alpha, beta, loss)
        if tau is None:
            tau, tau_rule = choose_tau(field, loss)
        else:
            tau_rule = "given"

        if map_name == "gradient":
            point_map = time_tau_map(field, tau)
        elif map_name == "ensemble":
            point_map = ensemble_map(runs, lag=lag, confidence=confidence)
        elif map_name == "trajectory":
            point_map = trajectory_map(runs, field.spacing)
        else:
            raise AnalysisError(f"--map {map_name!r}: unknown map; use one of {', '.join(MAPS)}")
        graph = morse_graph(outer_approximation(alpha, beta, point_map, field.valid), loss, field.valid)
        # The coarser levels re-approximate the gradient flow, which only the gradient map follows.
        pyramid = morse_pyramid(alpha, beta, loss, graph, tau, max_levels=pyramid_levels) if map_name == "gradient" else []
    except AnalysisError as exc:
        raise AnalysisError(f"slice '{name}': {exc}") from exc

    placements = {}
    for trajectory, projection in landscape_slice.projections.items():
        i, j, inside = box_index(alpha, beta, projection.coords)
        placements[trajectory] = np.where(inside, graph.regions[i, j], REGION_OUTSIDE).astype(np.int32)

    invalid = int((~field.valid).sum())
    attrs = {"invalid_cells": np.int64(invalid)}
    if map_name == "ensemble":
        attrs.update(confidence=float(confidence), lag=np.int64(lag))
    log.info(
        "slice %s: tau %.4g (%s), %d Morse sets, %d attractors, %d map edges, %d invalid cells, "
        "%d flow points left the grid, %d pyramid levels, %.2f s",
        name, tau, tau_rule, graph.n_sets, int(graph.attractor.sum()), graph.map_edges, invalid,
        getattr(point_map, "left", 0), len(pyramid), time.perf_counter() - started,
    )
    return SliceDynamics(
        name=name,
        alpha=alpha,
        beta=beta,
        grad_alpha=field.grad_alpha,
        grad_beta=field.grad_beta,
        error=field.error,
        morse=graph,
        placements=placements,
        tau=float(tau),
        tau_rule=tau_rule,
        map=map_name,
        attrs=attrs,
        pyramid=pyramid,
    )
