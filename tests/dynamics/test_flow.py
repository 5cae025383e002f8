"""Tests of the finite-difference gradient, its error estimate, tau and the flow map."""

import numpy as np
import pytest
from scipy.interpolate import RegularGridInterpolator

from doodl3_cli.dynamics.flow import (
    _FieldInterpolant,
    choose_tau,
    gradient_field,
    grid_spacing,
    integrate_flow,
)
from doodl3_cli.errors import AnalysisError


def grid(alpha, beta, function):
    a, b = np.meshgrid(alpha, beta, indexing="ij")
    return function(a, b)


def quadratic(a, b):
    return 3.0 * a**2 - 2.0 * a * b + 5.0 * b**2 + a - 4.0 * b + 7.0


def test_quadratic_gradient_is_exact():
    alpha = np.linspace(-1.3, 2.1, 21)
    beta = np.linspace(-0.7, 0.9, 17)
    a, b = np.meshgrid(alpha, beta, indexing="ij")

    field = gradient_field(alpha, beta, quadratic(a, b))

    np.testing.assert_allclose(field.grad_alpha, 6.0 * a - 2.0 * b + 1.0, rtol=0, atol=1e-10)
    np.testing.assert_allclose(field.grad_beta, -2.0 * a + 10.0 * b - 4.0, rtol=0, atol=1e-10)
    assert field.valid.all()
    assert np.max(field.error) < 1e-8


def test_quadratic_hessian_eigenvalues():
    alpha = np.linspace(-1.0, 1.0, 11)
    beta = np.linspace(-1.0, 1.0, 13)

    field = gradient_field(alpha, beta, grid(alpha, beta, lambda a, b: 2.0 * a**2 + 0.5 * b**2))

    np.testing.assert_allclose(field.hessian_max, 4.0, atol=1e-9)
    np.testing.assert_allclose(field.hessian_norm, 4.0, atol=1e-9)


def test_cubic_error_equals_truncation_error():
    # For a**3 the central stencil errs by exactly h**2 and the one-sided edge
    # stencils by exactly 2 * h**2, which is what the estimate must return.
    alpha = np.linspace(-2.0, 2.0, 41)
    beta = np.linspace(0.0, 1.0, 6)
    h = alpha[1] - alpha[0]

    field = gradient_field(alpha, beta, grid(alpha, beta, lambda a, b: a**3 + b))

    true_error = np.abs(field.grad_alpha - 3.0 * alpha[:, None] ** 2)
    np.testing.assert_allclose(field.error, true_error, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(field.error[1:-1], h**2, rtol=1e-6)
    np.testing.assert_allclose(field.error[[0, -1]], 2.0 * h**2, rtol=1e-6)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_nonfinite_cell_invalidates_its_stencils(bad_value):
    alpha = np.linspace(0.0, 1.0, 15)
    beta = np.linspace(0.0, 1.0, 15)
    loss = grid(alpha, beta, quadratic)
    loss[7, 6] = bad_value

    field = gradient_field(alpha, beta, loss)

    expected_invalid = np.zeros_like(field.valid)
    expected_invalid[5:10, 6] = True
    expected_invalid[7, 4:9] = True
    np.testing.assert_array_equal(~field.valid, expected_invalid)
    assert np.isnan(field.grad_alpha[~field.valid]).all()
    assert np.isnan(field.grad_beta[~field.valid]).all()
    assert np.isnan(field.error[~field.valid]).all()
    assert np.isfinite(field.grad_alpha[field.valid]).all()


def test_all_nonfinite_grid_raises():
    alpha = np.linspace(0.0, 1.0, 6)
    with pytest.raises(AnalysisError, match="no cell"):
        gradient_field(alpha, alpha, np.full((6, 6), np.nan))


@pytest.mark.parametrize(
    ("coords", "message"),
    [
        (np.linspace(0.0, 1.0, 4), "at least 5 samples"),
        (np.array([0.0, 0.1, 0.2, 0.35, 0.4]), "uniformly spaced"),
        (np.linspace(1.0, 0.0, 6), "strictly increasing"),
        (np.linspace(0.0, 1.0, 12).reshape(3, 4), "1-D array"),
    ],
)
def test_grid_spacing_rejects_bad_axes(coords, message):
    with pytest.raises(AnalysisError, match=message):
        grid_spacing(coords, "alpha")


def test_loss_shape_mismatch_raises():
    alpha = np.linspace(0.0, 1.0, 6)
    beta = np.linspace(0.0, 1.0, 7)
    with pytest.raises(AnalysisError, match=r"shape \(len\(alpha\), len\(beta\)\) = \(6, 7\)"):
        gradient_field(alpha, beta, np.zeros((7, 6)))


def test_tau_from_stiffest_minimum():
    alpha = np.linspace(-2.0, 2.0, 41)
    beta = np.linspace(-2.0, 2.0, 41)
    loss = grid(alpha, beta, lambda a, b: 2.0 * a**2 + 0.5 * b**2)

    tau, rule = choose_tau(gradient_field(alpha, beta, loss), loss)

    assert tau == pytest.approx(3.0 / 4.0, rel=1e-9)
    assert "local-minimum" in rule


def test_tau_fallback_on_a_slope():
    alpha = np.linspace(0.0, 1.0, 11)
    beta = np.linspace(0.0, 1.0, 11)
    loss = grid(alpha, beta, lambda a, b: a + 2.0 * b)

    tau, rule = choose_tau(gradient_field(alpha, beta, loss), loss)

    assert tau == pytest.approx(3.0 * 0.1 / np.sqrt(5.0), rel=1e-9)
    assert "median gradient norm" in rule


def test_tau_on_constant_loss_raises():
    alpha = np.linspace(0.0, 1.0, 8)
    loss = np.full((8, 8), 2.5)
    with pytest.raises(AnalysisError, match="pass tau explicitly"):
        choose_tau(gradient_field(alpha, alpha, loss), loss)


def test_flow_of_quadratic_matches_exponential_decay():
    # A linear gradient is interpolated exactly, so only the RK4 error remains:
    # below 1e-5 here, 2e-4 of a cell.
    alpha = np.linspace(-1.0, 1.0, 41)
    beta = np.linspace(-1.0, 1.0, 41)
    field = gradient_field(alpha, beta, grid(alpha, beta, lambda a, b: 2.0 * a**2 + 0.5 * b**2))
    start = np.array([[0.8, -0.9], [-0.3, 0.5], [0.0, 0.0]])
    tau = 0.6

    result = integrate_flow(field, start, tau)

    expected = start * np.exp(-np.array([4.0, 1.0]) * tau)
    np.testing.assert_allclose(result.end, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(result.error, 0.0, atol=1e-9)
    assert not result.stopped.any()


def test_flow_steps_move_at_most_half_a_cell():
    alpha = np.linspace(0.0, 10.0, 101)
    beta = np.linspace(0.0, 1.0, 11)
    field = gradient_field(alpha, beta, grid(alpha, beta, lambda a, b: -3.0 * a))

    result = integrate_flow(field, np.array([[1.0, 0.5]]), 1.0)

    np.testing.assert_allclose(result.end, [[4.0, 0.5]], atol=1e-9)
    assert result.iterations == 60


def test_flow_stops_where_it_leaves_the_domain():
    alpha = np.linspace(0.0, 1.0, 11)
    beta = np.linspace(0.0, 1.0, 11)
    field = gradient_field(alpha, beta, grid(alpha, beta, lambda a, b: -a))

    result = integrate_flow(field, np.array([[0.5, 0.5], [0.5, 0.2]]), 10.0)

    assert result.stopped.all()
    assert (result.end[:, 0] > 1.05).all()
    assert (result.end[:, 0] < 1.05 + 0.051).all()
    np.testing.assert_allclose(result.end[:, 1], [0.5, 0.2])


def test_flow_stops_before_invalid_cells():
    alpha = np.linspace(0.0, 2.0, 21)
    beta = np.linspace(0.0, 1.0, 11)
    loss = grid(alpha, beta, lambda a, b: -a)
    loss[15:, :] = np.nan

    field = gradient_field(alpha, beta, loss)
    result = integrate_flow(field, np.array([[0.2, 0.5]]), 10.0)

    assert result.stopped.all()
    last_valid = alpha[np.flatnonzero(field.valid[:, 5]).max()]
    assert result.end[0, 0] <= last_valid
    assert result.end[0, 0] > last_valid - 0.1


def test_interpolant_matches_regular_grid_interpolator():
    alpha = np.linspace(-1.0, 2.0, 31)
    beta = np.linspace(0.0, 1.5, 16)
    loss = grid(alpha, beta, lambda a, b: np.sin(2 * a) * np.cos(3 * b) + a * b**2)
    field = gradient_field(alpha, beta, loss)
    points = np.random.default_rng(0).uniform([-1.0, 0.0], [2.0, 1.5], size=(500, 2))

    velocity, error = _FieldInterpolant(field).velocity(points)

    reference = RegularGridInterpolator(
        (alpha, beta), np.stack([-field.grad_alpha, -field.grad_beta, field.error], axis=-1)
    )(points)
    np.testing.assert_allclose(velocity, reference[:, :2], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(error, reference[:, 2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tau", [0.0, -1.0, np.inf, np.nan])
def test_flow_rejects_bad_tau(tau):
    alpha = np.linspace(0.0, 1.0, 6)
    field = gradient_field(alpha, alpha, grid(alpha, alpha, quadratic))
    with pytest.raises(AnalysisError, match="tau must be a positive finite time"):
        integrate_flow(field, np.zeros((1, 2)), tau)
