"""dynamics.h5: gradient flow, Morse graphs and trajectory diagnostics.

Layout (schema ``doodl3/dynamics``, version 2)::

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
    /slices/<slice>/morse/conley_index    int64   [M, 3]   Betti numbers of the Conley index over Z/2
    /slices/<slice>/regions               int32   [nx, ny] attractor's Morse set index, or -1, -2, -3
    /slices/<slice>/placements/<trajectory>  int32 [T]     region of each checkpoint's projection
    /slices/<slice>/pyramid/<stride>/...   the Morse graph on alpha[::stride], beta[::stride]: the
                                           morse/ datasets above, regions, and finest_set int32 [M0],
                                           the set of this level containing each level-0 Morse set, or -1
    /slices/<slice>/ensemble/runs          str     [R]      runs placed on the slice
    /slices/<slice>/ensemble/early_region  int32   [R]      region of the checkpoint at early_fraction of each run
    /slices/<slice>/ensemble/final_region  int32   [R]      region of each run's last checkpoint
    /trajectories/<trajectory>/step         int64   [T]
    /trajectories/<trajectory>/step_length  float64 [T]    ||theta_t - theta_{t-1}||, NaN at t = 0
    /trajectories/<trajectory>/speed        float64 [T]    step_length per training step
    /trajectories/<trajectory>/cosine       float64 [T]    cosine between the updates into and out of t
    /trajectories/<trajectory>/loss         float64 [T]    logged training loss
    /trajectories/<trajectory>/sharpness_step  int64  [S]  checkpoints where the Hessian was probed (optional)
    /trajectories/<trajectory>/sharpness    float64 [S]    top Hessian eigenvalue there (optional)
    /ensemble/runs                          str     [R]    every trajectory, in the order of the matrices
    /ensemble/final_distance                float64 [R, R] distance between final parameter vectors
    /ensemble/disagreement                  float64 [R, R] fraction of evaluation samples predicted differently (optional)
    /ensemble/entropy                       float64 [N]    entropy of the mean predicted distribution, nats (optional)
    /findings                               str     [F]    one JSON object per finding

Grids are indexed ``[i, j]`` = (``alpha[i]``, ``beta[j]``) like landscape.h5, and box
(i, j) is the cell centred at that sample. Morse sets are numbered by their lowest
loss, ascending. Region and placement codes: -1 reaches no attractor, -2 reaches
more than one (a separatrix), -3 lies outside the domain (a cell without a valid
gradient, or a point outside the grid).

Version 2 added ``morse/conley_index``, the slice ``ensemble`` group, the
trajectory sharpness datasets, the slice ``pyramid`` group, ``/ensemble`` and
``/findings``. Version 1 files are
still read: what they lack reads as None or empty. The optional datasets are
written only when doodl3.toml let the stage rebuild the model.

A finding is ``{"kind", "severity", "runs", "steps", "evidence", "suggestion"}``
(see `doodl3_cli.dynamics.diagnostics.Finding`). Slice ensemble attributes:
`early_fraction`, `early_matches_final`, `final_loss_eta2`.

Slice attributes: `tau` (time of the flow map, coordinate units squared per loss
unit), `tau_rule` (how tau was chosen), `map` (``"gradient"``: the time-tau map of
the negative gradient flow), `invalid_cells` and `map_edges`. Trajectory attribute:
`path_over_displacement`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from doodl3_cli.artifacts._common import attr_str, named_group, open_artifact, read_str_dataset, write_str_dataset
from doodl3_cli.dynamics.diagnostics import Finding
from doodl3_cli.dynamics.ensemble import EARLY_FRACTION, EnsembleDiagnostics, SliceEnsemble
from doodl3_cli.dynamics.morse import MorseGraph
from doodl3_cli.dynamics.pyramid import PyramidLevel
from doodl3_cli.dynamics.trajectories import TrajectoryDiagnostics
from doodl3_cli.errors import ArtifactError

SCHEMA = "doodl3/dynamics"
SCHEMA_VERSION = 2
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
    ensemble : SliceEnsemble or None
        The runs grouped by their final attractor region, None when not computed.
    pyramid : list of PyramidLevel
        The Morse graph at each coarser level, stride 2 first. Empty when not computed.
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
    ensemble: SliceEnsemble | None = None
    pyramid: list[PyramidLevel] = field(default_factory=list)


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

    graph = result.morse
    _write_morse(group, graph)

    if result.pyramid:
        pyramid = group.create_group("pyramid")
        for level in result.pyramid:
            level_group = pyramid.create_group(str(level.stride))
            _write_morse(level_group, level.morse)
            level_group.create_dataset("finest_set", data=np.asarray(level.finest_set, dtype=np.int32))
            level_group.attrs["stride"] = np.int64(level.stride)
            level_group.attrs["map_edges"] = np.int64(level.morse.map_edges)

    placements = group.create_group("placements")
    for trajectory, placement in result.placements.items():
        placements.create_dataset(trajectory, data=np.asarray(placement, dtype=np.int32))

    if result.ensemble is not None:
        ensemble = group.create_group("ensemble")
        write_str_dataset(ensemble, "runs", result.ensemble.runs)
        ensemble.create_dataset("early_region", data=np.asarray(result.ensemble.early_region, dtype=np.int32))
        ensemble.create_dataset("final_region", data=np.asarray(result.ensemble.final_region, dtype=np.int32))
        ensemble.attrs["early_fraction"] = EARLY_FRACTION
        ensemble.attrs["early_matches_final"] = float(result.ensemble.early_matches_final)
        ensemble.attrs["final_loss_eta2"] = float(result.ensemble.final_loss_eta2)

    for key, value in result.attrs.items():
        group.attrs[key] = value
    group.attrs["tau"] = float(result.tau)
    group.attrs["tau_rule"] = result.tau_rule
    group.attrs["map"] = result.map
    group.attrs["map_edges"] = np.int64(graph.map_edges)
    return group


def _write_morse(group: h5py.Group, graph: MorseGraph) -> None:
    """Write a Morse graph as group/morse/* and group/regions."""
    morse = group.create_group("morse")
    morse.create_dataset("cell_scc", data=np.asarray(graph.cell_scc, dtype=np.int32))
    morse.create_dataset("morse_set", data=np.asarray(graph.morse_set, dtype=np.int32))
    morse.create_dataset("hasse_edges", data=np.asarray(graph.hasse_edges, dtype=np.int64).reshape(-1, 2))
    morse.create_dataset("order", data=np.asarray(graph.order, dtype=np.int64).reshape(-1, 2))
    morse.create_dataset("attractor", data=np.asarray(graph.attractor, dtype=bool))
    morse.create_dataset("repeller", data=np.asarray(graph.repeller, dtype=bool))
    morse.create_dataset("set_min_loss", data=np.asarray(graph.set_min_loss, dtype=np.float64))
    morse.create_dataset("set_cells", data=np.asarray(graph.set_cells, dtype=np.int64))
    if graph.conley_index is not None:
        morse.create_dataset("conley_index", data=np.asarray(graph.conley_index, dtype=np.int64).reshape(-1, 3))
    group.create_dataset("regions", data=np.asarray(graph.regions, dtype=np.int32))


def _read_morse(group: h5py.Group, path: Path, map_edges: int) -> MorseGraph:
    """Read the Morse graph that `_write_morse` wrote."""
    _require(group, ("morse", "regions"), path)
    _require(group["morse"], MORSE_DATASETS, path)
    morse = {key: group["morse"][key][()] for key in MORSE_DATASETS}
    if "conley_index" in group["morse"]:
        morse["conley_index"] = group["morse/conley_index"][()]
    return MorseGraph(regions=group["regions"][()], map_edges=map_edges, **morse)


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
    if diagnostics.sharpness is not None:
        group.create_dataset("sharpness_step", data=np.asarray(diagnostics.sharpness_step, dtype=np.int64))
        group.create_dataset("sharpness", data=np.asarray(diagnostics.sharpness, dtype=np.float64))
    group.attrs["path_over_displacement"] = float(diagnostics.path_over_displacement)
    return group


def write_ensemble(f: h5py.File, ensemble: EnsembleDiagnostics) -> h5py.Group:
    """Write the ensemble measures under /ensemble and the findings as /findings.

    The per-run diagnostics in `ensemble.trajectories` are written separately, by
    `write_trajectory`.
    """
    group = f.create_group("ensemble")
    write_str_dataset(group, "runs", ensemble.runs)
    group.create_dataset("final_distance", data=np.asarray(ensemble.final_distance, dtype=np.float64))
    if ensemble.disagreement is not None:
        group.create_dataset("disagreement", data=np.asarray(ensemble.disagreement, dtype=np.float64))
    if ensemble.entropy is not None:
        group.create_dataset("entropy", data=np.asarray(ensemble.entropy, dtype=np.float64))
    write_str_dataset(f, "findings", [json.dumps(finding.to_dict()) for finding in ensemble.findings])
    return group


def read_findings(path: Path) -> list[Finding]:
    """Read the findings, an empty list for a file written before version 2."""
    with open_artifact(path, schema=SCHEMA, max_version=SCHEMA_VERSION, command=COMMAND) as f:
        if "findings" not in f:
            return []
        return [Finding(**json.loads(text)) for text in read_str_dataset(f["findings"])]


def read_ensemble(path: Path) -> EnsembleDiagnostics | None:
    """Read the ensemble measures, findings and per-run diagnostics; None for a file without /ensemble.

    Raises
    ------
    ArtifactError
        When the file is missing or of another schema, or a run listed in /ensemble
        has no trajectory group.
    """
    with open_artifact(path, schema=SCHEMA, max_version=SCHEMA_VERSION, command=COMMAND) as f:
        group = f.get("ensemble")
        if group is None:
            return None
        _require(group, ("runs", "final_distance"), path)
        runs = read_str_dataset(group["runs"])
        ensemble = EnsembleDiagnostics(
            runs=runs,
            trajectories=[],
            final_distance=group["final_distance"][()],
            disagreement=group["disagreement"][()] if "disagreement" in group else None,
            entropy=group["entropy"][()] if "entropy" in group else None,
        )
    ensemble.trajectories = [read_trajectory(path, name) for name in runs]
    ensemble.findings = read_findings(path)
    return ensemble


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
        group = named_group(f, "slices", name, path=path, rerun=COMMAND)
        name = group.name.rpartition("/")[2]
        _require(group, ("alpha", "beta", "flow", "morse", "regions", "placements"), path)
        _require(group["flow"], ("grad_alpha", "grad_beta", "error"), path)
        attrs = {key: _attr_value(group, key) for key in group.attrs.keys()}
        graph = _read_morse(group, path, int(attrs.get("map_edges", -1)))
        pyramid = []
        if "pyramid" in group:
            levels = sorted(group["pyramid"].values(), key=lambda level: int(level.attrs["stride"]))
            for level in levels:
                _require(level, ("finest_set",), path)
                pyramid.append(PyramidLevel(
                    stride=int(level.attrs["stride"]),
                    morse=_read_morse(level, path, int(level.attrs.get("map_edges", -1))),
                    finest_set=level["finest_set"][()],
                ))
        ensemble = None
        if "ensemble" in group:
            stored = group["ensemble"]
            runs = read_str_dataset(stored["runs"])
            final_region = stored["final_region"][()]
            groups: dict[int, list[str]] = {}
            for run, region in zip(runs, final_region.tolist()):
                groups.setdefault(int(region), []).append(run)
            ensemble = SliceEnsemble(
                runs=runs,
                early_region=stored["early_region"][()],
                final_region=final_region,
                groups=groups,
                early_matches_final=float(stored.attrs.get("early_matches_final", np.nan)),
                final_loss_eta2=float(stored.attrs.get("final_loss_eta2", np.nan)),
            )
        return SliceDynamics(
            ensemble=ensemble,
            pyramid=pyramid,
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
            sharpness_step=group["sharpness_step"][()] if "sharpness_step" in group else None,
            sharpness=group["sharpness"][()] if "sharpness" in group else None,
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
