"""Conley indices of the Morse sets of a box map, as relative homology over Z/2.

Index pair
    For a Morse set S of the box graph F, the pair is ``P1 = S ∪ F(S)`` and
    ``P0 = F(S) \\ S``, both taken as unions of closed boxes. Because S is a strongly
    connected component, no box of P0 maps back into S. So P0 is positively invariant
    relative to P1, and every box of P1 whose image leaves P1 lies in P0. These are
    the combinatorial index-pair conditions of computational Conley theory.

Homology
    ``H_k(P1, P0; Z/2)`` comes from persistent homology of the two-step filtration
    P0 ⊂ P1 on the cubical complex of the grid (``gudhi.CubicalComplex``, field Z/2).
    The long exact sequence of the pair gives
    ``dim H_k(P1, P0) = dim coker(H_k(P0) -> H_k(P1)) + dim ker(H_{k-1}(P0) -> H_{k-1}(P1))``:
    the k-dimensional classes born in P1 plus the (k-1)-dimensional classes of P0
    that die in P1.

On a gradient flow the Betti numbers are (1, 0, 0) at a minimum, (0, 1, 0) at a
saddle and (0, 0, 1) at a maximum.

NOTE: these are the Betti numbers of the relative homology of one index pair. The
Conley index of a map is the shift-equivalence class of the map that f induces on
that homology, and it can be smaller (the Leray reduction drops the part on which
the index map is nilpotent). For a time-tau map of a flow the index map is an
isomorphism, so the two agree whenever the pair is tight. The images that leave the
box domain are clipped by the outer approximation, so a Morse set on the grid edge
loses the exit through that edge.
"""

from __future__ import annotations

import gudhi
import numpy as np
from scipy import sparse

# Filtration values of the cubical complex: the exit set, the rest of the pair, and
# every box outside the pair.
_EXIT, _PAIR, _OUTSIDE = 0.0, 1.0, 2.0

MAX_DIMENSION = 2


def conley_indices(graph: sparse.csr_array, morse_set: np.ndarray, n_sets: int) -> np.ndarray:
    """Compute the Betti numbers of the Conley index of every Morse set.

    Parameters
    ----------
    graph : scipy.sparse.csr_array of shape (nx * ny, nx * ny)
        Box graph from `outer_approximation`. Box (i, j) is node ``i * ny + j``.
    morse_set : ndarray of shape (nx, ny), int
        Morse set index of each box, -1 for boxes in none.
    n_sets : int
        Number of Morse sets, M.

    Returns
    -------
    ndarray of shape (M, 3), int64
        ``dim H_k(P1, P0; Z/2)`` for k = 0, 1, 2, one row per Morse set.
    """
    nx, ny = morse_set.shape
    graph = sparse.csr_array(graph)
    flat = morse_set.ravel()
    order = np.argsort(flat, kind="stable")
    starts = np.searchsorted(flat[order], np.arange(n_sets + 1))

    betti = np.zeros((n_sets, MAX_DIMENSION + 1), dtype=np.int64)
    for m in range(n_sets):
        members = order[starts[m]:starts[m + 1]]
        betti[m] = index_pair_homology(graph, members, (nx, ny))
    return betti


def index_pair_homology(graph: sparse.csr_array, members: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Compute ``dim H_k(S ∪ F(S), F(S) \\ S; Z/2)`` for k = 0, 1, 2.

    Parameters
    ----------
    graph : scipy.sparse.csr_array of shape (n, n)
        Box graph, n = nx * ny.
    members : ndarray of shape (K,), int64
        Flat indices ``i * ny + j`` of the boxes of S, K >= 1.
    shape : tuple of int
        Grid shape (nx, ny).

    Returns
    -------
    ndarray of shape (3,), int64
    """
    nx, ny = shape
    image = _image(graph, members)
    pair = np.union1d(members, image)
    exit_set = np.setdiff1d(image, members)

    # The pair is cut out of the grid with one box of margin, so that the boxes
    # outside it surround it and the complex stays small.
    i, j = np.divmod(pair, ny)
    i0, j0 = int(i.min()) - 1, int(j.min()) - 1
    values = np.full((int(i.max()) - i0 + 2, int(j.max()) - j0 + 2), _OUTSIDE)
    values[i - i0, j - j0] = _PAIR
    ei, ej = np.divmod(exit_set, ny)
    values[ei - i0, ej - j0] = _EXIT

    complex_ = gudhi.CubicalComplex(top_dimensional_cells=values)
    diagram = complex_.persistence(homology_coeff_field=2, min_persistence=0.0)

    betti = np.zeros(MAX_DIMENSION + 1, dtype=np.int64)
    for dimension, (birth, death) in diagram:
        if birth == _PAIR and death > _PAIR:
            betti[dimension] += 1
        elif birth == _EXIT and death == _PAIR and dimension + 1 <= MAX_DIMENSION:
            betti[dimension + 1] += 1
    return betti


def _image(graph: sparse.csr_array, members: np.ndarray) -> np.ndarray:
    """Return the sorted flat indices of the boxes that the boxes `members` map to."""
    return np.unique(graph[members].indices.astype(np.int64))
