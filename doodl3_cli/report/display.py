"""Display rules for loss grids: the colour scale (linear or logarithmic) and thinning of large grids.

A loss landscape often spans several decades: a steep corner of the slice reaches
tens while the basin the runs end in sits near 0.05. On a linear colour scale the
whole basin then gets one colour. When the finite losses are all positive and span
more than `LOG_DECADES` decades, the report colours by ``log10(loss)`` and labels
the colour bar in loss units.

A grid finer than `MAX_DISPLAY_POINTS` per axis is drawn at every k-th sample, so
the page stays small and responsive, and the figure title states the stride.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LOG_DECADES = 2.0
MAX_DISPLAY_POINTS = 101


@dataclass(frozen=True)
class LossScale:
    """The colour scale of a loss grid.

    Attributes
    ----------
    log : bool
        True when colours follow ``log10(loss)``.
    low, high : float
        The finite loss range, in loss units. On a log scale `low` is the smallest
        positive loss.
    has_zeros : bool
        True when a log scale has losses of exactly 0, which take the colour of `low`.
    """

    log: bool
    low: float
    high: float
    has_zeros: bool = False

    @property
    def cmin(self) -> float:
        """Lower end of the colour axis, in the units of `color_values`."""
        return math.log10(self.low) if self.log else self.low

    @property
    def cmax(self) -> float:
        """Upper end of the colour axis, in the units of `color_values`."""
        return math.log10(self.high) if self.log else self.high

    def color_values(self, loss: np.ndarray) -> np.ndarray:
        """Map losses to colour-axis values: the loss, or on a log scale ``log10(max(loss, low))``.

        NaN stays NaN; on a log scale a negative loss becomes NaN too.
        """
        loss = np.asarray(loss, dtype=np.float64)
        if not self.log:
            return loss
        with np.errstate(invalid="ignore"):
            return np.where(loss >= 0, np.log10(np.maximum(loss, self.low)), np.nan)

    def colorbar(self, **settings) -> dict:
        """Return plotly colour-bar settings titled ``loss``, with ticks in loss units on a log scale."""
        bar = {"title": {"text": "loss (log scale)" if self.log else "loss"}, **settings}
        if self.log:
            ticks = log_ticks(self.low, self.high)
            bar["tickvals"] = [math.log10(t) for t in ticks]
            bar["ticktext"] = [f"{t:g}" for t in ticks]
        return bar

    def note(self) -> str:
        """Describe the scale for a figure title; '' for a linear scale."""
        if not self.log:
            return ""
        text = (
            f"colours on a log scale: the finite losses span {math.log10(self.high / self.low):.1f} decades "
            f"({self.low:.3g} to {self.high:.3g})"
        )
        if self.has_zeros:
            text += "; losses of 0 take the lowest colour"
        return text


def loss_scale(loss: np.ndarray, *, decades: float = LOG_DECADES) -> LossScale:
    """Choose the colour scale of a loss grid from its finite values.

    The scale is logarithmic when no finite loss is negative and ``max / min``
    exceeds ``10**decades``, with min the smallest positive loss; otherwise it is
    linear. A grid with no finite value gets a linear scale over [0, 1].

    Parameters
    ----------
    loss : ndarray of any shape, float64
        Loss values; NaN and +-inf are ignored.
    decades : float
        Span, in powers of ten, above which the scale becomes logarithmic.
    """
    values = np.asarray(loss, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return LossScale(log=False, low=0.0, high=1.0)
    low, high = float(finite.min()), float(finite.max())
    positive = finite[finite > 0]
    if low >= 0 and positive.size and high / float(positive.min()) > 10.0**decades:
        return LossScale(log=True, low=float(positive.min()), high=high, has_zeros=low == 0)
    return LossScale(log=False, low=low, high=high)


def log_ticks(low: float, high: float) -> list[float]:
    """Return tick values in [low, high] at 1, 2 and 5 times powers of ten, or powers of ten only over more than 6 decades.

    Both bounds must be positive. When fewer than two such values fall inside,
    `low` and `high` rounded to 3 significant digits are added.
    """
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    mantissas = (1.0,) if last - first > 6 else (1.0, 2.0, 5.0)
    ticks = [m * 10.0**e for e in range(first, last + 1) for m in mantissas]
    inside = [t for t in ticks if low <= t <= high]
    if len(inside) < 2:
        inside = sorted({float(f"{low:.3g}"), *inside, float(f"{high:.3g}")})
    return inside


def display_indices(count: int, max_points: int = MAX_DISPLAY_POINTS) -> np.ndarray:
    """Return the sample indices along one axis that a figure draws: every k-th, with k the smallest stride that fits.

    Parameters
    ----------
    count : int
        Samples along the axis.
    max_points : int
        Maximum number of indices returned.

    Returns
    -------
    ndarray of shape (n,), int64
        ``0, k, 2k, ...`` with ``n <= max_points``; all indices when ``count <= max_points``.
    """
    stride = max(1, math.ceil(count / max_points))
    return np.arange(0, count, stride, dtype=np.int64)


def thinning_note(shape: tuple[int, ...], rows: np.ndarray, cols: np.ndarray) -> str:
    """Describe the thinning of a grid for a figure title; '' when every sample is drawn."""
    if len(rows) == shape[0] and len(cols) == shape[1]:
        return ""
    return (
        f"the {shape[0]}x{shape[1]} grid is drawn at every {_stride(rows)}x{_stride(cols)} sample "
        f"({len(rows)}x{len(cols)} points) to keep the page small"
    )


def _stride(indices: np.ndarray) -> int:
    return int(indices[1] - indices[0]) if len(indices) > 1 else 1
