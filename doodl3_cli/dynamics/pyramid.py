"""The Morse graph of a slice at each level of a resolution pyramid.

Level k keeps every ``2**k``-th sample of the loss grid on both axes, starting at
the first. It recomputes the gradient, the time-tau map and the Morse graph. The
map uses the tau of level 0, so that every level approximates the same flow. Levels stop
before an axis would have fewer than `doodl3_cli.dynamics.flow.MIN_SAMPLES` samples.

A box of level k covers ``2**k`` samples of level 0 per axis, so every Morse set of
level 0 lies in a set of boxes of level k. `finest_set` maps each level-0 Morse set
to the level-k Morse set that covers most of its area, the one with the lower loss
on a tie. Level-0 sets that map to
the same level-k set merge as the grid coarsens, and sets that map to -1 lie in no
Morse set of the coarser grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from doodl3_cli.dynamics.flow import MIN_SAMPLES, gradient_field, time_tau_map
from doodl3_cli.dynamics.morse import MorseGraph, box_index, morse_graph, outer_approximation
from doodl3_cli.errors import AnalysisError

log = logging.getLogger(__name__)

MAX_LEVELS = 6


@dataclass
class PyramidLevel:
    """The Morse graph of one coarser level of a slice.

    Attributes
    ----------
    stride : int
        Samples of level 0 per sample of this level, along each axis.
    morse : MorseGraph
        The Morse graph on the grid ``alpha[::stride]``, ``beta[::stride]``.
    finest_set : ndarray of shape (M0,), int32
        For each level-0 Morse set, the Morse set of this level that covers most of
        its area, or -1 when none of it lies in a Morse set here.
    """

    stride: int
    morse: MorseGraph
    finest_set: np.ndarray


def level_strides(shape: tuple[int, int], max_levels: int = MAX_LEVELS) -> list[int]:
    """Return the strides 2, 4, ... of the levels coarser than level 0 that keep at least 5 samples per axis."""
    strides = []
    stride = 2
    while len(strides) < max_levels and min((n - 1) // stride + 1 for n in shape) >= MIN_SAMPLES:
        strides.append(stride)
        stride *= 2
    return strides


def morse_pyramid(
    alpha: np.ndarray,
    beta: np.ndarray,
    loss: np.ndarray,
    finest: MorseGraph,
    tau: float,
    *,
    max_levels: int = MAX_LEVELS,
) -> list[PyramidLevel]:
    """Compute the Morse graph at each coarser level and match the level-0 Morse sets to it.

    Parameters
    ----------
    alpha : ndarray of shape (nx,), float64
    beta : ndarray of shape (ny,), float64
    loss : ndarray of shape (nx, ny), float64
        The level-0 loss grid.
    finest : MorseGraph
        The Morse graph of level 0.
    tau : float
        Time of the flow map, the one level 0 used.
    max_levels : int
        Maximum number of coarser levels.

    Returns
    -------
    list of PyramidLevel
        One entry per coarser level, stride 2 first. Empty when the grid is too small.

    Raises
    ------
    AnalysisError
        When a level has no valid cell (propagated from `gradient_field`).
    """
    levels = []
    for stride in level_strides(loss.shape, max_levels):
        coarse_alpha, coarse_beta = alpha[::stride], beta[::stride]
        coarse_loss = loss[::stride, ::stride]
        field = gradient_field(coarse_alpha, coarse_beta, coarse_loss)

        try:
            graph = morse_graph(
                outer_approximation(coarse_alpha, coarse_beta, time_tau_map(field, tau), field.valid),
                coarse_loss,
                field.valid,
            )
        except AnalysisError as exc:
            raise AnalysisError(f"pyramid level with stride {stride}: {exc}") from exc
        levels.append(PyramidLevel(stride, graph, _match_sets(alpha, beta, finest, coarse_alpha, coarse_beta, graph)))
        log.debug("pyramid stride %d: %d Morse sets, %d attractors", stride, graph.n_sets, int(graph.attractor.sum()))
    return levels


def _match_sets(
    alpha: np.ndarray,
    beta: np.ndarray,
    finest: MorseGraph,
    coarse_alpha: np.ndarray,
    coarse_beta: np.ndarray,
    coarse: MorseGraph,
) -> np.ndarray:
    """Map each level-0 Morse set to the coarse Morse set holding most of its boxes, -1 for none."""
    cells = np.argwhere(finest.morse_set >= 0)
    centres = np.stack([alpha[cells[:, 0]], beta[cells[:, 1]]], axis=1)

    # With an even stride the centre of every other fine box lies on a coarse box
    # edge. So each fine box votes with the four points a quarter of its width from
    # its centre, and a fine box split between two coarse boxes gives each half.
    quarter = 0.25 * np.array([alpha[1] - alpha[0], beta[1] - beta[0]])
    offsets = np.array([(-1, -1), (-1, 1), (1, -1), (1, 1)], dtype=np.float64) * quarter
    points = (centres[:, None, :] + offsets[None, :, :]).reshape(-1, 2)
    fine_set = np.repeat(finest.morse_set[cells[:, 0], cells[:, 1]].astype(np.int64), len(offsets))
    i, j, inside = box_index(coarse_alpha, coarse_beta, points)
    coarse_set = np.where(inside, coarse.morse_set[i, j], -1).astype(np.int64)

    match = np.full(finest.n_sets, -1, dtype=np.int32)
    hit = coarse_set >= 0
    if not hit.any():
        return match
    counts = np.zeros((finest.n_sets, coarse.n_sets), dtype=np.int64)
    np.add.at(counts, (fine_set[hit], coarse_set[hit]), 1)
    has_match = counts.any(axis=1)
    # argmax takes the first of equal counts: the coarse set with the lower loss.
    match[has_match] = counts[has_match].argmax(axis=1)
    return match
