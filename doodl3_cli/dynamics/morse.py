"""Combinatorial dynamics on the grid of boxes of a slice: Morse sets and the Morse graph.

Box convention
    Box (i, j) is centred at the sample ``(alpha[i], beta[j])`` and is one grid
    spacing wide on each axis. Boxes are half-open, ``[left, right)``, except that
    the last box of each axis also contains its right edge. The box domain is the
    union of all boxes, half a cell beyond the first and last samples.

Outer approximation
    A map f is evaluated at the four corners and the centre of every box. Box b maps
    to every box that meets the bounding rectangle of those five images, each
    widened by its error radius. The rectangle is clipped to the box domain, so the
    part of an image that leaves the domain is dropped and the flow is taken never to
    return. Boxes outside `domain` (cells without a valid gradient) have no image
    and are removed from every image.

Morse decomposition
    The strongly connected components of the box graph are found with
    ``scipy.sparse.csgraph.connected_components(connection="strong")``. A component
    is recurrent when it has more than one box or a box that maps to itself, and the
    recurrent components are the Morse sets. Morse set a lies above Morse set b
    when a path of boxes, through any boxes, leads from a to b. Attractors are
    Morse sets that reach no other Morse set. Repellers are Morse sets that no other
    Morse set reaches.

Regions
    Every box is labelled by the attractor its component reaches, or by its own
    attractor when it belongs to one. Boxes that reach no attractor, boxes that reach
    several (the separatrices) and boxes outside the domain get the codes
    `REGION_NONE`, `REGION_SEPARATRIX` and `REGION_OUTSIDE`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

from doodl3_cli.dynamics.conley import conley_indices
from doodl3_cli.errors import AnalysisError

REGION_NONE = -1
"""Region code of a box that reaches no attractor."""
REGION_SEPARATRIX = -2
"""Region code of a box that reaches more than one attractor."""
REGION_OUTSIDE = -3
"""Region code of a box outside the domain, and placement code of a point outside the box domain."""

MAX_EDGES = 20_000_000

BoxMap = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class MorseGraph:
    """The Morse decomposition of a box map and the regions of its attractors.

    Morse sets are numbered by their lowest loss, ascending, so set 0 contains
    the lowest recurrent box. Of two sets with equal lowest loss, the one whose first box
    has the lower flat index ``i * ny + j`` comes first.

    Attributes
    ----------
    cell_scc : ndarray of shape (nx, ny), int32
        Label of the strongly connected component of each box as returned by
        ``connected_components``, or -1 for boxes in non-recurrent components.
    morse_set : ndarray of shape (nx, ny), int32
        Index of the Morse set of each box, or -1 for boxes in no Morse set.
    hasse_edges : ndarray of shape (E, 2), int64
        Pairs (a, b) of Morse sets where a reaches b with no Morse set between them:
        the transitive reduction of `order`.
    order : ndarray of shape (E2, 2), int64
        Every pair (a, b), a != b, where Morse set a reaches Morse set b.
    attractor : ndarray of shape (M,), bool
        Morse sets that reach no other Morse set.
    repeller : ndarray of shape (M,), bool
        Morse sets that no other Morse set reaches.
    set_min_loss : ndarray of shape (M,), float64
        Lowest loss over the boxes of each Morse set.
    set_cells : ndarray of shape (M,), int64
        Number of boxes in each Morse set.
    regions : ndarray of shape (nx, ny), int32
        Index of the Morse set of the one attractor each box reaches, or
        `REGION_NONE`, `REGION_SEPARATRIX` or `REGION_OUTSIDE`.
    map_edges : int
        Number of edges (box to box) of the outer approximation.
    conley_index : ndarray of shape (M, 3), int64, or None
        Betti numbers ``dim H_k(P1, P0; Z/2)``, k = 0, 1, 2, of an index pair of each
        Morse set (see `doodl3_cli.dynamics.conley`): (1, 0, 0) at a minimum,
        (0, 1, 0) at a saddle, (0, 0, 1) at a maximum, and (0, 0, 0) for a set
        whose recurrence the index does not confirm. None when not computed.
    """

    cell_scc: np.ndarray
    morse_set: np.ndarray
    hasse_edges: np.ndarray
    order: np.ndarray
    attractor: np.ndarray
    repeller: np.ndarray
    set_min_loss: np.ndarray
    set_cells: np.ndarray
    regions: np.ndarray
    map_edges: int
    conley_index: Optional[np.ndarray] = None

    @property
    def n_sets(self) -> int:
        """Number of Morse sets, M."""
        return int(self.attractor.shape[0])


def box_edges(coords: np.ndarray) -> tuple[float, float, float]:
    """Return (left edge of the first box, right edge of the last box, spacing) of one axis.

    Parameters
    ----------
    coords : ndarray of shape (n,), float64
        Uniformly spaced sample coordinates, n >= 2.
    """
    h = float(coords[1] - coords[0])
    return float(coords[0] - 0.5 * h), float(coords[-1] + 0.5 * h), h


def box_index(alpha: np.ndarray, beta: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Find the box that contains each point, which is the box of the nearest sample.

    Parameters
    ----------
    alpha : ndarray of shape (nx,), float64
    beta : ndarray of shape (ny,), float64
    points : ndarray of shape (K, 2), float64
        Points (alpha, beta). NaN is allowed.

    Returns
    -------
    i, j : ndarray of shape (K,), int64
        Box indices, clipped to the grid.
    inside : ndarray of shape (K,), bool
        True for finite points inside the box domain, edges included.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    indices = []
    inside = np.isfinite(points).all(axis=1)
    for axis, coords in enumerate((alpha, beta)):
        left, right, h = box_edges(coords)
        x = np.where(np.isfinite(points[:, axis]), points[:, axis], left)
        inside &= (x >= left) & (x <= right)
        indices.append(np.clip(np.floor((x - left) / h), 0, len(coords) - 1).astype(np.int64))
    return indices[0], indices[1], inside


def outer_approximation(
    alpha: np.ndarray,
    beta: np.ndarray,
    f: BoxMap,
    domain: np.ndarray,
    *,
    max_edges: int = MAX_EDGES,
) -> sparse.csr_array:
    """Build the box graph of an outer approximation of the map f.

    Parameters
    ----------
    alpha : ndarray of shape (nx,), float64
        Uniformly spaced sample coordinates of the first axis.
    beta : ndarray of shape (ny,), float64
        Uniformly spaced sample coordinates of the second axis.
    f : callable
        Takes points of shape (K, 2) and returns ``(images, radius)``: images of
        shape (K, 2) and error radii of shape (K,) in coordinate units. Rows with a
        NaN image are left out of the bounding rectangle.
    domain : ndarray of shape (nx, ny), bool
        Boxes on which f is defined.
    max_edges : int
        Maximum number of edges. Building the graph peaked at 66 bytes an edge
        (tracemalloc, 16 million edges, numpy 2.4 and scipy 1.17), so the default
        of 20 million needs about 1.3 GB.

    Returns
    -------
    scipy.sparse.csr_array of shape (nx * ny, nx * ny), int8
        Entry [a, b] is 1 when box a maps to box b. Box (i, j) is row ``i * ny + j``.

    Raises
    ------
    AnalysisError
        When the images are so wide that the graph would exceed `max_edges`.
    """
    nx, ny = len(alpha), len(beta)
    (_, _, ha), (_, _, hb) = box_edges(alpha), box_edges(beta)

    # Built from the samples so that the outer corners equal the domain edges exactly.
    corner_a = np.append(alpha - 0.5 * ha, alpha[-1] + 0.5 * ha)
    corner_b = np.append(beta - 0.5 * hb, beta[-1] + 0.5 * hb)
    corners = np.stack(np.meshgrid(corner_a, corner_b, indexing="ij"), axis=-1).reshape(-1, 2)
    centres = np.stack(np.meshgrid(alpha, beta, indexing="ij"), axis=-1).reshape(-1, 2)
    images, radius = f(np.concatenate([corners, centres]))
    images = np.asarray(images, dtype=np.float64)
    radius = np.asarray(radius, dtype=np.float64)

    lower = (images - radius[:, None]).T
    upper = (images + radius[:, None]).T
    n_corners = corners.shape[0]
    lo = np.empty((2, nx, ny))
    hi = np.empty((2, nx, ny))
    for axis in range(2):
        corner_lo = lower[axis, :n_corners].reshape(nx + 1, ny + 1)
        corner_hi = upper[axis, :n_corners].reshape(nx + 1, ny + 1)
        four_lo = [corner_lo[:-1, :-1], corner_lo[1:, :-1], corner_lo[:-1, 1:], corner_lo[1:, 1:]]
        four_hi = [corner_hi[:-1, :-1], corner_hi[1:, :-1], corner_hi[:-1, 1:], corner_hi[1:, 1:]]
        lo[axis] = np.fmin.reduce(four_lo + [lower[axis, n_corners:].reshape(nx, ny)])
        hi[axis] = np.fmax.reduce(four_hi + [upper[axis, n_corners:].reshape(nx, ny)])

    (ilo, ihi, inside_a), (jlo, jhi, inside_b) = (
        _index_range(lo[0], hi[0], alpha),
        _index_range(lo[1], hi[1], beta),
    )
    has_image = np.asarray(domain, dtype=bool) & inside_a & inside_b
    return _rectangle_graph(ilo, ihi, jlo, jhi, has_image, np.asarray(domain, dtype=bool), max_edges)


def _index_range(
    lo: np.ndarray, hi: np.ndarray, coords: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Convert coordinate intervals to clipped box index ranges along one axis."""
    left, right, h = box_edges(coords)
    n = len(coords)
    inside = np.isfinite(lo) & np.isfinite(hi) & (hi >= left) & (lo <= right)
    lo = np.where(inside, lo, left)
    hi = np.where(inside, hi, left)
    first = np.clip(np.floor((lo - left) / h), 0, n - 1).astype(np.int64)
    last = np.clip(np.floor((hi - left) / h), 0, n - 1).astype(np.int64)
    return first, last, inside


def _rectangle_graph(
    ilo: np.ndarray,
    ihi: np.ndarray,
    jlo: np.ndarray,
    jhi: np.ndarray,
    has_image: np.ndarray,
    domain: np.ndarray,
    max_edges: int,
) -> sparse.csr_array:
    """Enumerate the boxes of every image rectangle as edges of a sparse graph."""
    nx, ny = domain.shape
    n = nx * ny
    sources = np.flatnonzero(has_image.ravel())
    width_i = (ihi.ravel() - ilo.ravel() + 1)[sources]
    width_j = (jhi.ravel() - jlo.ravel() + 1)[sources]
    counts = width_i * width_j
    total = int(counts.sum())
    if total > max_edges:
        raise AnalysisError(
            f"the outer approximation would have {total} edges, more than the limit of {max_edges}; "
            "the images are too wide, so pass a smaller tau or sample the slice more coarsely"
        )

    src = np.repeat(sources, counts)
    offset = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    row_width = np.repeat(width_j, counts)
    target_i = np.repeat(ilo.ravel()[sources], counts) + offset // row_width
    target_j = np.repeat(jlo.ravel()[sources], counts) + offset % row_width
    dst = target_i * ny + target_j

    keep = domain.ravel()[dst]
    src, dst = src[keep], dst[keep]
    data = np.ones(src.shape[0], dtype=np.int8)
    return sparse.csr_array((data, (src, dst)), shape=(n, n))


def morse_graph(graph: sparse.csr_array, loss: np.ndarray, domain: np.ndarray) -> MorseGraph:
    """Decompose a box graph into Morse sets, their order, attractors and regions.

    Parameters
    ----------
    graph : scipy.sparse.csr_array of shape (nx * ny, nx * ny)
        Box graph from `outer_approximation`. Box (i, j) is node ``i * ny + j``.
    loss : ndarray of shape (nx, ny), float64
        Loss per box, which orders the Morse sets and gives `set_min_loss`.
    domain : ndarray of shape (nx, ny), bool
        Boxes inside the domain. The others get region `REGION_OUTSIDE`.

    Returns
    -------
    MorseGraph

    Raises
    ------
    AnalysisError
        When the graph and the grids have different sizes.
    """
    nx, ny = loss.shape
    n = nx * ny
    if graph.shape != (n, n) or domain.shape != (nx, ny):
        raise AnalysisError(
            f"box graph of shape {graph.shape} and domain of shape {domain.shape} do not match "
            f"the {nx}x{ny} loss grid"
        )
    coo = sparse.coo_array(graph)
    src, dst = coo.row.astype(np.int64), coo.col.astype(np.int64)

    n_components, labels = csgraph.connected_components(graph, directed=True, connection="strong")
    labels = labels.astype(np.int64)
    size = np.bincount(labels, minlength=n_components)
    self_loop = np.zeros(n_components, dtype=bool)
    self_loop[labels[src[src == dst]]] = True
    recurrent = (size > 1) | self_loop

    set_of_component, set_min_loss, set_cells = _number_morse_sets(labels, recurrent, loss.ravel())
    n_sets = set_min_loss.shape[0]

    reach, beyond = _reachable_sets(labels, src, dst, n_components, set_of_component, n_sets)
    component_of_set = np.empty(n_sets, dtype=np.int64)
    morse_components = np.flatnonzero(set_of_component >= 0)
    component_of_set[set_of_component[morse_components]] = morse_components
    order_matrix = _unpack_bits(reach[component_of_set], n_sets)
    hasse = _unpack_bits(reach[component_of_set] & ~beyond[component_of_set], n_sets)

    attractor = ~order_matrix.any(axis=1)
    repeller = ~order_matrix.any(axis=0)
    regions = _regions(reach, set_of_component, attractor, labels, domain)

    cell_scc = np.where(recurrent[labels], labels, -1).reshape(nx, ny).astype(np.int32)
    morse_set = set_of_component[labels].reshape(nx, ny).astype(np.int32)
    return MorseGraph(
        cell_scc=cell_scc,
        morse_set=morse_set,
        hasse_edges=np.argwhere(hasse).astype(np.int64).reshape(-1, 2),
        order=np.argwhere(order_matrix).astype(np.int64).reshape(-1, 2),
        attractor=attractor,
        repeller=repeller,
        set_min_loss=set_min_loss,
        set_cells=set_cells,
        regions=regions,
        map_edges=int(src.shape[0]),
        conley_index=conley_indices(graph, morse_set.reshape(nx, ny), n_sets),
    )


def _number_morse_sets(
    labels: np.ndarray, recurrent: np.ndarray, loss: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Number the recurrent components by lowest loss and return (set of component, min loss, box count)."""
    n_components = recurrent.shape[0]
    min_loss = np.full(n_components, np.inf)
    np.minimum.at(min_loss, labels, np.where(np.isfinite(loss), loss, np.inf))

    # The first box of each component in flat order breaks ties between equal losses.
    first_box = np.full(n_components, labels.shape[0], dtype=np.int64)
    np.minimum.at(first_box, labels, np.arange(labels.shape[0], dtype=np.int64))

    components = np.flatnonzero(recurrent)
    ranked = components[np.lexsort((first_box[components], min_loss[components]))]
    set_of_component = np.full(n_components, -1, dtype=np.int64)
    set_of_component[ranked] = np.arange(ranked.shape[0])
    cells = np.bincount(labels, minlength=n_components)[ranked].astype(np.int64)
    return set_of_component, min_loss[ranked], cells


def _reachable_sets(
    labels: np.ndarray,
    src: np.ndarray,
    dst: np.ndarray,
    n_components: int,
    set_of_component: np.ndarray,
    n_sets: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Return, per component, the bitsets of Morse sets reachable directly and beyond another set.

    The components form a directed acyclic graph (the condensation). Components are
    visited in layers from the sinks upwards (Kahn's algorithm on out-degrees), so
    every successor of a layer is final before the layer is computed. Both bitsets
    follow from those of the successors d: ``reach = OR(reach[d] | own[d])`` and
    ``beyond = OR(beyond[d] | (reach[d] if d is a Morse set))``. A Morse set in
    `reach` but not in `beyond` has no Morse set between it and the component, so
    the two give the Hasse edges without a quadratic transitive reduction.

    Returns
    -------
    reach : ndarray of shape (n_components, W), uint64
        Bit ``m % 64`` of word ``m // 64`` is set when Morse set m is reachable by a
        path of at least one edge.
    beyond : ndarray of shape (n_components, W), uint64
        The same for Morse sets reachable by a path through another Morse set.
    """
    words = max(1, (n_sets + 63) // 64)
    own = np.zeros((n_components, words), dtype=np.uint64)
    morse_components = np.flatnonzero(set_of_component >= 0)
    sets = set_of_component[morse_components]
    own[morse_components, sets // 64] = np.left_shift(np.uint64(1), (sets % 64).astype(np.uint64))

    component_src, component_dst = labels[src], labels[dst]
    between = component_src != component_dst
    keys = np.unique(component_src[between] * n_components + component_dst[between])
    edge_src, edge_dst = keys // n_components, keys % n_components
    forward = sparse.csr_array(
        (np.ones(keys.shape[0], dtype=np.int8), (edge_src, edge_dst)), shape=(n_components, n_components)
    )
    backward = sparse.csr_array(
        (np.ones(keys.shape[0], dtype=np.int8), (edge_dst, edge_src)), shape=(n_components, n_components)
    )

    is_morse = set_of_component >= 0
    reach = np.zeros((n_components, words), dtype=np.uint64)
    beyond = np.zeros((n_components, words), dtype=np.uint64)
    out_degree = np.diff(forward.indptr).astype(np.int64)
    layer = np.flatnonzero(out_degree == 0)
    visited = 0
    while layer.size:
        visited += layer.size
        rows, successors = _gather_rows(forward, layer)
        if successors.size:
            starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
            successor_reach = reach[successors]
            through = np.where(is_morse[successors, None], successor_reach, np.uint64(0))
            reach[rows[starts]] = np.bitwise_or.reduceat(successor_reach | own[successors], starts, axis=0)
            beyond[rows[starts]] = np.bitwise_or.reduceat(beyond[successors] | through, starts, axis=0)

        _, predecessors = _gather_rows(backward, layer)
        np.subtract.at(out_degree, predecessors, 1)
        candidates = np.unique(predecessors)
        layer = candidates[out_degree[candidates] == 0]

    if visited != n_components:
        raise RuntimeError(
            f"bug in doodl3: the condensation of the box graph has a cycle ({visited} of {n_components} "
            "components ordered); please report it with the landscape.h5 that triggers it"
        )
    return reach, beyond


def _gather_rows(matrix: sparse.csr_array, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (row of each entry, column of each entry) for the given CSR rows, in row order."""
    starts = matrix.indptr[rows].astype(np.int64)
    lengths = matrix.indptr[rows + 1].astype(np.int64) - starts
    total = int(lengths.sum())
    positions = np.arange(total, dtype=np.int64) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.repeat(rows, lengths), matrix.indices[positions].astype(np.int64)


def _unpack_bits(bits: np.ndarray, n_sets: int) -> np.ndarray:
    """Expand uint64 bitsets of shape (R, W) to a bool matrix of shape (R, n_sets)."""
    as_bytes = bits.astype("<u8").view(np.uint8).reshape(bits.shape[0], 8 * bits.shape[1])
    return np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :n_sets].astype(bool)


def _regions(
    reach: np.ndarray,
    set_of_component: np.ndarray,
    attractor: np.ndarray,
    labels: np.ndarray,
    domain: np.ndarray,
) -> np.ndarray:
    """Label each box by the one attractor it reaches or belongs to."""
    n_components = reach.shape[0]
    count = np.zeros(n_components, dtype=np.int64)
    attractor_reached = np.full(n_components, REGION_NONE, dtype=np.int64)
    for m in np.flatnonzero(attractor):
        word, bit = m // 64, np.uint64(m % 64)
        hits = ((reach[:, word] >> bit) & np.uint64(1)).astype(bool) | (set_of_component == m)
        count += hits
        attractor_reached[hits] = m

    region_of_component = np.full(n_components, REGION_SEPARATRIX, dtype=np.int64)
    region_of_component[count == 0] = REGION_NONE
    region_of_component[count == 1] = attractor_reached[count == 1]
    regions = region_of_component[labels].reshape(domain.shape)
    regions[~domain] = REGION_OUTSIDE
    return regions.astype(np.int32)
