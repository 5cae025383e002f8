"""Tests of the resolution pyramid: levels, bottleneck distances and the recommended resolution."""

from __future__ import annotations

import gudhi
import numpy as np
import pytest

from doodl3_cli.topology import analyse_slice, build_pyramid, vertex_diagram, wall_nonfinite
from doodl3_cli.topology.pyramid import level_strides


def himmelblau(x, y):
    return (x**2 + y - 11) ** 2 + (x + y**2 - 7) ** 2


def double_well_with_dip(alpha, beta, dip_at):
    """A double well with a narrow extra well centred on the sample point `dip_at`."""
    a, b = np.meshgrid(alpha, beta, indexing="ij")
    loss = (a**2 - 1) ** 2 + 0.25 * a + b**2
    i, j = dip_at
    loss[i, j] -= 0.5
    return loss


@pytest.mark.parametrize(
    "shape, strides",
    [((101, 101), [1, 2, 4, 8, 16, 32]), ((81, 41), [1, 2, 4, 8, 16]), ((1, 2), [1]), ((5, 5), [1, 2]), ((4, 9), [1])],
)
def test_level_strides(shape, strides):
    assert level_strides(shape) == strides


def test_himmelblau_pyramid_stable():
    alpha = beta = np.linspace(-5.0, 5.0, 101)
    a, b = np.meshgrid(alpha, beta, indexing="ij")
    topology = analyse_slice("s", himmelblau(a, b), alpha, beta, {})
    pyramid = topology.pyramid

    np.testing.assert_array_equal(pyramid.stride, [1, 2, 4, 8, 16, 32])
    np.testing.assert_array_equal(pyramid.shape, [[101, 101], [51, 51], [26, 26], [13, 13], [7, 7], [4, 4]])
    np.testing.assert_array_equal(pyramid.significant_counts[:4], [[4, 0]] * 4)
    assert not pyramid.unstable
    assert pyramid.recommended_level >= 3
    assert np.all(pyramid.significant_counts[: pyramid.recommended_level + 1] == [4, 0])
    if pyramid.recommended_level + 1 < len(pyramid.stride):
        assert np.any(pyramid.significant_counts[pyramid.recommended_level + 1] != [4, 0])
    assert pyramid.recommended_stride == 2 ** pyramid.recommended_level
    assert np.isfinite(pyramid.bottleneck).all()

    level0 = pyramid.level == 0
    np.testing.assert_array_equal(pyramid.birth[level0], topology.pairs.birth)
    np.testing.assert_array_equal(pyramid.death[level0], topology.pairs.death)


def test_narrow_well_makes_slice_unstable():
    alpha = np.linspace(-2.0, 2.0, 81)
    beta = np.linspace(-1.0, 1.0, 41)
    loss = double_well_with_dip(alpha, beta, dip_at=(51, 21))
    topology = analyse_slice("s", loss, alpha, beta, {})
    pyramid = topology.pyramid

    assert len(topology.minima) == 3
    np.testing.assert_array_equal(pyramid.significant_counts[:2], [[3, 0], [2, 0]])
    assert pyramid.unstable
    assert pyramid.recommended_level == 0

    # Level 1 skips the odd index 51. Matching the extra well, of persistence p,
    # to the diagonal costs p / 2, which bounds the H0 distance from above.
    dip = (topology.pairs.dim == 0) & (topology.pairs.birth_cell == (51, 21)).all(axis=1)
    persistence = topology.pairs.persistence[dip][0]
    assert persistence > topology.threshold
    assert topology.threshold / 2 < pyramid.bottleneck[0, 0] <= persistence / 2


def test_bottleneck_matches_gudhi_on_full_diagrams():
    alpha = np.linspace(-2.0, 2.0, 81)
    beta = np.linspace(-1.0, 1.0, 41)
    loss = double_well_with_dip(alpha, beta, dip_at=(51, 21))
    filtration, nonfinite, _ = wall_nonfinite(loss)

    pyramid = build_pyramid(filtration, nonfinite, threshold=0.0)

    for k in range(len(pyramid.stride) - 1):
        coarse = vertex_diagram(filtration[:: 2 ** (k + 1), :: 2 ** (k + 1)], nonfinite[:: 2 ** (k + 1), :: 2 ** (k + 1)])
        fine = vertex_diagram(filtration[:: 2**k, :: 2**k], nonfinite[:: 2**k, :: 2**k])
        for d in (0, 1):
            expected = gudhi.bottleneck_distance(coarse.in_dimension(d), fine.in_dimension(d))
            assert pyramid.bottleneck[k, d] == pytest.approx(expected)


def test_essential_count_change_gives_inf():
    alpha = np.linspace(-2.0, 2.0, 81)
    beta = np.linspace(-1.0, 1.0, 41)
    loss = double_well_with_dip(alpha, beta, dip_at=(50, 20))
    loss[41, :] = np.nan
    topology = analyse_slice("s", loss, alpha, beta, {})
    pyramid = topology.pyramid

    # The non-finite stripe at the odd row 41 splits level 0 into two essential
    # components; level 1 does not sample it and keeps one.
    assert np.sum(topology.pairs.essential & (topology.pairs.dim == 0)) == 2
    assert pyramid.bottleneck[0, 0] == np.inf
    assert np.isfinite(pyramid.bottleneck[1:, 0]).all()
    np.testing.assert_array_equal(pyramid.essential_counts[:2, 0], [2, 1])
    assert pyramid.unstable
    assert pyramid.recommended_level == 0


def test_single_level_is_unstable():
    topology = analyse_slice("s", np.array([[0.25, 0.75]]), np.array([0.0]), np.array([0.0, 1.0]), {})

    np.testing.assert_array_equal(topology.pyramid.stride, [1])
    assert topology.pyramid.bottleneck.shape == (0, 2)
    assert topology.pyramid.unstable
    assert topology.pyramid.recommended_level == 0


def test_transpose_gives_same_pyramid():
    alpha = np.linspace(-5.0, 5.0, 41)
    beta = np.linspace(-5.0, 5.0, 61)
    a, b = np.meshgrid(alpha, beta, indexing="ij")
    loss = himmelblau(a, b)
    topology = analyse_slice("s", loss, alpha, beta, {})
    transposed = analyse_slice("t", loss.T.copy(), beta, alpha, {})

    for field in ("stride", "significant_counts", "bottleneck", "level", "dim", "birth", "death"):
        np.testing.assert_array_equal(getattr(topology.pyramid, field), getattr(transposed.pyramid, field), err_msg=field)
    np.testing.assert_array_equal(topology.pyramid.shape, transposed.pyramid.shape[:, ::-1])
    for field in ("significant", "total_persistence", "entropy", "betti_levels", "betti"):
        np.testing.assert_array_equal(getattr(topology.summary, field), getattr(transposed.summary, field), err_msg=field)
