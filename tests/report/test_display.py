import math

import numpy as np
import pytest

from doodl3_cli.report.display import display_indices, log_ticks, loss_scale, thinning_note


def test_scale_linear_within_two_decades():
    scale = loss_scale(np.array([[0.5, 1.0], [20.0, np.nan]]))

    assert not scale.log
    assert (scale.cmin, scale.cmax) == (0.5, 20.0)
    assert scale.note() == ""
    assert "tickvals" not in scale.colorbar()


def test_scale_log_beyond_two_decades():
    loss = np.array([[0.05, 1.0], [92.0, np.inf]])

    scale = loss_scale(loss)

    assert scale.log
    assert scale.cmin == pytest.approx(math.log10(0.05))
    assert scale.cmax == pytest.approx(math.log10(92.0))
    assert np.allclose(scale.color_values(loss[0]), np.log10([0.05, 1.0]))
    assert "3.3 decades (0.05 to 92)" in scale.note()
    bar = scale.colorbar(x=1.0)
    assert bar["ticktext"] == ["0.05", "0.1", "0.2", "0.5", "1", "2", "5", "10", "20", "50"]
    assert bar["tickvals"][4] == pytest.approx(0.0)
    assert bar["x"] == 1.0


def test_scale_log_with_zeros_uses_smallest_positive():
    scale = loss_scale(np.array([0.0, 0.01, 30.0]))

    assert scale.log
    assert scale.low == 0.01
    assert scale.color_values(np.array([0.0]))[0] == pytest.approx(-2.0)
    assert "losses of 0 take the lowest colour" in scale.note()


def test_scale_linear_with_negative_losses():
    assert not loss_scale(np.array([-1.0, 0.01, 500.0])).log


def test_scale_without_finite_values():
    scale = loss_scale(np.array([np.nan, np.inf]))

    assert not scale.log
    assert (scale.low, scale.high) == (0.0, 1.0)


def test_log_ticks_powers_only_over_six_decades():
    assert log_ticks(1e-4, 1e4) == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4])


@pytest.mark.parametrize(("count", "expected_length", "stride"), [(41, 41, 1), (101, 101, 1), (201, 101, 2), (250, 84, 3)])
def test_display_indices_stride(count, expected_length, stride):
    indices = display_indices(count)

    assert len(indices) == expected_length
    assert indices[0] == 0
    assert (np.diff(indices) == stride).all()


def test_thinning_note_only_when_thinned():
    rows = display_indices(201)

    assert thinning_note((41, 41), display_indices(41), display_indices(41)) == ""
    assert thinning_note((201, 41), rows, display_indices(41)) == (
        "the 201x41 grid is drawn at every 2x1 sample (101x41 points) to keep the page small"
    )
