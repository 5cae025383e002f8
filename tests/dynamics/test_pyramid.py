"""Tests of the Morse graph across the resolution pyramid."""

import numpy as np
import pytest

from doodl3_cli.dynamics.flow import choose_tau, gradient_field, time_tau_map
from doodl3_cli.dynamics.morse import morse_graph, outer_approximation
from doodl3_cli.dynamics.pyramid import level_strides, morse_pyramid

from tests.dynamics.test_morse import himmelblau


@pytest.fixture(scope="module")
def himmelblau_pyramid():
    alpha = beta = np.linspace(-5.0, 5.0, 101)
    a, b = np.meshgrid(alpha, beta, indexing="ij")
    loss = himmelblau(a, b)
    field = gradient_field(alpha, beta, loss)
    tau, _ = choose_tau(field, loss)

    finest = morse_graph(outer_approximation(alpha, beta, time_tau_map(field, tau), field.valid), loss, field.valid)
    return finest, morse_pyramid(alpha, beta, loss, finest, tau)


def test_level_strides_stop_at_five_samples():
    assert level_strides((101, 101)) == [2, 4, 8, 16]
    assert level_strides((41, 31)) == [2, 4]
    assert level_strides((8, 100)) == []


def test_pyramid_level_shapes(himmelblau_pyramid):
    _, levels = himmelblau_pyramid

    assert [level.stride for level in levels] == [2, 4, 8, 16]
    assert [level.morse.morse_set.shape for level in levels] == [(51, 51), (26, 26), (13, 13), (7, 7)]


def test_pyramid_keeps_four_minima_at_stride_two(himmelblau_pyramid):
    finest, levels = himmelblau_pyramid
    minima = np.flatnonzero(finest.attractor)

    coarse = levels[0].finest_set[minima]

    assert levels[0].morse.attractor.sum() == 4
    assert len(set(coarse.tolist())) == 4
    assert levels[0].morse.attractor[coarse].all()


def test_pyramid_merges_everything_at_the_coarsest_level(himmelblau_pyramid):
    finest, levels = himmelblau_pyramid
    critical = np.flatnonzero(finest.conley_index.any(axis=1))

    merged = levels[-1].finest_set[critical]

    assert critical.size == 9
    assert len(set(merged.tolist())) == 1
    assert levels[-1].morse.conley_index[merged[0]].tolist() == [1, 0, 0]


def test_pyramid_saddle_and_maximum_merge_to_index_zero(himmelblau_pyramid):
    finest, levels = himmelblau_pyramid
    maximum = int(np.flatnonzero((finest.conley_index == [0, 0, 1]).all(axis=1))[0])

    coarse = levels[1].finest_set[maximum]
    partners = np.flatnonzero(levels[1].finest_set == coarse)

    assert any(finest.conley_index[m].tolist() == [0, 1, 0] for m in partners)
    assert levels[1].morse.conley_index[coarse].tolist() == [0, 0, 0]
