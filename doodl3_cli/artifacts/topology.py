"""topology.h5: persistent homology, minima and basins of every landscape slice.

Layout (schema ``doodl3/topology``, version 1)::

    /slices/<slice>/alpha                     float64 [nx]     copied from landscape.h5
    /slices/<slice>/beta                      float64 [ny]     copied from landscape.h5
    /slices/<slice>/pairs/dim                 int64   [n]      0 (components) or 1 (rings)
    /slices/<slice>/pairs/birth               float64 [n]      loss at which the class appears
    /slices/<slice>/pairs/death               float64 [n]      loss at which it dies, inf if essential
    /slices/<slice>/pairs/birth_cell          int64   [n, 2]   grid index (i, j) of the birth vertex
    /slices/<slice>/pairs/death_cell          int64   [n, 2]   (-1, -1) if essential
    /slices/<slice>/pairs/birth_coords        float64 [n, 2]   (alpha, beta) of the birth vertex
    /slices/<slice>/pairs/death_coords        float64 [n, 2]   NaN if essential
    /slices/<slice>/pairs/essential           bool    [n]
    /slices/<slice>/pairs/significant         bool    [n]
    /slices/<slice>/minima/cell               int64   [k, 2]   grid index of each significant minimum
    /slices/<slice>/minima/coords             float64 [k, 2]   its (alpha, beta)
    /slices/<slice>/minima/value              float64 [k]      its loss
    /slices/<slice>/minima/persistence        float64 [k]      death - birth of its H0 pair, inf if essential
    /slices/<slice>/basins                    int32   [nx, ny] row of /minima each cell drains to, -1 for none
    /slices/<slice>/boundary                  bool    [nx, ny] cells on the divide between two basins
    /slices/<slice>/nonfinite                 bool    [nx, ny] cells whose loss was NaN or +-inf
    /slices/<slice>/assignments/<trajectory>  int32   [T]      basin of each checkpoint, -1 outside the grid

Grids are indexed ``[i, j]`` = (``alpha[i]``, ``beta[j]``), as in landscape.h5.
Pairs are sorted by dimension, then birth, then death. Minima are sorted by loss,
deepest first, so basin 0 is the basin of the lowest minimum.

Slice attributes:

- ``convention``: the filtration used.
- ``threshold``: the persistence above which a pair is significant, in loss units.
- ``threshold_rule``: how the threshold was chosen.
- ``nonfinite_cells``: the number of NaN or +-inf cells.
- ``wall_value``: the loss given to non-finite cells during the computation.
- ``final_basins``: JSON map from trajectory name to the basin of its last
  checkpoint; -1 when that checkpoint lies outside the grid or the trajectory has
  no checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from doodl3_cli.artifacts._common import attr_json, attr_str, open_artifact
from doodl3_cli.errors import ArtifactError

SCHEMA = "doodl3/topology"
SCHEMA_VERSION = 1
COMMAND = "doodl3 topology RUN"

PAIR_FIELDS = (
    "dim", "birth", "death", "birth_cell", "death_cell",
    "birth_coords", "death_coords", "essential", "significant",
)
MINIMA_FIELDS = ("cell", "coords", "value", "persistence")


@dataclass
class PersistencePairs:
    """The persistence diagram of one slice, one row per pair.

    Attributes
    ----------
    dim : ndarray of shape (n,), int64
        Homology dimension: 0 for connected components, 1 for rings.
    birth : ndarray of shape (n,), float64
        Loss at which the class appears.
    death : ndarray of shape (n,), float64
        Loss at which the class dies; inf for essential classes.
    birth_cell : ndarray of shape (n, 2), int64
        Grid index (i, j) of the vertex whose loss is `birth`.
    death_cell : ndarray of shape (n, 2), int64
        Grid index (i, j) of the vertex whose loss is `death`; (-1, -1) when essential.
    birth_coords : ndarray of shape (n, 2), float64
        (alpha, beta) of `birth_cell`.
    death_coords : ndarray of shape (n, 2), float64
        (alpha, beta) of `death_cell`; NaN when essential.
    essential : ndarray of shape (n,), bool
        True for classes that never die at a finite loss.
    significant : ndarray of shape (n,), bool
        True when the persistence ``death - birth`` exceeds the slice threshold;
        always True for essential classes.
    """

    dim: np.ndarray
    birth: np.ndarray
    death: np.ndarray
    birth_cell: np.ndarray
    death_cell: np.ndarray
    birth_coords: np.ndarray
    death_coords: np.ndarray
    essential: np.ndarray
    significant: np.ndarray

    @property
    def persistence(self) -> np.ndarray:
        """``death - birth``, ndarray of shape (n,), float64; inf for essential classes."""
        return self.death - self.birth

    def __len__(self) -> int:
        return int(self.dim.shape[0])


@dataclass
class Minima:
    """The significant minima of one slice, deepest first.

    Attributes
    ----------
    cell : ndarray of shape (k, 2), int64
        Grid index (i, j) of each minimum.
    coords : ndarray of shape (k, 2), float64
        (alpha, beta) of each minimum.
    value : ndarray of shape (k,), float64
        Loss at each minimum.
    persistence : ndarray of shape (k,), float64
        Loss rise needed before the basin merges with a deeper one; inf when it never does.
    """

    cell: np.ndarray
    coords: np.ndarray
    value: np.ndarray
    persistence: np.ndarray

    def __len__(self) -> int:
        return int(self.value.shape[0])


@dataclass
class SliceTopology:
    """The topology of one landscape slice, read into memory.

    Attributes
    ----------
    name : str
        Slice name, the same as in landscape.h5.
    alpha : ndarray of shape (nx,), float64
    beta : ndarray of shape (ny,), float64
    pairs : PersistencePairs
    minima : Minima
    basins : ndarray of shape (nx, ny), int32
        Row of `minima` that each cell drains to; -1 for non-finite cells.
    boundary : ndarray of shape (nx, ny), bool
        Cells on the divide between two basins.
    nonfinite : ndarray of shape (nx, ny), bool
        Cells whose loss was NaN, +inf or -inf.
    assignments : dict of str to ndarray of shape (T,), int32
        Basin of each checkpoint of each trajectory; -1 outside the grid or on a non-finite cell.
    final_basins : dict of str to int
        Basin of the last checkpoint of each trajectory.
    threshold : float
        Persistence above which a pair is significant, in loss units.
    threshold_rule : str
        How `threshold` was chosen.
    convention : str
        The filtration used.
    wall_value : float
        Loss that non-finite cells were given during the computation.
    """

    name: str
    alpha: np.ndarray
    beta: np.ndarray
    pairs: PersistencePairs
    minima: Minima
    basins: np.ndarray
    boundary: np.ndarray
    nonfinite: np.ndarray
    assignments: dict[str, np.ndarray] = field(default_factory=dict)
    final_basins: dict[str, int] = field(default_factory=dict)
    threshold: float = 0.0
    threshold_rule: str = ""
    convention: str = ""
    wall_value: float = float("nan")

    @property
    def nonfinite_cells(self) -> int:
        """Number of cells whose loss was NaN or +-inf."""
        return int(self.nonfinite.sum())


def write_slice(f: h5py.File, topology: SliceTopology) -> h5py.Group:
    """Write one slice into an open topology.h5, replacing a slice of the same name.

    Parameters
    ----------
    f : h5py.File
        The artifact, open for writing.
    topology : SliceTopology
        The slice to write.

    Returns
    -------
    h5py.Group
        The group ``/slices/<name>``.
    """
    slices = f.require_group("slices")
    if topology.name in slices:
        del slices[topology.name]
    group = slices.create_group(topology.name)

    group.create_dataset("alpha", data=np.asarray(topology.alpha, dtype=np.float64))
    group.create_dataset("beta", data=np.asarray(topology.beta, dtype=np.float64))

    pairs = group.create_group("pairs")
    for name in PAIR_FIELDS:
        pairs.create_dataset(name, data=getattr(topology.pairs, name))

    minima = group.create_group("minima")
    for name in MINIMA_FIELDS:
        minima.create_dataset(name, data=getattr(topology.minima, name))

    group.create_dataset("basins", data=np.asarray(topology.basins, dtype=np.int32), compression="gzip")
    group.create_dataset("boundary", data=np.asarray(topology.boundary, dtype=bool), compression="gzip")
    group.create_dataset("nonfinite", data=np.asarray(topology.nonfinite, dtype=bool), compression="gzip")

    assignments = group.create_group("assignments")
    for trajectory, basins in topology.assignments.items():
        assignments.create_dataset(trajectory, data=np.asarray(basins, dtype=np.int32))

    group.attrs["convention"] = topology.convention
    group.attrs["threshold"] = float(topology.threshold)
    group.attrs["threshold_rule"] = topology.threshold_rule
    group.attrs["nonfinite_cells"] = np.int64(topology.nonfinite_cells)
    group.attrs["wall_value"] = float(topology.wall_value)
    group.attrs["final_basins"] = json.dumps(topology.final_basins, sort_keys=True)
    return group


def list_slices(path: Path) -> list[str]:
    """Return the names of the slices in topology.h5.

    Raises
    ------
    ArtifactError
        When the file is missing, is not HDF5, or has another schema or version.
    """
    with open_artifact(path, schema=SCHEMA, max_version=SCHEMA_VERSION, command=COMMAND) as f:
        return list(f["slices"].keys()) if "slices" in f else []


def read_slice(path: Path, name: str | None = None) -> SliceTopology:
    """Read one slice of topology.h5; the first one when `name` is None.

    Parameters
    ----------
    path : Path
        The topology.h5 file.
    name : str, optional
        Slice name; the first slice in the file by default.

    Returns
    -------
    SliceTopology
        Every array read into memory.

    Raises
    ------
    ArtifactError
        When the file is missing, has another schema or version, contains no
        slice, or does not contain the slice named.
    """
    with open_artifact(path, schema=SCHEMA, max_version=SCHEMA_VERSION, command=COMMAND) as f:
        slices = f.get("slices")
        if slices is None or len(slices) == 0:
            raise ArtifactError(f"{path}: contains no slice; rerun `{COMMAND}`")
        if name is None:
            name = next(iter(slices.keys()))
        if name not in slices:
            raise ArtifactError(
                f"{path}: slice '{name}' not found (slices: {', '.join(slices.keys())}); "
                f"rerun `{COMMAND}` if landscape.h5 gained slices"
            )
        group = slices[name]

        pairs = PersistencePairs(**{key: group["pairs"][key][()] for key in PAIR_FIELDS})
        minima = Minima(**{key: group["minima"][key][()] for key in MINIMA_FIELDS})
        assignments = {trajectory: dataset[()] for trajectory, dataset in group["assignments"].items()}
        final_basins = {str(k): int(v) for k, v in attr_json(group, "final_basins", {}).items()}

        return SliceTopology(
            name=name,
            alpha=group["alpha"][()],
            beta=group["beta"][()],
            pairs=pairs,
            minima=minima,
            basins=group["basins"][()],
            boundary=group["boundary"][()],
            nonfinite=group["nonfinite"][()],
            assignments=assignments,
            final_basins=final_basins,
            threshold=float(group.attrs["threshold"]),
            threshold_rule=attr_str(group, "threshold_rule", ""),
            convention=attr_str(group, "convention", ""),
            wall_value=float(group.attrs.get("wall_value", np.nan)),
        )
