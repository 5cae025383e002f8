"""Diagnostics of an ensemble of recorded runs: flags per run, measures across runs, findings.

Per run: the update diagnostics of `doodl3_cli.dynamics.trajectories`, the top
Hessian eigenvalue at a few evenly spaced checkpoints, and the flags of
`doodl3_cli.dynamics.diagnostics`. Across runs: distances between final states,
pairwise prediction disagreement and the per-sample entropy of the mean predicted
probabilities on the evaluation data. The last three and the eigenvalues need the
model, so they are computed only when an `EvaluationSetup` is given.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from doodl3_cli.artifacts.trajectory import Layout, Trajectory
from doodl3_cli.dynamics.diagnostics import (
    Finding,
    find_divergence,
    find_loss_instability,
    find_oscillation,
    find_plateaus,
    find_sharpness,
)
from doodl3_cli.dynamics.trajectories import TrajectoryDiagnostics, update_diagnostics

if TYPE_CHECKING:
    from doodl3_cli.evaluate import EvaluationSetup

log = logging.getLogger(__name__)

SHARPNESS_CHECKPOINTS = 3
LEARNING_RATE_KEYS = ("lr", "learning_rate")


@dataclass
class EnsembleDiagnostics:
    """Everything the ensemble analysis computes.

    Attributes
    ----------
    runs : list of str
        Trajectory names, R of them, in the order of every per-run array.
    trajectories : list of TrajectoryDiagnostics
        Per-run diagnostics, sharpness included where a model was given.
    final_distance : ndarray of shape (R, R), float64
        Euclidean distance between the final parameter vectors of two runs.
    disagreement : ndarray of shape (R, R), float64, or None
        Fraction of evaluation samples on which the argmax predictions of the final
        states of two runs differ. None without a model or for a model whose
        targets are not integer class labels.
    entropy : ndarray of shape (N,), float64, or None
        Entropy in nats of the mean of the R predicted distributions, per evaluation
        sample: 0 where every run predicts one class with certainty, up to ln(C).
        None when `disagreement` is.
    findings : list of Finding
    """

    runs: list[str]
    trajectories: list[TrajectoryDiagnostics]
    final_distance: np.ndarray
    disagreement: np.ndarray | None = None
    entropy: np.ndarray | None = None
    findings: list[Finding] = field(default_factory=list)


def learning_rate(trajectory: Trajectory, index: int = -1) -> float | None:
    """Return the recorded learning rate at a checkpoint: metric ``lr``, else attribute ``learning_rate`` or ``lr``."""
    for key in LEARNING_RATE_KEYS:
        values = trajectory.metrics.get(key)
        if values is not None and len(values) and math.isfinite(float(values[index])):
            return float(values[index])
    for key in LEARNING_RATE_KEYS:
        value = trajectory.attrs.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
            return float(value)
    return None


def diagnose_ensemble(
    trajectories: list[Trajectory],
    layout: Layout,
    setup: EvaluationSetup | None = None,
    *,
    sharpness_checkpoints: int = SHARPNESS_CHECKPOINTS,
) -> EnsembleDiagnostics:
    """Compute per-run diagnostics, flags, ensemble measures and findings.

    Parameters
    ----------
    trajectories : list of Trajectory
        The recorded runs, each with its logged ``loss`` metric where available.
    layout : Layout
        Flattening of the parameters, shared by every run.
    setup : EvaluationSetup, optional
        Model, data and loss from doodl3.toml. Without it the sharpness, the
        disagreement and the entropy are skipped.
    sharpness_checkpoints : int
        Number of evenly spaced checkpoints per run, first and last included, at
        which the top Hessian eigenvalue is computed. 0 skips it.

    Returns
    -------
    EnsembleDiagnostics
    """
    # Imported here so that reading dynamics.h5 does not import torch.
    from doodl3_cli.dynamics.hessian import predicted_probabilities, top_hessian_eigenvalue

    diagnostics = []
    for trajectory in trajectories:
        result = update_diagnostics(trajectory.name, trajectory.params, trajectory.step, trajectory.metrics.get("loss"))
        if setup is not None and sharpness_checkpoints > 0 and len(trajectory.step):
            indices = np.unique(np.linspace(0, len(trajectory.step) - 1, sharpness_checkpoints).round().astype(int))
            result.sharpness_step = trajectory.step[indices].astype(np.int64)
            result.sharpness = np.array(
                [top_hessian_eigenvalue(setup, layout, trajectory.params[i]) for i in indices], dtype=np.float64
            )
        diagnostics.append(result)
        log.info("trajectory %s: %d checkpoints, path over displacement %.4g",
                 trajectory.name, len(result.step), result.path_over_displacement)

    findings = _run_findings(trajectories, diagnostics)
    finals = np.array([t.params[-1] for t in trajectories], dtype=np.float64).reshape(len(trajectories), -1)
    distance = np.linalg.norm(finals[:, None, :] - finals[None, :, :], axis=-1) if len(finals) else np.zeros((0, 0))
    ensemble = EnsembleDiagnostics(
        runs=[t.name for t in trajectories], trajectories=diagnostics, final_distance=distance, findings=findings
    )
    predictions = [] if setup is None else [predicted_probabilities(setup, layout, t.params[-1]) for t in trajectories]
    if setup is not None and any(p is None for p in predictions):
        log.info("the model is not a classifier: skipping the prediction disagreement and the entropy")
    elif predictions:
        probabilities = np.stack(predictions)
        labels = probabilities.argmax(axis=-1)
        ensemble.disagreement = (labels[:, None, :] != labels[None, :, :]).mean(axis=-1)
        mean = probabilities.mean(axis=0)
        ensemble.entropy = -np.sum(mean * np.log(np.where(mean > 0, mean, 1.0)), axis=-1)
    return ensemble


def _run_findings(trajectories: list[Trajectory], diagnostics: list[TrajectoryDiagnostics]) -> list[Finding]:
    """Apply the per-run flag rules, with the ensemble's best final loss and best descent rate as references."""
    finals = [d.loss[-1] for d in diagnostics if len(d.loss) and np.isfinite(d.loss[-1])]
    best_loss = float(min(finals)) if finals else float("nan")
    rates = []
    for d in diagnostics:
        path = float(np.nansum(d.step_length))
        if len(d.loss) > 1 and path > 0 and np.isfinite(d.loss).all():
            rates.append((d.loss[0] - float(np.min(d.loss))) / path)
    reference_rate = max(rates) if rates else float("nan")

    findings: list[Finding] = []
    for trajectory, d in zip(trajectories, diagnostics):
        rate = learning_rate(trajectory)
        findings += find_oscillation(d, learning_rate=rate)
        findings += find_loss_instability(d, learning_rate=rate)
        findings += find_plateaus(d, best_loss, reference_rate)
        findings += find_divergence(d)
        if d.sharpness is not None:
            findings += find_sharpness(d.name, d.sharpness_step, d.sharpness, rate)
    return findings


EARLY_FRACTION = 0.2


@dataclass
class SliceEnsemble:
    """The attractor regions of one slice that the runs of the ensemble pass through and end in.

    Attributes
    ----------
    runs : list of str
        Trajectory names with placements on the slice, R of them.
    early_region : ndarray of shape (R,), int32
        Region of each run's checkpoint at `EARLY_FRACTION` of its checkpoints.
    final_region : ndarray of shape (R,), int32
        Region of each run's last checkpoint: the Morse set of its attractor, or a
        negative region code.
    groups : dict of int to list of str
        Runs by final region.
    early_matches_final : float
        Fraction of runs whose early region equals their final region, NaN without runs.
    final_loss_eta2 : float
        Share of the variance of the final loss between runs explained by the early
        region (correlation ratio eta squared, 0 to 1). NaN with fewer than two runs,
        without logged losses or when the final losses are all equal.
    """

    runs: list[str]
    early_region: np.ndarray
    final_region: np.ndarray
    groups: dict[int, list[str]]
    early_matches_final: float
    final_loss_eta2: float


def correlation_ratio(groups: np.ndarray, values: np.ndarray) -> float:
    """Return eta squared: between-group over total sum of squares of `values` grouped by `groups`."""
    keep = np.isfinite(values)
    groups, values = groups[keep], values[keep]
    if values.size < 2:
        return float("nan")
    total = float(np.sum((values - values.mean()) ** 2))
    if total == 0:
        return float("nan")
    between = sum(
        float(np.sum(groups == g)) * (float(values[groups == g].mean()) - float(values.mean())) ** 2
        for g in np.unique(groups)
    )
    return between / total


def slice_ensemble(
    placements: dict[str, np.ndarray], final_loss: dict[str, float], *, early_fraction: float = EARLY_FRACTION
) -> SliceEnsemble:
    """Group the runs by the attractor region of their last checkpoint on one slice.

    Parameters
    ----------
    placements : dict of str to ndarray of shape (T,), int32
        Region of each checkpoint of each run, from `analyse_slice`.
    final_loss : dict of str to float
        Final logged loss of each run, NaN where unknown.
    early_fraction : float
        Position of the early checkpoint as a fraction of the run's checkpoints.

    Returns
    -------
    SliceEnsemble
    """
    runs = [name for name, placement in placements.items() if len(placement)]
    early = np.array(
        [placements[r][int(round(early_fraction * (len(placements[r]) - 1)))] for r in runs], dtype=np.int32
    )
    final = np.array([placements[r][-1] for r in runs], dtype=np.int32)
    groups: dict[int, list[str]] = {}
    for run, region in zip(runs, final.tolist()):
        groups.setdefault(int(region), []).append(run)
    losses = np.array([final_loss.get(r, np.nan) for r in runs], dtype=np.float64)
    return SliceEnsemble(
        runs=runs,
        early_region=early,
        final_region=final,
        groups=groups,
        early_matches_final=float(np.mean(early == final)) if runs else float("nan"),
        final_loss_eta2=correlation_ratio(early, losses),
    )


def split_finding(slice_name: str, ensemble: SliceEnsemble, final_loss: dict[str, float]) -> Finding | None:
    """Return an ``ensemble_split`` finding when the runs end in more than one attractor region, else None."""
    attractors = {region: runs for region, runs in ensemble.groups.items() if region >= 0}
    if len(attractors) < 2:
        return None
    mean_loss = {
        str(region): float(np.nanmean([final_loss.get(r, np.nan) for r in runs])) if any(
            np.isfinite(final_loss.get(r, np.nan)) for r in runs) else None
        for region, runs in attractors.items()
    }
    return Finding(
        kind="ensemble_split",
        severity="info",
        runs=[r for runs in attractors.values() for r in runs],
        steps=[],
        evidence={
            "slice": slice_name,
            "groups": {str(region): runs for region, runs in attractors.items()},
            "mean_final_loss": mean_loss,
            "early_matches_final": ensemble.early_matches_final,
            "final_loss_eta2": ensemble.final_loss_eta2,
        },
        suggestion=(
            "the runs end in different basins of this slice; compare the groups' final losses and, if one basin "
            "is worse, change the initialisation or the early learning-rate schedule that sends runs there"
        ),
    )
