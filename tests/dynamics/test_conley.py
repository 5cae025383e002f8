"""Tests of the Conley indices of Morse sets: hand-built index pairs and gradient flows."""

import numpy as np
import pytest
from scipy import sparse

from doodl3_cli.dynamics.conley import conley_indices, index_pair_homology
from doodl3_cli.dynamics.morse import box_index

from tests.dynamics.test_morse import (
    HIMMELBLAU_MAXIMUM,
    HIMMELBLAU_MINIMA,
    double_well,
    gradient_morse_graph,
    graph_from_edges,
    himmelblau,
)

HIMMELBLAU_SADDLES = np.array(
    [(0.086677, 2.884254), (-3.073026, -0.081353), (-0.127961, -1.953715), (3.385154, 0.073852)]
)


def flat(ny, boxes):
    return np.array([i * ny + j for i, j in boxes], dtype=np.int64)


def test_isolated_fixed_box_is_a_minimum():
    graph = graph_from_edges(25, [(12, 12)])

    assert index_pair_homology(graph, np.array([12]), (5, 5)).tolist() == [1, 0, 0]


def test_box_exiting_on_two_sides_is_a_saddle():
    # Box (2, 2) maps to itself and to its left and right neighbours, which map nowhere.
    ny = 5
    graph = graph_from_edges(25, [(12, 12), (12, 7), (12, 17)])

    assert index_pair_homology(graph, flat(ny, [(2, 2)]), (5, 5)).tolist() == [0, 1, 0]


def test_box_exiting_all_round_is_a_maximum():
    ny = 5
    ring = [(1, 1), (1, 2), (1, 3), (2, 1), (2, 3), (3, 1), (3, 2), (3, 3)]
    edges = [(12, 12)] + [(12, int(b)) for b in flat(ny, ring)]
    graph = graph_from_edges(25, edges)

    assert index_pair_homology(graph, np.array([12]), (5, 5)).tolist() == [0, 0, 1]


def test_box_exiting_on_one_side_has_trivial_index():
    graph = graph_from_edges(25, [(12, 12), (12, 13)])

    assert index_pair_homology(graph, np.array([12]), (5, 5)).tolist() == [0, 0, 0]


def test_periodic_orbit_has_circle_index():
    ny = 5
    ring = flat(ny, [(1, 1), (1, 2), (1, 3), (2, 3), (3, 3), (3, 2), (3, 1), (2, 1)])
    edges = [(int(a), int(b)) for a, b in zip(ring, np.roll(ring, -1))]
    graph = graph_from_edges(25, edges)

    assert index_pair_homology(graph, ring, (5, 5)).tolist() == [1, 1, 0]


def test_conley_indices_one_row_per_set():
    morse_set = np.full((5, 5), -1, dtype=np.int32)
    morse_set[0, 0] = 0
    morse_set[2, 2] = 1
    graph = graph_from_edges(25, [(0, 0), (12, 12), (12, 7), (12, 17)])

    betti = conley_indices(sparse.csr_array(graph), morse_set, 2)

    assert betti.dtype == np.int64
    assert betti.tolist() == [[1, 0, 0], [0, 1, 0]]


@pytest.fixture(scope="module")
def himmelblau_graph():
    alpha = np.linspace(-5.0, 5.0, 101)
    beta = np.linspace(-5.0, 5.0, 101)
    return alpha, beta, gradient_morse_graph(himmelblau, alpha, beta)


@pytest.mark.parametrize(
    "points, expected",
    [(HIMMELBLAU_MINIMA, [1, 0, 0]), (HIMMELBLAU_SADDLES, [0, 1, 0]), (HIMMELBLAU_MAXIMUM, [0, 0, 1])],
    ids=["minima", "saddles", "maximum"],
)
def test_himmelblau_critical_point_indices(himmelblau_graph, points, expected):
    alpha, beta, graph = himmelblau_graph
    i, j, _ = box_index(alpha, beta, points)

    sets = graph.morse_set[i, j]

    assert (sets >= 0).all()
    for m in sets:
        assert graph.conley_index[m].tolist() == expected


def test_himmelblau_other_sets_have_trivial_index(himmelblau_graph):
    _, _, graph = himmelblau_graph

    nontrivial = np.flatnonzero(graph.conley_index.any(axis=1))

    assert nontrivial.size == 9


def test_double_well_indices():
    alpha = np.linspace(-2.0, 2.0, 64)
    beta = np.linspace(-1.5, 1.5, 64)
    graph = gradient_morse_graph(double_well, alpha, beta)
    i, j, _ = box_index(alpha, beta, np.array([(-1.0, 0.0), (1.0, 0.0), (0.0, 0.0)]))

    left, right, saddle = graph.morse_set[i, j]

    assert graph.conley_index[left].tolist() == [1, 0, 0]
    assert graph.conley_index[right].tolist() == [1, 0, 0]
    assert graph.conley_index[saddle].tolist() == [0, 1, 0]
