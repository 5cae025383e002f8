"""The ensemble section: how far the runs' final states are apart and what lies between them.

Distances are Euclidean, in parameter units, between the last recorded checkpoints
of trajectory.h5 (computed here with scipy, nothing is stored). The loss barrier of
a pair of runs comes from the lines of landscape.h5 (`doodl3 sample` with lines),
and prediction disagreement from dynamics.h5 when that file contains it.
"""

from __future__ import annotations

import html
import logging
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from scipy.spatial.distance import pdist, squareform

from doodl3_cli.artifacts.trajectory import Trajectory
from doodl3_cli.report.content import RunContent
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
from doodl3_cli.report.html import Cell, Section, figure_div, note, table

log = logging.getLogger(__name__)

MAX_MATRIX_RUNS = 60
DISTANCE_COLORSCALE = "Blues"


def final_states(trajectories: Sequence[Trajectory]) -> tuple[list[str], np.ndarray]:
    """Return the names of the runs with at least one checkpoint and their last parameter vectors.

    Returns
    -------
    names : list of str
    states : ndarray of shape (N, P), float64
    """
    kept = [t for t in trajectories if len(t.params)]
    if not kept:
        return [], np.empty((0, 0))
    return [t.name for t in kept], np.stack([np.asarray(t.params[-1], dtype=np.float64) for t in kept])


def final_distances(trajectories: Sequence[Trajectory]) -> tuple[list[str], np.ndarray]:
    """Compute the Euclidean distance between the final states of every pair of runs.

    Returns
    -------
    names : list of str
        Runs with at least one checkpoint, in recording order.
    distances : ndarray of shape (N, N), float64
        Symmetric, zero on the diagonal, in parameter units.
    """
    names, states = final_states(trajectories)
    if len(names) < 2:
        return names, np.zeros((len(names), len(names)))
    return names, squareform(pdist(states, metric="euclidean"))


def distance_matrix_figure(
    names: Sequence[str], distances: np.ndarray, *, basins: dict[str, int] | None = None, max_runs: int = MAX_MATRIX_RUNS
) -> go.Figure:
    """Draw the final-state distances as a heatmap, one row and column per run.

    Parameters
    ----------
    names : sequence of str
        Run names, the order of `distances`.
    distances : ndarray of shape (N, N), float64
        Pairwise distances in parameter units.
    basins : dict of str to int, optional
        Final basin of each run, shown in the hover text.
    max_runs : int
        Only the first `max_runs` runs are drawn, so the figure stays small.
    """
    basins = basins or {}
    return _pair_matrix_figure(
        names, distances,
        title="Distances between the final states",
        note="Euclidean distance between the last checkpoints of each pair of runs, in parameter units",
        quantity="distance",
        label=lambda name: f"{name} (basin {_basin(basins, name)})",
        max_runs=max_runs,
    )


def disagreement_figure(names: Sequence[str], disagreement: np.ndarray, *, max_runs: int = MAX_MATRIX_RUNS) -> go.Figure:
    """Draw the prediction disagreement of every pair of final states as a heatmap, in percent.

    Parameters
    ----------
    names : sequence of str
        Run names, the order of `disagreement`.
    disagreement : ndarray of shape (N, N), float64
        Fraction of evaluation samples on which the argmax predictions of two runs differ.
    max_runs : int
        Only the first `max_runs` runs are drawn.
    """
    return _pair_matrix_figure(
        names, 100.0 * np.asarray(disagreement, dtype=np.float64),
        title="Prediction disagreement between the final states",
        note="percentage of evaluation samples on which two runs predict different classes",
        quantity="disagreement, %",
        label=str,
        max_runs=max_runs,
    )


def _pair_matrix_figure(
    names: Sequence[str], values: np.ndarray, *, title: str, note: str, quantity: str, label, max_runs: int
) -> go.Figure:
    """Draw a symmetric run-by-run matrix as a heatmap, with both runs and the value in the hover text."""
    shown = list(names)[:max_runs]
    matrix = values[: len(shown), : len(shown)]
    hover = [
        [f"{label(a)}<br>{label(b)}<br>{quantity} {format_number(matrix[i, j])}" for j, b in enumerate(shown)]
        for i, a in enumerate(shown)
    ]
    notes = [note]
    if len(names) > max_runs:
        notes.append(f"the first {max_runs} of {len(names)} runs are shown")

    fig = go.Figure(
        go.Heatmap(
            x=shown, y=shown, z=masked(matrix), text=hover, hovertemplate="%{text}<extra></extra>",
            colorscale=DISTANCE_COLORSCALE, colorbar={"title": {"text": quantity}},
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        height=min(900, 260 + 18 * len(shown)),
        title=_title(title, notes),
        yaxis={"autorange": "reversed", "scaleanchor": "x", "constrain": "domain"},
        xaxis={"tickangle": -45, "constrain": "domain"},
        margin={"t": 90},
    )
    return fig


def _basin(basins: dict[str, int], name: str) -> str:
    basin = basins.get(name)
    if basin is None or basin < 0:
        return "none"
    return f"m{basin}"


def distance_summary(names: Sequence[str], distances: np.ndarray, basins: dict[str, int]) -> str:
    """Compare the mean distance between runs that end in the same basin with runs that end in different ones.

    Returns '' when there are fewer than two runs with a basin.
    """
    labelled = [(k, basins[n]) for k, n in enumerate(names) if basins.get(n, -1) >= 0]
    same, different = [], []
    for a in range(len(labelled)):
        for b in range(a + 1, len(labelled)):
            (i, basin_i), (j, basin_j) = labelled[a], labelled[b]
            (same if basin_i == basin_j else different).append(distances[i, j])
    parts = []
    if same:
        parts.append(f"runs that end in the same basin are {format_number(np.mean(same))} apart on average "
                     f"({len(same)} pairs)")
    if different:
        parts.append(f"runs that end in different basins are {format_number(np.mean(different))} apart "
                     f"({len(different)} pairs)")
    if not parts:
        return ""
    return "On the slice's basins, " + " and ".join(parts) + "."


def barrier_figure(lines: Sequence, *, max_traces: int = MAX_TRAJECTORY_TRACES) -> go.Figure:
    """Plot the loss along every line of landscape.h5 against the position t, marking each barrier.

    Parameters
    ----------
    lines : sequence of LandscapeLine
        Each with `t` (ndarray of shape (n,)), `loss` and attributes ``start``,
        ``end``, ``barrier`` and ``barrier_t``.
    max_traces : int
        Lines beyond ``max_traces - 1`` share one trace.
    """
    by_name = {line.name: line for line in lines}
    fig = go.Figure()
    for index, (label, members) in enumerate(group_trajectories(list(by_name), max_traces)):
        parts = [by_name[m] for m in members]
        fig.add_trace(
            go.Scatter(
                x=masked(_joined(p.t for p in parts)), y=masked(_joined(p.loss for p in parts)),
                mode="lines", name=_line_label(parts[0]) if len(parts) == 1 else label, legendgroup=label,
                line={"color": trajectory_color(index), "width": 2},
                hovertemplate="t %{x:.3g}<br>loss %{y:.4g}<extra>" + html.escape(label) + "</extra>",
            )
        )
    peaks = [(line, float(line.attrs.get("barrier_t", np.nan))) for line in lines]
    peaks = [(line, t) for line, t in peaks if np.isfinite(t)]
    if peaks:
        fig.add_trace(
            go.Scatter(
                x=[t for _, t in peaks],
                y=masked(np.array([np.interp(t, line.t, line.loss) for line, t in peaks])),
                mode="markers", name="barrier (largest excess over the straight line)",
                marker={"symbol": "x", "size": 10, "color": "black"},
                text=[f"{_line_label(line)}<br>barrier {format_number(line.attrs.get('barrier'))}" for line, _ in peaks],
                hovertemplate="%{text}<extra></extra>",
            )
        )
    fig.add_vline(x=0.0, line={"color": "grey", "width": 1, "dash": "dot"})
    fig.add_vline(x=1.0, line={"color": "grey", "width": 1, "dash": "dot"})
    fig.update_layout(
        template=TEMPLATE,
        height=460,
        title=_title("Loss along the straight line between final states",
                     ["t = 0 at the first run's final state, t = 1 at the second's"]),
        xaxis={"title": {"text": "t"}},
        yaxis={"title": {"text": "loss"}},
        legend={"orientation": "h", "y": -0.18, "x": 0.0},
    )
    return fig


def _line_label(line) -> str:
    start, end = line.attrs.get("start"), line.attrs.get("end")
    return f"{start} to {end}" if start and end else line.name


def barrier_table(lines: Sequence) -> str:
    """Tabulate the start, end, distance and barrier of every line."""
    rows = [
        [
            Cell(line.name),
            Cell(str(line.attrs.get("start", "not recorded"))),
            Cell(str(line.attrs.get("end", "not recorded"))),
            Cell(format_number(line.attrs.get("distance")), numeric=True),
            Cell(format_number(line.attrs.get("barrier")), numeric=True),
            Cell(format_number(line.attrs.get("barrier_t")), numeric=True),
        ]
        for line in lines
    ]
    return table(["line", "from", "to", "distance", "loss barrier", "at t"], rows)


def ensemble_section(content: RunContent) -> Section:
    """Build the ensemble section: final-state distances, loss barriers and prediction disagreement."""
    section = Section(
        "ensemble", "6. Ensemble",
        "How the runs' end points relate: their distances in parameter space and the loss on the straight line "
        "between two of them. A barrier near zero means the two end points are linearly connected (one basin in "
        "the full space); a high barrier means a ridge separates them.",
    )
    names, distances = final_distances(content.trajectories)
    if len(names) < 2:
        section.add(note("The ensemble section needs at least two recorded runs.",
                         command=content.command("record")))
        return section

    topology = next(iter(content.topologies.values()), None)
    basins = topology.final_basins if topology is not None else {}
    section.add(figure_div(distance_matrix_figure(names, distances, basins=basins), "ensemble-distances"))
    summary = distance_summary(names, distances, basins)
    if summary:
        section.add(note(summary))

    measures = content.ensemble
    disagreement = getattr(measures, "disagreement", None) if measures is not None else None
    if disagreement is not None:
        section.add(figure_div(disagreement_figure(measures.runs, disagreement), "ensemble-disagreement"))
        entropy = getattr(measures, "entropy", None)
        if entropy is not None and np.isfinite(entropy).any():
            section.add(note(
                f"Entropy of the ensemble's mean predicted distribution over {len(entropy)} evaluation samples: "
                f"mean {format_number(np.nanmean(entropy))} nats, largest {format_number(np.nanmax(entropy))} nats "
                "(0 where every run predicts one class with certainty)."
            ))
    elif "dynamics" in content.problems:
        section.add(note("The prediction disagreement is left out: dynamics.h5 is not available.",
                         command=content.command("dynamics")))
    else:
        section.add(note(
            "The prediction disagreement is left out: dynamics.h5 contains none, because the dynamics stage could "
            "not rebuild the model from doodl3.toml or the file was written by an older doodl3.",
            command=content.command("dynamics"),
        ))

    if content.lines:
        section.add(figure_div(barrier_figure(content.lines), "ensemble-barriers"))
        section.add(barrier_table(content.lines))
    elif "sample" not in content.problems:
        section.add(note("The loss barrier is left out: landscape.h5 contains no line between final states.",
                         command=f"{content.command('sample')} --line RUN_A:RUN_B"))
    else:
        section.add(note("The loss barrier is left out: landscape.h5 is not available.", command=content.command("sample")))
    return section
