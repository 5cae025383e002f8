"""Tests of the finite-difference diagnostics over checkpoints."""

import h5py
import numpy as np
import pytest

from doodl3_cli.dynamics.trajectories import update_diagnostics
from doodl3_cli.errors import AnalysisError


def test_straight_path():
    direction = np.array([3.0, 0.0, -4.0])
    along = np.array([0.0, 1.0, 3.0, 3.5, 6.0])
    step = np.array([0, 10, 30, 40, 100])

    result = update_diagnostics("straight", along[:, None] * direction, step)

    np.testing.assert_allclose(result.step_length, [np.nan, 5.0, 10.0, 2.5, 12.5])
    np.testing.assert_allclose(result.speed, [np.nan, 0.5, 0.5, 0.25, 12.5 / 60])
    np.testing.assert_allclose(result.cosine, [np.nan, 1.0, 1.0, 1.0, np.nan])
    assert result.path_over_displacement == pytest.approx(1.0)


def test_zig_zag_path():
    # theta_t = (-1)**t * v: every update reverses the one before.
    v = np.array([0.5, -1.0, 2.0, 0.0])
    params = np.array([(-1.0) ** t * v for t in range(6)])

    result = update_diagnostics("zig-zag", params, np.arange(6))

    np.testing.assert_allclose(result.cosine, [np.nan, -1.0, -1.0, -1.0, -1.0, np.nan])
    np.testing.assert_allclose(result.step_length[1:], 2.0 * np.linalg.norm(v))
    assert result.path_over_displacement == pytest.approx(5.0)


def test_right_angle_turn():
    params = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 2.0]])

    result = update_diagnostics("turn", params, np.array([0, 1, 2]))

    assert result.cosine[1] == pytest.approx(0.0, abs=1e-15)
    assert result.path_over_displacement == pytest.approx(3.0 / np.sqrt(5.0))


def test_path_returning_to_start_is_infinite():
    params = np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])

    result = update_diagnostics("loop", params, np.array([0, 1, 2]))

    assert result.path_over_displacement == np.inf


def test_zero_length_update_has_no_cosine():
    params = np.array([[0.0], [1.0], [1.0], [2.0]])

    result = update_diagnostics("pause", params, np.array([0, 1, 2, 3]))

    np.testing.assert_allclose(result.step_length, [np.nan, 1.0, 0.0, 1.0])
    assert np.isnan(result.cosine).all()


def test_repeated_step_has_no_speed():
    params = np.array([[0.0], [1.0], [3.0]])

    result = update_diagnostics("repeat", params, np.array([5, 5, 7]))

    np.testing.assert_allclose(result.speed, [np.nan, np.nan, 1.0])


def test_short_trajectories():
    single = update_diagnostics("single", np.ones((1, 3)), np.array([7]))
    empty = update_diagnostics("empty", np.ones((0, 3)), np.zeros(0, dtype=np.int64))

    assert np.isnan(single.step_length).all()
    assert np.isnan(single.cosine).all()
    assert np.isnan(single.path_over_displacement)
    assert empty.step.shape == (0,)
    assert np.isnan(empty.path_over_displacement)


def test_no_movement_has_no_path_ratio():
    result = update_diagnostics("still", np.zeros((3, 2)), np.arange(3))
    assert np.isnan(result.path_over_displacement)


def test_loss_is_passed_through():
    loss = np.array([2.0, 1.0, np.nan])

    with_loss = update_diagnostics("logged", np.zeros((3, 2)), np.arange(3), loss)
    without = update_diagnostics("unlogged", np.zeros((3, 2)), np.arange(3))

    np.testing.assert_array_equal(with_loss.loss, loss)
    assert np.isnan(without.loss).all()


def test_reads_rows_from_an_hdf5_dataset(tmp_path):
    rng = np.random.default_rng(3)
    params = rng.normal(size=(7, 50)).astype(np.float32)
    with h5py.File(tmp_path / "params.h5", "w") as f:
        f.create_dataset("params", data=params)
    step = np.arange(7) * 3

    with h5py.File(tmp_path / "params.h5", "r") as f:
        from_file = update_diagnostics("file", f["params"], step)
    in_memory = update_diagnostics("memory", params, step)

    np.testing.assert_array_equal(from_file.step_length, in_memory.step_length)
    np.testing.assert_array_equal(from_file.cosine, in_memory.cosine)
    assert from_file.path_over_displacement == in_memory.path_over_displacement


def test_float32_rows_are_differenced_in_float64():
    params = np.array([[1e4, 0.0], [1e4 + 0.0009765625, 0.0]], dtype=np.float32)

    result = update_diagnostics("precise", params, np.array([0, 1]))

    assert result.step_length[1] == 0.0009765625


@pytest.mark.parametrize(
    ("params", "step", "loss", "message"),
    [
        (np.zeros(4), np.arange(4), None, r"params must have shape \(T, P\)"),
        (np.zeros((4, 2)), np.arange(3), None, r"step must have shape \(4,\)"),
        (np.zeros((4, 2)), np.arange(4), np.zeros(5), r"loss must have shape \(4,\)"),
    ],
)
def test_bad_shapes_raise(params, step, loss, message):
    with pytest.raises(AnalysisError, match=message):
        update_diagnostics("bad", params, step, loss)
