"""Directions that span a two-dimensional slice of parameter space."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from doodl3_cli.errors import AnalysisError

log = logging.getLogger(__name__)


@dataclass
class PlaneDirections:
    """Two orthonormal directions and what they explain.

    Attributes
    ----------
    directions : ndarray of shape (2, P), float64
        Orthonormal rows.
    explained_variance : ndarray of shape (2,), float64
        Fraction of the checkpoints' total variance along each direction.
    singular_values : ndarray of shape (2,), float64
    """

    directions: np.ndarray
    explained_variance: np.ndarray
    singular_values: np.ndarray


def pca_directions(checkpoints: list[np.ndarray]) -> PlaneDirections:
    """Compute the top two principal directions of all checkpoints jointly.

    The checkpoints of every trajectory are stacked into one matrix, so every run
    lands in one shared plane. PCA is the standard mean-centred one, computed through
    the T x T Gram matrix in float64, which costs O(T^2 P) time and never forms a
    P x P matrix. Each direction's sign is fixed so that its entry of largest
    magnitude is positive, which makes the result reproducible.

    Parameters
    ----------
    checkpoints : list of ndarray of shape (T_i, P)
        Flattened parameters of each trajectory.

    Raises
    ------
    AnalysisError
        When the checkpoints span fewer than two dimensions.
    """
    matrix = np.concatenate([np.asarray(c, dtype=np.float64) for c in checkpoints], axis=0)
    total = matrix.shape[0]
    if total < 3:
        raise AnalysisError(
            f"PCA directions need at least 3 recorded checkpoints, trajectory.h5 holds {total}; "
            "record more checkpoints"
        )

    centred = matrix - matrix.mean(axis=0, keepdims=True)
    gram = centred @ centred.T
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues = np.clip(eigenvalues[order], 0.0, None)
    eigenvectors = eigenvectors[:, order]

    total_variance = float(eigenvalues.sum())
    if total_variance <= 0 or eigenvalues[1] <= total_variance * 1e-14:
        raise AnalysisError(
            f"the {total} recorded checkpoints span fewer than two dimensions, so no PCA plane exists; "
            "record checkpoints from more steps or more runs"
        )

    singular = np.sqrt(eigenvalues[:2])
    directions = (centred.T @ eigenvectors[:, :2]) / singular
    directions /= np.linalg.norm(directions, axis=0, keepdims=True)
    for k in range(2):
        if directions[np.argmax(np.abs(directions[:, k])), k] < 0:
            directions[:, k] *= -1
    return PlaneDirections(directions.T.copy(), eigenvalues[:2] / total_variance, singular)


def project(points: np.ndarray, center: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project points onto the plane through `center` spanned by orthonormal `directions`.

    Parameters
    ----------
    points : ndarray of shape (T, P)
    center : ndarray of shape (P,)
    directions : ndarray of shape (2, P), orthonormal rows

    Returns
    -------
    coords : ndarray of shape (T, 2), float64
        (alpha, beta) of each point.
    residual : ndarray of shape (T,), float64
        Euclidean distance of each point from the plane.
    """
    offsets = np.asarray(points, dtype=np.float64) - np.asarray(center, dtype=np.float64)
    coords = offsets @ directions.T
    in_plane = coords @ directions
    residual = np.linalg.norm(offsets - in_plane, axis=1)
    return coords, residual
