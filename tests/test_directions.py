import numpy as np
import pytest

from doodl3_cli.directions import pca_directions, project
from doodl3_cli.errors import AnalysisError


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
