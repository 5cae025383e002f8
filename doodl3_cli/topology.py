"""The `topology` stage: persistent homology, minima and basins of landscape slices.

Every slice of landscape.h5 is analysed with sublevel-set persistent homology of its
loss grid. Grid samples are the vertices of a cubical complex (gudhi
``CubicalComplex(vertices=...)``) and enter the filtration at their own loss. An
edge enters at the larger loss of its two ends and a square at the largest of its
four corners, which makes this the lower-star filtration. Edges join only
4-neighbours, so H0 counts 4-connected components of sublevel sets (basins of
minima) and H1 counts rings around higher ground.

Non-finite cells (NaN, +inf or -inf, including cells that were never evaluated)
follow one rule: they become a wall whose loss lies above every finite loss, so they
can neither create nor split a basin. A loss of -inf gets the same treatment,
because it signals a broken evaluation rather than a low loss. A class that only the wall would kill never
dies at a finite loss and is reported as essential. Examples are an H1 ring around a
region of non-finite cells and the H0 class of a finite region cut off by a
non-finite stripe.

A pair is significant when its persistence exceeds a threshold (see
`significance_threshold`), and the births of the significant H0 pairs are the
significant minima. Each finite cell is labelled with the significant minimum it
drains to (see `label_basins`), and each checkpoint of each trajectory with the
basin of its nearest grid cell.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gudhi
import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

from doodl3_cli.artifacts import landscape as landscape_artifact
from doodl3_cli.artifacts import topology as topology_artifact
from doodl3_cli.artifacts._common import atomic_h5, read_content_id, write_root_attrs
from doodl3_cli.artifacts.topology import Minima, PersistencePairs, SliceTopology
from doodl3_cli.errors import AnalysisError, ArtifactError
from doodl3_cli.runfolder import RunFolder

log = logging.getLogger(__name__)

CONVENTION = (
    "sublevel-set persistence of the lower-star filtration on grid vertices, 4-connected; "
    "non-finite cells are a wall above every finite loss"
)
THRESHOLD_FRACTION = 0.05


def wall_nonfinite(loss: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Replace non-finite cells of a loss grid by a wall above every finite loss.

    The wall value is ``max + 1 + (max - min)`` of the finite losses: strictly
    above every finite loss even on a constant grid.

    Parameters
    ----------
    loss : ndarray of shape (nx, ny), float64
        Loss grid, possibly with NaN, +inf or -inf cells.

    Returns
    -------
    filtration : ndarray of shape (nx, ny), float64
        The loss with every non-finite cell set to the wall value; all finite.
    nonfinite : ndarray of shape (nx, ny), bool
        True where `loss` was NaN, +inf or -inf.
    wall : float
        The wall value.

    Raises
    ------
    AnalysisError
        When no cell is finite, or the finite losses are so large that the wall
        value overflows float64.
    """
    loss = np.asarray(loss, dtype=np.float64)
    nonfinite = ~np.isfinite(loss)
    if nonfinite.all():
        raise AnalysisError(
            f"all {loss.size} cells of the loss grid are NaN or infinite; "
            "check the model and data with `doodl3 sample RUN` and resample"
        )

    finite = loss[~nonfinite]
    low = float(finite.min())
    high = float(finite.max())
    with np.errstate(over="ignore"):
        wall = high + 1.0 + (high - low)
    if not np.isfinite(wall):
        raise AnalysisError(
            f"finite losses span [{low:g}, {high:g}], too wide to place non-finite cells above them "
            "in float64; rescale the loss"
        )

    filtration = np.where(nonfinite, wall, loss)
    return filtration, nonfinite, wall


def significance_threshold(
    filtration: np.ndarray, nonfinite: np.ndarray, min_persistence: float | None
) -> tuple[float, str]:
    """Choose the persistence above which a pair is significant.

    The threshold is `min_persistence` when given, else 5% of the depth
    ``median - min`` of the finite losses (of ``max - min`` when the median is the
    minimum). The median ignores the steep walls at the edges of a slice, which
    would otherwise set the scale: on Himmelblau's function the grid maximum grows
    from about 890 on [-5, 5]^2 to 1,800 on a slightly wider grid, while the
    shallowest basin rises only 13.3 before it merges and the median stays near 120.

    Parameters
    ----------
    filtration : ndarray of shape (nx, ny), float64
        Loss grid after `wall_nonfinite`.
    nonfinite : ndarray of shape (nx, ny), bool
        Cells that hold the wall value.
    min_persistence : float or None
        Explicit threshold in loss units, at least 0.

    Returns
    -------
    threshold : float
        In loss units.
    rule : str
        How the threshold was chosen, for the artifact.

    Raises
    ------
    AnalysisError
        When `min_persistence` is negative, NaN or infinite.
    """
    if min_persistence is not None:
        if not np.isfinite(min_persistence) or min_persistence < 0:
            raise AnalysisError(
                f"min_persistence must be a finite number >= 0 in loss units, got {min_persistence!r}; "
                "omit it to use 5% of the median depth of the finite losses"
            )
        return float(min_persistence), "min_persistence option"

    finite = filtration[~nonfinite]
    depth = float(np.median(finite) - finite.min())
    if depth > 0:
        return THRESHOLD_FRACTION * depth, f"{THRESHOLD_FRACTION:.0%} of the median depth {depth:g} of the finite losses"
    loss_range = float(finite.max() - finite.min())
    return THRESHOLD_FRACTION * loss_range, f"{THRESHOLD_FRACTION:.0%} of the finite loss range {loss_range:g}"


def persistence_pairs(
    filtration: np.ndarray,
    nonfinite: np.ndarray,
    alpha: np.ndarray,
    beta: np.ndarray,
    threshold: float,
) -> PersistencePairs:
    """Compute the H0 and H1 persistence pairs of a finite loss grid.

    Pairs of zero persistence are left out. A pair whose death vertex is a
    non-finite cell is reported as essential: death inf, death cell (-1, -1).

    Parameters
    ----------
    filtration : ndarray of shape (nx, ny), float64
        Loss grid after `wall_nonfinite`; every value finite.
    nonfinite : ndarray of shape (nx, ny), bool
        Cells that hold the wall value.
    alpha : ndarray of shape (nx,), float64
    beta : ndarray of shape (ny,), float64
    threshold : float
        Persistence above which a pair is significant, in loss units.

    Returns
    -------
    PersistencePairs
        Sorted by dimension, then birth, then death.
    """
    complex_ = gudhi.CubicalComplex(vertices=filtration)
    complex_.compute_persistence(min_persistence=0.0)
    regular, essential = complex_.vertices_of_persistence_pairs()

    # gudhi returns one array per dimension up to the highest dimension that has a
    # pair, and numbers vertices in Fortran order (the first axis varies fastest).
    dims, births, deaths = [], [], []
    for d, vertex_pairs in enumerate(regular):
        vertex_pairs = np.asarray(vertex_pairs, dtype=np.int64).reshape(-1, 2)
        dims.append(np.full(len(vertex_pairs), d, dtype=np.int64))
        births.append(vertex_pairs[:, 0])
        deaths.append(vertex_pairs[:, 1])
    for d, vertices in enumerate(essential):
        vertices = np.asarray(vertices, dtype=np.int64).reshape(-1)
        dims.append(np.full(len(vertices), d, dtype=np.int64))
        births.append(vertices)
        deaths.append(np.full(len(vertices), -1, dtype=np.int64))
    dim = np.concatenate(dims) if dims else np.zeros(0, dtype=np.int64)
    birth_vertex = np.concatenate(births) if births else np.zeros(0, dtype=np.int64)
    death_vertex = np.concatenate(deaths) if deaths else np.zeros(0, dtype=np.int64)

    birth_cell = np.column_stack(np.unravel_index(birth_vertex, filtration.shape, order="F")).astype(np.int64)
    birth = filtration[birth_cell[:, 0], birth_cell[:, 1]]
    birth_coords = np.column_stack([alpha[birth_cell[:, 0]], beta[birth_cell[:, 1]]])

    # A class whose death vertex is non-finite never dies at a finite loss.
    dies = death_vertex >= 0
    dies[dies] = ~nonfinite.reshape(-1, order="F")[death_vertex[dies]]
    death_cell = np.full((len(dim), 2), -1, dtype=np.int64)
    death_cell[dies] = np.column_stack(np.unravel_index(death_vertex[dies], filtration.shape, order="F"))
    death = np.full(len(dim), np.inf)
    death[dies] = filtration[death_cell[dies, 0], death_cell[dies, 1]]
    death_coords = np.full((len(dim), 2), np.nan)
    death_coords[dies, 0] = alpha[death_cell[dies, 0]]
    death_coords[dies, 1] = beta[death_cell[dies, 1]]

    is_essential = ~dies
    significant = is_essential | (death - birth > threshold)

    order = np.lexsort((death, birth, dim))
    return PersistencePairs(
        dim=dim[order],
        birth=birth[order],
        death=death[order],
        birth_cell=birth_cell[order],
        death_cell=death_cell[order],
        birth_coords=birth_coords[order],
        death_coords=death_coords[order],
        essential=is_essential[order],
        significant=significant[order],
    )


def significant_minima(pairs: PersistencePairs, alpha: np.ndarray, beta: np.ndarray) -> Minima:
    """Collect the births of the significant H0 pairs, deepest first.

    Parameters
    ----------
    pairs : PersistencePairs
    alpha : ndarray of shape (nx,), float64
    beta : ndarray of shape (ny,), float64

    Returns
    -------
    Minima
        Sorted by loss, ties by grid index.
    """
    keep = (pairs.dim == 0) & pairs.significant
    cell = pairs.birth_cell[keep]
    value = pairs.birth[keep]
    persistence = pairs.persistence[keep]

    order = np.lexsort((cell[:, 1], cell[:, 0], value))
    cell = cell[order]
    coords = np.column_stack([alpha[cell[:, 0]], beta[cell[:, 1]]]) if len(cell) else np.zeros((0, 2))
    return Minima(
        cell=cell.astype(np.int64),
        coords=np.asarray(coords, dtype=np.float64),
        value=value[order],
        persistence=persistence[order],
    )


def _grid_edges(nonfinite: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """List the 4-neighbour edges between finite cells as pairs of C-order flat indices."""
    index = np.arange(nonfinite.size, dtype=np.int64).reshape(nonfinite.shape)
    finite = ~nonfinite
    heads, tails = [], []
    for low, high in (
        (np.s_[:-1, :], np.s_[1:, :]),
        (np.s_[:, :-1], np.s_[:, 1:]),
    ):
        both = finite[low] & finite[high]
        heads.append(index[low][both])
        tails.append(index[high][both])
    return np.concatenate(heads), np.concatenate(tails)


def _merge_tree(
    filtration: np.ndarray, nonfinite: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Build the minimum spanning forest of the finite cells under lower-star edge order.

    Edges are ordered by the higher loss of their two ends, then by the lower one.
    Under this order a cell that is not a local minimum joins the forest through the
    edge to its lowest neighbour, and two sublevel components join through the
    edge at which the lower-star filtration merges them.

    Returns
    -------
    heads, tails : ndarray of shape (E,), int64
        C-order flat indices of the ends of each forest edge.
    level : ndarray of shape (E,), int64
        Dense rank of the higher loss of each edge.
    weight : ndarray of shape (E,), float64
        Position of each edge in the edge order; larger is later.
    """
    rank = np.zeros(filtration.size, dtype=np.int64)
    distinct, dense = np.unique(filtration[~nonfinite], return_inverse=True)
    rank[(~nonfinite).reshape(-1)] = dense.reshape(-1)

    heads, tails = _grid_edges(nonfinite)
    high = np.maximum(rank[heads], rank[tails])
    low = np.minimum(rank[heads], rank[tails])

    # One float64 weight encodes the order (high, low) exactly while it stays
    # below 2**53; csgraph reads a weight of 0 as no edge.
    if len(distinct) ** 2 >= 2**53:
        raise AnalysisError(
            f"the grid has {len(distinct)} distinct losses, too many to order its edges exactly; "
            "sample a coarser grid"
        )
    weight = (high * len(distinct) + low + 1).astype(np.float64)
    graph = sparse.coo_array((weight, (heads, tails)), shape=(filtration.size,) * 2).tocsr()
    forest = csgraph.minimum_spanning_tree(graph).tocoo()

    heads = forest.row.astype(np.int64)
    tails = forest.col.astype(np.int64)
    return heads, tails, np.maximum(rank[heads], rank[tails]), forest.data


def _components(size: int, heads: np.ndarray, tails: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Label the connected components of the forest edges selected by `keep`."""
    graph = sparse.coo_array(
        (np.ones(int(keep.sum())), (heads[keep], tails[keep])), shape=(size, size)
    ).tocsr()
    return csgraph.connected_components(graph, directed=False)[1]


def _find_root(parent: dict[int, int], node: int) -> int:
    """Return the root of `node` in a union-find forest stored as a parent map."""
    while parent.get(node, node) != node:
        node = parent[node]
    return node


def _cut_merge_edges(
    size: int,
    heads: np.ndarray,
    tails: np.ndarray,
    level: np.ndarray,
    weight: np.ndarray,
    seeds: np.ndarray,
    merge_levels: np.ndarray,
) -> np.ndarray:
    """Find the forest edges at which two components holding seeds merge.

    At each merge level the components below it are labelled, then the edges of
    that level are added in edge order and an edge that would join two seeded
    components is cut instead. Only the few edges of each merge level pass
    through the Python loop.

    Returns
    -------
    ndarray of shape (E,), bool
        True for the edges to cut.
    """
    cut = np.zeros(len(heads), dtype=bool)
    for merge_level in np.unique(merge_levels):
        component = _components(size, heads, tails, (level < merge_level) & ~cut)
        seeded = set(component[seeds].tolist())
        parent: dict[int, int] = {}

        edges = np.flatnonzero(level == merge_level)
        for edge in edges[np.argsort(weight[edges], kind="stable")]:
            a = _find_root(parent, int(component[heads[edge]]))
            b = _find_root(parent, int(component[tails[edge]]))
            if a == b:
                continue
            if a in seeded and b in seeded:
                cut[edge] = True
                continue
            parent[b] = a
            if b in seeded:
                seeded.add(a)
    return cut


def _divide_mask(filtration: np.ndarray, basins: np.ndarray) -> np.ndarray:
    """Flag, for each pair of 4-neighbours in different basins, the higher of the two cells.

    Both cells are flagged when their losses are equal. Cells with basin -1 are ignored.
    """
    boundary = np.zeros(basins.shape, dtype=bool)
    for low, high in (
        (np.s_[:-1, :], np.s_[1:, :]),
        (np.s_[:, :-1], np.s_[:, 1:]),
    ):
        differ = (basins[low] != basins[high]) & (basins[low] >= 0) & (basins[high] >= 0)
        boundary[low] |= differ & (filtration[low] >= filtration[high])
        boundary[high] |= differ & (filtration[high] >= filtration[low])
    return boundary


def label_basins(
    filtration: np.ndarray, nonfinite: np.ndarray, pairs: PersistencePairs, minima: Minima
) -> tuple[np.ndarray, np.ndarray]:
    """Label every cell with the significant minimum it drains to.

    The finite cells are joined into the minimum spanning forest of the lower-star
    edge order (`scipy.sparse.csgraph`), in which every cell that is not a local
    minimum hangs from its lowest 4-neighbour, the grid analogue of steepest
    descent. Cutting the edges at which two components holding significant minima
    merge leaves one tree per significant minimum. A basin is that tree, so an
    insignificant minimum joins the basin it spills into at its death level.
    Non-finite cells belong to no basin, and no basin extends across them.

    NOTE: grid descent moves along one axis at a time, so within a few cells of a
    separatrix a cell can land in another basin than gradient descent from it
    would reach. On Himmelblau's function sampled 101 x 101 on [-5, 5]^2, 97% of
    cells agree (tests/test_topology.py). Each distinct merge level costs one
    pass over the grid, so a threshold that keeps thousands of minima is slow.

    Parameters
    ----------
    filtration : ndarray of shape (nx, ny), float64
        Loss grid after `wall_nonfinite`.
    nonfinite : ndarray of shape (nx, ny), bool
        Cells that hold the wall value.
    pairs : PersistencePairs
        The diagram of `filtration`; the finite deaths of its significant H0
        pairs are the levels at which basins would merge.
    minima : Minima
        Significant minima; basin b grows from row b.

    Returns
    -------
    basins : ndarray of shape (nx, ny), int32
        Row of `minima` for each cell; -1 for non-finite cells.
    boundary : ndarray of shape (nx, ny), bool
        The higher cell of each pair of 4-neighbours that lie in different basins.
    """
    shape = filtration.shape
    heads, tails, level, weight = _merge_tree(filtration, nonfinite)

    distinct = np.unique(filtration[~nonfinite])
    merging = (pairs.dim == 0) & pairs.significant & ~pairs.essential
    merge_levels = np.searchsorted(distinct, pairs.death[merging])
    seeds = np.ravel_multi_index((minima.cell[:, 0], minima.cell[:, 1]), shape)

    cut = _cut_merge_edges(filtration.size, heads, tails, level, weight, seeds, merge_levels)
    component = _components(filtration.size, heads, tails, ~cut)

    # Map each forest component to the row of the minimum it holds; components
    # without a minimum (the non-finite cells) stay -1.
    basin_of_component = np.full(component.max() + 1, -1, dtype=np.int32)
    basin_of_component[component[seeds]] = np.arange(len(minima), dtype=np.int32)
    basins = basin_of_component[component].reshape(shape)
    basins[nonfinite] = -1
    return basins, _divide_mask(filtration, basins)


def assign_checkpoints(
    coords: np.ndarray, alpha: np.ndarray, beta: np.ndarray, basins: np.ndarray
) -> np.ndarray:
    """Assign each checkpoint to the basin of the nearest grid cell.

    Parameters
    ----------
    coords : ndarray of shape (T, 2), float64
        (alpha, beta) of each checkpoint on the slice.
    alpha : ndarray of shape (nx,), float64
    beta : ndarray of shape (ny,), float64
    basins : ndarray of shape (nx, ny), int32
        From `label_basins`.

    Returns
    -------
    ndarray of shape (T,), int32
        Basin of each checkpoint; -1 when a coordinate is NaN or lies outside
        ``[min(alpha), max(alpha)] x [min(beta), max(beta)]``, or the nearest cell is non-finite.

    Raises
    ------
    AnalysisError
        When `coords` is not of shape (T, 2).
    """
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise AnalysisError(f"projection coords must have shape (T, 2), got {coords.shape}")

    a, b = coords[:, 0], coords[:, 1]
    inside = (
        np.isfinite(a) & np.isfinite(b)
        & (a >= alpha.min()) & (a <= alpha.max())
        & (b >= beta.min()) & (b <= beta.max())
    )
    with np.errstate(invalid="ignore"):
        i = np.abs(alpha[None, :] - a[:, None]).argmin(axis=1)
        j = np.abs(beta[None, :] - b[:, None]).argmin(axis=1)

    assigned = np.full(len(coords), -1, dtype=np.int32)
    assigned[inside] = basins[i[inside], j[inside]]
    return assigned


def analyse_slice(
    name: str,
    loss: np.ndarray,
    alpha: np.ndarray,
    beta: np.ndarray,
    projections: dict[str, np.ndarray],
    *,
    min_persistence: float | None = None,
) -> SliceTopology:
    """Compute persistence pairs, significant minima, basins and checkpoint assignments of one slice.

    Parameters
    ----------
    name : str
        Slice name.
    loss : ndarray of shape (nx, ny), float64
        Loss grid indexed ``[i, j]`` = (alpha[i], beta[j]); NaN and +-inf cells become a wall.
    alpha : ndarray of shape (nx,), float64
    beta : ndarray of shape (ny,), float64
    projections : dict of str to ndarray of shape (T, 2)
        (alpha, beta) of the checkpoints of each trajectory.
    min_persistence : float, optional
        Persistence threshold in loss units; 5% of the median depth of the finite losses by default.

    Returns
    -------
    SliceTopology

    Raises
    ------
    AnalysisError
        When the grid is empty or its shape does not match `alpha` and `beta`,
        when no cell is finite, or when `min_persistence` is invalid.
    """
    loss = np.asarray(loss, dtype=np.float64)
    alpha = np.asarray(alpha, dtype=np.float64).reshape(-1)
    beta = np.asarray(beta, dtype=np.float64).reshape(-1)
    if loss.ndim != 2 or loss.shape != (len(alpha), len(beta)) or loss.size == 0:
        raise AnalysisError(
            f"loss grid of shape {loss.shape} does not match alpha ({len(alpha)}) x beta ({len(beta)}) "
            "or is empty; resample the slice with `doodl3 sample RUN`"
        )

    filtration, nonfinite, wall = wall_nonfinite(loss)
    threshold, rule = significance_threshold(filtration, nonfinite, min_persistence)

    pairs = persistence_pairs(filtration, nonfinite, alpha, beta, threshold)
    minima = significant_minima(pairs, alpha, beta)
    basins, boundary = label_basins(filtration, nonfinite, pairs, minima)

    assignments = {
        trajectory: assign_checkpoints(coords, alpha, beta, basins)
        for trajectory, coords in projections.items()
    }
    final_basins = {
        trajectory: int(assigned[-1]) if len(assigned) else -1
        for trajectory, assigned in assignments.items()
    }

    return SliceTopology(
        name=name,
        alpha=alpha,
        beta=beta,
        pairs=pairs,
        minima=minima,
        basins=basins,
        boundary=boundary,
        nonfinite=nonfinite,
        assignments=assignments,
        final_basins=final_basins,
        threshold=threshold,
        threshold_rule=rule,
        convention=CONVENTION,
        wall_value=wall,
    )


def run_topology(run: RunFolder, *, min_persistence: float | None = None) -> Path:
    """Analyse every slice of landscape.h5 and write topology.h5.

    topology.h5 is written under a temporary name and renamed into place, so an
    interrupted run leaves the previous file untouched.

    Parameters
    ----------
    run : RunFolder
        The run folder; reads ``run.landscape`` and writes ``run.topology``.
    min_persistence : float, optional
        Persistence threshold in loss units for every slice; 5% of each slice's
        median depth ``median - min`` of the finite losses by default.

    Returns
    -------
    Path
        The topology.h5 written.

    Raises
    ------
    ArtifactError
        When landscape.h5 is missing, unreadable, of another schema, contains no
        slice, or a slice has no loss grid.
    AnalysisError
        When a slice cannot be analysed (no finite cell, invalid `min_persistence`).
    """
    names = landscape_artifact.list_slices(run.landscape)
    if not names:
        raise ArtifactError(f"{run.landscape}: contains no slice; rerun `{landscape_artifact.COMMAND}`")
    upstream_id = read_content_id(run.landscape)
    if upstream_id is None:
        raise ArtifactError(
            f"{run.landscape}: root attribute 'content_id' is missing; rewrite it with "
            f"`{landscape_artifact.COMMAND}`"
        )

    results = []
    for name in names:
        landscape_slice = landscape_artifact.read_slice(run.landscape, name, with_vectors=False)
        if "loss" not in landscape_slice.metrics:
            raise ArtifactError(
                f"{run.landscape}: slice '{name}' has no 'loss' grid; rerun `{landscape_artifact.COMMAND}`"
            )

        projections = {trajectory: p.coords for trajectory, p in landscape_slice.projections.items()}
        try:
            topology = analyse_slice(
                name, landscape_slice.loss, landscape_slice.alpha, landscape_slice.beta,
                projections, min_persistence=min_persistence,
            )
        except AnalysisError as exc:
            raise AnalysisError(f"{run.landscape}: slice '{name}': {exc}") from exc

        if topology.nonfinite_cells:
            log.warning(
                "slice %s: %d of %d cells are NaN or infinite and were treated as a wall",
                name, topology.nonfinite_cells, topology.nonfinite.size,
            )
        log.info(
            "slice %s: %d pairs, %d significant minima, threshold %g (%s)",
            name, len(topology.pairs), len(topology.minima), topology.threshold, topology.threshold_rule,
        )
        results.append(topology)

    settings = {"min_persistence": min_persistence, "threshold_fraction": THRESHOLD_FRACTION}
    with atomic_h5(run.topology) as f:
        write_root_attrs(
            f,
            schema=topology_artifact.SCHEMA,
            schema_version=topology_artifact.SCHEMA_VERSION,
            settings=settings,
            upstream={"landscape.h5": upstream_id},
        )
        for topology in results:
            topology_artifact.write_slice(f, topology)

    log.info("wrote %s (%d slices)", run.topology, len(results))
    return run.topology
