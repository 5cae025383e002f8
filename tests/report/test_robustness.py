"""A large run: 40 trajectories on a 201x201 grid with NaN and infinite cells.

The parameters are the two coordinates of Himmelblau's function
``(x^2 + y - 11)^2 + (x + y^2 - 7)^2``, so the slice is the whole parameter space
and every residual is 0. The loss spans from 0 at four minima to about 900 at the
corners. 40 gradient-descent runs start on a ring and end in those minima, and the
real topology and dynamics stages run on the result.
"""

import json
import re

import h5py
import numpy as np
import plotly.offline
import pytest
from scipy.interpolate import RegularGridInterpolator

from doodl3_cli.artifacts import landscape as landscape_artifact
from doodl3_cli.artifacts._common import read_content_id, write_root_attrs
from doodl3_cli.artifacts.landscape import Projection
from doodl3_cli.artifacts.trajectory import Layout, TrajectoryWriter
from doodl3_cli.dynamics.stage import run_dynamics
from doodl3_cli.report.display import MAX_DISPLAY_POINTS
from doodl3_cli.report.figures import MAX_TRAJECTORY_TRACES
from doodl3_cli.report.page import write_report
from doodl3_cli.runfolder import RunFolder
from doodl3_cli.topology import run_topology

RUNS = 40
STEPS = 25
RECORD_EVERY = 5
LEARNING_RATE = 0.01
GRID = 201
SIZE_BUDGET = 3 * 2**20
NAN_CELLS = 5 * 5
INF_CELLS = 1 + 3


def himmelblau(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x**2 + y - 11) ** 2 + (x + y**2 - 7) ** 2


def himmelblau_gradient(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    a, b = x**2 + y - 11, x + y**2 - 7
    return np.stack([4 * a * x + 2 * b, 2 * a + 4 * b * y], axis=-1)


def _descend() -> np.ndarray:
    """Run gradient descent from 40 starts on a ring of radius 4.5: float64 [RUNS, STEPS + 1, 2]."""
    angles = np.linspace(0.0, 2 * np.pi, RUNS, endpoint=False)
    points = np.column_stack([4.5 * np.cos(angles), 4.5 * np.sin(angles)])
    path = [points]
    for _ in range(STEPS):
        points = points - LEARNING_RATE * himmelblau_gradient(points[:, 0], points[:, 1])
        path.append(points)
    return np.stack(path, axis=1)


def _write_trajectories(run: RunFolder, paths: np.ndarray) -> None:
    layout = Layout.from_tensors({"xy": np.zeros(2, np.float32)})
    for index, path in enumerate(paths):
        with TrajectoryWriter(
            run.trajectory, layout=layout, buffer_layout=Layout(), trajectory=f"run{index:02d}",
            attrs={"seed": index, "learning_rate": LEARNING_RATE}, metric_keys=("loss",),
        ) as writer:
            for step in range(0, len(path), RECORD_EVERY):
                point = path[step]
                writer.append(point, np.zeros(0), step=step, metrics={"loss": float(himmelblau(*point))})


def _write_landscape(run: RunFolder, paths: np.ndarray) -> np.ndarray:
    axis = np.linspace(-5.0, 5.0, GRID)
    loss = himmelblau(axis[:, None], axis[None, :])
    loss[:5, :5] = np.nan
    loss[100, 150] = np.inf
    loss[-1, -3:] = -np.inf

    interpolate = RegularGridInterpolator((axis, axis), loss)
    with h5py.File(run.landscape, "w") as f:
        write_root_attrs(
            f, schema=landscape_artifact.SCHEMA, schema_version=landscape_artifact.SCHEMA_VERSION,
            settings={"resolution": GRID}, upstream={"trajectory.h5": read_content_id(run.trajectory)},
        )
        group = landscape_artifact.create_slice(
            f, "pca", center=np.zeros(2), directions=np.eye(2), alpha=axis, beta=axis, metric_names=["loss"],
            explained_variance=np.full(2, np.nan), attrs={"method": "identity", "nonfinite_cells": NAN_CELLS + INF_CELLS},
        )
        group["loss"][...] = loss
        group["evaluated"][...] = True
        for index, path in enumerate(paths):
            recorded = np.arange(0, len(path), RECORD_EVERY)
            coords = path[recorded].astype(np.float32).astype(np.float64)
            landscape_artifact.write_projection(group, f"run{index:02d}", Projection(
                coords=coords, residual=np.zeros(len(path)), loss=himmelblau(coords[:, 0], coords[:, 1]),
                loss_on_plane=interpolate(coords), step=recorded.astype(np.int64),
            ))
    return loss


@pytest.fixture(scope="module")
def large_run(tmp_path_factory) -> tuple[RunFolder, np.ndarray]:
    run = RunFolder(tmp_path_factory.mktemp("large"))
    paths = _descend()
    _write_trajectories(run, paths)
    loss = _write_landscape(run, paths)
    run_topology(run)
    run_dynamics(run)
    write_report(run)
    return run, loss


def _payloads(page: str) -> dict[str, tuple[list, dict]]:
    """Parse (data, layout) of every Plotly.newPlot call, rejecting NaN and Infinity."""
    def reject(name):
        raise ValueError(f"non-standard JSON constant {name}")

    decoder = json.JSONDecoder(parse_constant=reject)
    payloads = {}
    for match in re.finditer(r"Plotly\.newPlot\(\s*", page):
        values, position = [], match.end()
        for _ in range(3):
            value, position = decoder.raw_decode(page, position)
            values.append(value)
            position = re.compile(r"\s*,\s*").match(page, position).end()
        payloads[values[0]] = (values[1], values[2])
    return payloads


def test_large_report_within_size_budget(large_run):
    run, _ = large_run
    page = run.report.read_text(encoding="utf-8")

    figures_only = len(page.encode("utf-8")) - len(plotly.offline.get_plotlyjs().encode("utf-8"))

    assert figures_only < SIZE_BUDGET


def test_large_report_bounds_traces(large_run):
    run, _ = large_run
    payloads = _payloads(run.report.read_text(encoding="utf-8").replace(plotly.offline.get_plotlyjs(), ""))

    contour, _ = payloads["landscape-contour-pca"]
    runs = [trace for trace in contour if trace["type"] == "scatter" and trace.get("name", "").startswith("run")]
    merged = [trace for trace in contour if trace.get("name") == f"{RUNS - MAX_TRAJECTORY_TRACES + 1} more runs"]
    assert len(runs) == MAX_TRAJECTORY_TRACES - 1
    assert len(merged) == 1
    # The training figure has one trace per run group and curve (losses, speed, cosine, ...).
    for div_id, (data, _) in payloads.items():
        assert len(data) <= 5 * MAX_TRAJECTORY_TRACES + 10, div_id


def test_large_grid_is_thinned_with_note(large_run):
    run, _ = large_run
    payloads = _payloads(run.report.read_text(encoding="utf-8").replace(plotly.offline.get_plotlyjs(), ""))

    data, layout = payloads["landscape-contour-pca"]
    z = data[0]["z"]

    assert len(z) == MAX_DISPLAY_POINTS
    assert len(z[0]) == MAX_DISPLAY_POINTS
    assert "the 201x201 grid is drawn at every 2x2 sample (101x101 points)" in layout["title"]["text"]
    assert data[0]["x"][1] == pytest.approx(-4.9)


def test_large_grid_counts_nonfinite_and_uses_log_scale(large_run):
    run, loss = large_run
    payloads = _payloads(run.report.read_text(encoding="utf-8").replace(plotly.offline.get_plotlyjs(), ""))

    data, layout = payloads["landscape-contour-pca"]
    finite = loss[np.isfinite(loss)]
    smallest_positive = finite[finite > 0].min()

    assert f"{NAN_CELLS + INF_CELLS} of {GRID * GRID} grid cells are NaN or infinite" in layout["title"]["text"]
    # The grid contains the minimum (3, 2) exactly, where the loss is 0.
    assert finite.min() == 0.0
    assert "colours on a log scale" in layout["title"]["text"]
    assert "losses of 0 take the lowest colour" in layout["title"]["text"]
    assert data[0]["zmin"] == pytest.approx(np.log10(smallest_positive))
    assert data[0]["zmax"] == pytest.approx(np.log10(finite.max()))
    assert data[0]["customdata"][0][0] is None
    assert data[0]["customdata"][10][10] == pytest.approx(loss[20, 20])
    assert data[0]["z"][10][10] == pytest.approx(np.log10(loss[20, 20]))


@pytest.mark.browser
def test_large_report_renders_offline(large_run, tmp_path):
    browser = pytest.importorskip("tests.report.test_browser")
    if not browser.CHROMIUM.is_file():
        pytest.skip(f"{browser.CHROMIUM} not found (apt-get install chromium)")
    run, _ = large_run

    result = browser.render_offline(run.report, tmp_path / "large.png")

    assert result["console_errors"] == []
    assert result["page_errors"] == []
    assert result["blocked"] == []
    assert all(figure["svg"] > 0 or figure["webgl"] > 0 for figure in result["figures"])
