"""Tests of the topology stage on functions whose minima, saddles and rings are known."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from doodl3_cli.artifacts import topology as topology_artifact
from doodl3_cli.artifacts._common import write_root_attrs
from doodl3_cli.artifacts.landscape import Projection, create_slice, write_projection
from doodl3_cli.errors import AnalysisError, ArtifactError
from doodl3_cli.runfolder import RunFolder
from doodl3_cli.topology import analyse_slice, run_topology

# The four minima of Himmelblau's function, all with value 0.
HIMMELBLAU_MINIMA = np.array([
    (3.0, 2.0),
    (-2.805118, 3.131312),
    (-3.779310, -3.283186),
    (3.584428, -1.848126),
])


def himmelblau(x, y):
    return (x**2 + y - 11) ** 2 + (x + y**2 - 7) ** 2


def himmelblau_gradient(x, y):
    u = x**2 + y - 11
    v = x + y**2 - 7
    return 4 * x * u + 2 * v, 2 * u + 4 * y * v


def double_well(x, y):
    return (x**2 - 1) ** 2 + 0.25 * x + y**2


def ring_valley(x, y):
    return (np.hypot(x, y) - 2.0) ** 2


def sample(function, nx, ny, low=-5.0, high=5.0):
    alpha = np.linspace(low, high, nx)
    beta = np.linspace(low, high, ny)
    a, b = np.meshgrid(alpha, beta, indexing="ij")
    return alpha, beta, function(a, b)


def nearest_row(points, target):
    return int(np.argmin(np.linalg.norm(points - target, axis=1)))


def sorted_diagram(pairs):
    order = np.lexsort((pairs.death, pairs.birth, pairs.dim))
    return pairs.dim[order], pairs.birth[order], pairs.death[order]


@pytest.mark.parametrize("nx, ny", [(101, 101), (81, 121)])
def test_himmelblau_four_minima(nx, ny):
    alpha, beta, loss = sample(himmelblau, nx, ny)
    topology = analyse_slice("s", loss, alpha, beta, {})

    assert len(topology.minima) == 4
    dx, dy = alpha[1] - alpha[0], beta[1] - beta[0]
    matched = set()
    for true_minimum in HIMMELBLAU_MINIMA:
        row = nearest_row(topology.minima.coords, true_minimum)
        matched.add(row)
        assert abs(topology.minima.coords[row, 0] - true_minimum[0]) <= dx
        assert abs(topology.minima.coords[row, 1] - true_minimum[1]) <= dy
    assert matched == {0, 1, 2, 3}

    assert topology.threshold == pytest.approx(0.05 * (np.median(loss) - loss.min()))
    assert np.all(np.diff(topology.minima.value) >= 0)
    assert np.isinf(topology.minima.persistence[0])
    assert np.all(topology.minima.persistence[1:] > 13.0)
    assert np.all(topology.minima.persistence[1:] < 105.0)
    significant_rings = topology.pairs.significant & (topology.pairs.dim == 1)
    assert not significant_rings.any()


def test_himmelblau_basins_cover_grid():
    alpha, beta, loss = sample(himmelblau, 101, 101)
    topology = analyse_slice("s", loss, alpha, beta, {})

    assert set(np.unique(topology.basins)) == {0, 1, 2, 3}
    for row, (i, j) in enumerate(topology.minima.cell):
        assert topology.basins[i, j] == row
        assert not topology.boundary[i, j]
    assert topology.boundary.any()
    assert topology.boundary.sum() < 0.1 * topology.boundary.size


def test_transpose_gives_same_diagram():
    alpha, beta, loss = sample(himmelblau, 41, 61)
    topology = analyse_slice("s", loss, alpha, beta, {})
    transposed = analyse_slice("t", loss.T.copy(), beta, alpha, {})

    for original, swapped in zip(sorted_diagram(topology.pairs), sorted_diagram(transposed.pairs)):
        np.testing.assert_array_equal(original, swapped)
    np.testing.assert_array_equal(topology.minima.cell, transposed.minima.cell[:, ::-1])
    np.testing.assert_array_equal(topology.basins, transposed.basins.T)


def test_double_well_merge_value():
    alpha = np.linspace(-2.0, 2.0, 81)
    beta = np.linspace(-1.0, 1.0, 41)
    a, b = np.meshgrid(alpha, beta, indexing="ij")
    loss = double_well(a, b)
    topology = analyse_slice("s", loss, alpha, beta, {})

    assert len(topology.minima) == 2
    np.testing.assert_allclose(topology.minima.coords[0], (-1.05, 0.0))
    np.testing.assert_allclose(topology.minima.coords[1], (0.95, 0.0))

    # Every path between the wells crosses each column between them, and the
    # cheapest crossing of a column is its y = 0 row, so the grid merge value is
    # the highest loss on that row between the two minima.
    row = loss[:, 20]
    left, right = topology.minima.cell[0, 0], topology.minima.cell[1, 0]
    expected_merge = row[left:right + 1].max()

    merges = topology.pairs.significant & (topology.pairs.dim == 0) & ~topology.pairs.essential
    assert merges.sum() == 1
    assert topology.pairs.death[merges][0] == expected_merge
    assert topology.pairs.death_cell[merges][0, 1] == 20
    assert topology.minima.persistence[1] == expected_merge - topology.minima.value[1]

    saddle_x = min(np.roots([4.0, 0.0, -4.0, 0.25]), key=abs).real
    assert expected_merge == pytest.approx(double_well(saddle_x, 0.0), abs=2e-3)


def test_ring_valley_one_ring():
    alpha, beta, loss = sample(ring_valley, 81, 81, low=-4.0, high=4.0)
    topology = analyse_slice("s", loss, alpha, beta, {})

    rings = topology.pairs.significant & (topology.pairs.dim == 1)
    assert rings.sum() == 1
    assert topology.pairs.death[rings][0] == 4.0
    np.testing.assert_array_equal(topology.pairs.death_cell[rings][0], (40, 40))
    assert topology.pairs.birth[rings][0] < 0.01
    assert len(topology.minima) == 1


def test_nonfinite_cells_become_wall():
    alpha, beta, clean = sample(himmelblau, 101, 101)
    loss = clean.copy()
    loss[90:95, 90:95] = np.nan
    loss[50, 10] = np.inf
    loss[10, 50] = -np.inf
    topology = analyse_slice("s", loss, alpha, beta, {"run": np.array([[4.2, 4.2], [3.0, 2.0]])})
    reference = analyse_slice("s", clean, alpha, beta, {})

    assert topology.nonfinite_cells == 27
    np.testing.assert_array_equal(topology.nonfinite, ~np.isfinite(loss))
    np.testing.assert_array_equal(topology.basins == -1, topology.nonfinite)
    np.testing.assert_array_equal(topology.minima.cell, reference.minima.cell)
    np.testing.assert_array_equal(topology.assignments["run"], [-1, 0])

    # Each of the three separate non-finite regions is a peak that no finite
    # loss fills, so the ring around it never dies.
    pairs = topology.pairs
    assert np.sum(pairs.essential & (pairs.dim == 1)) == 3
    assert np.sum(pairs.essential & (pairs.dim == 0)) == 1
    assert np.isfinite(pairs.birth).all()
    assert np.isfinite(pairs.birth_coords).all()
    assert np.isfinite(pairs.death[~pairs.essential]).all()
    assert np.isfinite(pairs.death_coords[~pairs.essential]).all()
    assert np.isinf(pairs.death[pairs.essential]).all()
    assert np.isfinite(topology.minima.coords).all()
    assert np.isfinite(topology.minima.value).all()
    assert topology.wall_value == pytest.approx(2 * clean.max() - clean.min() + 1.0)


def test_nonfinite_stripe_separates_wells():
    alpha = np.linspace(-2.0, 2.0, 81)
    beta = np.linspace(-1.0, 1.0, 41)
    a, b = np.meshgrid(alpha, beta, indexing="ij")
    loss = double_well(a, b)
    loss[41, :] = np.nan
    topology = analyse_slice("s", loss, alpha, beta, {})

    assert len(topology.minima) == 2
    assert topology.pairs.essential[topology.pairs.dim == 0].all()
    np.testing.assert_array_equal(topology.minima.persistence, [np.inf, np.inf])
    assert (topology.basins[:41] == 0).all()
    assert (topology.basins[41] == -1).all()
    assert (topology.basins[42:] == 1).all()
    assert not topology.boundary.any()


def test_all_nonfinite_grid_rejected():
    loss = np.full((3, 4), np.nan)
    with pytest.raises(AnalysisError, match="all 12 cells"):
        analyse_slice("s", loss, np.arange(3.0), np.arange(4.0), {})


@pytest.mark.parametrize("shape", [(1, 2), (2, 1), (1, 1), (5, 7)])
def test_constant_and_tiny_grids(shape):
    loss = np.full(shape, 0.5)
    if shape == (1, 2):
        loss = np.array([[0.25, 0.75]])
    topology = analyse_slice("s", loss, np.arange(shape[0], dtype=float), np.arange(shape[1], dtype=float), {})

    assert len(topology.pairs) == 1
    assert topology.pairs.dim[0] == 0
    assert topology.pairs.essential[0]
    assert topology.pairs.significant[0]
    assert len(topology.minima) == 1
    assert topology.minima.value[0] == loss.min()
    assert (topology.basins == 0).all()
    assert not topology.boundary.any()


def test_min_persistence_option():
    alpha, beta, loss = sample(himmelblau, 101, 101)
    topology = analyse_slice("s", loss, alpha, beta, {}, min_persistence=50.0)

    assert topology.threshold == 50.0
    assert topology.threshold_rule == "min_persistence option"
    assert len(topology.minima) == 3
    assert set(np.unique(topology.basins)) == {0, 1, 2}


@pytest.mark.parametrize("value", [-1.0, np.nan, np.inf])
def test_invalid_min_persistence_rejected(value):
    alpha, beta, loss = sample(himmelblau, 11, 11)
    with pytest.raises(AnalysisError, match="min_persistence"):
        analyse_slice("s", loss, alpha, beta, {}, min_persistence=value)


def test_mismatched_grid_rejected():
    with pytest.raises(AnalysisError, match=r"shape \(3, 4\)"):
        analyse_slice("s", np.zeros((3, 4)), np.arange(4.0), np.arange(3.0), {})


def descend(points, iterations=2000):
    """Run gradient descent on Himmelblau's function with steps capped at 0.05."""
    x, y = points[:, 0].copy(), points[:, 1].copy()
    for _ in range(iterations):
        gx, gy = himmelblau_gradient(x, y)
        step = np.minimum(0.002, 0.05 / np.maximum(np.hypot(gx, gy), 1e-12))
        x -= step * gx
        y -= step * gy
    return np.column_stack([x, y])


def test_basins_match_gradient_descent():
    alpha, beta, loss = sample(himmelblau, 101, 101)
    topology = analyse_slice("s", loss, alpha, beta, {})

    starts = np.array([
        (1.5, 0.5), (4.5, 4.5), (1.0, 3.0),
        (-1.5, 4.5), (-4.5, 1.0),
        (-4.5, -4.5), (-1.5, -3.0),
        (4.5, -4.5), (2.0, -3.0),
    ])
    for start, end in zip(starts, descend(starts)):
        true_minimum = HIMMELBLAU_MINIMA[nearest_row(HIMMELBLAU_MINIMA, end)]
        np.testing.assert_allclose(end, true_minimum, atol=1e-4)
        expected_basin = nearest_row(topology.minima.coords, true_minimum)
        i = int(np.argmin(np.abs(alpha - start[0])))
        j = int(np.argmin(np.abs(beta - start[1])))
        assert topology.basins[i, j] == expected_basin, f"start {start} reached {true_minimum}"


def test_basins_agree_with_descent_on_grid():
    alpha, beta, loss = sample(himmelblau, 101, 101)
    topology = analyse_slice("s", loss, alpha, beta, {})
    a, b = np.meshgrid(alpha, beta, indexing="ij")

    ends = descend(np.column_stack([a.ravel(), b.ravel()]))
    distance = np.linalg.norm(ends[:, None, :] - HIMMELBLAU_MINIMA[None, :, :], axis=2)
    basin_of_true = [nearest_row(topology.minima.coords, m) for m in HIMMELBLAU_MINIMA]
    expected = np.array(basin_of_true)[distance.argmin(axis=1)].reshape(a.shape)

    # Grid descent moves along one axis at a time, so it parts from gradient
    # descent only within a few cells of a separatrix: 97.0% agree here.
    assert distance.min(axis=1).max() < 1e-3
    assert np.mean(expected == topology.basins) > 0.96


def test_checkpoint_assignment():
    alpha, beta, loss = sample(himmelblau, 101, 101)
    coords = np.array([
        (1.5, 0.5),        # drains to (3, 2)
        (-3.7, -3.2),      # next to (-3.78, -3.28)
        (5.5, 0.0),        # outside the grid
        (np.nan, 1.0),
        (3.01, 1.99),
    ])
    topology = analyse_slice("s", loss, alpha, beta, {"seed0": coords, "empty": np.zeros((0, 2))})

    basin_32 = nearest_row(topology.minima.coords, HIMMELBLAU_MINIMA[0])
    basin_33 = nearest_row(topology.minima.coords, HIMMELBLAU_MINIMA[2])
    np.testing.assert_array_equal(topology.assignments["seed0"], [basin_32, basin_33, -1, -1, basin_32])
    assert topology.assignments["seed0"].dtype == np.int32
    assert topology.final_basins == {"seed0": basin_32, "empty": -1}


def write_landscape(path, slices):
    with h5py.File(path, "w") as f:
        content_id = write_root_attrs(
            f, schema="doodl3/landscape", schema_version=1, settings={"grid": 101}, upstream={}
        )
        for name, (alpha, beta, loss, coords) in slices.items():
            group = create_slice(
                f, name, center=np.zeros(3), directions=np.eye(2, 3), alpha=alpha, beta=beta,
                metric_names=["loss"], explained_variance=np.array([0.7, 0.2]), attrs={"method": "pca"},
            )
            group["loss"][...] = loss
            group["evaluated"][...] = np.isfinite(loss)
            steps = len(coords)
            write_projection(group, "seed0", Projection(
                coords=coords, residual=np.zeros(steps), loss=np.zeros(steps),
                loss_on_plane=np.zeros(steps), step=np.arange(steps) * 100,
            ))
    return content_id


def test_run_topology_end_to_end(tmp_path):
    run = RunFolder(tmp_path)
    alpha, beta, loss = sample(himmelblau, 101, 101)
    loss[0, 0] = np.nan
    path = np.array([(1.5, 0.5), (2.0, 1.0), (2.9, 2.0)])
    well_alpha = np.linspace(-2.0, 2.0, 41)
    well_beta = np.linspace(-1.0, 1.0, 21)
    a, b = np.meshgrid(well_alpha, well_beta, indexing="ij")
    content_id = write_landscape(run.landscape, {
        "pca": (alpha, beta, loss, path),
        "well": (well_alpha, well_beta, double_well(a, b), np.array([(0.9, 0.1)])),
    })

    written = run_topology(run)

    assert written == run.topology
    with h5py.File(written, "r") as f:
        assert f.attrs["schema"] == "doodl3/topology"
        assert f.attrs["schema_version"] == 2
        assert json.loads(f.attrs["upstream"]) == {"landscape.h5": content_id}
        assert json.loads(f.attrs["settings"])["min_persistence"] is None
        assert f["slices/pca/basins"].dtype == np.int32
        assert f["slices/pca/pairs/significant"].dtype == bool
        assert f["slices/pca"].attrs["nonfinite_cells"] == 1

    assert topology_artifact.list_slices(written) == ["pca", "well"]
    topology = topology_artifact.read_slice(written, "pca")
    assert len(topology.minima) == 4
    for true_minimum in HIMMELBLAU_MINIMA:
        row = nearest_row(topology.minima.coords, true_minimum)
        np.testing.assert_allclose(topology.minima.coords[row], true_minimum, atol=0.1)
    basin_32 = nearest_row(topology.minima.coords, HIMMELBLAU_MINIMA[0])
    np.testing.assert_array_equal(topology.assignments["seed0"], [basin_32] * 3)
    assert topology.final_basins == {"seed0": basin_32}
    assert topology.nonfinite[0, 0]
    assert topology.basins[0, 0] == -1
    assert topology.threshold_rule.startswith("5% of the median depth")

    well = topology_artifact.read_slice(written, "well")
    assert len(well.minima) == 2
    assert well.final_basins == {"seed0": 1}


def test_run_topology_missing_landscape(tmp_path):
    with pytest.raises(ArtifactError, match=r"landscape\.h5.*doodl3 sample RUN"):
        run_topology(RunFolder(tmp_path))
