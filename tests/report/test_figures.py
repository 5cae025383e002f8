"""Figure functions on hand-built artifact dataclasses: edge cases the demo run does not reach."""

import json

import numpy as np
import plotly.io as pio
import pytest

from doodl3_cli.artifacts.dynamics import SliceDynamics
from doodl3_cli.artifacts.landscape import LandscapeSlice, Projection
from doodl3_cli.artifacts.topology import Minima, PersistencePairs, SliceTopology
from doodl3_cli.artifacts.trajectory import Trajectory
from doodl3_cli.dynamics.morse import REGION_OUTSIDE, MorseGraph
from doodl3_cli.report import figures


def _landscape(nx: int = 5, ny: int = 4, runs: int = 2, steps: int = 3) -> LandscapeSlice:
    alpha = np.linspace(-1.0, 1.0, nx)
    beta = np.linspace(-2.0, 2.0, ny)
    loss = alpha[:, None] ** 2 + 0.5 * beta[None, :] ** 2
    projections = {
        f"run{r}": Projection(
            coords=np.column_stack([np.linspace(0.5, 0.0, steps), np.full(steps, 0.1 * r)]),
            residual=np.full(steps, 0.2),
            loss=np.linspace(2.0, 1.0, steps),
            loss_on_plane=np.linspace(1.5, 0.5, steps),
            step=np.arange(steps, dtype=np.int64) * 10,
        )
        for r in range(runs)
    }
    return LandscapeSlice(
        name="plane", center=np.empty(0, np.float32), directions=np.empty((2, 0)), alpha=alpha, beta=beta,
        metrics={"loss": loss}, evaluated=np.ones((nx, ny), bool), explained_variance=np.array([0.5, 0.25]),
        projections=projections, attrs={},
    )


def _empty_topology(nx: int = 5, ny: int = 4) -> SliceTopology:
    empty = np.empty(0)
    pairs = PersistencePairs(
        dim=empty.astype(np.int64), birth=empty, death=empty, birth_cell=np.empty((0, 2), np.int64),
        death_cell=np.empty((0, 2), np.int64), birth_coords=np.empty((0, 2)), death_coords=np.empty((0, 2)),
        essential=empty.astype(bool), significant=empty.astype(bool),
    )
    minima = Minima(cell=np.empty((0, 2), np.int64), coords=np.empty((0, 2)), value=empty, persistence=empty)
    return SliceTopology(
        name="plane", alpha=np.linspace(-1, 1, nx), beta=np.linspace(-2, 2, ny), pairs=pairs, minima=minima,
        basins=np.full((nx, ny), -1, np.int32), boundary=np.zeros((nx, ny), bool), nonfinite=np.zeros((nx, ny), bool),
    )


def _dynamics_without_domain(nx: int = 5, ny: int = 4) -> SliceDynamics:
    graph = MorseGraph(
        cell_scc=np.full((nx, ny), -1, np.int32), morse_set=np.full((nx, ny), -1, np.int32),
        hasse_edges=np.empty((0, 2), np.int64), order=np.empty((0, 2), np.int64),
        attractor=np.empty(0, bool), repeller=np.empty(0, bool), set_min_loss=np.empty(0),
        set_cells=np.empty(0, np.int64), regions=np.full((nx, ny), REGION_OUTSIDE, np.int32), map_edges=0,
    )
    nan = np.full((nx, ny), np.nan)
    return SliceDynamics(
        name="plane", alpha=np.linspace(-1, 1, nx), beta=np.linspace(-2, 2, ny), grad_alpha=nan, grad_beta=nan,
        error=nan, morse=graph, placements={}, tau=float("nan"), tau_rule="", map="gradient",
    )


def _strict_json(fig) -> dict:
    def reject(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(pio.to_json(fig), parse_constant=reject)


def test_masked_replaces_nonfinite_with_none():
    assert figures.masked(np.array([[1.0, np.nan], [np.inf, -np.inf]])) == [[1.0, None], [None, None]]


@pytest.mark.parametrize(
    ("value", "text"),
    [(float("nan"), "n/a"), (float("inf"), "inf"), (float("-inf"), "-inf"), (0.123456, "0.1235"), (None, "n/a")],
)
def test_format_number_cases(value, text):
    assert figures.format_number(value) == text


def test_group_trajectories_bounds_count():
    names = [f"run{k}" for k in range(50)]

    groups = figures.group_trajectories(names, max_traces=20)

    assert len(groups) == 20
    assert groups[0] == ("run0", ["run0"])
    assert groups[-1] == ("31 more runs", names[19:])


def test_contour_trace_count_is_bounded():
    landscape = _landscape(runs=45)

    fig = figures.landscape_contour(landscape, max_trajectories=10)

    runs = [trace for trace in fig.data if trace.type == "scatter"]
    assert len(runs) == 10
    assert runs[-1].name == "36 more runs"
    assert len(runs[-1].x) == 36 * 3 + 35
    _strict_json(fig)


def test_surface_trace_count_is_bounded():
    landscape = _landscape(runs=45)

    fig = figures.landscape_surface(landscape, max_trajectories=10)

    runs = [trace for trace in fig.data if trace.type == "scatter3d"]
    assert len(runs) == 10
    assert runs[-1].name == "36 more runs"
    _strict_json(fig)


def test_contour_of_rectangular_grid_is_transposed():
    landscape = _landscape(nx=5, ny=4)

    contour = figures.landscape_contour(landscape).data[0]

    assert len(contour.z) == 4
    assert len(contour.z[0]) == 5
    assert contour.z[3][1] == pytest.approx(landscape.loss[1, 3])


def test_contour_of_all_nonfinite_grid():
    landscape = _landscape()
    landscape.metrics["loss"][:] = np.nan

    fig = figures.landscape_contour(landscape)

    assert "20 of 20 grid cells are NaN or infinite" in fig.layout.title.text
    _strict_json(fig)


def test_explained_variance_note_without_pca():
    note = figures.explained_variance_note(np.array([np.nan, np.nan]))

    assert note.startswith("explained variance not available")


def test_empty_persistence_diagram():
    fig = figures.persistence_diagram(_empty_topology())

    assert "the diagram is empty" in fig.layout.title.text
    _strict_json(fig)


def test_flow_field_without_valid_cells():
    fig = figures.flow_field(_dynamics_without_domain())

    assert "no box has a valid gradient" in fig.layout.title.text
    assert "20 of 20 boxes have no valid gradient" in fig.layout.title.text
    _strict_json(fig)


def test_morse_graph_without_sets():
    fig = figures.morse_graph(_dynamics_without_domain())

    assert "no Morse set was found" in fig.layout.title.text
    assert len(fig.data) == 0


def test_training_diagnostics_without_dynamics_has_loss_panel_only():
    trajectory = Trajectory(
        name="run0", params=np.zeros((3, 2), np.float32), buffers=np.zeros((3, 0), np.float32),
        step=np.array([0, 10, 20]), epoch=np.full(3, np.nan), metrics={"loss": np.array([2.0, np.nan, 1.0])},
        source=["live"] * 3, source_digest=["a", "b", "c"], attrs={},
    )

    fig = figures.training_diagnostics([trajectory])

    assert len(fig.layout.annotations) == 1
    assert fig.data[0].y == (2.0, None, 1.0)
    _strict_json(fig)
