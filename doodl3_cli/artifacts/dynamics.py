"""dynamics.h5: gradient flow, Morse graphs and trajectory diagnostics.

Layout (schema ``doodl3/dynamics``, version 1)::

    /slices/<slice>/alpha                 float64 [nx]     sample coordinates, as in landscape.h5
    /slices/<slice>/beta                  float64 [ny]
    /slices/<slice>/flow/grad_alpha       float64 [nx, ny] gradient of the loss, NaN outside the domain
    /slices/<slice>/flow/grad_beta        float64 [nx, ny]
    /slices/<slice>/flow/error            float64 [nx, ny] estimated norm of the gradient error
    /slices/<slice>/morse/cell_scc        int32   [nx, ny] strongly connected component, -1 if not recurrent
    /slices/<slice>/morse/morse_set       int32   [nx, ny] Morse set index, -1 if in none
    /slices/<slice>/morse/hasse_edges     int64   [E, 2]   (a, b): set a lies directly above set b
    /slices/<slice>/morse/order           int64   [E2, 2]  (a, b): set a reaches set b
    /slices/<slice>/morse/attractor       bool    [M]
    /slices/<slice>/morse/repeller        bool    [M]
    /slices/<slice>/morse/set_min_loss    float64 [M]      lowest loss in each set
    /slices/<slice>/morse/set_cells       int64   [M]      boxes in each set
    /slices/<slice>/regions               int32   [nx, ny] attractor's Morse set index, or -1, -2, -3
    /slices/<slice>/placements/<trajectory>  int32 [T]     region of each checkpoint's projection
    /trajectories/<trajectory>/step         int64   [T]
    /trajectories/<trajectory>/step_length  float64 [T]    ||theta_t - theta_{t-1}||, NaN at t = 0
    /trajectories/<trajectory>/speed        float64 [T]    step_length per training step
    /trajectories/<trajectory>/cosine       float64 [T]    cosine between the updates into and out of t
    /trajectories/<trajectory>/loss         float64 [T]    logged training loss

Grids are indexed ``[i, j]`` = (``alpha[i]``, ``beta[j]``) like landscape.h5, and box
(i, j) is the cell centred at that sample. Morse sets are numbered by their lowest
loss, ascending. Region and placement codes: -1 reaches no attractor, -2 reaches
more than one (a separatrix), -3 lies outside the domain (a cell without a valid
gradient, or a point outside the grid).

Slice attributes: `tau` (time of the flow map, coordinate units squared per loss
unit), `tau_rule` (how tau was chosen), `map` (``"gradient"``: the time-tau map of
the negative gradient flow), `invalid_cells` and `map_edges`. Trajectory attribute:
`path_over_displacement`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from doodl3_cli.artifacts._common import attr_str, open_artifact
from doodl3_cli.dynamics.morse import MorseGraph
from doodl3_cli.dynamics.trajectories import TrajectoryDiagnostics
from doodl3_cli.errors import ArtifactError

SCHEMA = "doodl3/dynamics"
SCHEMA_VERSION = 1
COMMAND = "doodl3 dynamics RUN"

MORSE_DATASETS = ("cell_scc", "morse_set", "hasse_edges", "order", "attractor", "repeller", "set_min_loss", "set_cells")
TRAJECTORY_DATASETS = ("step", "step_length", "speed", "cosine", "loss")


@dataclass
class SliceDynamics:
    """The flow and Morse graph of one slice, read into memory.

    Attributes
    ----------
    name : str
        Slice name, as in landscape.h5.
    alpha : ndarray of shape (nx,), float64
    beta : ndarray of shape (ny,), float64
    grad_alpha, grad_beta : ndarray of shape (nx, ny), float64
        Gradient of the loss, NaN outside the domain.
    error : ndarray of shape (nx, ny), float64
        Estimated norm of the gradient error, NaN outside the domain.
    morse : MorseGraph
        Morse sets, their order and the regions of the attractors.
    placements : dict of str to ndarray of shape (T,), int32
        Region of each checkpoint's projection, per trajectory.
    tau : float
        Time of the flow map.
    tau_rule : str
        How `tau` was chosen.
    map : str
        The map that was approximated, ``"gradient"``.
    attrs : dict
        Every slice attribute, the three above included.
    """

    name: str
    alpha: np.ndarray
    beta: np.ndarray
    grad_alpha: np.ndarray
    grad_beta: np.ndarray
    error: np.ndarray
    morse: MorseGraph
    placements: dict[str, np.ndarray]
    tau: float
    tau_rule: str
    map: str
    attrs: dict[str, Any] = field(default_factory=dict)


def write_slice(f: h5py.File, result: SliceDynamics) -> h5py.Group:
    """Write one slice's flow, Morse graph, regions and placements.

    Parameters
    ----------
    f : h5py.File
        dynamics.h5, open for writing.
    result : SliceDynamics
        What to write. Entries of `attrs` other than tau, tau_rule and map are
        written as extra slice attributes.

    Raises
    ------
    ArtifactError
        When the file already contains a slice of that name.
    """
    slices = f.require_group("slices")
    if result.name in slices:
        raise ArtifactError(f"{f.filename}: slice '{result.name}' is already written")
    group = slices.create_group(result.name)
    group.create_dataset("alpha", data=np.asarray(result.alpha, dtype=np.float64))
    group.create_dataset("beta", data=np.asarray(result.beta, dtype=np.float64))

    flow = group.create_group("flow")
    flow.create_dataset("grad_alpha", data=np.asarray(result.grad_alpha, dtype=np.float64))
    flow.create_dataset("grad_beta", data=np.asarray(result.grad_beta, dtype=np.float64))
    flow.create_dataset("error", data=np.asarray(result.error, dtype=np.float64))

    morse = group.create_group("morse")
    graph = result.morse
    morse.create_dataset("cell_scc", data=np.asarray(graph.cell_scc, dtype=np.int32))
    morse.create_dataset("morse_set", data=np.asarray(graph.morse_set, dtype=np.int32))
    morse.create_dataset("hasse_edges", data=np.asarray(graph.hasse_edges, dtype=np.int64).reshape(-1, 2))
    morse.create_dataset("order", data=np.asarray(graph.order, dtype=np.int64).reshape(-1, 2))
    morse.create_dataset("attractor", data=np.asarray(graph.attractor, dtype=bool))
    morse.create_dataset("repeller", data=np.asarray(graph.repeller, dtype=bool))
    morse.create_dataset("set_min_loss", data=np.asarray(graph.set_min_loss, dtype=np.float64))
    morse.create_dataset("set_cells", data=np.asarray(graph.set_cells, dtype=np.int64))
    group.create_dataset("regions", data=np.asarray(graph.regions, dtype=np.int32))

    placements = group.create_group("placements")
    for trajectory, placement in result.placements.items():
        placements.create_dataset(trajectory, data=np.asarray(placement, dtype=np.int32))

    for key, value in result.attrs.items():
        group.attrs[key] = value
    group.attrs["tau"] = float(result.tau)
    group.attrs["tau_rule"] = result.tau_rule
    group.attrs["map"] = result.map
    group.attrs["map_edges"] = np.int64(graph.map_edges)
    return group


def write_trajectory(f: h5py.File, diagnostics: TrajectoryDiagnostics) -> h5py.Group:
    """Write the diagnostics of one trajectory under /trajectories/<name>.

    Raises
    ------
    ArtifactError
        When the file already contains a trajectory of that name.
    """
    trajectories = f.require_group("trajectories")
    if diagnostics.name in trajectories:
        raise ArtifactError(f"{f.filename}: trajectory '{diagnostics.name}' is already written")
    group = trajectories.create_group(diagnostics.name)
    group.create_dataset("step", data=np.asarray(diagnostics.step, dtype=np.int64))
    for name in ("step_length", "speed", "cosine", "loss"):
        group.create_dataset(name, data=np.asarray(getattr(diagnostics, name), dtype=np.float64))
    group.attrs["path_over_displacement"] = float(diagnostics.path_over_displacement)
    return group


def list_slices(path: Path) -> list[str]:
    """Return the names of the slices in dynamics.h5."""
    with open_artifact(path, schema=SCHEMA, max_version=SCHEMA_VERSION, command=COMMAND) as f:
        return list(f["slices"].keys()) if "slices" in f else []


def list_trajectories(path: Path) -> list[str]:
    """Return the names of the trajectories in dynamics.h5."""
    with open_artifact(path, schema=SCHEMA, max_version=SCHEMA_VERSION, command=COMMAND) as f:
        return list(f["trajectories"].keys()) if "trajectories" in f else []


def read_slice(path: Path, name: str | None = None) -> SliceDynamics:
    """Read one slice, or the first one when `name` is None.

    Raises
    ------
    ArtifactError
        When the file is missing or of another schema, contains no slice, lacks the
        slice named, or lacks one of its datasets.
    """
    with open_artifact(path, schema=SCHEMA, max_version=SCHEMA_VERSION, command=COMMAND) as f:
        slices = f.get("slices")
        if slices is None or len(slices) == 0:
            raise ArtifactError(f"{path}: contains no slice; rerun `{COMMAND}`")
        if name is None:
            name = next(iter(slices.keys()))
        if name not in slices:
            raise ArtifactError(f"{path}: slice '{name}' not found (slices: {', '.join(slices.keys())})")
        group = slices[name]
        _require(group, ("alpha", "beta", "flow", "morse", "regions", "placements"), path)
        _require(group["flow"], ("grad_alpha", "grad_beta", "error"), path)
        _require(group["morse"], MORSE_DATASETS, path)

        morse = {key: group["morse"][key][()] for key in MORSE_DATASETS}
        attrs = {key: _attr_value(group, key) for key in group.attrs.keys()}
        graph = MorseGraph(
            regions=group["regions"][()],
            map_edges=int(attrs.get("map_edges", -1)),
            **morse,
        )
        return SliceDynamics(
            name=name,
            alpha=group["alpha"][()],
            beta=group["beta"][()],
            grad_alpha=group["flow/grad_alpha"][()],
            grad_beta=group["flow/grad_beta"][()],
            error=group["flow/error"][()],
            morse=graph,
            placements={key: dataset[()] for key, dataset in group["placements"].items()},
            tau=float(attrs.get("tau", np.nan)),
            tau_rule=str(attrs.get("tau_rule", "")),
            map=str(attrs.get("map", "")),
            attrs=attrs,
        )


def read_trajectory(path: Path, name: str) -> TrajectoryDiagnostics:
    """Read the diagnostics of one trajectory.

    Raises
    ------
    ArtifactError
        When the file is missing or of another schema, lacks the trajectory, or
        lacks one of its datasets.
    """
    with open_artifact(path, schema=SCHEMA, max_version=SCHEMA_VERSION, command=COMMAND) as f:
        group = f.get(f"trajectories/{name}")
        if group is None:
            available = ", ".join(f["trajectories"].keys()) if "trajectories" in f else "none"
            raise ArtifactError(f"{path}: trajectory '{name}' not found (trajectories: {available})")
        _require(group, TRAJECTORY_DATASETS, path)
        return TrajectoryDiagnostics(
            name=name,
            path_over_displacement=float(group.attrs.get("path_over_displacement", np.nan)),
            **{key: group[key][()] for key in TRAJECTORY_DATASETS},
        )


def _require(group: h5py.Group, names: tuple[str, ...], path: Path) -> None:
    missing = [name for name in names if name not in group]
    if missing:
        raise ArtifactError(
            f"{path}: group '{group.name}' lacks {', '.join(missing)}; the file is incomplete, rerun `{COMMAND}`"
        )


def _attr_value(group: h5py.Group, key: str) -> Any:
    value = group.attrs[key]
    if isinstance(value, (bytes, str)):
        return attr_str(group, key)
    if isinstance(value, np.generic):
        return value.item()
    return value
