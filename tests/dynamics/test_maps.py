"""Tests of the maps learnt from the runs: the ensemble (Gaussian process) and trajectory maps."""

import numpy as np
import pytest
from scipy.stats import norm

from doodl3_cli.artifacts import dynamics as dynamics_artifact
from doodl3_cli.dynamics.maps import checkpoint_pairs, ensemble_map, joint_quantile, trajectory_map
from doodl3_cli.dynamics.morse import box_index
from doodl3_cli.dynamics.stage import run_dynamics
from doodl3_cli.errors import AnalysisError
from doodl3_cli.runfolder import RunFolder

from tests.dynamics.test_stage import ALPHA, BETA, write_landscape, write_trajectories

STARTS = {"a": (0.4, 1.0), "b": (-0.3, -1.2), "c": (1.8, -1.0), "d": (-0.05, 0.5), "e": (1.5, 1.2), "f": (-1.7, 0.9)}
RIGHT_RUNS = ["a", "c", "e"]
LEFT_RUNS = ["b", "d", "f"]


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    folder = RunFolder(tmp_path_factory.mktemp("ensemble-map"))
    write_trajectories(folder, STARTS)
    write_landscape(folder, starts=STARTS)
    run_dynamics(folder, map_name="ensemble", confidence=0.9, sharpness_checkpoints=0)
    return folder


def test_ensemble_map_finds_both_minima(ensemble_run):
    result = dynamics_artifact.read_slice(ensemble_run.dynamics, "pca")
    i, j, _ = box_index(ALPHA, BETA, np.array([(-1.0, 0.0), (1.0, 0.0), (0.0, 0.0)]))

    left, right, saddle = result.morse.morse_set[i, j]

    assert result.map == "ensemble"
    assert result.attrs["confidence"] == pytest.approx(0.9)
    assert result.morse.attractor.sum() == 2
    assert result.morse.attractor[[left, right]].all()
    assert result.morse.conley_index[left].tolist() == [1, 0, 0]
    assert result.morse.conley_index[right].tolist() == [1, 0, 0]
    assert result.morse.conley_index[saddle].tolist() == [0, 1, 0]
    assert result.pyramid == []


def test_ensemble_map_groups_runs_by_minimum(ensemble_run):
    result = dynamics_artifact.read_slice(ensemble_run.dynamics, "pca")
    i, j, _ = box_index(ALPHA, BETA, np.array([(-1.0, 0.0), (1.0, 0.0)]))
    left, right = result.morse.morse_set[i, j]

    assert result.ensemble.groups == {int(right): RIGHT_RUNS, int(left): LEFT_RUNS}


def line_runs():
    """Three runs that move by (0.1, 0) per checkpoint along beta = -0.5, 0 and 0.5."""
    steps = np.arange(8)[:, None] * np.array([0.1, 0.0])
    return {f"run{k}": np.array([-0.4, b]) + steps for k, b in enumerate((-0.5, 0.0, 0.5))}


def test_ensemble_map_radius_scales_with_confidence():
    points = np.array([[0.0, 0.0], [0.2, 0.5], [2.0, 2.0]])

    _, radius_low = ensemble_map(line_runs(), confidence=0.5)(points)
    _, radius_high = ensemble_map(line_runs(), confidence=0.99)(points)

    # Three points: each of six coordinates may fail with probability (1 - mu) / 6, two-sided.
    ratio = norm.ppf(1 - 0.01 / 12) / norm.ppf(1 - 0.5 / 12)
    np.testing.assert_allclose(radius_high / radius_low, ratio, rtol=1e-9)
    assert radius_low[2] > radius_low[0]


def test_joint_quantile_covers_all_coordinates():
    rng = np.random.default_rng(0)
    points, confidence = 50, 0.8
    z = joint_quantile(confidence, points)

    draws = rng.standard_normal((20_000, points, 2))
    covered = np.mean(np.all(np.abs(draws) <= z, axis=(1, 2)))

    assert z == pytest.approx(norm.isf(0.2 / 200))
    assert covered >= confidence
    assert joint_quantile(confidence, 1) == pytest.approx(norm.isf(0.05))


def test_ensemble_map_learns_constant_displacement():
    images, _ = ensemble_map(line_runs(), lag=2)(np.array([[0.0, 0.0]]))

    np.testing.assert_allclose(images[0], [0.2, 0.0], atol=0.02)


def test_trajectory_map_regresses_displacement():
    point_map = trajectory_map(line_runs(), (0.1, 0.1))

    images, radius = point_map(np.array([[0.0, 0.0], [0.05, 0.5], [3.0, 3.0]]))

    np.testing.assert_allclose(images[:2], [[0.1, 0.0], [0.15, 0.5]], atol=1e-9)
    assert np.isnan(images[2]).all()
    assert (radius == 0).all()


def test_checkpoint_pairs_skip_non_finite():
    pairs = checkpoint_pairs({"r": np.array([[0.0, 0.0], [1.0, 0.0], [np.nan, 0.0], [3.0, 0.0]])}, 1)

    np.testing.assert_array_equal(pairs[0], [[0.0, 0.0]])
    np.testing.assert_array_equal(pairs[1], [[1.0, 0.0]])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ensemble_map(line_runs(), confidence=1.0), "--confidence must lie strictly between 0 and 1"),
        (lambda: ensemble_map(line_runs(), lag=0), "lag must be 1 or more"),
        (lambda: ensemble_map({"r": np.zeros((2, 2))}), "at least 3 pairs"),
        (lambda: trajectory_map({"r": np.zeros((3, 2))}, (0.1, 0.1)), "at least 3 recorded intervals"),
    ],
    ids=["confidence", "lag", "ensemble-too-few", "trajectory-too-few"],
)
def test_learnt_maps_reject_invalid_input(call, message):
    with pytest.raises(AnalysisError, match=message):
        call()


def test_stage_rejects_unknown_map(tmp_path):
    folder = RunFolder(tmp_path)
    write_trajectories(folder)
    write_landscape(folder)

    with pytest.raises(AnalysisError, match="--map 'flow': unknown map; use one of gradient, ensemble, trajectory"):
        run_dynamics(folder, map_name="flow")
