"""Tests of the outer approximation, Morse decomposition, order and regions."""

import numpy as np
import pytest
from scipy import sparse

from doodl3_cli.dynamics.flow import choose_tau, gradient_field, time_tau_map
from doodl3_cli.dynamics.morse import (
    REGION_NONE,
    REGION_OUTSIDE,
    REGION_SEPARATRIX,
    box_index,
    morse_graph,
    outer_approximation,
)
from doodl3_cli.errors import AnalysisError

HIMMELBLAU_MINIMA = np.array(
    [(3.0, 2.0), (-2.805118, 3.131312), (-3.779310, -3.283186), (3.584428, -1.848126)]
)
HIMMELBLAU_MAXIMUM = np.array([(-0.270845, -0.923039)])


def himmelblau(a, b):
    return (a**2 + b - 11.0) ** 2 + (a + b**2 - 7.0) ** 2


def double_well(a, b):
    return (a**2 - 1.0) ** 2 + b**2


def gradient_morse_graph(function, alpha, beta):
    a, b = np.meshgrid(alpha, beta, indexing="ij")
    loss = function(a, b)
    field = gradient_field(alpha, beta, loss)
    tau, _ = choose_tau(field, loss)

    return morse_graph(outer_approximation(alpha, beta, time_tau_map(field, tau), field.valid), loss, field.valid)


def graph_from_edges(n, edges):
    src, dst = np.array(edges, dtype=np.int64).T
    return sparse.csr_array((np.ones(len(edges), dtype=np.int8), (src, dst)), shape=(n, n))


def pairs(array):
    return {tuple(row) for row in array.tolist()}


@pytest.fixture(scope="module")
def himmelblau_graph():
    alpha = np.linspace(-5.0, 5.0, 101)
    beta = np.linspace(-5.0, 5.0, 101)
    return alpha, beta, gradient_morse_graph(himmelblau, alpha, beta)


def test_himmelblau_has_four_attractors(himmelblau_graph):
    _, _, graph = himmelblau_graph
    assert graph.attractor.sum() == 4


def test_himmelblau_attractors_contain_minima(himmelblau_graph):
    alpha, beta, graph = himmelblau_graph
    i, j, inside = box_index(alpha, beta, HIMMELBLAU_MINIMA)

    sets = graph.morse_set[i, j]

    assert inside.all()
    assert (sets >= 0).all()
    assert graph.attractor[sets].all()
    assert len(set(sets.tolist())) == 4


def test_himmelblau_regions_near_minima(himmelblau_graph):
    alpha, beta, graph = himmelblau_graph
    i, j, _ = box_index(alpha, beta, HIMMELBLAU_MINIMA)
    offsets = np.array([(0.3, 0.2), (-0.25, 0.3), (0.2, -0.3), (-0.3, -0.2)])

    for minimum, offset, attractor in zip(HIMMELBLAU_MINIMA, offsets, graph.morse_set[i, j]):
        near_i, near_j, _ = box_index(alpha, beta, (minimum + offset)[None])
        assert graph.regions[near_i[0], near_j[0]] == attractor


def test_himmelblau_maximum_is_a_repeller(himmelblau_graph):
    alpha, beta, graph = himmelblau_graph
    i, j, _ = box_index(alpha, beta, HIMMELBLAU_MAXIMUM)

    maximum_set = graph.morse_set[i[0], j[0]]

    assert maximum_set >= 0
    assert graph.repeller[maximum_set]
    assert graph.regions[i[0], j[0]] == REGION_SEPARATRIX
    reached = {b for a, b in graph.order.tolist() if a == maximum_set}
    assert set(np.flatnonzero(graph.attractor).tolist()) <= reached


def test_himmelblau_sets_numbered_by_loss(himmelblau_graph):
    _, _, graph = himmelblau_graph
    assert np.all(np.diff(graph.set_min_loss) >= 0)
    assert graph.set_cells.sum() == (graph.morse_set >= 0).sum()
    assert (graph.cell_scc >= 0).sum() == (graph.morse_set >= 0).sum()


def test_himmelblau_hasse_edges_reduce_the_order(himmelblau_graph):
    _, _, graph = himmelblau_graph
    order = np.zeros((graph.n_sets, graph.n_sets), dtype=bool)
    order[graph.order[:, 0], graph.order[:, 1]] = True
    two_steps = (order.astype(np.int64) @ order.astype(np.int64)) > 0

    assert not (two_steps & ~order).any()
    assert pairs(graph.hasse_edges) == pairs(np.argwhere(order & ~two_steps))
    assert not np.diagonal(order).any()


def test_double_well_saddle_above_both_attractors():
    alpha = np.linspace(-2.0, 2.0, 81)
    beta = np.linspace(-1.5, 1.5, 61)

    graph = gradient_morse_graph(double_well, alpha, beta)

    i, j, _ = box_index(alpha, beta, np.array([(-1.0, 0.0), (1.0, 0.0), (0.0, 0.0)]))
    left, right, saddle = graph.morse_set[i, j]
    assert np.flatnonzero(graph.attractor).tolist() == sorted([left, right])
    assert saddle >= 0
    assert not graph.attractor[saddle]
    assert {(saddle, left), (saddle, right)} <= pairs(graph.order)
    assert graph.regions[i[0], j[0]] == left
    assert graph.regions[i[1], j[1]] == right


def test_hand_built_graph_decomposition():
    # Boxes 0 <-> 1 form a cycle that leads through 2 to the self-loops at 3 and 4;
    # box 5 maps nowhere.
    graph = graph_from_edges(6, [(0, 1), (1, 0), (1, 2), (2, 3), (3, 3), (2, 4), (4, 4)])
    loss = np.array([[5.0, 6.0, 4.0, 1.0, 2.0, 0.5]])

    result = morse_graph(graph, loss, np.ones((1, 6), dtype=bool))

    np.testing.assert_array_equal(result.morse_set, [[2, 2, -1, 0, 1, -1]])
    np.testing.assert_array_equal(result.set_min_loss, [1.0, 2.0, 5.0])
    np.testing.assert_array_equal(result.set_cells, [1, 1, 2])
    np.testing.assert_array_equal(result.attractor, [True, True, False])
    np.testing.assert_array_equal(result.repeller, [False, False, True])
    assert pairs(result.order) == {(2, 0), (2, 1)}
    assert pairs(result.hasse_edges) == {(2, 0), (2, 1)}
    np.testing.assert_array_equal(result.regions, [[REGION_SEPARATRIX] * 3 + [0, 1, REGION_NONE]])
    assert result.map_edges == 7


def test_cell_scc_marks_only_recurrent_boxes():
    graph = graph_from_edges(6, [(0, 1), (1, 0), (1, 2), (2, 3), (3, 3), (2, 4), (4, 4)])
    loss = np.zeros((1, 6))

    result = morse_graph(graph, loss, np.ones((1, 6), dtype=bool))

    scc = result.cell_scc[0]
    assert scc[0] == scc[1] >= 0
    assert scc[3] >= 0
    assert scc[4] >= 0
    assert len({scc[0], scc[3], scc[4]}) == 3
    assert scc[2] == -1
    assert scc[5] == -1


def test_chain_order_and_hasse_edges():
    # 0 -> 1 -> 2 -> 3 with self-loops at 0, 2 and 3; box 1 is transient.
    graph = graph_from_edges(4, [(0, 0), (0, 1), (1, 2), (2, 2), (2, 3), (3, 3)])
    loss = np.array([[3.0], [2.5], [2.0], [1.0]])

    result = morse_graph(graph, loss, np.ones((4, 1), dtype=bool))

    assert pairs(result.order) == {(2, 1), (2, 0), (1, 0)}
    assert pairs(result.hasse_edges) == {(2, 1), (1, 0)}
    np.testing.assert_array_equal(result.attractor, [True, False, False])
    np.testing.assert_array_equal(result.repeller, [False, False, True])
    np.testing.assert_array_equal(result.regions.ravel(), [0, 0, 0, 0])


def test_outside_domain_region_code():
    graph = graph_from_edges(3, [(0, 0), (1, 0)])
    domain = np.array([[True, True, False]])

    result = morse_graph(graph, np.zeros((1, 3)), domain)

    np.testing.assert_array_equal(result.regions, [[0, 0, REGION_OUTSIDE]])


def test_graph_without_edges_has_no_morse_sets():
    alpha = np.linspace(0.0, 1.0, 6)
    domain = np.ones((6, 6), dtype=bool)
    graph = outer_approximation(alpha, alpha, constant_map(np.array([5.0, 0.5])), domain)

    result = morse_graph(graph, np.zeros((6, 6)), domain)

    assert result.n_sets == 0
    assert result.order.shape == (0, 2)
    assert result.hasse_edges.shape == (0, 2)
    assert (result.regions == REGION_NONE).all()
    assert (result.morse_set == -1).all()


def test_morse_graph_shape_mismatch_raises():
    graph = graph_from_edges(4, [(0, 0)])
    with pytest.raises(AnalysisError, match="do not match"):
        morse_graph(graph, np.zeros((2, 3)), np.ones((2, 3), dtype=bool))


def constant_map(target, radius=0.0):
    def f(points):
        return np.broadcast_to(target, points.shape).copy(), np.full(points.shape[0], radius)

    return f


def test_constant_map_sends_every_box_to_one():
    alpha = np.linspace(0.0, 1.0, 11)
    beta = np.linspace(0.0, 2.0, 21)
    target = np.array([alpha[4], beta[7]])

    graph = outer_approximation(alpha, beta, constant_map(target), np.ones((11, 21), dtype=bool))

    assert graph.nnz == 11 * 21
    np.testing.assert_array_equal(graph.tocoo().col, 4 * 21 + 7)


def test_radius_widens_the_image():
    alpha = np.linspace(0.0, 1.0, 11)
    beta = np.linspace(0.0, 1.0, 11)
    target = np.array([alpha[5], beta[5]])

    graph = outer_approximation(alpha, beta, constant_map(target, radius=0.1), np.ones((11, 11), dtype=bool))

    targets = np.unique(graph.tocoo().col)
    expected = [i * 11 + j for i in (4, 5, 6) for j in (4, 5, 6)]
    np.testing.assert_array_equal(targets, expected)


def test_images_outside_the_grid_are_clipped():
    alpha = np.linspace(0.0, 1.0, 6)
    beta = np.linspace(0.0, 1.0, 6)
    domain = np.ones((6, 6), dtype=bool)

    outside = outer_approximation(alpha, beta, constant_map(np.array([5.0, 0.5])), domain)
    straddling = outer_approximation(alpha, beta, lambda p: (p + [0.5, 0.0], np.zeros(len(p))), domain)

    # A shift of 2.5 cells: boxes 3 straddle the right edge and keep the part inside,
    # boxes 4 and 5 leave entirely.
    assert outside.nnz == 0
    rows, cols = straddling.tocoo().row // 6, straddling.tocoo().col // 6
    np.testing.assert_array_equal(np.unique(cols[rows == 3]), [5])
    np.testing.assert_array_equal(np.unique(rows), [0, 1, 2, 3])


def test_excluded_boxes_have_no_edges():
    alpha = np.linspace(0.0, 1.0, 6)
    beta = np.linspace(0.0, 1.0, 6)
    domain = np.ones((6, 6), dtype=bool)
    domain[2, 3] = False
    domain[0, 0] = False

    graph = outer_approximation(alpha, beta, constant_map(np.array([alpha[2], beta[3]]), 0.2), domain)

    coo = graph.tocoo()
    assert 2 * 6 + 3 not in set(coo.col.tolist())
    assert 0 not in set(coo.row.tolist())
    assert 0 not in set(coo.col.tolist())


def test_max_edges_limit_raises():
    alpha = np.linspace(0.0, 1.0, 11)
    domain = np.ones((11, 11), dtype=bool)
    with pytest.raises(AnalysisError, match="more than the limit of 1000"):
        outer_approximation(alpha, alpha, constant_map(np.array([0.5, 0.5]), 1.0), domain, max_edges=1000)


def test_box_index_convention():
    alpha = np.linspace(0.0, 1.0, 11)
    beta = np.linspace(0.0, 2.0, 5)
    points = np.array([[0.0, 0.0], [0.049, 0.24], [0.051, 0.26], [1.05, 2.25], [1.06, 1.0], [np.nan, 1.0]])

    i, j, inside = box_index(alpha, beta, points)

    np.testing.assert_array_equal(i[:4], [0, 0, 1, 10])
    np.testing.assert_array_equal(j[:4], [0, 0, 1, 4])
    np.testing.assert_array_equal(inside, [True, True, True, True, False, False])


def test_morse_graph_256_grid_one_attractor():
    alpha = np.linspace(-1.0, 1.0, 256)
    beta = np.linspace(-1.0, 1.0, 256)
    a, b = np.meshgrid(alpha, beta, indexing="ij")
    domain = np.ones((256, 256), dtype=bool)

    graph = outer_approximation(alpha, beta, lambda p: (0.5 * p, np.full(len(p), 0.004)), domain)
    result = morse_graph(graph, a**2 + b**2, domain)

    assert result.attractor.sum() == 1
    assert (result.regions == np.flatnonzero(result.attractor)[0]).all()
