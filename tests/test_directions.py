import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from doodl3_cli import zoo
from doodl3_cli.artifacts.trajectory import Layout
from doodl3_cli.checkpoints import flatten_model, model_layouts
from doodl3_cli.directions import (
    axis_directions,
    axis_name,
    endpoint_directions,
    file_directions,
    filter_normalise,
    hessian_directions,
    parse_axis,
    pca_directions,
    project,
    random_directions,
)
from doodl3_cli.errors import AnalysisError, ConfigError, UsageError
from doodl3_cli.evaluate import EvaluationSetup, Evaluator


def _reference_pca(matrix: np.ndarray) -> np.ndarray:
    centred = matrix - matrix.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return vt[:2]


def test_pca_matches_numpy_svd():
    rng = np.random.default_rng(0)
    runs = [rng.normal(size=(30, 200)) @ np.diag(np.linspace(3, 0.1, 200)) for _ in range(3)]

    plane = pca_directions(runs)

    reference = _reference_pca(np.concatenate(runs))
    for k in range(2):
        assert abs(abs(plane.directions[k] @ reference[k]) - 1.0) < 1e-10
    np.testing.assert_allclose(plane.directions @ plane.directions.T, np.eye(2), atol=1e-12)


def test_pca_explained_variance_ratio():
    rng = np.random.default_rng(1)
    matrix = rng.normal(size=(50, 3)) * np.array([4.0, 2.0, 1.0])

    plane = pca_directions([matrix])

    centred = matrix - matrix.mean(axis=0)
    s = np.linalg.svd(centred, compute_uv=False)
    np.testing.assert_allclose(plane.explained_variance, s[:2] ** 2 / (s**2).sum(), rtol=1e-10)


def test_pca_sign_rule_largest_entry_positive():
    rng = np.random.default_rng(2)
    plane = pca_directions([rng.normal(size=(20, 10))])

    for direction in plane.directions:
        assert direction[np.argmax(np.abs(direction))] > 0


def test_pca_rejects_collinear_checkpoints():
    line = np.outer(np.arange(10.0), np.ones(5))

    with pytest.raises(AnalysisError, match="fewer than two dimensions"):
        pca_directions([line])


def test_pca_rejects_two_checkpoints():
    with pytest.raises(AnalysisError, match="at least 3"):
        pca_directions([np.eye(2, 5)])


def test_project_residual_of_off_plane_point():
    directions = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    center = np.array([1.0, 1.0, 1.0])

    coords, residual = project(np.array([[2.0, 3.0, 5.0]]), center, directions)

    np.testing.assert_allclose(coords, [[1.0, 2.0]])
    np.testing.assert_allclose(residual, [4.0])


def _conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 10),
    )


def test_pca_streamed_blocks_match_one_block():
    rng = np.random.default_rng(4)
    runs = [rng.normal(size=(12, 50)) for _ in range(2)]

    whole = pca_directions(runs)
    blocked = pca_directions(runs, column_block=7)

    np.testing.assert_allclose(blocked.directions, whole.directions, atol=1e-12)
    np.testing.assert_allclose(blocked.explained_variance, whole.explained_variance, rtol=1e-12)


def test_filter_normalise_each_filter_matches_center():
    model = _conv_model()
    layout, _ = model_layouts(model)
    center = flatten_model(model, layout, model_layouts(model)[1])[0].astype(np.float64)
    raw = np.random.default_rng(0).standard_normal(layout.size)

    direction = filter_normalise(raw, center, layout)

    for entry in layout.entries:
        part = slice(entry.offset, entry.offset + entry.numel)
        if len(entry.shape) < 2:
            assert not direction[part].any(), entry.name
            continue
        d = direction[part].reshape(entry.shape[0], -1)
        c = center[part].reshape(entry.shape[0], -1)
        r = raw[part].reshape(entry.shape[0], -1)
        for k in range(entry.shape[0]):
            assert abs(np.linalg.norm(d[k]) - np.linalg.norm(c[k])) < 1e-6, (entry.name, k)
            expected = r[k] * np.linalg.norm(c[k]) / np.linalg.norm(r[k])
            np.testing.assert_allclose(d[k], expected, atol=1e-6)


def test_filter_normalise_scale_rule_scales_whole_vectors():
    model = _conv_model()
    layout, buffer_layout = model_layouts(model)
    center = flatten_model(model, layout, buffer_layout)[0].astype(np.float64)
    raw = np.random.default_rng(1).standard_normal(layout.size)

    direction = filter_normalise(raw, center, layout, bias="scale")

    one_dimensional = [e for e in layout.entries if len(e.shape) == 1]
    assert {e.name for e in one_dimensional} == {"0.bias", "1.weight", "1.bias", "4.bias"}
    for entry in one_dimensional:
        part = slice(entry.offset, entry.offset + entry.numel)
        scale = np.linalg.norm(center[part]) / np.linalg.norm(raw[part])
        np.testing.assert_allclose(direction[part], raw[part] * scale, atol=1e-6)


def test_filter_normalise_rejects_unknown_bias_rule():
    layout = Layout.from_tensors({"w": np.zeros((2, 2))})

    with pytest.raises(ConfigError, match="--bias 'keep'"):
        filter_normalise(np.ones(4), np.ones(4), layout, bias="keep")


def test_random_directions_seeded():
    model = _conv_model()
    layout, buffer_layout = model_layouts(model)
    center = flatten_model(model, layout, buffer_layout)[0]

    first = random_directions(center, layout, seed=3)
    again = random_directions(center, layout, seed=3)
    other = random_directions(center, layout, seed=4)

    assert np.array_equal(first, again)
    assert not np.allclose(first, other)
    assert first.shape == (2, layout.size)


def test_endpoint_directions_contain_three_endpoints():
    rng = np.random.default_rng(5)
    endpoints = rng.normal(size=(3, 40))

    directions = endpoint_directions(endpoints)

    np.testing.assert_allclose(directions @ directions.T, np.eye(2), atol=1e-12)
    coords, residual = project(endpoints, endpoints[0], directions)
    np.testing.assert_allclose(residual, 0.0, atol=1e-12)
    np.testing.assert_allclose(coords[1], [np.linalg.norm(endpoints[1] - endpoints[0]), 0.0], atol=1e-12)


def test_endpoint_directions_two_runs_and_random():
    rng = np.random.default_rng(6)
    endpoints = rng.normal(size=(2, 30))
    extra = rng.normal(size=30)

    directions = endpoint_directions(endpoints, random_direction=extra)

    np.testing.assert_allclose(directions @ directions.T, np.eye(2), atol=1e-12)
    _, residual = project(endpoints, endpoints[0], directions)
    np.testing.assert_allclose(residual, 0.0, atol=1e-12)


def test_endpoint_directions_reject_collinear_runs():
    start = np.zeros(5)
    step = np.arange(5.0)

    with pytest.raises(AnalysisError, match="on one line"):
        endpoint_directions(np.stack([start, start + step, start + 2 * step]))


def test_hessian_eigenvalues_match_dense_hessian():
    torch.manual_seed(0)
    model = zoo.mlp(4, [3], 3)
    layout, buffer_layout = model_layouts(model)
    center, buffers = flatten_model(model, layout, buffer_layout)
    inputs, targets = zoo.iris("all")
    setup = EvaluationSetup(model.eval(), inputs, targets, F.cross_entropy, 64, torch.device("cpu"))
    loss_of = Evaluator(setup, layout, buffer_layout, buffers).loss_function()

    eigenvalues, directions = hessian_directions(loss_of, center, tolerance=1e-12)

    dense = torch.func.hessian(loss_of)(torch.as_tensor(center, dtype=torch.float64)).numpy()
    reference_values, reference_vectors = np.linalg.eigh(dense)
    np.testing.assert_allclose(eigenvalues, reference_values[::-1][:2], rtol=1e-6)
    for k in range(2):
        assert abs(abs(directions[k] @ reference_vectors[:, -1 - k]) - 1.0) < 1e-6


def test_hessian_directions_reject_tiny_model():
    with pytest.raises(AnalysisError, match="at least 3 parameters"):
        hessian_directions(lambda v: (v**2).sum(), np.zeros(2))


def test_parse_axis_round_trip():
    layout = Layout.from_tensors({"0.weight": np.zeros((4, 8)), "0.bias": np.zeros(4), "scale": np.zeros(())})

    index = parse_axis("0.weight[3,7]", layout)

    assert index == 31
    assert axis_name(index, layout) == "0.weight[3,7]"
    assert parse_axis("0.bias[2]", layout) == 34
    assert parse_axis("scale", layout) == 36
    assert axis_name(36, layout) == "scale"


@pytest.mark.parametrize(
    ("spec", "message"),
    [("1.weight[0,0]", "parameter '1.weight' not found"), ("0.weight[4,0]", r"shape \[4, 8\]"),
     ("0.weight[a,b]", "integers"), ("0.weight[1]", r"shape \[4, 8\]")],
)
def test_parse_axis_rejects_bad_specs(spec, message):
    layout = Layout.from_tensors({"0.weight": np.zeros((4, 8))})

    with pytest.raises(UsageError, match=message):
        parse_axis(spec, layout)


def test_axis_directions_pick_largest_spread():
    layout = Layout.from_tensors({"w": np.zeros((2, 3))})
    finals = np.array([[0.0, 5.0, 0.0, 1.0, 0.0, 0.0], [0.0, -5.0, 0.0, -2.0, 0.5, 0.0]])

    directions, indices = axis_directions(layout, finals=finals)

    assert indices == [1, 3]
    assert directions[0, 1] == 1.0
    assert directions[1, 3] == 1.0
    assert directions.sum() == 2.0


def test_axis_directions_reject_same_axis():
    layout = Layout.from_tensors({"w": np.zeros((2, 3))})

    with pytest.raises(UsageError, match="same parameter"):
        axis_directions(layout, axes=("w[0,1]", "w[0,1]"))


def test_file_directions_npy_and_h5(tmp_path):
    layout = Layout.from_tensors({"w": np.zeros((2, 3))})
    directions = np.random.default_rng(7).normal(size=(2, 6))
    np.save(tmp_path / "d.npy", directions)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["directions"] = directions

    np.testing.assert_array_equal(file_directions(tmp_path / "d.npy", layout), directions)
    np.testing.assert_array_equal(file_directions(tmp_path / "d.h5", layout), directions)


@pytest.mark.parametrize(
    ("array", "message"),
    [(np.ones((2, 5)), r"expected shape \(2, 6\)"), (np.ones((2, 6)), "parallel"),
     (np.vstack([np.ones(6), np.zeros(6)]), "all zeros"), (np.full((2, 6), np.nan), "NaN")],
)
def test_file_directions_reject_invalid(tmp_path, array, message):
    layout = Layout.from_tensors({"w": np.zeros((2, 3))})
    np.save(tmp_path / "d.npy", array)

    with pytest.raises(ConfigError, match=message):
        file_directions(tmp_path / "d.npy", layout)
