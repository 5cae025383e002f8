"""Maps on a slice learnt from the recorded runs, for the outer approximation.

ensemble
    The map from a checkpoint's slice coordinates to those of the checkpoint `lag`
    recorded checkpoints later in the same run, fitted over every such pair of every
    run with a Gaussian process (``sklearn.gaussian_process.GaussianProcessRegressor``,
    kernel ``ConstantKernel * RBF + WhiteKernel``, hyperparameters by maximum
    likelihood). The GP models the displacement, so far from the data the map tends
    to the mean displacement instead of to a fixed point. Each image is widened by
    ``z * max(sigma_alpha, sigma_beta)``, where sigma is the predictive standard
    deviation. The map is evaluated at K points in one call (the corners and
    centres of every box), and ``z = Phi^-1(1 - (1 - mu) / (4 K))``, so each of
    the 2K image coordinates leaves its interval with probability (1 - mu) / (2 K)
    under the model. By the union bound, which needs no independence, every
    rectangle then contains its image at once with probability at least mu, and so
    does the outer approximation built from them.
trajectory
    The displacement over one recorded interval, regressed onto the grid by
    Nadaraya-Watson smoothing with a Gaussian kernel one grid cell wide. Boxes whose
    total kernel weight is below `MIN_WEIGHT` (no checkpoint within about 2.5
    cells) have no image. The map carries no error radius.

"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
from scipy.stats import norm
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

from doodl3_cli.errors import AnalysisError

log = logging.getLogger(__name__)

MAPS = ("gradient", "ensemble", "trajectory")
MIN_PAIRS = 3
MIN_WEIGHT = 0.05

PointMap = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def checkpoint_pairs(projections: dict[str, np.ndarray], lag: int) -> tuple[np.ndarray, np.ndarray]:
    """Collect (start, end) slice coordinates of checkpoints `lag` apart within each run.

    Parameters
    ----------
    projections : dict of str to ndarray of shape (T, 2), float64
        Slice coordinates of each run's checkpoints, in training order.
    lag : int
        Recorded checkpoints between start and end, >= 1.

    Returns
    -------
    starts, ends : ndarray of shape (K, 2), float64
        Pairs with both ends finite.
    """
    starts, ends = [], []
    for coords in projections.values():
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        if len(coords) > lag:
            starts.append(coords[:-lag])
            ends.append(coords[lag:])
    if not starts:
        return np.empty((0, 2)), np.empty((0, 2))
    starts, ends = np.concatenate(starts), np.concatenate(ends)
    finite = np.isfinite(starts).all(axis=1) & np.isfinite(ends).all(axis=1)
    return starts[finite], ends[finite]


def ensemble_map(projections: dict[str, np.ndarray], *, lag: int = 1, confidence: float = 0.95, seed: int = 0) -> PointMap:
    """Fit the ensemble map by Gaussian-process regression (see the module docstring).

    Parameters
    ----------
    projections : dict of str to ndarray of shape (T, 2), float64
        Slice coordinates of each run's checkpoints.
    lag : int
        Recorded checkpoints from a start to its image.
    confidence : float
        Confidence level mu in (0, 1) of the widened images.
    seed : int
        Seed of the optimiser restarts.

    Returns
    -------
    callable
        Point map: points (K, 2) to (images (K, 2), radius (K,)).

    Raises
    ------
    AnalysisError
        When lag < 1, confidence is not in (0, 1), or fewer than 3 pairs exist.
    """
    if lag < 1:
        raise AnalysisError(f"lag must be 1 or more recorded checkpoints, got {lag}")
    if not 0.0 < confidence < 1.0:
        raise AnalysisError(f"--confidence must lie strictly between 0 and 1, got {confidence!r}; pass e.g. 0.95")
    starts, ends = checkpoint_pairs(projections, lag)
    if len(starts) < MIN_PAIRS:
        raise AnalysisError(
            f"the ensemble map needs at least {MIN_PAIRS} pairs of checkpoints {lag} apart on the slice, "
            f"found {len(starts)}; record more checkpoints or use --map gradient"
        )

    scale = np.maximum(starts.std(axis=0), 1e-12)
    kernel = ConstantKernel(1.0) * RBF(length_scale=scale) + WhiteKernel(noise_level=1e-2)
    model = GaussianProcessRegressor(kernel=kernel, normalize_y=True, n_restarts_optimizer=2, random_state=seed)
    model.fit(starts, ends - starts)
    log.info("ensemble map: %d pairs, kernel %s", len(starts), model.kernel_)

    def point_map(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        mean, std = model.predict(points, return_std=True)
        std = np.asarray(std).reshape(len(points), -1)
        z = joint_quantile(confidence, len(points))
        log.info("ensemble map: %d points at joint confidence %g, z %.3f", len(points), confidence, z)
        return points + mean, z * std.max(axis=1)

    return point_map


def joint_quantile(confidence: float, points: int) -> float:
    """Return z such that 2 * points Gaussian coordinates all lie within z sigma with probability >= confidence.

    Bonferroni (union) bound: each coordinate gets the two-sided level
    ``1 - (1 - confidence) / (2 * points)``.

    Parameters
    ----------
    confidence : float
        Joint level mu in (0, 1).
    points : int
        Number of two-dimensional images, >= 1.

    Returns
    -------
    float
        ``Phi^-1(1 - (1 - mu) / (4 * points))``.
    """
    return float(norm.isf((1.0 - confidence) / (4.0 * max(int(points), 1))))


def trajectory_map(projections: dict[str, np.ndarray], spacing: tuple[float, float]) -> PointMap:
    """Regress the one-interval displacement of the checkpoints onto the grid (see the module docstring).

    Parameters
    ----------
    projections : dict of str to ndarray of shape (T, 2), float64
        Slice coordinates of each run's checkpoints.
    spacing : tuple of float
        Grid spacing (h_alpha, h_beta): the kernel width along each axis.

    Returns
    -------
    callable
        Point map: points (K, 2) to (images (K, 2), radius (K,) of zeros). Images
        are NaN where the kernel weight is below `MIN_WEIGHT`.

    Raises
    ------
    AnalysisError
        When fewer than 3 recorded intervals exist.
    """
    starts, ends = checkpoint_pairs(projections, 1)
    if len(starts) < MIN_PAIRS:
        raise AnalysisError(
            f"the trajectory map needs at least {MIN_PAIRS} recorded intervals on the slice, found {len(starts)}; "
            "record more checkpoints or use --map gradient"
        )
    displacement = ends - starts
    width = np.asarray(spacing, dtype=np.float64)

    def point_map(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        scaled = (points[:, None, :] - starts[None, :, :]) / width
        weight = np.exp(-0.5 * np.sum(scaled**2, axis=-1))
        total = weight.sum(axis=1)
        mean = np.divide(weight @ displacement, total[:, None], out=np.zeros_like(points), where=total[:, None] > 0)
        images = np.where((total >= MIN_WEIGHT)[:, None], points + mean, np.nan)
        return images, np.zeros(len(points))

    return point_map
