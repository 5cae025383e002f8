"""The training diagnostics figure: loss, speed, update cosine and sharpness of every run over its steps.

Segments that the dynamics stage flagged (oscillation, loss instability, plateau,
divergence) are shaded across every panel, and the top Hessian eigenvalue is drawn against
``2 / learning rate``, the largest curvature along which gradient descent with
that step size is stable.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from doodl3_cli.artifacts.landscape import Projection
from doodl3_cli.artifacts.trajectory import Trajectory
from doodl3_cli.dynamics.ensemble import learning_rate
from doodl3_cli.dynamics.trajectories import TrajectoryDiagnostics
from doodl3_cli.report.display import loss_scale
from doodl3_cli.report.figures import (
    MAX_TRAJECTORY_TRACES,
    TEMPLATE,
    _joined,
    _title,
    format_number,
    group_trajectories,
    masked,
    trajectory_color,
)

MAX_SHADED_SEGMENTS = 40
MAX_STABILITY_LINES = 8
# Colour of the shading of each kind of flagged segment, and its name for the figure's note.
SEGMENT_COLOURS = {
    "oscillation": ("#d62728", "red"),
    "loss_instability": ("#ff7f0e", "orange"),
    "plateau": ("#7f7f7f", "grey"),
    "divergence": ("#9467bd", "purple"),
}


def training_diagnostics(
    trajectories: Sequence[Trajectory],
    *,
    projections: dict[str, Projection] | None = None,
    diagnostics: dict[str, TrajectoryDiagnostics] | None = None,
    findings: Sequence[Any] = (),
    max_trajectories: int = MAX_TRAJECTORY_TRACES,
) -> go.Figure:
    """Plot the loss, speed, cosine between successive updates and sharpness of every run over its steps.

    Parameters
    ----------
    trajectories : sequence of Trajectory
        Gives each run's step, logged training loss (metric ``"loss"``) and learning rate.
    projections : dict of str to Projection, optional
        Adds each checkpoint's own loss on the evaluation set, from landscape.h5.
    diagnostics : dict of str to TrajectoryDiagnostics, optional
        Adds the speed and cosine panels, from dynamics.h5, and the sharpness panel
        when any run has a ``sharpness`` array. Without it the figure has the loss
        panel only.
    findings : sequence of Finding
        Findings of dynamics.h5; those of kind oscillation, loss_instability, plateau
        or divergence shade their steps (at most `MAX_SHADED_SEGMENTS`, first in the given order).
    max_trajectories : int
        Maximum number of run groups; each group has one trace per panel.
    """
    has_sharpness = bool(diagnostics) and any(
        getattr(d, "sharpness", None) is not None and len(d.sharpness) for d in diagnostics.values()
    )
    panels = ["loss"]
    if diagnostics:
        panels += ["speed (parameter distance per step)", "cosine between successive updates"]
    if has_sharpness:
        panels.append("sharpness: top Hessian eigenvalue against 2 / learning rate")
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, subplot_titles=panels, vertical_spacing=0.07)

    by_name = {t.name: t for t in trajectories}
    losses = _add_run_traces(fig, by_name, projections, diagnostics, has_sharpness, max_trajectories)
    notes = ["solid: own loss on the evaluation set; dotted: training loss as logged"]
    scale = loss_scale(np.concatenate(losses) if losses else np.zeros(0))
    if scale.log:
        fig.update_yaxes(type="log", row=1, col=1)
        notes.append(f"log loss axis: the losses span {np.log10(scale.high / scale.low):.1f} decades")
    if diagnostics:
        fig.add_hline(y=0.0, line={"color": "grey", "width": 1, "dash": "dash"}, row=3, col=1)
        fig.update_yaxes(range=[-1.05, 1.05], row=3, col=1)
        notes.append("a cosine near -1 means successive updates point in opposite directions (oscillation)")
    if has_sharpness:
        notes.append(_add_stability_limits(fig, trajectories, row=4))
    notes += _shade_segments(fig, findings, diagnostics or {}, rows=len(panels))

    fig.update_xaxes(title_text="training step", row=len(panels), col=1)
    fig.update_layout(
        template=TEMPLATE,
        height=250 * len(panels) + 140,
        title=_title("Training diagnostics", notes),
        legend={"orientation": "h", "y": -0.06, "x": 0.0},
        margin={"t": 110},
    )
    return fig


def _add_run_traces(
    fig: go.Figure,
    by_name: dict[str, Trajectory],
    projections: dict[str, Projection] | None,
    diagnostics: dict[str, TrajectoryDiagnostics] | None,
    has_sharpness: bool,
    max_trajectories: int,
) -> list[np.ndarray]:
    """Add one trace per run group and curve; return every loss array drawn, for the choice of axis scale."""
    losses = []
    for index, (label, members) in enumerate(group_trajectories(list(by_name), max_trajectories)):
        line = {"color": trajectory_color(index), "width": 1.8}
        shown = False

        def add(x: np.ndarray, y: np.ndarray, row: int, name: str, dash: str = "solid") -> None:
            nonlocal shown
            fig.add_trace(
                go.Scatter(
                    x=masked(x), y=masked(y), mode="lines+markers", name=label, legendgroup=label,
                    showlegend=not shown, line={**line, "dash": dash}, marker={"size": 4},
                    hovertemplate=f"{label}<br>{name}<br>step %{{x}}<br>%{{y:.4g}}<extra></extra>",
                ),
                row=row, col=1,
            )
            shown = True

        if projections and all(m in projections for m in members):
            parts = [projections[m] for m in members]
            values = _joined(p.loss for p in parts)
            add(_joined(p.step for p in parts), values, 1, "loss on the evaluation set")
            losses.append(values)
        logged = [by_name[m] for m in members if "loss" in by_name[m].metrics]
        if logged:
            values = _joined(t.metrics["loss"] for t in logged)
            add(_joined(t.step for t in logged), values, 1, "logged training loss", dash="dot")
            losses.append(values)
        if diagnostics and all(m in diagnostics for m in members):
            parts = [diagnostics[m] for m in members]
            steps = _joined(d.step for d in parts)
            add(steps, _joined(d.speed for d in parts), 2, "speed")
            add(steps, _joined(d.cosine for d in parts), 3, "cosine")
            probed = [d for d in parts if getattr(d, "sharpness", None) is not None and len(d.sharpness)]
            if has_sharpness and probed:
                add(_joined(d.sharpness_step for d in probed), _joined(d.sharpness for d in probed), 4,
                    "top Hessian eigenvalue")
    return losses


def _add_stability_limits(fig: go.Figure, trajectories: Sequence[Trajectory], *, row: int) -> str:
    """Draw ``2 / learning rate`` for every distinct recorded learning rate; return the title note."""
    rates = sorted({rate for rate in (learning_rate(t) for t in trajectories) if rate is not None and rate > 0})
    for rate in rates[:MAX_STABILITY_LINES]:
        fig.add_hline(
            y=2.0 / rate, line={"color": "black", "width": 1, "dash": "dash"}, row=row, col=1,
            annotation_text=f"2 / {rate:g} = {2.0 / rate:.3g}", annotation_position="top right",
        )
    if not rates:
        return "no learning rate was recorded, so 2 / learning rate is not drawn"
    text = "dashed: 2 / learning rate; above it, gradient descent with that step is unstable along the top eigenvector"
    if len(rates) > MAX_STABILITY_LINES:
        text += f" (drawn for the {MAX_STABILITY_LINES} smallest of {len(rates)} learning rates)"
    return text


def _shade_segments(
    fig: go.Figure, findings: Sequence[Any], diagnostics: dict[str, TrajectoryDiagnostics], *, rows: int
) -> list[str]:
    """Shade the steps of every flagged segment on all panels, with one hover trace per kind; return title notes."""
    segments = [f for f in findings if getattr(f, "kind", None) in SEGMENT_COLOURS and len(getattr(f, "steps", [])) >= 1]
    notes = []
    if not segments:
        return notes
    if len(segments) > MAX_SHADED_SEGMENTS:
        notes.append(f"the first {MAX_SHADED_SEGMENTS} of {len(segments)} flagged segments are shaded")
        segments = segments[:MAX_SHADED_SEGMENTS]

    for finding in segments:
        first, last = min(finding.steps), max(finding.steps)
        for row in range(1, rows + 1):
            fig.add_vrect(x0=first, x1=last, fillcolor=SEGMENT_COLOURS[finding.kind][0], opacity=0.12, line_width=0,
                          layer="below", row=row, col=1)
    for kind, (color, _) in SEGMENT_COLOURS.items():
        chosen = [f for f in segments if f.kind == kind]
        if not chosen:
            continue
        x, y, text = [], [], []
        for finding in chosen:
            middle = 0.5 * (min(finding.steps) + max(finding.steps))
            run = diagnostics.get(finding.runs[0]) if finding.runs else None
            x.append(middle)
            y.append(float(np.interp(middle, run.step, run.loss)) if run is not None and len(run.step) else None)
            text.append(f"<b>{kind.replace('_', ' ')}</b> of {', '.join(finding.runs)}, steps {min(finding.steps)} to "
                        f"{max(finding.steps)}<br>{_evidence_text(finding.evidence)}")
        fig.add_trace(
            go.Scatter(
                x=x, y=masked(np.array(y, dtype=np.float64)), mode="markers", name=f"flagged: {kind.replace('_', ' ')}",
                marker={"symbol": "triangle-down", "size": 11, "color": color, "line": {"color": "black", "width": 1}},
                text=text, hovertemplate="%{text}<extra></extra>",
            ),
            row=1, col=1,
        )
    shaded = [
        f"{kind.replace('_', ' ')} in {name}" for kind, (_, name) in SEGMENT_COLOURS.items() if any(f.kind == kind for f in segments)
    ]
    notes.append("shaded: steps flagged by the dynamics stage (" + ", ".join(shaded) + ")")
    return notes


def _evidence_text(evidence: dict) -> str:
    """Format the evidence of a finding as ``key value`` pairs, numbers to 4 significant digits."""
    parts = []
    for key, value in evidence.items():
        if isinstance(value, (list, tuple)):
            value = ", ".join(format_number(v) if isinstance(v, (int, float)) else str(v) for v in value)
        elif isinstance(value, (int, float)):
            value = format_number(value)
        parts.append(f"{key.replace('_', ' ')} {value}")
    return "<br>".join(parts)
