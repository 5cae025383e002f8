"""Oracle test: doodl3's Morse graph of a time-tau gradient map against CMGDB's.

CMGDB (PyPI ``cmgdb``, a test-only dependency) builds the Morse graph of a box map
on a dyadic grid. At depth d in 2-D its grid has 2**ceil(d/2) x 2**floor(d/2) boxes,
x first. With ``subdiv_min = subdiv_max = subdiv_init = d`` every box is subdivided
to depth d before the first Morse decomposition, so CMGDB works on the same uniform
grid as doodl3. Without ``subdiv_init = d`` CMGDB keeps the boxes outside the Morse
sets coarse, and its order then has extra edges through those larger boxes.

Both sides get the same image rectangles: the time-tau map at the four corners and
the centre of a box, widened by the integrated error estimate.
"""

import re

import numpy as np
import pytest

from doodl3_cli.dynamics.flow import choose_tau, gradient_field, time_tau_map
from doodl3_cli.dynamics.morse import box_index, morse_graph, outer_approximation

from tests.dynamics.test_morse import HIMMELBLAU_MINIMA, double_well, himmelblau

CMGDB = pytest.importorskip("CMGDB", reason="CMGDB is a test-only dependency: pip install 'doodl3[test]'")


def time_tau_setup(function, alpha, beta):
    """Return (loss, valid mask, point map) of the time-tau gradient map of `function` on the grid."""
    a, b = np.meshgrid(alpha, beta, indexing="ij")
    loss = function(a, b)
    field = gradient_field(alpha, beta, loss)
    tau, _ = choose_tau(field, loss)

    point_map = time_tau_map(field, tau)

    return loss, field.valid, point_map


def rectangle_map(point_map, domain_upper):
    """Wrap a point map as a CMGDB batch map: rectangles (N, 4) to image rectangles (N, 4).

    A box whose five images are all NaN (its flow leaves the grid) gets a rectangle
    beyond `domain_upper`, which meets no box, as it has no image in doodl3.
    """

    def batch(rects):
        rects = np.asarray(rects, dtype=np.float64)
        n = rects.shape[0]
        centres = 0.5 * (rects[:, :2] + rects[:, 2:])
        points = np.concatenate([rects[:, [0, 1]], rects[:, [2, 1]], rects[:, [0, 3]], rects[:, [2, 3]], centres])
        images, radius = point_map(points)
        lower = (images - radius[:, None]).reshape(5, n, 2)
        upper = (images + radius[:, None]).reshape(5, n, 2)
        none = np.isnan(lower).all(axis=0).any(axis=1)
        lower[:, none] = upper[:, none] = np.asarray(domain_upper) + 1.0
        return np.hstack([np.nanmin(lower, axis=0), np.nanmax(upper, axis=0)])

    return batch


def cmgdb_morse_graph(point_map, alpha, beta):
    """Run CMGDB on the uniform grid of boxes centred at the samples.

    Returns
    -------
    sets : list of frozenset of int
        Flat box indices ``i * ny + j`` of each CMGDB Morse set.
    edges : set of (int, int)
        CMGDB's Hasse edges between its vertices.
    betti : list of list of int
        Degree of the characteristic polynomial of the index map in dimensions 0, 1, 2.
    """
    nx, ny = len(alpha), len(beta)
    depth = int(np.log2(nx)) + int(np.log2(ny))
    assert (2 ** int(np.ceil(depth / 2)), 2 ** (depth // 2)) == (nx, ny)
    ha, hb = alpha[1] - alpha[0], beta[1] - beta[0]
    lower = [alpha[0] - 0.5 * ha, beta[0] - 0.5 * hb]
    upper = [alpha[-1] + 0.5 * ha, beta[-1] + 0.5 * hb]
    batch = rectangle_map(point_map, upper)

    model = CMGDB.Model(depth, depth, depth, nx * ny, lower, upper, lambda rect: list(batch([rect])[0]))
    model.set_batch_map(batch)
    graph, _ = CMGDB.ComputeConleyMorseGraph(model)

    sets = []
    betti = []
    for vertex in range(graph.num_vertices()):
        boxes = np.array(graph.morse_set_boxes(vertex))
        centres = 0.5 * (boxes[:, :2] + boxes[:, 2:])
        i, j, _ = box_index(alpha, beta, centres)
        sets.append(frozenset((i * ny + j).tolist()))
        betti.append([polynomial_degree(p) for p in graph.annotations(vertex)[:3]])
    return sets, set(graph.edges()), betti


def polynomial_degree(text):
    """Degree of a polynomial in x written like CMGDB's annotations ('0', 'x-1', 'x^2+1')."""
    if text.strip() == "0":
        return 0
    powers = [int(power) if power else 1 for power in re.findall(r"x(?:\^(\d+))?", text)]
    return max(powers, default=0)


def doodl3_sets(graph):
    flat = graph.morse_set.ravel()
    return [frozenset(np.flatnonzero(flat == m).tolist()) for m in range(graph.n_sets)]


@pytest.mark.parametrize(
    "function, alpha, beta",
    [
        (double_well, np.linspace(-2.0, 2.0, 64), np.linspace(-1.5, 1.5, 64)),
        (himmelblau, np.linspace(-5.0, 5.0, 64), np.linspace(-5.0, 5.0, 64)),
    ],
    ids=["double_well", "himmelblau"],
)
def test_morse_graph_matches_cmgdb(function, alpha, beta):
    loss, valid, point_map = time_tau_setup(function, alpha, beta)
    ours = morse_graph(outer_approximation(alpha, beta, point_map, valid), loss, valid)
    their_sets, their_edges, their_betti = cmgdb_morse_graph(point_map, alpha, beta)

    our_sets = doodl3_sets(ours)
    assert len(their_sets) == ours.n_sets
    assert set(their_sets) == set(our_sets)

    ours_of_theirs = [our_sets.index(s) for s in their_sets]
    relabelled = {(ours_of_theirs[a], ours_of_theirs[b]) for a, b in their_edges}
    assert relabelled == {tuple(edge) for edge in ours.hasse_edges.tolist()}

    for vertex, m in enumerate(ours_of_theirs):
        assert ours.conley_index[m].tolist() == their_betti[vertex], f"Morse set {m}"


def test_cmgdb_attractors_contain_himmelblau_minima():
    alpha = beta = np.linspace(-5.0, 5.0, 64)
    loss, valid, point_map = time_tau_setup(himmelblau, alpha, beta)
    ours = morse_graph(outer_approximation(alpha, beta, point_map, valid), loss, valid)
    their_sets, their_edges, _ = cmgdb_morse_graph(point_map, alpha, beta)
    i, j, _ = box_index(alpha, beta, HIMMELBLAU_MINIMA)

    their_sinks = {v for v in range(len(their_sets)) if not any(a == v for a, _ in their_edges)}
    minima_boxes = set((i * len(beta) + j).tolist())

    assert len(their_sinks) == 4
    assert all(any(box in their_sets[v] for v in their_sinks) for box in minima_boxes)
    assert int(ours.attractor.sum()) == 4
