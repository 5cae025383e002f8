"""Plotly figures of the topology section beyond the persistence diagram.

The barcode per homology dimension, and the diagrams across the resolution pyramid
with the bottleneck stability curve. The pyramid exists only in topology.h5 of
version 2 and later, so its figure is optional.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from doodl3_cli.artifacts.topology import SliceTopology
from doodl3_cli.report.figures import PALETTE, TEMPLATE, _title, finite_range, format_number

MAX_BARS_PER_DIMENSION = 150


def barcode(topology: SliceTopology, *, max_bars: int = MAX_BARS_PER_DIMENSION) -> go.Figure:
    """Draw the persistence barcode of the slice, one panel per homology dimension.

    Each pair is a horizontal bar from its birth to its death loss, longest first.
    Significant pairs are drawn in full colour, the others pale. Essential classes
    run to the right edge and end in an arrow. Each panel draws at most `max_bars`
    bars, the most persistent ones, as two traces (significant and not), so the
    trace count does not grow with the number of pairs.

    Parameters
    ----------
    topology : SliceTopology
        The slice; its `pairs` give dim, birth, death, essential and significant.
    max_bars : int
        Maximum number of bars per dimension.
    """
    pairs = topology.pairs
    dims = sorted(int(d) for d in np.unique(pairs.dim)) or [0]
    span = finite_range(np.concatenate([pairs.birth, pairs.death])) if len(pairs) else None
    low, high = span or (0.0, 1.0)
    right = high + 0.05 * (high - low or 1.0)

    fig = make_subplots(
        rows=len(dims), cols=1, shared_xaxes=True, vertical_spacing=0.12,
        subplot_titles=[f"H{d}: {_dimension_name(d)}" for d in dims],
    )
    notes = []
    for row, dim in enumerate(dims, start=1):
        selected = np.flatnonzero(pairs.dim == dim)
        persistence = np.where(pairs.essential[selected], np.inf, pairs.persistence[selected])
        # Longest bars first; stable so equal bars keep the order of the file.
        order = selected[np.argsort(-persistence, kind="stable")]
        shown = order[:max_bars]
        if len(order) > max_bars:
            notes.append(f"H{dim}: the {max_bars} most persistent of {len(order)} bars")
        positions = np.arange(len(shown))
        for significant in (True, False):
            chosen = pairs.significant[shown] == significant
            if chosen.any():
                trace = _bars(topology, shown[chosen], positions[chosen], dim=dim, significant=significant, right=right)
                fig.add_trace(trace, row=row, col=1)
        fig.update_yaxes(
            title_text="bar, longest first", autorange="reversed", showticklabels=False, row=row, col=1,
        )
    fig.update_xaxes(title_text="loss (filtration value)", range=[low - 0.02 * (right - low), right + 0.03 * (right - low)],
                     row=len(dims), col=1)
    notes += [f"no H{d} pair on this slice" for d in (0, 1) if len(pairs) and d not in dims]
    if pairs.essential.any():
        notes.append("an arrow at the right edge marks an essential class, which never dies")
    if len(pairs) == 0:
        notes.append("no persistence pair, so the barcode is empty")
    fig.update_layout(
        template=TEMPLATE,
        height=max(300, 60 + sum(min(200 + 3 * int((pairs.dim == d).sum()), 420) for d in dims)),
        title=_title(f"Persistence barcode of the slice '{topology.name}'", notes),
        legend={"orientation": "h", "y": -0.12, "x": 0.0},
        margin={"t": 100},
    )
    return fig


def _dimension_name(dim: int) -> str:
    return {0: "minima and their basins", 1: "rings (loops of low loss)"}.get(dim, f"{dim}-dimensional holes")


def _bars(
    topology: SliceTopology, rows: np.ndarray, positions: np.ndarray, *, dim: int, significant: bool, right: float
) -> go.Scatter:
    """Build one trace of horizontal bars at y = `positions`, separated by None so plotly breaks the line.

    `rows` index `topology.pairs`. The end of an essential bar carries an arrow marker.
    """
    pairs = topology.pairs
    xs: list = []
    ys: list = []
    texts: list = []
    sizes: list = []
    for row, position in zip(rows, positions):
        essential = bool(pairs.essential[row])
        end = right if essential else float(pairs.death[row])
        xs += [float(pairs.birth[row]), end, None]
        ys += [int(position), int(position), None]
        text = (
            f"<b>H{dim}</b>{' essential' if essential else ''}"
            f"<br>birth {format_number(pairs.birth[row])}<br>death {format_number(pairs.death[row])}"
            f"<br>persistence {format_number(pairs.persistence[row])}"
        )
        texts += [text, text, None]
        sizes += [0, 11 if essential else 0, 0]
    color = PALETTE[dim % len(PALETTE)]
    return go.Scatter(
        x=xs, y=ys, mode="lines+markers", connectgaps=False,
        name=f"H{dim} {'significant' if significant else 'below the threshold'}",
        legendgroup=f"H{dim}",
        line={"color": color, "width": 4 if significant else 2},
        opacity=1.0 if significant else 0.35,
        text=texts, hovertemplate="%{text}<extra></extra>",
        marker={"size": sizes, "symbol": "triangle-right", "color": color},
    )


def pyramid_figure(topology: SliceTopology) -> go.Figure | None:
    """Draw the persistence diagrams across the resolution pyramid and the bottleneck stability curve.

    Left: the diagram of every level (stride 1, 2, 4, ... of the samples), one colour
    per level, essential classes on a line at the top. Right: the bottleneck
    distance in H0 and H1 between each level and the next finer one, against the
    coarser level's grid. The recommended level is marked on both.

    Returns None when the slice has no pyramid (topology.h5 older than version 2).
    """
    pyramid = getattr(topology, "pyramid", None)
    if pyramid is None or len(pyramid.stride) == 0:
        return None
    levels = len(pyramid.stride)
    labels = [f"{int(rows)}x{int(cols)}" for rows, cols in np.asarray(pyramid.shape).reshape(-1, 2)]
    recommended = int(pyramid.recommended_level)

    fig = make_subplots(
        rows=1, cols=2, column_widths=[0.5, 0.5], horizontal_spacing=0.12,
        subplot_titles=["diagrams of every level", "bottleneck distance to the next finer level"],
    )
    _add_level_diagrams(fig, pyramid, labels, recommended)
    notes = _add_bottleneck_curve(fig, pyramid, labels, recommended)

    notes.insert(0, f"recommended resolution: level {recommended}, sample stride {int(pyramid.stride[recommended])} "
                    f"({labels[recommended]}), the coarsest whose significant classes match the full grid")
    if pyramid.unstable:
        notes.insert(1, "unstable: halving the resolution changes which classes are significant, so sample the slice finer")
    fig.update_layout(
        template=TEMPLATE,
        height=520,
        title=_title(f"Persistence across resolutions of the slice '{topology.name}' ({levels} levels)", notes),
        legend={"orientation": "h", "y": -0.2, "x": 0.0},
    )
    return fig


def _add_level_diagrams(fig: go.Figure, pyramid, labels: list[str], recommended: int) -> None:
    """Add one scatter trace per level to the left panel: H0 as circles, H1 as diamonds, essential at the top."""
    birth, death = np.asarray(pyramid.birth, float), np.asarray(pyramid.death, float)
    span = finite_range(np.concatenate([birth, death])) if birth.size else None
    low, high = span or (0.0, 1.0)
    top = high + 0.08 * (high - low or 1.0)
    fig.add_trace(go.Scatter(x=[low, top], y=[low, top], mode="lines", line={"color": "grey", "width": 1},
                             name="diagonal", showlegend=False, hoverinfo="skip"), row=1, col=1)
    for level, label in enumerate(labels):
        rows = np.flatnonzero(pyramid.level == level)
        if rows.size == 0:
            continue
        essential = ~np.isfinite(death[rows])
        fig.add_trace(
            go.Scatter(
                x=birth[rows].tolist(), y=np.where(essential, top, death[rows]).tolist(), mode="markers",
                name=f"level {level}: {label}" + (" (recommended)" if level == recommended else ""),
                marker={
                    "color": PALETTE[level % len(PALETTE)], "size": 8 if level else 10,
                    "symbol": ["diamond" if d == 1 else "circle" for d in pyramid.dim[rows]],
                    "opacity": [1.0 if s else 0.35 for s in pyramid.significant[rows]],
                },
                text=[
                    f"level {level} ({label})<br>H{int(d)} birth {format_number(b)}<br>death {format_number(x)}"
                    for d, b, x in zip(pyramid.dim[rows], birth[rows], death[rows])
                ],
                hovertemplate="%{text}<extra></extra>",
            ),
            row=1, col=1,
        )
    fig.update_xaxes(title_text="birth (loss)", row=1, col=1)
    fig.update_yaxes(title_text="death (loss); essential at the top", row=1, col=1)


def _add_bottleneck_curve(fig: go.Figure, pyramid, labels: list[str], recommended: int) -> list[str]:
    """Add the H0 and H1 bottleneck curves to the right panel; return the title notes they need."""
    notes = []
    bottleneck = np.asarray(pyramid.bottleneck, dtype=np.float64).reshape(-1, 2)
    coarse = labels[1:]
    finite = bottleneck[np.isfinite(bottleneck)]
    ceiling = float(finite.max()) * 1.15 if finite.size and finite.max() > 0 else 1.0
    for dim in (0, 1):
        values = bottleneck[:, dim]
        counts = np.asarray(pyramid.significant_counts).reshape(-1, 2)[:, dim]
        fig.add_trace(
            go.Scatter(
                x=coarse, y=np.where(np.isfinite(values), values, ceiling).tolist(), mode="lines+markers",
                name=f"H{dim} bottleneck", line={"color": PALETTE[dim], "width": 2},
                marker={"symbol": ["circle" if np.isfinite(v) else "x" for v in values], "size": 9},
                text=[f"H{dim}, {label} vs the finer level: {format_number(v)}<br>significant H{dim} classes: {int(c)}"
                      for label, v, c in zip(coarse, values, counts[1:])],
                hovertemplate="%{text}<extra></extra>",
            ),
            row=1, col=2,
        )
    if not np.isfinite(bottleneck).all():
        notes.append("an x at the top: infinite distance, the levels differ in their number of essential classes")
    if coarse and recommended >= 1:
        fig.add_vline(x=labels[recommended], line={"color": "black", "width": 1, "dash": "dash"}, row=1, col=2)
    fig.update_xaxes(title_text="coarser level (grid points)", type="category", row=1, col=2)
    fig.update_yaxes(title_text="bottleneck distance (loss)", rangemode="tozero", row=1, col=2)
    if not coarse:
        notes.append("the grid is too small for a coarser level, so there is no stability curve")
    return notes
