"""Sublevel-set persistence of a loss grid, its locations and its summaries.

Grid samples are the vertices of a cubical complex and enter the filtration at
their own loss. An edge enters at the larger loss of its two ends and a square at
the largest of its four corners, which makes this the lower-star filtration. Edges
join only 4-neighbours, so H0 counts 4-connected components of sublevel sets
(basins of minima) and H1 counts rings around higher ground. Taking the samples as
top-dimensional cells instead would join cells through corners (8-connected) and
give another diagram on the same grid. Vertices were chosen because a sample is a
point value of the loss, and a diagonal step between two wells should not count
as a connection.

The diagram is computed with gudhi's low-dimensional top-cell algorithm through the
duality between the vertex and the top-dimensional constructions (Bleile, Garin,
Heiss, Maggs and Robins, "The persistent homology of dual digital image
constructions", arXiv:2102.11397). The negated grid, padded with a -inf border, is
read as top cells. Its H0 pairs (b, d) are the H1 pairs (-d, -b) of the vertex
filtration, its H1 pairs are the H0 pairs, and the class of the border is dropped. That
algorithm returns values only. The birth and death cells of a pair are the cells
that hold those values, so they are found by lookup in the sorted grid when each
value needed occurs in one cell only. Otherwise gudhi's ``CubicalComplex(vertices=...)``
computes the pairs with their vertices, about 50 times slower.

Non-finite cells (NaN, +inf or -inf) follow one rule: they become a wall whose loss
lies above every finite loss, so they can neither create nor split a basin. A loss
of -inf gets the same treatment, because it signals a broken evaluation rather than
a low loss. A class that only the wall would kill never dies at a finite loss and
is reported as essential.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import gudhi
import numpy as np
from scipy import stats

# NOTE: a private gudhi module, the one behind gudhi.sklearn's CubicalPersistence
# in gudhi 3.13. Where it is missing, the diagram comes from the vertex complex.
try:
    from gudhi._pers_cub_low_dim_ext import _persistence_on_rectangle_from_top_cells
except ImportError:
    _persistence_on_rectangle_from_top_cells = None

from doodl3_cli.artifacts.topology import PersistencePairs, Summary
from doodl3_cli.errors import AnalysisError

CONVENTION = (
    "sublevel-set persistence of the lower-star filtration on grid vertices, 4-connected; "
    "non-finite cells are a wall above every finite loss"
)
THRESHOLD_FRACTION = 0.05
NOISE_MULTIPLE = 5.0
BETTI_LEVELS = 101
ENTROPY_RULE = (
    "Shannon entropy (natural log) of the finite persistences of the dimension divided by their sum; "
    "essential classes are left out; 0 when no finite pair exists"
)


@dataclass
class Diagram:
    """A persistence diagram of one grid, values only.

    Attributes
    ----------
    dim : ndarray of shape (n,), int64
    birth : ndarray of shape (n,), float64
    death : ndarray of shape (n,), float64
        inf for essential classes, including classes that die on the wall.
    """

    dim: np.ndarray
    birth: np.ndarray
    death: np.ndarray

    def in_dimension(self, dim: int) -> np.ndarray:
        """Return the (birth, death) rows of one dimension, ndarray of shape (m, 2)."""
        keep = self.dim == dim
        return np.column_stack([self.birth[keep], self.death[keep]])


@dataclass
class SortedGrid:
    """A finite grid with its cells in filtration order.

    Attributes
    ----------
    values : ndarray of shape (nx, ny), float64
    order : ndarray of shape (nx * ny,), int64
        C-order flat indices of the cells by increasing value, ties by index.
    sorted_values : ndarray of shape (nx * ny,), float64
        ``values.ravel()[order]``.
    """

    values: np.ndarray
    order: np.ndarray
    sorted_values: np.ndarray

    @classmethod
    def of(cls, values: np.ndarray) -> "SortedGrid":
        order = np.argsort(values, axis=None, kind="stable")
        return cls(values=values, order=order, sorted_values=values.reshape(-1)[order])

    @cached_property
    def rank(self) -> np.ndarray:
        """Position of each cell in `order`, ndarray of shape (nx * ny,), int64."""
        rank = np.empty(self.order.size, dtype=np.int64)
        rank[self.order] = np.arange(self.order.size, dtype=np.int64)
        return rank

    @cached_property
    def level(self) -> np.ndarray:
        """Dense rank of each cell's value (equal values share one), ndarray of shape (nx * ny,), int64."""
        steps = np.concatenate([[0], np.cumsum(np.diff(self.sorted_values) > 0)])
        level = np.empty(self.order.size, dtype=np.int64)
        level[self.order] = steps
        return level


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
    filtration: np.ndarray,
    nonfinite: np.ndarray,
    min_persistence: float | None,
    loss_stderr: np.ndarray | None = None,
) -> tuple[float, str]:
    """Choose the persistence above which a pair is significant.

    In order of precedence: `min_persistence` when given. Else, when a standard
    error grid is given, ``NOISE_MULTIPLE * sqrt(2) * s`` with ``s`` the median
    standard error over the cells where both the loss and the error are finite.
    The persistence of a pair is a difference of two losses, and its standard
    error is ``sqrt(2) * s`` when both losses have error ``s``. Else 5% of the depth
    ``median - min`` of the finite losses (of ``max - min`` when the median is the
    minimum). The median ignores the steep walls at the edges of a slice, which
    would otherwise set the scale: on Himmelblau's function the grid maximum grows
    from about 890 on [-5, 5]^2 to 1,800 on a slightly wider grid, while the
    shallowest basin rises only 13.3 before it merges and the median stays near 120.

    NOTE: the median standard error understates the noise where it varies
    strongly across the slice, for instance near divergence.

    Parameters
    ----------
    filtration : ndarray of shape (nx, ny), float64
        Loss grid after `wall_nonfinite`.
    nonfinite : ndarray of shape (nx, ny), bool
        Cells that hold the wall value.
    min_persistence : float or None
        Explicit threshold in loss units, at least 0.
    loss_stderr : ndarray of shape (nx, ny), float64, optional
        Standard error of the loss at each cell, in loss units.

    Returns
    -------
    threshold : float
        In loss units.
    rule : str
        How the threshold was chosen, for the artifact.

    Raises
    ------
    AnalysisError
        When `min_persistence` is negative, NaN or infinite, or `loss_stderr`
        does not have the shape of the grid or contains a negative value.
    """
    if min_persistence is not None:
        if not np.isfinite(min_persistence) or min_persistence < 0:
            raise AnalysisError(
                f"min_persistence must be a finite number >= 0 in loss units, got {min_persistence!r}; "
                "omit it to derive the threshold from the evaluation noise or the finite losses"
            )
        return float(min_persistence), "min_persistence option"

    if loss_stderr is not None:
        rule = _noise_threshold(np.asarray(loss_stderr, dtype=np.float64), nonfinite)
        if rule is not None:
            return rule

    finite = filtration[~nonfinite]
    depth = float(np.median(finite) - finite.min())
    if depth > 0:
        return THRESHOLD_FRACTION * depth, f"{THRESHOLD_FRACTION:.0%} of the median depth {depth:g} of the finite losses"
    loss_range = float(finite.max() - finite.min())
    return THRESHOLD_FRACTION * loss_range, f"{THRESHOLD_FRACTION:.0%} of the finite loss range {loss_range:g}"


def _noise_threshold(loss_stderr: np.ndarray, nonfinite: np.ndarray) -> tuple[float, str] | None:
    """Derive the threshold from a standard error grid; None when no cell has a finite error."""
    if loss_stderr.shape != nonfinite.shape:
        raise AnalysisError(
            f"loss_stderr grid has shape {loss_stderr.shape}, expected the loss grid's {nonfinite.shape}; "
            "resample the slice with `doodl3 sample RUN`"
        )
    usable = loss_stderr[~nonfinite & np.isfinite(loss_stderr)]
    if usable.size == 0:
        return None
    if (usable < 0).any():
        raise AnalysisError(
            f"loss_stderr grid contains negative standard errors (minimum {usable.min():g}); "
            "resample the slice with `doodl3 sample RUN`"
        )
    stderr = float(np.median(usable))
    threshold = NOISE_MULTIPLE * np.sqrt(2.0) * stderr
    return threshold, f"{NOISE_MULTIPLE:g} x sqrt(2) x the median loss standard error {stderr:g}"


def vertex_diagram(filtration: np.ndarray, nonfinite: np.ndarray) -> Diagram:
    """Compute the H0 and H1 pairs of the lower-star filtration of a finite grid, values only.

    Uses the vertex/top-cell duality described in the module docstring. Pairs of
    zero persistence are left out, as gudhi does.

    Parameters
    ----------
    filtration : ndarray of shape (nx, ny), float64
        Loss grid after `wall_nonfinite`; every value finite.
    nonfinite : ndarray of shape (nx, ny), bool
        Cells that hold the wall value; a class that dies at the wall value is essential.

    Returns
    -------
    Diagram
        Sorted by dimension, then birth, then death.
    """
    if _persistence_on_rectangle_from_top_cells is None:
        complex_ = gudhi.CubicalComplex(vertices=filtration)
        rows = complex_.persistence(min_persistence=0.0)
        dim = np.array([d for d, _ in rows], dtype=np.int64)
        birth = np.array([b for _, (b, _) in rows], dtype=np.float64)
        death = np.array([e for _, (_, e) in rows], dtype=np.float64)
    else:
        padded = np.pad(-filtration, 1, constant_values=-np.inf)
        dual_h0, dual_h1 = (
            np.asarray(d, dtype=np.float64).reshape(-1, 2)
            for d in _persistence_on_rectangle_from_top_cells(padded, 0.0)
        )
        dual_h0 = dual_h0[np.isfinite(dual_h0[:, 0])]
        dim = np.concatenate([np.zeros(len(dual_h1), np.int64), np.ones(len(dual_h0), np.int64)])
        birth = -np.concatenate([dual_h1[:, 1], dual_h0[:, 1]])
        death = -np.concatenate([dual_h1[:, 0], dual_h0[:, 0]])

    if nonfinite.any():
        death[death >= filtration[nonfinite][0]] = np.inf

    order = np.lexsort((death, birth, dim))
    return Diagram(dim=dim[order], birth=birth[order], death=death[order])


def _locate_values(grid: SortedGrid, values: np.ndarray) -> np.ndarray | None:
    """Find the one cell that contains each value; None when several cells contain some value."""
    left = np.searchsorted(grid.sorted_values, values, side="left")
    right = np.searchsorted(grid.sorted_values, values, side="right")
    if np.any(right - left != 1):
        return None
    return grid.order[left]


def _slow_vertex_pairs(filtration: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compute the pairs with gudhi's vertex complex: dimension, birth and death vertex (C order, -1 if essential)."""
    complex_ = gudhi.CubicalComplex(vertices=filtration)
    complex_.compute_persistence(min_persistence=0.0)
    regular, essential = complex_.vertices_of_persistence_pairs()

    # gudhi returns one array per dimension up to the highest dimension that has a
    # pair, and numbers vertices in Fortran order (the first axis varies fastest).
    dims, births, deaths = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
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
    dim, birth_vertex, death_vertex = (np.concatenate(parts) for parts in (dims, births, deaths))

    def to_c_order(vertex: np.ndarray) -> np.ndarray:
        cell = np.unravel_index(vertex, filtration.shape, order="F")
        return np.ravel_multi_index(cell, filtration.shape)

    located = death_vertex >= 0
    death_vertex[located] = to_c_order(death_vertex[located])
    return dim, to_c_order(birth_vertex), death_vertex


def persistence_pairs(
    filtration: np.ndarray,
    nonfinite: np.ndarray,
    alpha: np.ndarray,
    beta: np.ndarray,
    threshold: float,
    grid: SortedGrid | None = None,
) -> tuple[PersistencePairs, str]:
    """Compute the H0 and H1 persistence pairs of a finite loss grid with their cells.

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
    grid : SortedGrid, optional
        `filtration` in filtration order, when the caller has sorted it already.

    Returns
    -------
    pairs : PersistencePairs
        Sorted by dimension, then birth, then death.
    locator : str
        ``"value lookup"`` when every cell came from the values of the fast
        diagram, ``"vertex complex"`` when gudhi's vertex complex located them.
    """
    grid = grid if grid is not None else SortedGrid.of(filtration)
    diagram = vertex_diagram(filtration, nonfinite)

    finite_death = np.isfinite(diagram.death)
    birth_vertex = _locate_values(grid, diagram.birth)
    death_located = _locate_values(grid, diagram.death[finite_death])
    if birth_vertex is not None and death_located is not None:
        death_vertex = np.full(len(diagram.dim), -1, dtype=np.int64)
        death_vertex[finite_death] = death_located
        dim, locator = diagram.dim, "value lookup"
    else:
        dim, birth_vertex, death_vertex = _slow_vertex_pairs(filtration)
        locator = "vertex complex"

    pairs = _pairs_from_vertices(filtration, nonfinite, alpha, beta, threshold, dim, birth_vertex, death_vertex)
    return pairs, locator


def _pairs_from_vertices(
    filtration: np.ndarray,
    nonfinite: np.ndarray,
    alpha: np.ndarray,
    beta: np.ndarray,
    threshold: float,
    dim: np.ndarray,
    birth_vertex: np.ndarray,
    death_vertex: np.ndarray,
) -> PersistencePairs:
    """Build the pairs from their birth and death vertices (C-order flat indices, -1 for no death)."""
    flat = filtration.reshape(-1)
    birth_cell = np.column_stack(np.unravel_index(birth_vertex, filtration.shape)).astype(np.int64).reshape(-1, 2)
    birth = flat[birth_vertex]
    birth_coords = np.column_stack([alpha[birth_cell[:, 0]], beta[birth_cell[:, 1]]]).reshape(-1, 2)

    # A class whose death vertex is non-finite never dies at a finite loss.
    dies = death_vertex >= 0
    dies[dies] = ~nonfinite.reshape(-1)[death_vertex[dies]]
    death_cell = np.full((len(dim), 2), -1, dtype=np.int64)
    death_cell[dies] = np.column_stack(np.unravel_index(death_vertex[dies], filtration.shape))
    death = np.full(len(dim), np.inf)
    death[dies] = flat[death_vertex[dies]]
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


def negate_pairs(pairs: PersistencePairs) -> PersistencePairs:
    """Return the pairs with birth and death negated, to report a superlevel diagram in loss units."""
    return PersistencePairs(
        dim=pairs.dim,
        birth=-pairs.birth,
        death=-pairs.death,
        birth_cell=pairs.birth_cell,
        death_cell=pairs.death_cell,
        birth_coords=pairs.birth_coords,
        death_coords=pairs.death_coords,
        essential=pairs.essential,
        significant=pairs.significant,
    )


def summarise(
    dim: np.ndarray,
    birth: np.ndarray,
    death: np.ndarray,
    significant: np.ndarray,
    levels: np.ndarray,
) -> Summary:
    """Summarise a diagram per dimension: significant features, total persistence, entropy and Betti curves.

    Parameters
    ----------
    dim, birth, death : ndarray of shape (n,)
        The diagram in filtration units (birth <= death); death inf for essential classes.
    significant : ndarray of shape (n,), bool
    levels : ndarray of shape (L,), float64
        Increasing filtration values at which the Betti curves are evaluated.

    Returns
    -------
    Summary
        Per dimension 0 and 1: significant classes (essential ones included), total
        persistence and persistence entropy over the finite pairs (see `ENTROPY_RULE`),
        and Betti numbers ``#{birth <= t < death}`` of all pairs at each level t.
    """
    significant_count = np.zeros(2, dtype=np.int64)
    total = np.zeros(2, dtype=np.float64)
    entropy = np.zeros(2, dtype=np.float64)
    betti = np.zeros((2, len(levels)), dtype=np.int64)

    for d in (0, 1):
        keep = dim == d
        significant_count[d] = int(np.sum(significant[keep]))

        lengths = (death - birth)[keep]
        lengths = lengths[np.isfinite(lengths) & (lengths > 0)]
        total[d] = float(lengths.sum())
        entropy[d] = float(stats.entropy(lengths)) if lengths.size else 0.0

        born = np.searchsorted(np.sort(birth[keep]), levels, side="right")
        died = np.searchsorted(np.sort(death[keep]), levels, side="right")
        betti[d] = born - died

    return Summary(
        significant=significant_count,
        total_persistence=total,
        entropy=entropy,
        betti_levels=np.asarray(levels, dtype=np.float64),
        betti=betti,
        entropy_rule=ENTROPY_RULE,
    )


def betti_levels(filtration: np.ndarray, nonfinite: np.ndarray, count: int = BETTI_LEVELS) -> np.ndarray:
    """Return `count` evenly spaced levels from the lowest to the highest finite loss, ndarray of shape (count,)."""
    finite = filtration[~nonfinite]
    return np.linspace(float(finite.min()), float(finite.max()), count)
