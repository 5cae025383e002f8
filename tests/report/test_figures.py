"""Figure functions on hand-built artifact dataclasses: edge cases the demo run does not reach."""

import json

import numpy as np
import plotly.io as pio
import pytest

from doodl3_cli.artifacts.dynamics import SliceDynamics
from doodl3_cli.artifacts.landscape import LandscapeSlice, Projection
from doodl3_cli.artifacts.topology import Minima, PersistencePairs, Pyramid, SliceTopology
from doodl3_cli.artifacts.trajectory import Trajectory
from doodl3_cli.dynamics.morse import REGION_OUTSIDE, MorseGraph
from doodl3_cli.report import figures, topology_figures, training_figures


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

    fig = training_figures.training_diagnostics([trajectory])

    assert len(fig.layout.annotations) == 1
    assert fig.data[0].y == (2.0, None, 1.0)
    _strict_json(fig)


def _topology_with_pairs() -> SliceTopology:
    """Four pairs: H0 (0.1, inf) essential, H0 (0.2, 0.9), H0 (0.3, 0.35) below the threshold, H1 (0.5, 0.8)."""
    topology = _empty_topology()
    topology.pairs = PersistencePairs(
        dim=np.array([0, 0, 0, 1]), birth=np.array([0.1, 0.2, 0.3, 0.5]), death=np.array([np.inf, 0.9, 0.35, 0.8]),
        birth_cell=np.zeros((4, 2), np.int64), death_cell=np.zeros((4, 2), np.int64), birth_coords=np.zeros((4, 2)),
        death_coords=np.zeros((4, 2)), essential=np.array([True, False, False, False]),
        significant=np.array([True, True, False, True]),
    )
    return topology


def test_barcode_panels_and_bar_order():
    fig = topology_figures.barcode(_topology_with_pairs())

    traces = {trace.name: trace for trace in fig.data}
    significant = traces["H0 significant"]
    assert [a.text for a in fig.layout.annotations[:2]] == ["H0: minima and their basins", "H1: rings (loops of low loss)"]
    assert set(traces) == {"H0 significant", "H0 below the threshold", "H1 significant"}
    # Most persistent first: the essential bar on row 0 runs to the right edge, (0.2, 0.9) on row 1.
    assert significant.y == (0, 0, None, 1, 1, None)
    assert significant.x[0] == 0.1
    assert significant.x[1] > 0.9
    assert significant.x[3:5] == (0.2, 0.9)
    assert significant.marker.size == (0, 11, 0, 0, 0, 0)
    assert traces["H0 below the threshold"].y == (2, 2, None)
    assert traces["H1 significant"].x == (0.5, 0.8, None)
    _strict_json(fig)


def test_barcode_caps_bars_per_dimension():
    fig = topology_figures.barcode(_topology_with_pairs(), max_bars=2)

    assert "H0: the 2 most persistent of 3 bars" in fig.layout.title.text
    assert all(trace.name != "H0 below the threshold" for trace in fig.data)


def test_empty_barcode_says_so():
    fig = topology_figures.barcode(_empty_topology())

    assert "no persistence pair" in fig.layout.title.text
    _strict_json(fig)


def test_pyramid_figure_absent_without_pyramid():
    assert topology_figures.pyramid_figure(_empty_topology()) is None


def test_pyramid_figure_marks_recommended_level():
    topology = _empty_topology()
    topology.pyramid = Pyramid(
        stride=np.array([1, 2, 4]), shape=np.array([[41, 41], [21, 21], [11, 11]]),
        significant_counts=np.array([[2, 0], [2, 0], [1, 0]]), essential_counts=np.array([[1, 0], [1, 0], [1, 0]]),
        bottleneck=np.array([[0.01, 0.0], [np.inf, 0.0]]), level=np.array([0, 0, 1, 1, 2]),
        dim=np.array([0, 0, 0, 0, 0]), birth=np.array([0.1, 0.2, 0.1, 0.21, 0.12]),
        death=np.array([np.inf, 0.5, np.inf, 0.48, np.inf]), significant=np.array([True, True, True, True, True]),
        recommended_level=1, unstable=False,
    )

    fig = topology_figures.pyramid_figure(topology)

    title = fig.layout.title.text
    assert "recommended resolution: level 1, sample stride 2 (21x21)" in title
    assert "infinite distance" in title
    assert "unstable" not in title
    h0 = next(trace for trace in fig.data if trace.name == "H0 bottleneck")
    assert h0.x == ("21x21", "11x11")
    assert h0.y[0] == 0.01
    assert h0.y[1] == pytest.approx(0.01 * 1.15)
    assert [trace.name for trace in fig.data if trace.name.startswith("level")] == [
        "level 0: 41x41", "level 1: 21x21 (recommended)", "level 2: 11x11"]
    _strict_json(fig)


def test_morse_graph_labels_conley_index():
    dynamics = _dynamics_without_domain()
    dynamics.morse = MorseGraph(
        cell_scc=np.zeros((5, 4), np.int32), morse_set=np.zeros((5, 4), np.int32),
        hasse_edges=np.array([[1, 0]]), order=np.array([[1, 0]]), attractor=np.array([True, False]),
        repeller=np.array([False, True]), set_min_loss=np.array([0.05, 2.0]), set_cells=np.array([3, 1]),
        regions=np.zeros((5, 4), np.int32), map_edges=10, conley_index=np.array([[1, 0, 0], [0, 0, 1]]),
    )

    fig = figures.morse_graph(dynamics)

    attractor = next(trace for trace in fig.data if trace.name == "attractor")
    assert attractor.text == ("0  CH=(1,0,0)  loss 0.05",)
    assert "attracting, like a minimum" in attractor.hovertext[0]
    assert list(fig.layout.yaxis.range) == [-0.5, 1.5]
