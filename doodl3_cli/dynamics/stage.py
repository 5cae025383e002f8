"""The `dynamics` stage: gradient flow, Morse graphs and trajectory diagnostics.

For every slice of landscape.h5 the stage differentiates the loss grid and builds
the outer approximation of the time-tau map of the negative gradient flow on the
grid of boxes. It decomposes that map into Morse sets and attractor regions and
places every projected checkpoint in a region. For every trajectory of
trajectory.h5 it computes step length, speed and update cosines in full parameter
space. Everything is written to dynamics.h5 in one atomic write.
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
from doodl3_cli.artifacts._common import atomic_h5, read_content_id, write_root_attrs
from doodl3_cli.artifacts.dynamics import SliceDynamics
from doodl3_cli.artifacts.landscape import LandscapeSlice
from doodl3_cli.dynamics.flow import MAX_STEP_CELLS, TAU_CONTRACTION, choose_tau, gradient_field, integrate_flow
from doodl3_cli.dynamics.morse import REGION_OUTSIDE, box_index, morse_graph, outer_approximation
from doodl3_cli.dynamics.trajectories import update_diagnostics
from doodl3_cli.errors import AnalysisError
from doodl3_cli.runfolder import RunFolder

log = logging.getLogger(__name__)

MAP = "gradient"


def run_dynamics(run: RunFolder, *, tau: float | None = None) -> Path:
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

    Returns
    -------
    Path
        The dynamics.h5 written.

    Raises
    ------
    ArtifactError
        When trajectory.h5 or landscape.h5 is missing or unreadable.
    AnalysisError
        When tau is not positive and finite, or a slice cannot be analysed.
    """
    if tau is not None and not (math.isfinite(tau) and tau > 0):
        raise AnalysisError(f"tau must be a positive finite time, got {tau!r}; pass e.g. --tau 0.1 or omit it")

    slice_names = landscape_artifact.list_slices(run.landscape)
    trajectory_names = trajectory_artifact.list_trajectories(run.trajectory)
    upstream = {
        "trajectory.h5": read_content_id(run.trajectory),
        "landscape.h5": read_content_id(run.landscape),
    }
    if run.topology.is_file():
        upstream["topology.h5"] = read_content_id(run.topology)
    settings = {"tau": tau, "map": MAP, "tau_contraction": TAU_CONTRACTION, "max_step_cells": MAX_STEP_CELLS}

    with atomic_h5(run.dynamics) as f:
        write_root_attrs(
            f,
            schema=dynamics_artifact.SCHEMA,
            schema_version=dynamics_artifact.SCHEMA_VERSION,
            settings=settings,
            upstream=upstream,
        )
        for name in slice_names:
            landscape_slice = landscape_artifact.read_slice(run.landscape, name, with_vectors=False)
            dynamics_artifact.write_slice(f, analyse_slice(landscape_slice, tau=tau))

        for name in trajectory_names:
            trajectory = trajectory_artifact.read_trajectory(run.trajectory, name)
            diagnostics = update_diagnostics(name, trajectory.params, trajectory.step, trajectory.metrics.get("loss"))
            dynamics_artifact.write_trajectory(f, diagnostics)
            log.info(
                "trajectory %s: %d checkpoints, path over displacement %.4g",
                name, len(diagnostics.step), diagnostics.path_over_displacement,
            )

    log.info("wrote %s (%d slices, %d trajectories)", run.dynamics, len(slice_names), len(trajectory_names))
    return run.dynamics


def analyse_slice(landscape_slice: LandscapeSlice, *, tau: float | None = None) -> SliceDynamics:
    """Compute the flow, Morse graph, regions and checkpoint placements of one slice.

    Parameters
    ----------
    landscape_slice : LandscapeSlice
        The slice, with its loss grid and trajectory projections.
    tau : float, optional
        Time of the flow map, chosen by `choose_tau` when None.

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
    try:
        field = gradient_field(alpha, beta, loss)
        if tau is None:
            tau, tau_rule = choose_tau(field, loss)
        else:
            tau_rule = "given"

        stopped = []

        def time_tau_map(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            flow_end = integrate_flow(field, points, tau)
            stopped.append(int(flow_end.stopped.sum()))
            return flow_end.end, flow_end.error

        graph = morse_graph(outer_approximation(alpha, beta, time_tau_map, field.valid), loss, field.valid)
    except AnalysisError as exc:
        raise AnalysisError(f"slice '{name}': {exc}") from exc

    placements = {}
    for trajectory, projection in landscape_slice.projections.items():
        i, j, inside = box_index(alpha, beta, projection.coords)
        placements[trajectory] = np.where(inside, graph.regions[i, j], REGION_OUTSIDE).astype(np.int32)

    invalid = int((~field.valid).sum())
    log.info(
        "slice %s: tau %.4g (%s), %d Morse sets, %d attractors, %d map edges, %d invalid cells, "
        "%d flow points stopped early, %.2f s",
        name, tau, tau_rule, graph.n_sets, int(graph.attractor.sum()), graph.map_edges, invalid,
        sum(stopped), time.perf_counter() - started,
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
        map=MAP,
        attrs={"invalid_cells": np.int64(invalid)},
    )
