"""topology.h5: persistent homology, minima and basins of every landscape slice.

Layout (schema ``doodl3/topology``, version 2)::

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
    /slices/<slice>/saddles/{cell,coords,value,persistence}    death cells of the significant finite H0 pairs
    /slices/<slice>/summary/significant       int64   [2]      significant classes in H0, H1 (essential included)
    /slices/<slice>/summary/total_persistence float64 [2]      sum of the finite persistences in H0, H1
    /slices/<slice>/summary/entropy           float64 [2]      persistence entropy in H0, H1
    /slices/<slice>/summary/betti_levels      float64 [L]      loss levels of the Betti curves
    /slices/<slice>/summary/betti             int64   [2, L]   Betti numbers of H0, H1 at each level
    /slices/<slice>/pyramid/stride            int64   [K]      sample stride of each level: 1, 2, 4, ...
    /slices/<slice>/pyramid/shape             int64   [K, 2]   grid shape of each level
    /slices/<slice>/pyramid/significant_counts int64  [K, 2]   significant classes in H0, H1 per level
    /slices/<slice>/pyramid/essential_counts  int64   [K, 2]   essential classes in H0, H1 per level
    /slices/<slice>/pyramid/bottleneck        float64 [K-1, 2] H0, H1 bottleneck distance between levels k+1 and k
    /slices/<slice>/pyramid/{level,dim,birth,death,significant}  [m]  the diagram of every level, values only
    /slices/<slice>/superlevel/...            only with --superlevel: pairs/, maxima/ and summary/ as above,
                                                               of the superlevel-set filtration, in loss units

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
- ``runs_by_basin``: JSON map from basin (as a string) to the sorted names of
  the trajectories whose last checkpoint lies in it.
- ``locator``: how the birth and death cells were found (``value lookup`` or
  ``vertex complex``).
- ``pyramid/`` attributes ``recommended_level`` (int) and ``unstable`` (bool);
  ``summary/`` attribute ``entropy_rule``.

Version 2 added saddles/, summary/, pyramid/, superlevel/ and ``locator``; version
1 files are still read, with those fields None.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from doodl3_cli.artifacts._common import attr_json, attr_str, named_group, open_artifact

SCHEMA = "doodl3/topology"
SCHEMA_VERSION = 2
COMMAND = "doodl3 topology RUN"

PAIR_FIELDS = (
    "dim", "birth", "death", "birth_cell", "death_cell",
    "birth_coords", "death_coords", "essential", "significant",
)
MINIMA_FIELDS = ("cell", "coords", "value", "persistence")
SUMMARY_FIELDS = ("significant", "total_persistence", "entropy", "betti_levels", "betti")
PYRAMID_FIELDS = (
    "stride", "shape", "significant_counts", "essential_counts", "bottleneck", "level", "dim", "birth", "death", "significant",
)


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
        """``|death - birth|``, ndarray of shape (n,), float64; inf for essential classes.

        The absolute value keeps it positive for superlevel diagrams, where death < birth.
        """
        return np.abs(self.death - self.birth)

    def __len__(self) -> int:
        return int(self.dim.shape[0])


@dataclass
class Minima:
    """The significant minima of one slice, deepest first; the same fields hold saddles and maxima.

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
class Summary:
    """Summaries of a persistence diagram, per homology dimension (row 0 for H0, row 1 for H1).

    Attributes
    ----------
    significant : ndarray of shape (2,), int64
        Significant classes, essential ones included.
    total_persistence : ndarray of shape (2,), float64
        Sum of the finite persistences, in loss units.
    entropy : ndarray of shape (2,), float64
        Persistence entropy, following `entropy_rule`.
    betti_levels : ndarray of shape (L,), float64
        Loss levels, evenly spaced over the finite losses.
    betti : ndarray of shape (2, L), int64
        Number of classes alive at each level: of the sublevel set ``loss <= t``,
        or of the superlevel set ``loss >= t`` in a superlevel summary.
    entropy_rule : str
        How essential classes enter the entropy.
    """

    significant: np.ndarray
    total_persistence: np.ndarray
    entropy: np.ndarray
    betti_levels: np.ndarray
    betti: np.ndarray
    entropy_rule: str = ""


@dataclass
class Pyramid:
    """Diagrams of one slice at strides 1, 2, 4, ... of its samples, values only.

    Attributes
    ----------
    stride : ndarray of shape (K,), int64
    shape : ndarray of shape (K, 2), int64
    significant_counts : ndarray of shape (K, 2), int64
        Significant classes in H0 and H1 at each level, under the slice threshold
        (essential classes included).
    essential_counts : ndarray of shape (K, 2), int64
        Essential classes in H0 and H1 at each level.
    bottleneck : ndarray of shape (K-1, 2), float64
        Bottleneck distance in H0 and H1 between level k+1 and level k, in loss
        units. Only pairs whose persistence exceeds half the threshold count, so
        the value is within half the threshold of the distance between the full
        diagrams. It is inf when the numbers of essential classes differ.
    level, dim : ndarray of shape (m,), int64
        Level and dimension of each pair of the concatenated level diagrams.
    birth, death : ndarray of shape (m,), float64
        death inf for essential classes.
    significant : ndarray of shape (m,), bool
    recommended_level : int
        Coarsest level whose significant and essential classes, and those of every
        finer level, match level 0 in number per dimension.
    unstable : bool
        True when level 1 is missing or differs from level 0 in those numbers:
        the slice needs more resolution.
    """

    stride: np.ndarray
    shape: np.ndarray
    significant_counts: np.ndarray
    essential_counts: np.ndarray
    bottleneck: np.ndarray
    level: np.ndarray
    dim: np.ndarray
    birth: np.ndarray
    death: np.ndarray
    significant: np.ndarray
    recommended_level: int = 0
    unstable: bool = True

    @property
    def recommended_stride(self) -> int:
        """Sample stride of the recommended level."""
        return int(self.stride[self.recommended_level])


@dataclass
class Superlevel:
    """The superlevel-set analysis of one slice (maxima and ridges), in loss units.

    Attributes
    ----------
    pairs : PersistencePairs
        H0 classes are born at maxima and die at lower saddles, so death <= birth;
        death is -inf for essential classes.
    maxima : Minima
        Births of the significant H0 pairs, highest first.
    summary : Summary
    """

    pairs: PersistencePairs
    maxima: Minima
    summary: Summary


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
    saddles : Minima or None
        Death cells of the significant finite H0 pairs, where two basins meet.
    summary : Summary or None
    pyramid : Pyramid or None
    locator : str
        How the birth and death cells were found.
    superlevel : Superlevel or None
        Present when the superlevel analysis was requested.
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
    saddles: Minima | None = None
    summary: Summary | None = None
    pyramid: Pyramid | None = None
    locator: str = ""
    superlevel: Superlevel | None = None

    @property
    def runs_by_basin(self) -> dict[int, list[str]]:
        """Names of the trajectories whose last checkpoint lies in each basin, sorted; -1 for none."""
        groups: dict[int, list[str]] = {}
        for trajectory, basin in sorted(self.final_basins.items()):
            groups.setdefault(int(basin), []).append(trajectory)
        return dict(sorted(groups.items()))

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

    _write_fields(group, "pairs", topology.pairs, PAIR_FIELDS)
    _write_fields(group, "minima", topology.minima, MINIMA_FIELDS)
    if topology.saddles is not None:
        _write_fields(group, "saddles", topology.saddles, MINIMA_FIELDS)
    if topology.summary is not None:
        _write_summary(group, topology.summary)
    if topology.pyramid is not None:
        pyramid = _write_fields(group, "pyramid", topology.pyramid, PYRAMID_FIELDS)
        pyramid.attrs["recommended_level"] = np.int64(topology.pyramid.recommended_level)
        pyramid.attrs["unstable"] = bool(topology.pyramid.unstable)
    if topology.superlevel is not None:
        superlevel = group.create_group("superlevel")
        _write_fields(superlevel, "pairs", topology.superlevel.pairs, PAIR_FIELDS)
        _write_fields(superlevel, "maxima", topology.superlevel.maxima, MINIMA_FIELDS)
        _write_summary(superlevel, topology.superlevel.summary)

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
    group.attrs["runs_by_basin"] = json.dumps({str(k): v for k, v in topology.runs_by_basin.items()})
    group.attrs["locator"] = topology.locator
    return group


def _write_fields(parent: h5py.Group, name: str, record: object, fields: tuple[str, ...]) -> h5py.Group:
    group = parent.create_group(name)
    for key in fields:
        group.create_dataset(key, data=getattr(record, key))
    return group


def _write_summary(parent: h5py.Group, summary: Summary) -> None:
    group = _write_fields(parent, "summary", summary, SUMMARY_FIELDS)
    group.attrs["entropy_rule"] = summary.entropy_rule


def _read_fields(group: h5py.Group, fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {key: group[key][()] for key in fields}


def _read_summary(group: h5py.Group) -> Summary:
    return Summary(**_read_fields(group, SUMMARY_FIELDS), entropy_rule=attr_str(group, "entropy_rule", ""))


def _read_pyramid(group: h5py.Group) -> Pyramid:
    return Pyramid(
        **_read_fields(group, PYRAMID_FIELDS),
        recommended_level=int(group.attrs["recommended_level"]),
        unstable=bool(group.attrs["unstable"]),
    )


def _read_superlevel(group: h5py.Group) -> Superlevel:
    return Superlevel(
        pairs=PersistencePairs(**_read_fields(group["pairs"], PAIR_FIELDS)),
        maxima=Minima(**_read_fields(group["maxima"], MINIMA_FIELDS)),
        summary=_read_summary(group["summary"]),
    )


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
        group = named_group(f, "slices", name, path=path, rerun=COMMAND)
        name = group.name.rpartition("/")[2]

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
            saddles=Minima(**_read_fields(group["saddles"], MINIMA_FIELDS)) if "saddles" in group else None,
            summary=_read_summary(group["summary"]) if "summary" in group else None,
            pyramid=_read_pyramid(group["pyramid"]) if "pyramid" in group else None,
            locator=attr_str(group, "locator", ""),
            superlevel=_read_superlevel(group["superlevel"]) if "superlevel" in group else None,
        )
