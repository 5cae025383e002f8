"""Tests of the fast diagram, its locations, the thresholds and the summaries."""

from __future__ import annotations

import gudhi
import numpy as np
import pytest
from scipy import stats

from doodl3_cli.errors import AnalysisError
from doodl3_cli.topology import analyse_slice, persistence_pairs, vertex_diagram, wall_nonfinite
from doodl3_cli.topology.persistence import NOISE_MULTIPLE, _pairs_from_vertices, _slow_vertex_pairs, summarise

# Critical points of Himmelblau's function (x^2 + y - 11)^2 + (x + y^2 - 7)^2.
HIMMELBLAU_MINIMA = np.array([(3.0, 2.0), (-2.805118, 3.131312), (-3.779310, -3.283186), (3.584428, -1.848126)])
HIMMELBLAU_SADDLES = np.array([(0.086677, 2.884254), (-3.073026, -0.081353), (3.385154, 0.073852), (-0.127961, -1.953715)])
HIMMELBLAU_MAXIMUM = np.array([-0.270845, -0.923039])


def himmelblau(x, y):
    return (x**2 + y - 11) ** 2 + (x + y**2 - 7) ** 2


def double_well(x, y):
    return (x**2 - 1) ** 2 + 0.25 * x + y**2


def sample(function, nx, ny, low=-5.0, high=5.0):
    alpha = np.linspace(low, high, nx)
    beta = np.linspace(low, high, ny)
    a, b = np.meshgrid(alpha, beta, indexing="ij")
    return alpha, beta, function(a, b)


def slow_diagram(filtration, nonfinite):
    """The diagram from gudhi's vertex complex, deaths on the wall set to inf, sorted like `vertex_diagram`."""
    complex_ = gudhi.CubicalComplex(vertices=filtration)
    rows = [(d, b, e) for d, (b, e) in complex_.persistence(min_persistence=0.0)]
    dim = np.array([r[0] for r in rows], dtype=np.int64)
    birth = np.array([r[1] for r in rows], dtype=np.float64)
    death = np.array([r[2] for r in rows], dtype=np.float64)
    if nonfinite.any():
        death[death >= filtration[nonfinite][0]] = np.inf
    order = np.lexsort((death, birth, dim))
    return dim[order], birth[order], death[order]


def grids_for_duality():
    rng = np.random.default_rng(7)
    random = rng.random((23, 37))
    with_holes = rng.random((30, 20))
    with_holes[5:8, 4:9] = np.nan
    with_holes[20, :] = np.inf
    with_holes[12, 15] = -np.inf
    _, _, himmelblau_grid = sample(himmelblau, 41, 61)
    rounded = np.round(rng.random((25, 25)), 1)
    return {
        "random": random,
        "nonfinite": with_holes,
        "himmelblau": himmelblau_grid,
        "ties": rounded,
        "constant": np.full((5, 7), 0.5),
        "one_by_two": np.array([[0.25, 0.75]]),
        "two_by_one": np.array([[0.75], [0.25]]),
        "single": np.array([[3.0]]),
    }


@pytest.mark.parametrize("name", list(grids_for_duality()))
def test_fast_diagram_matches_vertex_complex(name):
    filtration, nonfinite, _ = wall_nonfinite(grids_for_duality()[name])

    fast = vertex_diagram(filtration, nonfinite)
    dim, birth, death = slow_diagram(filtration, nonfinite)

    np.testing.assert_array_equal(fast.dim, dim)
    np.testing.assert_array_equal(fast.birth, birth)
    np.testing.assert_array_equal(fast.death, death)
    assert np.sum(np.isinf(fast.death) & (fast.dim == 0)) >= 1


def test_fast_diagram_essential_classes():
    loss = np.random.default_rng(3).random((30, 20))
    loss[5:8, 4:9] = np.nan
    loss[20, :] = np.inf
    filtration, nonfinite, _ = wall_nonfinite(loss)

    fast = vertex_diagram(filtration, nonfinite)

    # The stripe at row 20 cuts the grid in two components, and the block of NaN
    # and the single cell at (12, 15) would be filled only by the wall.
    assert np.sum(np.isinf(fast.death) & (fast.dim == 0)) == 2
    assert np.sum(np.isinf(fast.death) & (fast.dim == 1)) == 1
    assert fast.birth[(fast.dim == 0)].min() == loss[np.isfinite(loss)].min()


def test_value_lookup_matches_vertex_complex():
    loss = np.random.default_rng(11).random((31, 43))
    loss[10:13, 20:22] = np.nan
    filtration, nonfinite, _ = wall_nonfinite(loss)
    alpha, beta = np.linspace(-1, 1, 31), np.linspace(0, 2, 43)

    pairs, locator = persistence_pairs(filtration, nonfinite, alpha, beta, threshold=0.1)
    slow = _pairs_from_vertices(filtration, nonfinite, alpha, beta, 0.1, *_slow_vertex_pairs(filtration))

    assert locator == "value lookup"
    for field in ("dim", "birth", "death", "birth_cell", "death_cell", "birth_coords", "death_coords",
                  "essential", "significant"):
        np.testing.assert_array_equal(getattr(pairs, field), getattr(slow, field), err_msg=field)


def test_ties_fall_back_to_vertex_complex():
    loss = np.round(np.random.default_rng(5).random((25, 25)), 1)
    filtration, nonfinite, _ = wall_nonfinite(loss)
    axis = np.arange(25.0)

    pairs, locator = persistence_pairs(filtration, nonfinite, axis, axis, threshold=0.0)

    assert locator == "vertex complex"
    births = filtration[pairs.birth_cell[:, 0], pairs.birth_cell[:, 1]]
    np.testing.assert_array_equal(births, pairs.birth)


def within_one_cell(found, expected, alpha, beta):
    return abs(found[0] - expected[0]) <= alpha[1] - alpha[0] and abs(found[1] - expected[1]) <= beta[1] - beta[0]


def test_himmelblau_critical_points():
    alpha, beta, loss = sample(himmelblau, 101, 101)
    topology = analyse_slice("s", loss, alpha, beta, {}, min_persistence=1.0, superlevel=True)
    pairs = topology.pairs

    assert len(topology.minima) == 4
    for true_minimum in HIMMELBLAU_MINIMA:
        assert any(within_one_cell(found, true_minimum, alpha, beta) for found in topology.minima.coords)

    # Three saddles kill H0 classes; the fourth closes the ring around the
    # maximum, which is born there and dies at the maximum.
    ring = pairs.significant & (pairs.dim == 1)
    assert ring.sum() == 1
    saddles = np.concatenate([topology.saddles.coords, pairs.birth_coords[ring]])
    assert len(saddles) == 4
    for true_saddle in HIMMELBLAU_SADDLES:
        assert sum(within_one_cell(found, true_saddle, alpha, beta) for found in saddles) == 1
    assert within_one_cell(pairs.death_coords[ring][0], HIMMELBLAU_MAXIMUM, alpha, beta)
    assert pairs.death[ring][0] == pytest.approx(himmelblau(*HIMMELBLAU_MAXIMUM), abs=0.2)

    for i, j in topology.saddles.cell:
        assert topology.boundary[i, j]

    interior = topology.superlevel.pairs.significant & (topology.superlevel.pairs.dim == 0)
    interior &= np.abs(topology.superlevel.pairs.birth_coords).max(axis=1) < 4.0
    assert interior.sum() == 1
    assert within_one_cell(topology.superlevel.pairs.birth_coords[interior][0], HIMMELBLAU_MAXIMUM, alpha, beta)
    assert topology.superlevel.pairs.death[interior][0] < topology.superlevel.pairs.birth[interior][0]
    assert topology.superlevel.pairs.death[interior][0] == pytest.approx(pairs.birth[ring][0])


def test_superlevel_reports_loss_units():
    alpha, beta, loss = sample(himmelblau, 41, 41)
    topology = analyse_slice("s", loss, alpha, beta, {}, superlevel=True)
    superlevel = topology.superlevel

    essential = superlevel.pairs.essential
    assert essential.sum() == 1
    assert superlevel.pairs.birth[essential][0] == loss.max()
    assert superlevel.pairs.death[essential][0] == -np.inf
    assert superlevel.maxima.value[0] == loss.max()
    assert np.all(np.diff(superlevel.maxima.value) <= 0)
    assert np.all(superlevel.pairs.persistence > 0)
    assert superlevel.summary.betti_levels[0] == loss.max()
    assert superlevel.summary.betti_levels[-1] == loss.min()
    # Every cell lies in the superlevel set of the lowest loss: one component, no ring.
    assert superlevel.summary.betti[0, -1] == 1
    assert superlevel.summary.betti[1, -1] == 0


def test_double_well_minima_and_saddle():
    alpha = np.linspace(-2.0, 2.0, 81)
    beta = np.linspace(-1.0, 1.0, 41)
    a, b = np.meshgrid(alpha, beta, indexing="ij")
    topology = analyse_slice("s", double_well(a, b), alpha, beta, {})

    assert len(topology.minima) == 2
    assert len(topology.saddles) == 1
    saddle_x = min(np.roots([4.0, 0.0, -4.0, 0.25]), key=abs).real
    assert within_one_cell(topology.saddles.coords[0], (saddle_x, 0.0), alpha, beta)
    assert topology.boundary[tuple(topology.saddles.cell[0])]
    np.testing.assert_array_equal(topology.summary.significant, [2, 0])


def noisy_double_well(sigma, seed=0):
    alpha = np.linspace(-2.0, 2.0, 81)
    beta = np.linspace(-1.0, 1.0, 41)
    a, b = np.meshgrid(alpha, beta, indexing="ij")
    noise = np.random.default_rng(seed).normal(0.0, sigma, a.shape)
    return alpha, beta, double_well(a, b) + noise


def test_noise_threshold_keeps_true_minima():
    sigma = 0.02
    alpha, beta, loss = noisy_double_well(sigma)
    stderr = np.full(loss.shape, sigma)

    topology = analyse_slice("s", loss, alpha, beta, {}, loss_stderr=stderr)
    unthresholded = analyse_slice("s", loss, alpha, beta, {}, min_persistence=0.0)

    assert topology.threshold == pytest.approx(NOISE_MULTIPLE * np.sqrt(2) * sigma)
    assert "standard error" in topology.threshold_rule
    assert len(unthresholded.minima) > 20
    assert len(topology.minima) == 2
    # The noise moves the lowest sample within the flat bottom of each well.
    true_x = np.sort(np.roots([4.0, 0.0, -4.0, 0.25]).real)[[0, 2]]
    np.testing.assert_allclose(topology.minima.coords[:, 0], true_x, atol=0.2)
    np.testing.assert_allclose(topology.minima.coords[:, 1], [0.0, 0.0], atol=0.2)
    assert set(np.unique(topology.basins)) == {0, 1}


def test_noise_threshold_ignores_nonfinite_errors():
    sigma = 0.02
    alpha, beta, loss = noisy_double_well(sigma)
    stderr = np.full(loss.shape, sigma)
    stderr[:10] = np.nan
    stderr[-1, -1] = 50.0
    loss[0, 0] = np.nan

    topology = analyse_slice("s", loss, alpha, beta, {}, loss_stderr=stderr)

    assert topology.threshold == pytest.approx(NOISE_MULTIPLE * np.sqrt(2) * sigma)


def test_all_nan_stderr_falls_back_to_depth():
    alpha, beta, loss = noisy_double_well(0.02)
    topology = analyse_slice("s", loss, alpha, beta, {}, loss_stderr=np.full(loss.shape, np.nan))

    assert topology.threshold_rule.startswith("5% of the median depth")


def test_min_persistence_overrides_stderr():
    alpha, beta, loss = noisy_double_well(0.02)
    topology = analyse_slice("s", loss, alpha, beta, {}, loss_stderr=np.full(loss.shape, 0.02), min_persistence=2.0)

    assert topology.threshold == 2.0
    assert len(topology.minima) == 1


@pytest.mark.parametrize(
    "stderr, message",
    [(np.full((3, 3), 0.1), r"shape \(3, 3\)"), (np.full((81, 41), -0.1), "negative")],
)
def test_invalid_stderr_rejected(stderr, message):
    alpha, beta, loss = noisy_double_well(0.02)
    with pytest.raises(AnalysisError, match=message):
        analyse_slice("s", loss, alpha, beta, {}, loss_stderr=stderr)


def test_summary_hand_computed():
    dim = np.array([0, 0, 0, 1, 1])
    birth = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    death = np.array([np.inf, 2.0, 5.0, 3.5, 4.0])
    significant = np.array([True, False, True, False, False])

    summary = summarise(dim, birth, death, significant, np.array([0.5, 1.5, 3.2, 6.0]))

    np.testing.assert_array_equal(summary.significant, [2, 0])
    np.testing.assert_array_equal(summary.total_persistence, [4.0, 0.5])
    assert summary.entropy[0] == pytest.approx(-(0.25 * np.log(0.25) + 0.75 * np.log(0.75)))
    assert summary.entropy[0] == pytest.approx(stats.entropy([1.0, 3.0]))
    assert summary.entropy[1] == 0.0
    np.testing.assert_array_equal(summary.betti[0], [1, 2, 2, 1])
    np.testing.assert_array_equal(summary.betti[1], [0, 0, 1, 0])


def test_ring_valley_summary():
    alpha = beta = np.linspace(-4.0, 4.0, 81)
    a, b = np.meshgrid(alpha, beta, indexing="ij")
    loss = (np.hypot(a, b) - 2.0) ** 2
    topology = analyse_slice("s", loss, alpha, beta, {})
    summary = topology.summary

    np.testing.assert_array_equal(summary.significant, [1, 1])
    ring = topology.pairs.significant & (topology.pairs.dim == 1)
    assert summary.total_persistence[1] >= topology.pairs.persistence[ring][0]
    # Between the bottom of the valley and the loss 4 at the centre, the sublevel set is an annulus.
    inside = (summary.betti_levels > 0.05) & (summary.betti_levels < 3.9)
    assert np.all(summary.betti[1, inside] == 1)
    assert np.all(summary.betti[0, inside] == 1)
    assert summary.betti[1, -1] == 0


@pytest.mark.parametrize("shape", [(1, 2), (5, 7), (1, 1)])
def test_constant_and_tiny_summaries_zero(shape):
    loss = np.full(shape, 0.5)
    topology = analyse_slice("s", loss, np.arange(shape[0], dtype=float), np.arange(shape[1], dtype=float), {})
    summary = topology.summary

    np.testing.assert_array_equal(summary.significant, [1, 0])
    np.testing.assert_array_equal(summary.total_persistence, [0.0, 0.0])
    np.testing.assert_array_equal(summary.entropy, [0.0, 0.0])
    assert np.all(summary.betti[0] == 1)
    assert np.isfinite(summary.betti_levels).all()


def test_nonfinite_summaries_finite():
    alpha, beta, loss = sample(himmelblau, 101, 101)
    loss[90:95, 90:95] = np.nan
    loss[50, 10] = np.inf
    topology = analyse_slice("s", loss, alpha, beta, {}, superlevel=True)

    for summary in (topology.summary, topology.superlevel.summary):
        assert np.isfinite(summary.entropy).all()
        assert np.isfinite(summary.total_persistence).all()
        assert np.isfinite(summary.betti_levels).all()
    assert topology.summary.significant[1] == 2
    assert topology.superlevel.pairs.birth_cell.min() >= 0
    assert not topology.nonfinite[tuple(topology.superlevel.maxima.cell[0])]


def test_diagram_without_fast_module(monkeypatch):
    from doodl3_cli.topology import persistence

    loss = np.random.default_rng(2).random((17, 13))
    loss[4, 4:7] = np.nan
    filtration, nonfinite, _ = wall_nonfinite(loss)
    fast = vertex_diagram(filtration, nonfinite)

    monkeypatch.setattr(persistence, "_persistence_on_rectangle_from_top_cells", None)
    fallback = vertex_diagram(filtration, nonfinite)

    np.testing.assert_array_equal(fallback.dim, fast.dim)
    np.testing.assert_array_equal(fallback.birth, fast.birth)
    np.testing.assert_array_equal(fallback.death, fast.death)
