"""Plotly figures of the report, one function per figure.

Every function takes artifact dataclasses that are already in memory and returns a
``plotly.graph_objects.Figure``; nothing here reads or writes files.

Two rules hold for every figure, because the page embeds each figure as JSON and
must open in any browser:

- Non-finite values never reach the JSON. Grid cells that are NaN or infinite are
  replaced by ``None`` (plotly leaves them blank), and each figure that masks cells
  states how many in its title. Colour scales span the finite values only.
- The number of traces is bounded. A figure draws at most `MAX_TRAJECTORY_TRACES`
  trajectories as traces of their own and merges the rest into one trace, and all
  Morse sets share two traces, so an ensemble of hundreds of runs stays responsive.

Loss grids are coloured on the scale that `display.loss_scale` chooses (log10 when
the finite losses span more than two decades) and drawn at most
`display.MAX_DISPLAY_POINTS` samples per axis.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

from doodl3_cli.artifacts.dynamics import SliceDynamics
from doodl3_cli.artifacts.landscape import LandscapeSlice, Projection
from doodl3_cli.artifacts.topology import SliceTopology
from doodl3_cli.dynamics.morse import REGION_NONE, REGION_OUTSIDE, REGION_SEPARATRIX
from doodl3_cli.report.display import LossScale, display_indices, loss_scale, thinning_note

MAX_TRAJECTORY_TRACES = 20
MAX_ARROWS_PER_AXIS = 25

LOSS_COLORSCALE = "Viridis"
STEP_COLORSCALE = "OrRd"
TEMPLATE = "plotly_white"
PALETTE = qualitative.D3

LANDSCAPE_HEIGHT = 620
DIAGRAM_HEIGHT = 520


# --- value helpers -------------------------------------------------------------------------------


def masked(values: np.ndarray) -> list:
    """Convert an array of any shape to nested lists, with None in place of NaN and +-inf."""
    array = np.asarray(values, dtype=np.float64)
    obj = array.astype(object)
    obj[~np.isfinite(array)] = None
    return obj.tolist()


def format_number(value: float, digits: int = 4) -> str:
    """Format a float for hover text and tables; ``n/a`` for NaN, ``inf`` for infinity."""
    if value is None:
        return "n/a"
    value = float(value)
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}g}"


def finite_range(values: np.ndarray) -> tuple[float, float] | None:
    """Return (min, max) of the finite entries, or None when there is none."""
    array = np.asarray(values, dtype=np.float64)
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        return None
    return float(finite.min()), float(finite.max())


def nonfinite_count(values: np.ndarray) -> int:
    """Return the number of NaN and +-inf entries."""
    return int((~np.isfinite(np.asarray(values, dtype=np.float64))).sum())


def trajectory_color(index: int) -> str:
    """Return the line colour of the trajectory at `index` in the run order."""
    return PALETTE[index % len(PALETTE)]


def group_trajectories(names: Sequence[str], max_traces: int = MAX_TRAJECTORY_TRACES) -> list[tuple[str, list[str]]]:
    """Split trajectory names into at most `max_traces` (label, members) groups.

    The first ``max_traces - 1`` runs get a group each, and the rest share one group
    labelled with their count, so the number of traces stays bounded.
    """
    names = list(names)
    if len(names) <= max_traces:
        return [(name, [name]) for name in names]
    own = [(name, [name]) for name in names[: max_traces - 1]]
    rest = names[max_traces - 1:]
    return own + [(f"{len(rest)} more runs", rest)]


def _joined(parts: Iterable[np.ndarray]) -> np.ndarray:
    """Concatenate 1-D or 2-D arrays, separating them with a NaN row so plotly breaks the line."""
    pieces = []
    for part in parts:
        part = np.asarray(part, dtype=np.float64)
        if pieces:
            pieces.append(np.full((1,) + part.shape[1:], np.nan))
        pieces.append(part)
    return np.concatenate(pieces) if pieces else np.empty(0)


def _title(text: str, notes: Sequence[str] = ()) -> dict:
    notes = [note for note in notes if note]
    if notes:
        text = text + "<br><sup>" + "<br>".join(notes) + "</sup>"
    return {"text": text, "x": 0.0, "xanchor": "left"}


def masked_note(count: int, total: int, what: str = "grid cells") -> str:
    """Return the title note that states how many cells were left blank, or '' when none."""
    if count == 0:
        return ""
    return f"{count} of {total} {what} are NaN or infinite and are left blank"


def explained_variance_note(explained: np.ndarray) -> str:
    """Describe how much of the checkpoints' variance the slice plane explains."""
    explained = np.asarray(explained, dtype=np.float64)
    if explained.shape != (2,) or not np.isfinite(explained).all():
        return "explained variance not available (the directions are not PCA directions)"
    first, second = (100 * explained).tolist()
    return (
        f"the plane explains {first:.1f}% + {second:.1f}% = {first + second:.1f}% "
        "of the checkpoints' variance"
    )


# --- the landscape slice -------------------------------------------------------------------------


def _checkpoint_text(
    name: str, projection: Projection, basins: np.ndarray | None = None
) -> list[str]:
    """Build the hover text of every checkpoint: its own loss next to the plane's loss and the residual."""
    texts = []
    for k in range(len(projection.step)):
        lines = [
            f"<b>{name}</b> step {int(projection.step[k])}",
            f"own loss: {format_number(projection.loss[k])}",
            f"loss on the plane: {format_number(projection.loss_on_plane[k])}",
            f"off-plane residual: {format_number(projection.residual[k])}",
        ]
        if basins is not None and k < len(basins):
            lines.append(f"basin: {int(basins[k])}" if basins[k] >= 0 else "basin: none")
        texts.append("<br>".join(lines))
    return texts


def _checkpoint_markers(steps: np.ndarray, last_rows: Sequence[int], step_range: tuple[float, float]) -> dict:
    """Return marker settings coloured by step on the shared step colour axis, with the final checkpoint as a diamond."""
    symbols = np.full(len(steps), "circle", dtype=object)
    sizes = np.full(len(steps), 7)
    for row in last_rows:
        symbols[row] = "diamond"
        sizes[row] = 12
    # The NaN rows that separate merged runs have no position, so their colour is never drawn,
    # but plotly rejects null colours.
    colors = np.where(np.isfinite(steps), steps, step_range[0])
    return {
        "color": colors.tolist(),
        "coloraxis": "coloraxis2",
        "symbol": symbols.tolist(),
        "size": sizes.tolist(),
        "line": {"color": "black", "width": 0.6},
        "cmin": step_range[0],
        "cmax": step_range[1],
    }


def _trajectory_traces(
    projections: dict[str, Projection],
    *,
    assignments: dict[str, np.ndarray] | None,
    height_of: str | None,
    max_traces: int,
) -> list:
    """Build one trace per trajectory group: a line in the run's colour with markers coloured by step.

    `height_of` is None for the 2-D contour, or ``"loss_on_plane"`` to lift the
    checkpoints onto the 3-D surface.
    """
    names = list(projections)
    all_steps = np.concatenate([projections[n].step for n in names]) if names else np.zeros(1)
    step_range = (float(all_steps.min()), float(max(all_steps.max(), all_steps.min() + 1)))
    traces = []
    for index, (label, members) in enumerate(group_trajectories(names, max_traces)):
        parts = [projections[m] for m in members]
        coords = _joined(p.coords for p in parts)
        steps = _joined(p.step for p in parts)
        texts = []
        last_rows = []
        for member, part in zip(members, parts):
            if texts:
                texts.append("")
            basins = assignments.get(member) if assignments else None
            texts.extend(_checkpoint_text(member, part, basins))
            last_rows.append(len(texts) - 1)
        common = {
            "name": label,
            "legendgroup": label,
            "mode": "lines+markers",
            "text": texts,
            "hovertemplate": "%{text}<extra></extra>",
            "line": {"color": trajectory_color(index), "width": 2},
            "marker": _checkpoint_markers(steps, last_rows, step_range),
        }
        if height_of is None:
            traces.append(go.Scatter(x=masked(coords[:, 0]), y=masked(coords[:, 1]), **common))
        else:
            heights = _joined(getattr(p, height_of) for p in parts)
            common["marker"]["size"] = [max(3, s // 2) for s in common["marker"]["size"]]
            common["marker"].pop("line")
            traces.append(
                go.Scatter3d(x=masked(coords[:, 0]), y=masked(coords[:, 1]), z=masked(heights), **common)
            )
    return traces


def _step_coloraxis(projections: dict[str, Projection]) -> dict:
    return {
        "colorscale": STEP_COLORSCALE,
        "colorbar": {"title": {"text": "step"}, "x": 1.12, "len": 0.8},
    }


def _loss_contour(
    landscape: LandscapeSlice, *, scale: LossScale, rows: np.ndarray, cols: np.ndarray
) -> go.Contour:
    loss = landscape.loss[np.ix_(rows, cols)]
    # The grid is indexed [i, j] = (alpha[i], beta[j]) and plotly's z is [row = y][column = x].
    settings = {"z": masked(scale.color_values(loss).T)}
    if scale.log:
        settings["customdata"] = masked(loss.T)
        settings["hovertemplate"] = (
            "alpha %{x:.4g}<br>beta %{y:.4g}<br>loss on the plane %{customdata:.4g}<extra></extra>"
        )
    else:
        settings["hovertemplate"] = "alpha %{x:.4g}<br>beta %{y:.4g}<br>loss on the plane %{z:.4g}<extra></extra>"
    return go.Contour(
        x=masked(landscape.alpha[rows]),
        y=masked(landscape.beta[cols]),
        zmin=scale.cmin,
        zmax=scale.cmax,
        colorscale=LOSS_COLORSCALE,
        contours={"coloring": "heatmap", "showlines": True},
        line={"width": 0.5, "color": "rgba(255,255,255,0.5)"},
        colorbar=scale.colorbar(x=1.0, len=0.8),
        name="loss",
        **settings,
    )


def _basin_boundary_trace(topology: SliceTopology, rows: np.ndarray, cols: np.ndarray) -> go.Contour | None:
    """Draw contour lines at the half-integer levels of the basin labels, which are the divides between basins."""
    count = len(topology.minima)
    if count < 2:
        return None
    basins = topology.basins[np.ix_(rows, cols)]
    labels = basins.astype(np.float64)
    labels[basins < 0] = np.nan
    return go.Contour(
        x=masked(topology.alpha[rows]),
        y=masked(topology.beta[cols]),
        z=masked(labels.T),
        autocontour=False,
        contours={"start": 0.5, "end": count - 1.5, "size": 1, "coloring": "none"},
        line={"color": "white", "width": 2.5, "dash": "dash"},
        showscale=False,
        showlegend=True,
        name="basin boundaries",
        hoverinfo="skip",
    )


def _minima_trace(topology: SliceTopology) -> go.Scatter | None:
    minima = topology.minima
    if len(minima) == 0:
        return None
    texts = [
        f"<b>minimum {k}</b><br>loss {format_number(minima.value[k])}"
        f"<br>persistence {format_number(minima.persistence[k])}"
        for k in range(len(minima))
    ]
    return go.Scatter(
        x=masked(minima.coords[:, 0]),
        y=masked(minima.coords[:, 1]),
        mode="markers+text",
        name="significant minima",
        text=[f"m{k}" for k in range(len(minima))],
        textposition="top center",
        textfont={"color": "#111111", "size": 13, "shadow": "0px 0px 3px white"},
        hovertext=texts,
        hovertemplate="%{hovertext}<extra></extra>",
        marker={"symbol": "star", "size": 16, "color": "white", "line": {"color": "black", "width": 1.2}},
    )


def _morse_set_traces(
    dynamics: SliceDynamics, rows: np.ndarray | None = None, cols: np.ndarray | None = None
) -> list[go.Scatter]:
    """Scatter the box centres of the Morse sets: one trace for attractors, one for the other sets.

    Two traces whatever the number of sets, so the legend stays short; each box's
    hover text names its set. With `rows` and `cols`, only boxes on that thinned
    lattice of the grid are drawn.
    """
    graph = dynamics.morse
    on_lattice = np.ones(graph.morse_set.shape, dtype=bool)
    if rows is not None and cols is not None:
        on_lattice[:] = False
        on_lattice[np.ix_(rows, cols)] = True
    traces = []
    for is_attractor in (True, False):
        members = np.flatnonzero(graph.attractor == is_attractor)
        cells = np.argwhere(np.isin(graph.morse_set, members) & on_lattice)
        if cells.size == 0:
            continue
        sets = graph.morse_set[cells[:, 0], cells[:, 1]]
        texts = [
            f"Morse set {s}{' (attractor)' if is_attractor else ''}<br>min loss {format_number(graph.set_min_loss[s])}"
            for s in sets
        ]
        traces.append(
            go.Scatter(
                x=masked(dynamics.alpha[cells[:, 0]]),
                y=masked(dynamics.beta[cells[:, 1]]),
                mode="markers",
                name="Morse sets: attractors" if is_attractor else "Morse sets: others",
                legendgroup="morse",
                text=texts,
                hovertemplate="%{text}<extra></extra>",
                marker={
                    "symbol": "square" if is_attractor else "square-open",
                    "size": 9,
                    "color": "rgba(255,255,255,0.6)" if is_attractor else "rgba(230,60,60,0.9)",
                    "line": {"color": "black" if is_attractor else "rgba(230,60,60,0.9)", "width": 1.2},
                },
            )
        )
    return traces


def landscape_contour(
    landscape: LandscapeSlice,
    *,
    topology: SliceTopology | None = None,
    dynamics: SliceDynamics | None = None,
    max_trajectories: int = MAX_TRAJECTORY_TRACES,
) -> go.Figure:
    """Draw the loss slice as a contour with every trajectory, the minima, basins and Morse sets.

    Parameters
    ----------
    landscape : LandscapeSlice
        The slice; its `loss` grid ndarray of shape (nx, ny) is indexed
        ``[i, j]`` = (alpha[i], beta[j]).
    topology : SliceTopology, optional
        Adds the significant minima, the basin boundaries and each checkpoint's basin.
    dynamics : SliceDynamics, optional
        Adds the box centres of every Morse set.
    max_trajectories : int
        Maximum number of trajectory traces; further runs share one trace.
    """
    loss = landscape.loss
    scale = loss_scale(loss)
    rows, cols = display_indices(loss.shape[0]), display_indices(loss.shape[1])
    masked_cells = nonfinite_count(loss)

    fig = go.Figure()
    fig.add_trace(_loss_contour(landscape, scale=scale, rows=rows, cols=cols))
    if topology is not None and topology.basins.shape == loss.shape:
        boundary = _basin_boundary_trace(topology, rows, cols)
        if boundary is not None:
            fig.add_trace(boundary)
    if dynamics is not None and dynamics.morse.morse_set.shape == loss.shape:
        for trace in _morse_set_traces(dynamics, rows, cols):
            fig.add_trace(trace)
    for trace in _trajectory_traces(
        landscape.projections,
        assignments=topology.assignments if topology is not None else None,
        height_of=None,
        max_traces=max_trajectories,
    ):
        fig.add_trace(trace)
    if topology is not None:
        minima = _minima_trace(topology)
        if minima is not None:
            fig.add_trace(minima)

    fig.update_layout(
        template=TEMPLATE,
        height=LANDSCAPE_HEIGHT,
        title=_title(
            f"Loss on the slice '{landscape.name}' with the recorded trajectories",
            [
                explained_variance_note(landscape.explained_variance),
                masked_note(masked_cells, loss.size),
                scale.note(),
                thinning_note(loss.shape, rows, cols),
            ],
        ),
        xaxis={"title": {"text": "alpha (direction 1)"}, "range": _axis_range(landscape.alpha)},
        yaxis={"title": {"text": "beta (direction 2)"}, "range": _axis_range(landscape.beta)},
        coloraxis2=_step_coloraxis(landscape.projections),
        legend={"orientation": "h", "y": -0.15, "x": 0.0},
        margin={"t": 100, "r": 40},
    )
    return fig


def _axis_range(coords: np.ndarray) -> list[float] | None:
    """Axis range of a grid padded by half a cell, so markers on the edge cells stay whole."""
    span = finite_range(coords)
    if span is None or span[0] == span[1]:
        return None
    pad = 0.5 * (span[1] - span[0]) / max(len(coords) - 1, 1)
    return [span[0] - pad, span[1] + pad]


def landscape_surface(landscape: LandscapeSlice, *, max_trajectories: int = MAX_TRAJECTORY_TRACES) -> go.Figure:
    """Draw the loss slice as a 3-D surface with the trajectories lifted to the plane's loss.

    Each checkpoint is drawn at `loss_on_plane`, the surface height at its
    projection, so it sits on the surface. Its own loss and its distance from the
    plane are in the hover text. Checkpoints outside the grid have no height and are
    left out.
    """
    loss = landscape.loss
    scale = loss_scale(loss)
    rows, cols = display_indices(loss.shape[0]), display_indices(loss.shape[1])
    shown = loss[np.ix_(rows, cols)]
    masked_cells = nonfinite_count(loss)

    fig = go.Figure()
    colors = {"surfacecolor": masked(scale.color_values(shown).T)} if scale.log else {}
    fig.add_trace(
        go.Surface(
            x=masked(landscape.alpha[rows]),
            y=masked(landscape.beta[cols]),
            z=masked(shown.T),
            cmin=scale.cmin,
            cmax=scale.cmax,
            colorscale=LOSS_COLORSCALE,
            opacity=0.9,
            colorbar=scale.colorbar(x=1.0, len=0.8),
            name="loss",
            hovertemplate="alpha %{x:.4g}<br>beta %{y:.4g}<br>loss on the plane %{z:.4g}<extra></extra>",
            **colors,
        )
    )
    for trace in _trajectory_traces(
        landscape.projections, assignments=None, height_of="loss_on_plane", max_traces=max_trajectories
    ):
        fig.add_trace(trace)

    fig.update_layout(
        template=TEMPLATE,
        height=LANDSCAPE_HEIGHT,
        title=_title(
            f"Loss surface of the slice '{landscape.name}'",
            [
                "checkpoints are drawn at the plane's loss at their projection, not at their own loss",
                masked_note(masked_cells, loss.size),
                scale.note() + ("; the loss axis is logarithmic too" if scale.log else ""),
                thinning_note(loss.shape, rows, cols),
            ],
        ),
        scene={
            "xaxis": {"title": {"text": "alpha"}},
            "yaxis": {"title": {"text": "beta"}},
            "zaxis": {"title": {"text": "loss"}, "type": "log" if scale.log else "linear"},
        },
        coloraxis2=_step_coloraxis(landscape.projections),
        legend={"orientation": "h", "y": -0.05, "x": 0.0},
        margin={"t": 90, "l": 0, "r": 0, "b": 0},
    )
    return fig


# --- topology ------------------------------------------------------------------------------------


def persistence_diagram(topology: SliceTopology) -> go.Figure:
    """Draw the persistence diagram of H0 and H1 of the slice, with essential classes on a line at the top.

    Points far above the diagonal are features that persist over a wide range of
    loss. Filled markers are significant (persistence above the slice threshold),
    open markers are not. Essential classes never die, so they are drawn at a death
    value above every finite one, on a labelled dashed line.
    """
    pairs = topology.pairs
    values = np.concatenate([pairs.birth, pairs.death]) if len(pairs) else np.zeros(0)
    span = finite_range(values) or (0.0, 1.0)
    margin = 0.08 * (span[1] - span[0]) if span[1] > span[0] else 0.1 * max(abs(span[1]), 1.0)
    low, top = span[0] - margin, span[1] + margin

    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[low, top], y=[low, top], mode="lines", name="diagonal (death = birth)",
            line={"color": "grey", "width": 1}, hoverinfo="skip",
        )
    )
    if math.isfinite(topology.threshold) and topology.threshold > 0:
        fig.add_trace(
            go.Scatter(
                x=[low, top - topology.threshold], y=[low + topology.threshold, top], mode="lines",
                name=f"significance threshold ({format_number(topology.threshold)})",
                line={"color": "grey", "width": 1, "dash": "dot"}, hoverinfo="skip",
            )
        )

    for dim, color in ((0, PALETTE[0]), (1, PALETTE[1])):
        selected = pairs.dim == dim
        finite = selected & ~pairs.essential
        essential = selected & pairs.essential
        if finite.any():
            fig.add_trace(
                go.Scatter(
                    x=masked(pairs.birth[finite]),
                    y=masked(pairs.death[finite]),
                    mode="markers",
                    name=f"H{dim}",
                    legendgroup=f"H{dim}",
                    text=_pair_text(topology, np.flatnonzero(finite)),
                    hovertemplate="%{text}<extra></extra>",
                    marker={
                        "color": color,
                        "size": 10,
                        "symbol": ["circle" if s else "circle-open" for s in pairs.significant[finite]],
                    },
                )
            )
        if essential.any():
            fig.add_trace(
                go.Scatter(
                    x=masked(pairs.birth[essential]),
                    y=[top] * int(essential.sum()),
                    mode="markers",
                    name=f"H{dim} essential",
                    legendgroup=f"H{dim}",
                    text=_pair_text(topology, np.flatnonzero(essential)),
                    hovertemplate="%{text}<extra></extra>",
                    marker={"color": color, "size": 13, "symbol": "triangle-up", "line": {"color": "black", "width": 1}},
                )
            )

    if pairs.essential.any():
        fig.add_hline(y=top, line={"color": "black", "width": 1, "dash": "dash"})
        fig.add_annotation(
            x=low, y=top, xanchor="left", yanchor="bottom", showarrow=False,
            text="essential classes: never die (drawn at the top)",
        )
    notes = [f"{len(pairs)} pairs; threshold rule: {topology.threshold_rule or 'not recorded'}"]
    if len(pairs) == 0:
        notes.append("the diagram is empty")
    fig.update_layout(
        template=TEMPLATE,
        height=DIAGRAM_HEIGHT,
        title=_title(f"Persistence diagram of the slice '{topology.name}'", notes),
        xaxis={"title": {"text": "birth (loss)"}, "range": [low, top], "constrain": "domain"},
        yaxis={"title": {"text": "death (loss)"}, "range": [low, top + margin], "scaleanchor": "x", "constrain": "domain"},
        legend={"orientation": "h", "y": -0.18, "x": 0.0},
    )
    return fig


def _pair_text(topology: SliceTopology, rows: np.ndarray) -> list[str]:
    pairs = topology.pairs
    texts = []
    for row in rows:
        alpha, beta = pairs.birth_coords[row]
        texts.append(
            f"<b>H{int(pairs.dim[row])}</b> {'essential' if pairs.essential[row] else ''}"
            f"<br>birth {format_number(pairs.birth[row])}"
            f"<br>death {format_number(pairs.death[row])}"
            f"<br>persistence {format_number(pairs.persistence[row])}"
            f"<br>{'significant' if pairs.significant[row] else 'below the threshold'}"
            f"<br>born at alpha {format_number(alpha)}, beta {format_number(beta)}"
        )
    return texts


# --- dynamics ------------------------------------------------------------------------------------


def _region_labels(regions: np.ndarray) -> tuple[np.ndarray, list[str], list[str]]:
    """Map the region codes present in `regions` to consecutive integers for a categorical heatmap.

    Returns the relabelled grid (NaN for boxes outside the domain), the label of each
    integer and its colour.
    """
    attractors = sorted(int(r) for r in np.unique(regions) if r >= 0)
    codes = list(attractors)
    names = [f"region of Morse set {a}" for a in attractors]
    colors = [PALETTE[(k + 2) % len(PALETTE)] for k in range(len(attractors))]
    for code, name, color in (
        (REGION_SEPARATRIX, "separatrix (reaches several attractors)", "#7f7f7f"),
        (REGION_NONE, "reaches no attractor", "#d0d0d0"),
    ):
        if (regions == code).any():
            codes.append(code)
            names.append(name)
            colors.append(color)

    relabelled = np.full(regions.shape, np.nan)
    for index, code in enumerate(codes):
        relabelled[regions == code] = index
    return relabelled, names, colors


def _categorical_colorscale(colors: Sequence[str]) -> list[list]:
    """Build a stepped colour scale that gives integer k exactly the colour colors[k]."""
    count = len(colors)
    scale = []
    for k, color in enumerate(colors):
        scale.append([k / count, color])
        scale.append([(k + 1) / count, color])
    return scale


def _arrow_segments(dynamics: SliceDynamics, max_per_axis: int) -> tuple[list, list, int]:
    """Line segments (with None breaks) of arrows along the negative gradient.

    The grid is thinned to at most `max_per_axis` arrows per axis. Each arrow's length
    is proportional to the gradient norm, and the longest spans 0.9 of the thinned
    spacing. Returns x, y and the number of arrows drawn.
    """
    alpha, beta = dynamics.alpha, dynamics.beta
    stride_i = max(1, math.ceil(len(alpha) / max_per_axis))
    stride_j = max(1, math.ceil(len(beta) / max_per_axis))
    rows = np.arange(0, len(alpha), stride_i)
    cols = np.arange(0, len(beta), stride_j)
    ga = -dynamics.grad_alpha[np.ix_(rows, cols)]
    gb = -dynamics.grad_beta[np.ix_(rows, cols)]

    # Lengths are measured in cells of the thinned grid, so the arrows stay readable when
    # alpha and beta have different units. Directions stay those of the data coordinates.
    h_alpha = (alpha[-1] - alpha[0]) / max(len(alpha) - 1, 1) * stride_i or 1.0
    h_beta = (beta[-1] - beta[0]) / max(len(beta) - 1, 1) * stride_j or 1.0
    norm = np.hypot(ga / h_alpha, gb / h_beta)
    valid = np.isfinite(norm)
    largest = float(norm[valid].max()) if valid.any() else 0.0
    if largest == 0.0:
        return [], [], 0
    scale = 0.9 / largest

    xs: list = []
    ys: list = []
    for a, b in zip(*np.nonzero(valid)):
        x0, y0 = float(alpha[rows[a]]), float(beta[cols[b]])
        cx, cy = ga[a, b] * scale / h_alpha, gb[a, b] * scale / h_beta
        x1, y1 = x0 + cx * h_alpha, y0 + cy * h_beta
        xs += [x0, x1, None]
        ys += [y0, y1, None]
        # Two barbs a quarter of the shaft long, 25 degrees either side of the reversed shaft.
        for angle in (math.radians(25.0), -math.radians(25.0)):
            bx = -0.25 * (cx * math.cos(angle) - cy * math.sin(angle))
            by = -0.25 * (cx * math.sin(angle) + cy * math.cos(angle))
            xs += [x1, x1 + bx * h_alpha, None]
            ys += [y1, y1 + by * h_beta, None]
    return xs, ys, int(valid.sum())


def _region_heatmap(
    dynamics: SliceDynamics, regions: np.ndarray, names: list[str], colors: list[str], rows: np.ndarray, cols: np.ndarray
) -> go.Heatmap:
    regions = regions[np.ix_(rows, cols)]
    hover = [[names[int(v)] if np.isfinite(v) else "outside the domain" for v in row] for row in regions.T]
    return go.Heatmap(
        x=masked(dynamics.alpha[rows]),
        y=masked(dynamics.beta[cols]),
        z=masked(regions.T),
        zmin=-0.5,
        zmax=len(names) - 0.5,
        colorscale=_categorical_colorscale(colors),
        opacity=0.45,
        showscale=False,
        text=hover,
        hovertemplate="alpha %{x:.4g}<br>beta %{y:.4g}<br>%{text}<extra></extra>",
        name="regions",
    )


def flow_field(
    dynamics: SliceDynamics,
    *,
    landscape: LandscapeSlice | None = None,
    max_arrows_per_axis: int = MAX_ARROWS_PER_AXIS,
) -> go.Figure:
    """Draw the regions of attraction of the slice with arrows of the negative loss gradient.

    Each box is coloured by the attractor its flow reaches; grey boxes reach more
    than one (separatrices). Arrows point downhill with length proportional to the
    gradient norm. Boxes without a valid gradient are left blank.
    """
    regions, names, colors = _region_labels(dynamics.morse.regions)
    outside = int((dynamics.morse.regions == REGION_OUTSIDE).sum())
    rows, cols = display_indices(regions.shape[0]), display_indices(regions.shape[1])

    fig = go.Figure()
    if names:
        fig.add_trace(_region_heatmap(dynamics, regions, names, colors, rows, cols))
    for name, color in zip(names, colors):
        # Legend entries for the heatmap's categories; a heatmap has no legend of its own.
        fig.add_trace(
            go.Scatter(
                x=[None], y=[None], mode="markers", name=name, showlegend=True,
                marker={"symbol": "square", "size": 12, "color": color, "opacity": 0.6},
            )
        )
    scale = None
    if landscape is not None and landscape.loss.shape == dynamics.morse.regions.shape:
        scale = loss_scale(landscape.loss)
        shown = landscape.loss[np.ix_(rows, cols)]
        # Labels would read log10(loss) on a log scale, so they are shown on a linear scale only.
        fig.add_trace(
            go.Contour(
                x=masked(landscape.alpha[rows]), y=masked(landscape.beta[cols]),
                z=masked(scale.color_values(shown).T), zmin=scale.cmin, zmax=scale.cmax,
                contours={"coloring": "none", "showlabels": not scale.log},
                line={"color": "rgba(40,40,40,0.45)", "width": 1}, showscale=False,
                name="loss contours" + (" (log-spaced)" if scale.log else ""), hoverinfo="skip",
            )
        )

    xs, ys, arrows = _arrow_segments(dynamics, max_arrows_per_axis)
    if arrows:
        fig.add_trace(
            go.Scatter(
                x=xs, y=ys, mode="lines", name="negative gradient", hoverinfo="skip",
                line={"color": "black", "width": 1.2},
            )
        )
    for trace in _morse_set_traces(dynamics, rows, cols):
        fig.add_trace(trace)

    notes = [
        f"time-tau map of the {dynamics.map or 'recorded'} flow, tau = {format_number(dynamics.tau)} "
        f"({dynamics.tau_rule or 'rule not recorded'})",
    ]
    if outside:
        notes.append(f"{outside} of {regions.size} boxes have no valid gradient (NaN or infinite loss nearby) and are left blank")
    if not arrows:
        notes.append("no box has a valid gradient, so no arrow is drawn")
    notes.append(thinning_note(regions.shape, rows, cols))
    fig.update_layout(
        template=TEMPLATE,
        height=LANDSCAPE_HEIGHT,
        title=_title(f"Flow and regions of attraction on the slice '{dynamics.name}'", notes),
        xaxis={"title": {"text": "alpha (direction 1)"}, "range": _axis_range(dynamics.alpha)},
        yaxis={"title": {"text": "beta (direction 2)"}, "range": _axis_range(dynamics.beta)},
        legend={"orientation": "h", "y": -0.15, "x": 0.0},
        margin={"t": 100},
    )
    return fig


def _morse_levels(count: int, hasse_edges: np.ndarray) -> np.ndarray:
    """Return the longest path from each Morse set down to an attractor along the Hasse edges (0 for attractors)."""
    below: list[list[int]] = [[] for _ in range(count)]
    for upper, lower in np.asarray(hasse_edges, dtype=np.int64).reshape(-1, 2):
        below[int(upper)].append(int(lower))
    level = np.full(count, -1, dtype=np.int64)

    def visit(node: int) -> int:
        # Iterative depth-first search: the order is acyclic, but deep graphs would overflow recursion.
        stack = [(node, False)]
        while stack:
            current, expanded = stack.pop()
            if level[current] >= 0:
                continue
            if expanded:
                level[current] = 1 + max((level[b] for b in below[current]), default=-1)
                continue
            stack.append((current, True))
            stack.extend((b, False) for b in below[current] if level[b] < 0)
        return int(level[node])

    for node in range(count):
        visit(node)
    return level


CONLEY_TYPES = {(1, 0, 0): "attracting, like a minimum", (0, 1, 0): "saddle", (0, 0, 1): "repelling, like a maximum",
                (0, 0, 0): "trivial: recurrence not confirmed"}


def conley_label(graph, index: int) -> str:
    """Return the Betti numbers of the Conley index of Morse set `index` as ``CH=(b0,b1,b2)``, or '' when not computed."""
    conley = getattr(graph, "conley_index", None)
    if conley is None or index >= len(conley):
        return ""
    return "CH=(" + ",".join(str(int(b)) for b in conley[index]) + ")"


def conley_text(graph, index: int) -> str:
    """Describe the Conley index of Morse set `index` for hover text and tables."""
    conley = getattr(graph, "conley_index", None)
    if conley is None or index >= len(conley):
        return "not computed"
    betti = tuple(int(b) for b in conley[index])
    kind = CONLEY_TYPES.get(betti, "a combination of types")
    return f"Betti numbers {betti} over Z/2 ({kind})"


def morse_graph(dynamics: SliceDynamics) -> go.Figure:
    """Draw the Morse graph as a layered diagram in which the flow runs down to the attractors.

    Each node is a Morse set, placed on the row of its longest path down to an
    attractor, so every edge of the Hasse diagram points downward. Node size grows
    with the number of boxes in the set and node colour shows its type. The label
    gives the set, the Betti numbers of its Conley index where dynamics.h5 contains
    them, and its lowest loss.
    """
    graph = dynamics.morse
    count = graph.n_sets
    fig = go.Figure()
    if count == 0:
        fig.update_layout(
            template=TEMPLATE, height=300,
            title=_title(f"Morse graph of the slice '{dynamics.name}'", ["no Morse set was found"]),
        )
        return fig

    level = _morse_levels(count, graph.hasse_edges)
    x = np.zeros(count)
    for row in np.unique(level):
        members = np.flatnonzero(level == row)
        x[members] = np.linspace(-1, 1, len(members) + 2)[1:-1] if len(members) > 1 else 0.0

    edge_x: list = []
    edge_y: list = []
    for upper, lower in np.asarray(graph.hasse_edges, dtype=np.int64).reshape(-1, 2):
        edge_x += [x[upper], x[lower], None]
        edge_y += [level[upper], level[lower], None]
    fig.add_trace(
        go.Scatter(x=edge_x, y=edge_y, mode="lines", name="reaches (Hasse edge)",
                   line={"color": "#888", "width": 1.2}, hoverinfo="skip")
    )

    kinds = np.where(graph.attractor, "attractor", np.where(graph.repeller, "repeller", "saddle-like"))
    colors = {"attractor": PALETTE[2], "repeller": PALETTE[3], "saddle-like": "#7f7f7f"}
    for kind, color in colors.items():
        members = np.flatnonzero(kinds == kind)
        if members.size == 0:
            continue
        fig.add_trace(
            go.Scatter(
                x=x[members].tolist(),
                y=level[members].tolist(),
                mode="markers+text",
                name=kind if kind != "saddle-like" else "neither attractor nor repeller",
                text=[f"{s}  {conley_label(graph, s)}  loss {format_number(graph.set_min_loss[s], 3)}" for s in members],
                textposition="middle right",
                hovertext=[
                    f"<b>Morse set {s}</b> ({kind})<br>{int(graph.set_cells[s])} boxes"
                    f"<br>min loss {format_number(graph.set_min_loss[s])}"
                    f"<br>Conley index: {conley_text(graph, s)}"
                    for s in members
                ],
                hovertemplate="%{hovertext}<extra></extra>",
                marker={
                    "color": color,
                    "size": (8 + 4 * np.sqrt(graph.set_cells[members])).clip(8, 30).tolist(),
                    "line": {"color": "black", "width": 1},
                },
            )
        )
    fig.update_layout(
        template=TEMPLATE,
        height=max(320, 55 * (int(level.max()) + 4)),
        title=_title(
            f"Morse graph of the slice '{dynamics.name}', {dynamics.map or 'unnamed'} map",
            [f"{count} Morse sets, {int(graph.attractor.sum())} attractors; the flow runs downward; "
             "labels: set, Betti numbers of its Conley index (CH) where computed, lowest loss"],
        ),
        xaxis={"visible": False, "range": [-1.1, 1.3]},
        yaxis={"title": {"text": "longest path to an attractor"}, "dtick": 1, "range": [-0.5, int(level.max()) + 0.5]},
        legend={"orientation": "h", "y": -0.1, "x": 0.0},
    )
    return fig
