"""Finite differences over the checkpoints of a trajectory, in full parameter space.

The update into checkpoint t is ``d_t = theta_t - theta_{t-1}``. Every diagnostic is
an array of length T aligned with the checkpoints, so it can be plotted against
`step` directly. An entry that needs a checkpoint before the first or after the last
is NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from doodl3_cli.errors import AnalysisError


@dataclass
class TrajectoryDiagnostics:
    """Update statistics of one trajectory.

    Attributes
    ----------
    name : str
        Trajectory name in trajectory.h5.
    step : ndarray of shape (T,), int64
        Training step of each checkpoint.
    step_length : ndarray of shape (T,), float64
        ``||theta_t - theta_{t-1}||``, the Euclidean length of the update into
        checkpoint t in parameter units. NaN at t = 0.
    speed : ndarray of shape (T,), float64
        ``step_length[t] / (step[t] - step[t-1])``, parameter units per training
        step. NaN at t = 0 and where the step does not increase.
    cosine : ndarray of shape (T,), float64
        Cosine between the update into checkpoint t and the update out of it. NaN at
        the first and last checkpoint and where either update has zero length. Near 1
        on a straight path and near -1 when training oscillates across a valley.
    loss : ndarray of shape (T,), float64
        The logged training loss of each checkpoint, NaN where not logged.
    path_over_displacement : float
        Summed step lengths over ``||theta_{T-1} - theta_0||``: 1 for a straight path,
        larger for a winding one. NaN with fewer than two checkpoints or with no
        movement at all, and inf when the path returns exactly to its start.
    sharpness_step : ndarray of shape (S,), int64, or None
        Training steps of the checkpoints where the top Hessian eigenvalue was computed.
    sharpness : ndarray of shape (S,), float64, or None
        Top Hessian eigenvalue of the loss at those checkpoints. None when the model
        was not rebuilt.
    """

    name: str
    step: np.ndarray
    step_length: np.ndarray
    speed: np.ndarray
    cosine: np.ndarray
    loss: np.ndarray
    path_over_displacement: float
    sharpness_step: Optional[np.ndarray] = None
    sharpness: Optional[np.ndarray] = None


def update_diagnostics(
    name: str,
    params: np.ndarray,
    step: np.ndarray,
    loss: np.ndarray | None = None,
) -> TrajectoryDiagnostics:
    """Compute step length, speed, update cosine and path ratio of a trajectory.

    Rows are read one at a time and differenced in float64, so `params` may also be
    an ``h5py.Dataset`` larger than memory.

    Parameters
    ----------
    name : str
        Trajectory name, stored in the result.
    params : ndarray of shape (T, P)
        Flattened parameters of each checkpoint, in training order.
    step : ndarray of shape (T,), int64
        Training step of each checkpoint.
    loss : ndarray of shape (T,), float64, optional
        Logged loss of each checkpoint, all NaN when omitted.

    Returns
    -------
    TrajectoryDiagnostics

    Raises
    ------
    AnalysisError
        When `params` is not two-dimensional or `step` or `loss` has another length.
    """
    if len(params.shape) != 2:
        raise AnalysisError(f"trajectory '{name}': params must have shape (T, P), got {params.shape}")
    n = params.shape[0]
    step = np.asarray(step, dtype=np.int64)
    if step.shape != (n,):
        raise AnalysisError(f"trajectory '{name}': step must have shape ({n},) like params, got {step.shape}")
    loss = np.full(n, np.nan) if loss is None else np.asarray(loss, dtype=np.float64)
    if loss.shape != (n,):
        raise AnalysisError(f"trajectory '{name}': loss must have shape ({n},) like params, got {loss.shape}")

    step_length = np.full(n, np.nan)
    cosine = np.full(n, np.nan)
    previous_update_norm = np.nan
    previous_update = None
    previous = np.asarray(params[0], dtype=np.float64) if n else None
    for t in range(1, n):
        current = np.asarray(params[t], dtype=np.float64)
        update = current - previous
        norm = float(np.linalg.norm(update))
        step_length[t] = norm
        if previous_update is not None and norm > 0 and previous_update_norm > 0:
            cosine[t - 1] = float(np.dot(previous_update, update)) / (previous_update_norm * norm)
        previous, previous_update, previous_update_norm = current, update, norm

    elapsed = np.full(n, np.nan)
    elapsed[1:] = np.diff(step).astype(np.float64)
    speed = np.divide(step_length, elapsed, out=np.full(n, np.nan), where=elapsed > 0)

    return TrajectoryDiagnostics(
        name=name,
        step=step,
        step_length=step_length,
        speed=speed,
        cosine=np.clip(cosine, -1.0, 1.0),
        loss=loss,
        path_over_displacement=_path_over_displacement(params, step_length),
    )


def _path_over_displacement(params: np.ndarray, step_length: np.ndarray) -> float:
    """Return summed step length over end-to-end distance (see TrajectoryDiagnostics)."""
    n = params.shape[0]
    if n < 2:
        return float("nan")
    path = float(np.sum(step_length[1:]))
    displacement = float(np.linalg.norm(np.asarray(params[n - 1], np.float64) - np.asarray(params[0], np.float64)))
    if displacement > 0:
        return path / displacement
    return float("inf") if path > 0 else float("nan")
