"""The training figure on hand-built diagnostics: sharpness panel, stability limits and flagged segments."""

import json

import numpy as np
import plotly.io as pio

from doodl3_cli.artifacts.trajectory import Trajectory
from doodl3_cli.dynamics.diagnostics import SEGMENT_KINDS, Finding
from doodl3_cli.dynamics.trajectories import TrajectoryDiagnostics
from doodl3_cli.report import training_figures
from doodl3_cli.report.training_figures import SEGMENT_COLOURS

STEPS = np.array([0, 10, 20, 30, 40])


def _trajectory(name: str, learning_rate: float, loss: np.ndarray) -> Trajectory:
    count = len(STEPS)
    return Trajectory(
        name=name, params=np.zeros((count, 2), np.float32), buffers=np.zeros((count, 0), np.float32), step=STEPS,
        epoch=np.full(count, np.nan), metrics={"loss": loss}, source=["live"] * count,
        source_digest=[str(k) for k in range(count)], attrs={"learning_rate": learning_rate},
    )


def _diagnostics(name: str, loss: np.ndarray, sharpness: np.ndarray | None) -> TrajectoryDiagnostics:
    return TrajectoryDiagnostics(
        name=name, step=STEPS, step_length=np.array([np.nan, 1.0, 1.0, 1.0, 1.0]),
        speed=np.array([np.nan, 0.1, 0.1, 0.1, 0.1]), cosine=np.array([np.nan, -0.9, -0.9, 0.5, np.nan]), loss=loss,
        path_over_displacement=2.0, sharpness_step=None if sharpness is None else np.array([0, 40]),
        sharpness=sharpness,
    )


def _figure(findings=(), sharpness=np.array([1.0, 5.0])):
    loss = np.array([2.0, 1.0, 0.5, 0.2, 0.1])
    trajectories = [_trajectory("fast", 0.5, loss), _trajectory("slow", 0.1, loss)]
    diagnostics = {"fast": _diagnostics("fast", loss, sharpness), "slow": _diagnostics("slow", loss, None)}
    return training_figures.training_diagnostics(trajectories, diagnostics=diagnostics, findings=findings)


def test_sharpness_panel_with_stability_limits():
    fig = _figure()

    titles = [a.text for a in fig.layout.annotations]
    limits = sorted(shape.y0 for shape in fig.layout.shapes if shape.type == "line" and shape.y0 == shape.y1 and shape.y0 > 0)
    sharpness = [trace for trace in fig.data if trace.yaxis == "y4"]
    assert "sharpness: top Hessian eigenvalue against 2 / learning rate" in titles
    assert limits == [4.0, 20.0]
    assert "2 / 0.5 = 4" in titles
    assert len(sharpness) == 1
    assert sharpness[0].y == (1.0, 5.0)
    json.loads(pio.to_json(fig))


def test_no_sharpness_panel_without_eigenvalues():
    fig = _figure(sharpness=None)

    assert len([a for a in fig.layout.annotations if a.text.startswith("sharpness")]) == 0
    assert not any(trace.yaxis == "y4" for trace in fig.data)


def test_flagged_segment_shaded_on_every_panel():
    finding = Finding(kind="oscillation", severity="warning", runs=["fast"], steps=[10, 20],
                      evidence={"mean_cosine": -0.9}, suggestion="lower the learning rate")
    sharp = Finding(kind="sharpness", severity="warning", runs=["fast"], steps=[40], evidence={}, suggestion="")

    fig = _figure(findings=[finding, sharp])

    rectangles = [shape for shape in fig.layout.shapes if shape.type == "rect"]
    marker = next(trace for trace in fig.data if trace.name == "flagged: oscillation")
    assert len(rectangles) == 4
    assert {(shape.x0, shape.x1) for shape in rectangles} == {(10, 20)}
    assert marker.x == (15.0,)
    assert marker.y == (0.75,)
    assert "mean cosine -0.9" in marker.text[0]
    assert "oscillation in red" in fig.layout.title.text
    assert not any(trace.name == "flagged: sharpness" for trace in fig.data)


def test_loss_instability_shaded_in_orange():
    finding = Finding(kind="loss_instability", severity="warning", runs=["fast"], steps=[5, 25],
                      evidence={"rising_intervals": 7}, suggestion="lower the learning rate")

    fig = _figure(findings=[finding])

    rectangles = [shape for shape in fig.layout.shapes if shape.type == "rect"]
    marker = next(trace for trace in fig.data if trace.name == "flagged: loss instability")
    assert {(shape.x0, shape.x1) for shape in rectangles} == {(5, 25)}
    assert {shape.fillcolor for shape in rectangles} == {"#ff7f0e"}
    assert "rising intervals 7" in marker.text[0]
    assert "loss instability in orange" in fig.layout.title.text


def test_loss_axis_logarithmic_over_two_decades():
    loss = np.array([100.0, 10.0, 1.0, 0.1, 0.05])
    fig = training_figures.training_diagnostics([_trajectory("run", 0.1, loss)])

    assert fig.layout.yaxis.type == "log"
    assert "log loss axis: the losses span 3.3 decades" in fig.layout.title.text


def test_every_segment_kind_has_colour():
    assert list(SEGMENT_COLOURS) == list(SEGMENT_KINDS)
