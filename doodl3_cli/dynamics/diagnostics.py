"""Flagged training segments and the findings that the report turns into text.

Every rule reads the per-checkpoint diagnostics of one trajectory
(`TrajectoryDiagnostics`) and returns `Finding` objects. The thresholds are the
module constants below. They are defaults that a finding states in its evidence,
not universal constants.

Oscillation
    At least `OSCILLATION_MIN_CHECKPOINTS` successive checkpoints whose update
    cosine is below `OSCILLATION_COSINE`: the updates into and out of each
    checkpoint point in nearly opposite directions, so the run bounces across a
    valley.
Loss instability
    A window of `INSTABILITY_WINDOW` successive recorded intervals (the whole run
    when it is shorter, but at least `INSTABILITY_MIN_INTERVALS`) in which at least
    `INSTABILITY_FRACTION` of the intervals raise the loss by more than
    `INSTABILITY_RISE` of its value. Gradient descent above the stability limit
    ``2 / learning rate`` bounces with a period of a few steps. With checkpoints
    several steps apart that bounce rarely shows as opposite successive updates,
    but it shows as a loss that keeps going up between checkpoints. Descending
    runs rise only at isolated spikes.
Plateau
    At least `PLATEAU_MIN_UPDATES` successive updates whose loss change per unit
    of path, ``|loss[t-1] - loss[t]| / step_length[t]``, is below
    `PLATEAU_EFFICIENCY` times the reference rate. The reference rate is the best
    ``(loss[0] - min loss) / path length`` over the ensemble's runs. The loss must
    also stay above ``best + PLATEAU_GAP * (loss[0] - best)``, where best is the
    lowest final loss of the ensemble.
Divergence
    A non-finite loss, or a loss that rises over at least `DIVERGENCE_MIN_UPDATES`
    successive updates by more than `DIVERGENCE_RISE` of its value before the rise.
Sharpness
    A checkpoint whose top Hessian eigenvalue exceeds ``2 / learning rate``, the
    largest curvature along which gradient descent with that step is stable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from doodl3_cli.dynamics.trajectories import TrajectoryDiagnostics

OSCILLATION_COSINE = -0.5
OSCILLATION_MIN_CHECKPOINTS = 3
PLATEAU_EFFICIENCY = 0.05
PLATEAU_GAP = 0.25
PLATEAU_MIN_UPDATES = 4
DIVERGENCE_RISE = 0.1
DIVERGENCE_MIN_UPDATES = 3
INSTABILITY_RISE = 0.05
INSTABILITY_WINDOW = 20
INSTABILITY_MIN_INTERVALS = 8
INSTABILITY_FRACTION = 0.3

SEVERITIES = ("info", "warning", "error")
# Finding kinds whose steps are the first and last step of a flagged stretch of training.
SEGMENT_KINDS = ("oscillation", "loss_instability", "plateau", "divergence")


@dataclass
class Finding:
    """One flagged behaviour of one or more runs.

    Attributes
    ----------
    kind : str
        ``"oscillation"``, ``"loss_instability"``, ``"plateau"``, ``"divergence"``,
        ``"sharpness"`` or ``"ensemble_split"``.
    severity : str
        ``"info"``, ``"warning"`` or ``"error"``.
    runs : list of str
        Trajectory names concerned.
    steps : list of int
        First and last training step of the segment, or the steps of the checkpoints
        concerned.
    evidence : dict
        The measured values and the thresholds they were compared with.
    suggestion : str
        A change to the training setup that addresses the finding.
    """

    kind: str
    severity: str
    runs: list[str]
    steps: list[int]
    evidence: dict[str, Any] = field(default_factory=dict)
    suggestion: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Return the finding as a JSON-serialisable dict."""
        return asdict(self)


def segments(mask: np.ndarray, min_length: int) -> list[tuple[int, int]]:
    """Return (first, last) index pairs of the runs of True in `mask` with at least `min_length` entries."""
    padded = np.concatenate([[False], np.asarray(mask, dtype=bool), [False]])
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    starts, stops = changes[0::2], changes[1::2]
    return [(int(a), int(b) - 1) for a, b in zip(starts, stops) if b - a >= min_length]


def find_oscillation(diagnostics: TrajectoryDiagnostics, *, learning_rate: float | None = None) -> list[Finding]:
    """Flag runs of successive checkpoints whose update cosine is below `OSCILLATION_COSINE`."""
    cosine = np.asarray(diagnostics.cosine, dtype=np.float64)
    findings = []
    for first, last in segments(np.nan_to_num(cosine, nan=1.0) < OSCILLATION_COSINE, OSCILLATION_MIN_CHECKPOINTS):
        suggestion = "lower the learning rate or add momentum damping; the updates reverse direction at every step"
        if learning_rate is not None:
            suggestion = f"lower the learning rate below {learning_rate:g} (for example to {learning_rate / 2:g})"
        findings.append(Finding(
            kind="oscillation",
            severity="warning",
            runs=[diagnostics.name],
            steps=[int(diagnostics.step[first]), int(diagnostics.step[last])],
            evidence={
                "mean_cosine": float(np.mean(cosine[first:last + 1])),
                "checkpoints": last - first + 1,
                "cosine_threshold": OSCILLATION_COSINE,
            },
            suggestion=suggestion,
        ))
    return findings


def find_loss_instability(diagnostics: TrajectoryDiagnostics, *, learning_rate: float | None = None) -> list[Finding]:
    """Flag stretches of training in which the loss rises between many successive checkpoints.

    Parameters
    ----------
    diagnostics : TrajectoryDiagnostics
    learning_rate : float or None
        Recorded learning rate of the run, for the suggestion.

    Returns
    -------
    list of Finding
        One ``loss_instability`` warning per maximal stretch covered by flagged
        windows. Its steps run from the checkpoint before the first rise in the
        stretch to the checkpoint after the last.
    """
    loss = np.asarray(diagnostics.loss, dtype=np.float64)
    change = np.diff(loss)
    rises = (change > INSTABILITY_RISE * np.abs(loss[:-1])).astype(np.int64)
    window = min(INSTABILITY_WINDOW, rises.size)
    if window < INSTABILITY_MIN_INTERVALS:
        return []
    needed = math.ceil(INSTABILITY_FRACTION * window)

    counts = np.convolve(rises, np.ones(window, dtype=np.int64), mode="valid")
    flagged = (counts >= needed).astype(np.int64)
    # Interval j lies in the flagged windows that start at j - window + 1 ... j.
    covered = np.convolve(flagged, np.ones(window, dtype=np.int64), mode="full")[: rises.size] > 0

    suggestion = "lower the learning rate, or warm it up, until the loss decreases between most checkpoints"
    if learning_rate is not None:
        suggestion = (f"lower the learning rate below {learning_rate:g} (for example to {learning_rate / 2:g}) "
                      "or warm it up")
    findings = []
    for start, stop in segments(covered, 1):
        rising = start + np.flatnonzero(rises[start:stop + 1])
        first, last = int(rising[0]), int(rising[-1])
        findings.append(Finding(
            kind="loss_instability",
            severity="warning",
            runs=[diagnostics.name],
            steps=[int(diagnostics.step[first]), int(diagnostics.step[last + 1])],
            evidence={
                "rising_intervals": int(rises[first:last + 1].sum()),
                "intervals": last - first + 1,
                "most_rises_in_window": int(counts.max()),
                "window": window,
                "rise_threshold": INSTABILITY_RISE,
                "fraction_threshold": INSTABILITY_FRACTION,
            },
            suggestion=suggestion,
        ))
    return findings


def find_plateaus(diagnostics: TrajectoryDiagnostics, best_loss: float, reference_rate: float) -> list[Finding]:
    """Flag segments with little loss decrease per unit of path while the loss stays well above `best_loss`.

    Parameters
    ----------
    diagnostics : TrajectoryDiagnostics
        Diagnostics of the run, with its logged loss.
    best_loss : float
        Lowest final loss over the ensemble.
    reference_rate : float
        Best loss decrease per unit of path over the ensemble's runs.
    """
    loss = np.asarray(diagnostics.loss, dtype=np.float64)
    length = np.asarray(diagnostics.step_length, dtype=np.float64)
    if loss.size < 2 or not np.isfinite(loss).all() or not (np.isfinite(best_loss) and reference_rate > 0):
        return []

    efficiency = np.full(loss.size, np.nan)
    efficiency[1:] = np.divide(
        loss[:-1] - loss[1:], length[1:], out=np.zeros(loss.size - 1), where=length[1:] > 0
    )
    high = loss > best_loss + PLATEAU_GAP * max(loss[0] - best_loss, 0.0)
    # A loss that rises along the path is instability or divergence, not a plateau.
    slow = np.abs(np.nan_to_num(efficiency, nan=np.inf)) < PLATEAU_EFFICIENCY * reference_rate
    findings = []
    for first, last in segments(slow & high, PLATEAU_MIN_UPDATES):
        findings.append(Finding(
            kind="plateau",
            severity="warning",
            runs=[diagnostics.name],
            steps=[int(diagnostics.step[max(first - 1, 0)]), int(diagnostics.step[last])],
            evidence={
                "loss_start": float(loss[max(first - 1, 0)]),
                "loss_end": float(loss[last]),
                "best_loss": float(best_loss),
                "mean_efficiency": float(np.mean(efficiency[first:last + 1])),
                "reference_efficiency": float(reference_rate),
                "efficiency_threshold": PLATEAU_EFFICIENCY,
                "gap_threshold": PLATEAU_GAP,
            },
            suggestion=(
                "the run is stuck above the ensemble's best loss; raise the learning rate, change the "
                "initialisation scale or use an adaptive optimiser"
            ),
        ))
    return findings


def find_divergence(diagnostics: TrajectoryDiagnostics) -> list[Finding]:
    """Flag a non-finite loss and sustained rises of the loss."""
    loss = np.asarray(diagnostics.loss, dtype=np.float64)
    logged = ~np.isnan(loss)
    findings = []
    broken = np.flatnonzero(logged & ~np.isfinite(loss))
    if broken.size:
        findings.append(Finding(
            kind="divergence",
            severity="error",
            runs=[diagnostics.name],
            steps=[int(diagnostics.step[broken[0]]), int(diagnostics.step[broken[-1]])],
            evidence={"non_finite_checkpoints": int(broken.size)},
            suggestion="the loss became infinite or NaN; lower the learning rate or clip the gradients",
        ))

    finite = np.isfinite(loss)
    rising = np.zeros(loss.size, dtype=bool)
    rising[1:] = finite[1:] & finite[:-1] & (np.where(finite[1:], loss[1:], 0.0) > np.where(finite[:-1], loss[:-1], 0.0))
    for first, last in segments(rising, DIVERGENCE_MIN_UPDATES):
        before, after = loss[first - 1], loss[last]
        if after <= before * (1.0 + DIVERGENCE_RISE):
            continue
        findings.append(Finding(
            kind="divergence",
            severity="error",
            runs=[diagnostics.name],
            steps=[int(diagnostics.step[first - 1]), int(diagnostics.step[last])],
            evidence={"loss_start": float(before), "loss_end": float(after), "rise_threshold": DIVERGENCE_RISE},
            suggestion="lower the learning rate or clip the gradient norm",
        ))
    return findings


def find_sharpness(
    name: str, steps: np.ndarray, eigenvalues: np.ndarray, learning_rate: float | None
) -> list[Finding]:
    """Flag checkpoints whose top Hessian eigenvalue exceeds 2 / learning rate.

    Parameters
    ----------
    name : str
        Trajectory name.
    steps : ndarray of shape (S,), int64
        Training steps of the probed checkpoints.
    eigenvalues : ndarray of shape (S,), float64
        Top Hessian eigenvalue at each of them.
    learning_rate : float or None
        Recorded learning rate. Nothing is flagged without it.
    """
    if learning_rate is None or not (math.isfinite(learning_rate) and learning_rate > 0):
        return []
    limit = 2.0 / learning_rate
    above = np.asarray(eigenvalues) > limit
    if not above.any():
        return []
    return [Finding(
        kind="sharpness",
        severity="warning",
        runs=[name],
        steps=[int(s) for s in np.asarray(steps)[above]],
        evidence={
            "top_eigenvalues": [float(v) for v in np.asarray(eigenvalues)[above]],
            "stability_limit": limit,
            "learning_rate": float(learning_rate),
        },
        suggestion=(
            f"the curvature exceeds 2 / learning rate = {limit:.4g}, where gradient descent is unstable; "
            f"lower the learning rate below {2.0 / float(np.max(eigenvalues)):.4g}"
        ),
    )]
