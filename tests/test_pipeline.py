"""The whole pipeline end to end: the demo on real digits, and a known analytic landscape."""

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from doodl3_cli import zoo
from doodl3_cli.artifacts import dynamics as dynamics_artifact
from doodl3_cli.artifacts import landscape as landscape_artifact
from doodl3_cli.artifacts import topology as topology_artifact
from doodl3_cli.artifacts.trajectory import read_all_trajectories
from doodl3_cli.cli import app
from doodl3_cli.runfolder import RunFolder

REPO = Path(__file__).resolve().parents[1]
HIMMELBLAU_MINIMA = np.array([[3.0, 2.0], [-2.805118, 3.131312], [-3.779310, -3.283186], [3.584428, -1.848126]])
ARTIFACTS = ("trajectory.h5", "landscape.h5", "topology.h5", "dynamics.h5", "report.html")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> RunFolder:
    path = tmp_path_factory.mktemp("demo") / "run"
    result = CliRunner().invoke(app, ["demo", str(path), "--seeds", "4", "--steps", "120", "--resolution", "21"])
    assert result.exit_code == 0, result.output
    return RunFolder(path)


def test_demo_writes_every_artifact(demo_run):
    for name in ARTIFACTS:
        assert (demo_run.path / name).is_file(), name
    with h5py.File(demo_run.dynamics, "r") as f:
        assert f.attrs["schema"] == "doodl3/dynamics"


def test_demo_records_eight_runs_two_rates(demo_run):
    trajectories = read_all_trajectories(demo_run.trajectory)

    assert len(trajectories) == 8
    assert {t.attrs["learning_rate"] for t in trajectories} == {0.3, 1.2}
    assert all(t.step[-1] == 120 for t in trajectories)
    assert all(np.all(t.metrics["lr"] == t.attrs["learning_rate"]) for t in trajectories)


def test_demo_projection_matches_numpy_svd(demo_run):
    landscape = landscape_artifact.read_slice(demo_run.landscape)
    trajectories = read_all_trajectories(demo_run.trajectory)

    matrix = np.concatenate([t.params for t in trajectories]).astype(np.float64)
    _, _, vt = np.linalg.svd(matrix - matrix.mean(axis=0), full_matrices=False)
    for t in trajectories:
        expected = (t.params - landscape.center.astype(np.float64)) @ vt[:2].T
        got = landscape.projections[t.name].coords
        signs = np.sign(np.sum(expected * got, axis=0))
        np.testing.assert_allclose(got, expected * signs, atol=1e-5)


def test_demo_landscape_minimum_near_final_state(demo_run):
    landscape = landscape_artifact.read_slice(demo_run.landscape)
    i, j = np.unravel_index(np.nanargmin(landscape.loss), landscape.loss.shape)
    cell = np.array([landscape.alpha[1] - landscape.alpha[0], landscape.beta[1] - landscape.beta[0]])

    center = np.array([0.0, 0.0])
    distance_in_cells = np.abs(np.array([landscape.alpha[i], landscape.beta[j]]) - center) / cell
    assert np.all(distance_in_cells <= 2.0)

    center_loss = landscape.projections[landscape.attrs["center_trajectory"]].loss[-1]
    assert np.nanmin(landscape.loss) <= center_loss * 1.05


def test_demo_converged_runs_end_in_attractor_region(demo_run):
    landscape = landscape_artifact.read_slice(demo_run.landscape, with_vectors=False)
    dynamics = dynamics_artifact.read_slice(demo_run.dynamics)

    attractors = np.flatnonzero(dynamics.morse.attractor)
    assert attractors.size >= 1
    center_run = landscape.attrs["center_trajectory"]
    assert dynamics.placements[center_run][-1] >= 0
    for name, projection in landscape.projections.items():
        on_plane = projection.residual[-1] < 1e-6 or abs(projection.loss_on_plane[-1] - projection.loss[-1]) < 0.05
        if projection.loss[-1] < 0.5 and on_plane:
            assert dynamics.placements[name][-1] >= 0, name


def test_demo_topology_minimum_is_the_center_basin(demo_run):
    topology = topology_artifact.read_slice(demo_run.topology)
    center_run = landscape_artifact.read_slice(demo_run.landscape, with_vectors=False).attrs["center_trajectory"]

    assert len(topology.minima) >= 1
    assert topology.final_basins[center_run] >= 0


def test_run_reports_up_to_date(demo_run):
    result = CliRunner().invoke(app, ["run", str(demo_run.path)])

    assert result.exit_code == 0, result.output
    assert "every stage is up to date" in result.output


def _write_descent(folder: Path, start: tuple[float, float], *, steps: int = 200, lr: float = 0.01) -> None:
    """Save plain state_dicts of gradient descent on Himmelblau's function every 5 steps."""
    folder.mkdir(parents=True)
    model = zoo.AnalyticSurface("himmelblau", start)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps + 1):
        if step % 5 == 0:
            torch.save(model.state_dict(), folder / f"step-{step}.pt")
        loss = model(torch.zeros(1, 1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def himmelblau_run(tmp_path_factory) -> RunFolder:
    root = tmp_path_factory.mktemp("himmelblau")
    run = RunFolder(root / "run")
    run.path.mkdir()
    shutil.copy(REPO / "configs" / "himmelblau.toml", run.config_path)
    runner = CliRunner()
    for k, start in enumerate([(0.5, 0.5), (-0.5, 1.5), (-1.0, -1.0), (1.0, -0.8)]):
        _write_descent(root / f"descent{k}", start)
        result = runner.invoke(app, ["record", str(run.path), "--from", str(root / f"descent{k}")])
        assert result.exit_code == 0, result.output
    for command in (["sample", str(run.path), "--resolution", "101"], ["topology", str(run.path)], ["dynamics", str(run.path)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.output
    return run


def _to_parameters(landscape, coords: np.ndarray) -> np.ndarray:
    return landscape.center[None, :] + coords[:, :1] * landscape.directions[0] + coords[:, 1:] * landscape.directions[1]


def test_himmelblau_four_minima_within_one_cell(himmelblau_run):
    landscape = landscape_artifact.read_slice(himmelblau_run.landscape)
    topology = topology_artifact.read_slice(himmelblau_run.topology)
    cell_diagonal = np.hypot(landscape.alpha[1] - landscape.alpha[0], landscape.beta[1] - landscape.beta[0])

    found = _to_parameters(landscape, topology.minima.coords)

    assert found.shape == (4, 2)
    for true_minimum in HIMMELBLAU_MINIMA:
        assert np.min(np.linalg.norm(found - true_minimum, axis=1)) <= cell_diagonal


def test_himmelblau_morse_graph_has_four_attractors(himmelblau_run):
    landscape = landscape_artifact.read_slice(himmelblau_run.landscape)
    dynamics = dynamics_artifact.read_slice(himmelblau_run.dynamics)

    attractors = np.flatnonzero(dynamics.morse.attractor)
    assert attractors.size == 4

    alpha_grid, beta_grid = np.meshgrid(landscape.alpha, landscape.beta, indexing="ij")
    for true_minimum in HIMMELBLAU_MINIMA:
        coords = np.linalg.lstsq(landscape.directions.T, true_minimum - landscape.center, rcond=None)[0]
        i = np.argmin(np.abs(landscape.alpha - coords[0]))
        j = np.argmin(np.abs(landscape.beta - coords[1]))
        assert dynamics.morse.morse_set[i, j] in attractors


def test_himmelblau_runs_end_in_their_own_attractor(himmelblau_run):
    dynamics = dynamics_artifact.read_slice(himmelblau_run.dynamics)

    finals = [int(dynamics.placements[f"descent{k}"][-1]) for k in range(4)]

    assert sorted(finals) == sorted(np.flatnonzero(dynamics.morse.attractor).tolist())
