"""landscape.h5: loss-landscape slices sampled on grids.

Layout (schema ``doodl3/landscape``, version 2)::

    /slices/<slice>/center        float32 [P]      the parameter point at (0, 0)
    /slices/<slice>/directions    float64 [2, P]   orthonormal for PCA directions
    /slices/<slice>/alpha         float64 [nx]     coordinate along directions[0]
    /slices/<slice>/beta          float64 [ny]     coordinate along directions[1]
    /slices/<slice>/<metric>      float64 [nx, ny] loss, loss_stderr, accuracy; [i, j] = (alpha[i], beta[j])
    /slices/<slice>/evaluated     bool    [nx, ny] cells already computed (resume)
    /slices/<slice>/explained_variance  float64 [2]  ratio per PCA direction
    /slices/<slice>/projections/<trajectory>/coords         float64 [T, 2]
    /slices/<slice>/projections/<trajectory>/residual       float64 [T]  distance from the plane
    /slices/<slice>/projections/<trajectory>/loss           float64 [T]  the checkpoint's own loss
    /slices/<slice>/projections/<trajectory>/loss_on_plane  float64 [T]  grid loss interpolated at coords
    /slices/<slice>/projections/<trajectory>/step           int64   [T]
    /lines/<line>/t               float64 [n]      position: 0 at the start run, 1 at the end run
    /lines/<line>/<metric>        float64 [n]      loss, loss_stderr, accuracy at start + t (end - start)
    /lines/<line>/evaluated       bool    [n]

Slice attributes: method, center_trajectory, center_index, normalisation,
batchnorm_policy, split, samples, device, dtype, nonfinite_cells, and `recipe`
(JSON of everything that determines the grid, used to decide whether a resume is valid).
Line attributes: start, end (trajectory names), distance, barrier, barrier_t, recipe.

Version 2 added the ``loss_stderr`` grid and ``/lines``; version 1 files stay readable.
`sample` writes the same layout into a partial file (`partial_path`) and renames it
to landscape.h5 when the grid is complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from doodl3_cli.artifacts._common import attr_json, attr_str, named_group, open_artifact

SCHEMA = "doodl3/landscape"
SCHEMA_VERSION = 2
COMMAND = "doodl3 sample RUN"


def partial_path(path: Path) -> Path:
    """Return the file that `sample` evaluates into before it renames it to landscape.h5 at `path`.

    It is ``.<name>.partial`` next to `path`, with the layout of landscape.h5.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


@dataclass
class Projection:
    """One trajectory projected onto a slice.

    Attributes
    ----------
    coords : ndarray of shape (T, 2), float64
        (alpha, beta) of each checkpoint.
    residual : ndarray of shape (T,), float64
        Euclidean distance of each checkpoint from the slice plane, in parameter units.
    loss : ndarray of shape (T,), float64
        The checkpoint's own loss on the evaluation set.
    loss_on_plane : ndarray of shape (T,), float64
        The grid loss interpolated bilinearly at `coords` (NaN outside the grid).
    step : ndarray of shape (T,), int64
    """

    coords: np.ndarray
    residual: np.ndarray
    loss: np.ndarray
    loss_on_plane: np.ndarray
    step: np.ndarray


@dataclass
class LandscapeSlice:
    """A two-dimensional slice of the loss landscape, read into memory.

    Attributes
    ----------
    name : str
    center : ndarray of shape (P,), float32
    directions : ndarray of shape (2, P), float64
    alpha : ndarray of shape (nx,), float64
    beta : ndarray of shape (ny,), float64
    metrics : dict of str to ndarray of shape (nx, ny), float64
        Always contains "loss"; NaN where the evaluation was non-finite or not done.
    evaluated : ndarray of shape (nx, ny), bool
    explained_variance : ndarray of shape (2,), float64
        Ratio of checkpoint variance explained by each direction (NaN unless PCA).
    projections : dict of str to Projection
    attrs : dict
    """

    name: str
    center: np.ndarray
    directions: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    metrics: dict[str, np.ndarray]
    evaluated: np.ndarray
    explained_variance: np.ndarray
    projections: dict[str, Projection] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def loss(self) -> np.ndarray:
        """The loss grid, ndarray of shape (nx, ny)."""
        return self.metrics["loss"]


METRIC_SKIP = {"center", "directions", "alpha", "beta", "evaluated", "explained_variance", "projections"}


def list_slices(path: Path) -> list[str]:
    """Return the names of the two-dimensional slices in landscape.h5 (lines are listed by `list_lines`)."""
    with open_artifact(path, schema=SCHEMA, max_version=SCHEMA_VERSION, command=COMMAND) as f:
        return list(f["slices"].keys()) if "slices" in f else []


def read_slice(path: Path, name: str | None = None, *, with_vectors: bool = True) -> LandscapeSlice:
    """Read one slice; the first one when `name` is None.

    Parameters
    ----------
    with_vectors : bool
        Read `center` and `directions` (P-sized); empty arrays otherwise.

    Raises
    ------
    ArtifactError
        When the file contains no slice or not the one named.
    """
    with open_artifact(path, schema=SCHEMA, max_version=SCHEMA_VERSION, command=COMMAND) as f:
        g = named_group(f, "slices", name, path=path, rerun=COMMAND)
        name = g.name.rpartition("/")[2]

        metrics = {k: g[k][()].astype(np.float64) for k in g.keys() if k not in METRIC_SKIP}
        projections = {}
        for traj, pg in g.get("projections", {}).items():
            projections[traj] = Projection(
                coords=pg["coords"][()], residual=pg["residual"][()], loss=pg["loss"][()],
                loss_on_plane=pg["loss_on_plane"][()], step=pg["step"][()],
            )
        attrs = {}
        for key in g.attrs.keys():
            value = g.attrs[key]
            attrs[key] = attr_str(g, key) if isinstance(value, (str, bytes)) else (
                value.item() if isinstance(value, np.generic) else value
            )
        if "recipe" in attrs:
            attrs["recipe"] = attr_json(g, "recipe", {})
        return LandscapeSlice(
            name=name,
            center=g["center"][()] if with_vectors else np.empty(0, np.float32),
            directions=g["directions"][()] if with_vectors else np.empty((2, 0)),
            alpha=g["alpha"][()],
            beta=g["beta"][()],
            metrics=metrics,
            evaluated=g["evaluated"][()],
            explained_variance=g["explained_variance"][()] if "explained_variance" in g else np.full(2, np.nan),
            projections=projections,
            attrs=attrs,
        )


def create_slice(
    f: h5py.File,
    name: str,
    *,
    center: np.ndarray,
    directions: np.ndarray,
    alpha: np.ndarray,
    beta: np.ndarray,
    metric_names: list[str],
    explained_variance: np.ndarray,
    attrs: dict[str, Any],
) -> h5py.Group:
    """Create a slice group with NaN metric grids and an all-False `evaluated` mask."""
    slices = f.require_group("slices")
    if name in slices:
        del slices[name]
    g = slices.create_group(name)
    g.create_dataset("center", data=np.asarray(center, dtype=np.float32))
    g.create_dataset("directions", data=np.asarray(directions, dtype=np.float64))
    g.create_dataset("alpha", data=np.asarray(alpha, dtype=np.float64))
    g.create_dataset("beta", data=np.asarray(beta, dtype=np.float64))
    shape = (len(alpha), len(beta))
    for metric in metric_names:
        g.create_dataset(metric, data=np.full(shape, np.nan), dtype=np.float64)
    g.create_dataset("evaluated", data=np.zeros(shape, dtype=bool))
    g.create_dataset("explained_variance", data=np.asarray(explained_variance, dtype=np.float64))
    g.create_group("projections")
    for key, value in attrs.items():
        g.attrs[key] = value
    return g


def write_projection(group: h5py.Group, trajectory: str, projection: Projection) -> None:
    """Write (or replace) the projection of one trajectory into a slice group."""
    projections = group.require_group("projections")
    if trajectory in projections:
        del projections[trajectory]
    pg = projections.create_group(trajectory)
    pg.create_dataset("coords", data=np.asarray(projection.coords, dtype=np.float64))
    pg.create_dataset("residual", data=np.asarray(projection.residual, dtype=np.float64))
    pg.create_dataset("loss", data=np.asarray(projection.loss, dtype=np.float64))
    pg.create_dataset("loss_on_plane", data=np.asarray(projection.loss_on_plane, dtype=np.float64))
    pg.create_dataset("step", data=np.asarray(projection.step, dtype=np.int64))


@dataclass
class LandscapeLine:
    """A one-dimensional slice between the final states of two trajectories.

    Attributes
    ----------
    name : str
    t : ndarray of shape (n,), float64
        Position along the line: the point is ``start + t * (end - start)``.
    metrics : dict of str to ndarray of shape (n,), float64
        ``loss``, ``loss_stderr`` and, for classifiers, ``accuracy``.
    evaluated : ndarray of shape (n,), bool
    attrs : dict
        ``start``, ``end``, ``distance`` (Euclidean, parameter units), ``barrier``
        (largest excess of the loss over the straight line between the two end
        losses, for t in [0, 1]), ``barrier_t`` and ``recipe``.
    """

    name: str
    t: np.ndarray
    metrics: dict[str, np.ndarray]
    evaluated: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def loss(self) -> np.ndarray:
        """The loss along the line, ndarray of shape (n,)."""
        return self.metrics["loss"]


def list_lines(path: Path) -> list[str]:
    """Return the names of the lines in landscape.h5."""
    with open_artifact(path, schema=SCHEMA, max_version=SCHEMA_VERSION, command=COMMAND) as f:
        return list(f["lines"].keys()) if "lines" in f else []


def read_line(path: Path, name: str | None = None) -> LandscapeLine:
    """Read one line; the first one when `name` is None.

    Raises
    ------
    ArtifactError
        When the file contains no line or not the one named.
    """
    with open_artifact(path, schema=SCHEMA, max_version=SCHEMA_VERSION, command=COMMAND) as f:
        g = named_group(f, "lines", name, path=path, rerun=f"{COMMAND} --line A:B")
        name = g.name.rpartition("/")[2]
        metrics = {k: g[k][()].astype(np.float64) for k in g.keys() if k not in ("t", "evaluated")}
        attrs = {}
        for key in g.attrs.keys():
            value = g.attrs[key]
            attrs[key] = attr_str(g, key) if isinstance(value, (str, bytes)) else (
                value.item() if isinstance(value, np.generic) else value
            )
        if "recipe" in attrs:
            attrs["recipe"] = attr_json(g, "recipe", {})
        return LandscapeLine(name=name, t=g["t"][()], metrics=metrics, evaluated=g["evaluated"][()], attrs=attrs)


def create_line(f: h5py.File, name: str, *, t: np.ndarray, metric_names: list[str], attrs: dict[str, Any]) -> h5py.Group:
    """Create (or replace) a line group with NaN metrics and an all-False `evaluated` mask."""
    lines = f.require_group("lines")
    if name in lines:
        del lines[name]
    g = lines.create_group(name)
    g.create_dataset("t", data=np.asarray(t, dtype=np.float64))
    for metric in metric_names:
        g.create_dataset(metric, data=np.full(len(t), np.nan), dtype=np.float64)
    g.create_dataset("evaluated", data=np.zeros(len(t), dtype=bool))
    for key, value in attrs.items():
        g.attrs[key] = value
    return g
