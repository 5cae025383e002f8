"""The topology stage through real run folders: analytic two-parameter models, noise grids, the artifact."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from doodl3_cli import zoo
from doodl3_cli.artifacts import landscape as landscape_artifact
from doodl3_cli.artifacts import topology as topology_artifact
from doodl3_cli.artifacts._common import write_root_attrs
from doodl3_cli.artifacts.landscape import Projection, create_slice, write_projection
from doodl3_cli.cli import app
from doodl3_cli.runfolder import RunFolder
from doodl3_cli.topology import run_topology
from doodl3_cli.topology.persistence import NOISE_MULTIPLE

REPO = Path(__file__).resolve().parents[1]
HIMMELBLAU_MINIMA = np.array([(3.0, 2.0), (-2.805118, 3.131312), (-3.779310, -3.283186), (3.584428, -1.848126)])
HIMMELBLAU_SADDLES = np.array([(0.086677, 2.884254), (-3.073026, -0.081353), (3.385154, 0.073852), (-0.127961, -1.953715)])
HIMMELBLAU_MAXIMUM = np.array([-0.270845, -0.923039])
runner = CliRunner()


def write_descent(folder: Path, surface: str, start: tuple[float, float], *, steps: int = 200, lr: float = 0.01) -> None:
    """Save plain state_dicts of gradient descent on an analytic surface every 10 steps."""
    folder.mkdir(parents=True)
    model = zoo.AnalyticSurface(surface, start)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps + 1):
        if step % 10 == 0:
            torch.save(model.state_dict(), folder / f"step-{step}.pt")
        loss = model(torch.zeros(1, 1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def build_run(root: Path, surface: str, starts, resolution: int, topology_options: list[str]) -> RunFolder:
    run = RunFolder(root / "run")
    run.path.mkdir()
    config = (REPO / "configs" / "himmelblau.toml").read_text()
    run.config_path.write_text(config.replace('surface = "himmelblau"', f'surface = "{surface}"'))
    for k, start in enumerate(starts):
        write_descent(root / f"descent{k}", surface, start)
        result = runner.invoke(app, ["record", str(run.path), "--from", str(root / f"descent{k}")])
        assert result.exit_code == 0, result.output
    for command in (["sample", str(run.path), "--resolution", str(resolution)], ["topology", str(run.path), *topology_options]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.output
    return run


def to_parameters(landscape, coords: np.ndarray) -> np.ndarray:
    coords = np.asarray(coords).reshape(-1, 2)
    return landscape.center[None, :] + coords[:, :1] * landscape.directions[0] + coords[:, 1:] * landscape.directions[1]


def cell_diagonal(landscape) -> float:
    return float(np.hypot(landscape.alpha[1] - landscape.alpha[0], landscape.beta[1] - landscape.beta[0]))


@pytest.fixture(scope="module")
def himmelblau_run(tmp_path_factory) -> RunFolder:
    starts = [(0.5, 0.5), (-0.5, 1.5), (-1.0, -1.0), (1.0, -0.8), (2.0, 1.0)]
    return build_run(tmp_path_factory.mktemp("himmelblau"), "himmelblau", starts, 101,
                     ["--min-persistence", "1", "--superlevel"])


def test_himmelblau_minima_saddles_maximum(himmelblau_run):
    landscape = landscape_artifact.read_slice(himmelblau_run.landscape)
    topology = topology_artifact.read_slice(himmelblau_run.topology)
    reach = cell_diagonal(landscape)
    pairs = topology.pairs

    minima = to_parameters(landscape, topology.minima.coords)
    assert len(minima) == 4
    for true_minimum in HIMMELBLAU_MINIMA:
        assert np.min(np.linalg.norm(minima - true_minimum, axis=1)) <= reach

    ring = pairs.significant & (pairs.dim == 1)
    assert ring.sum() == 1
    saddles = to_parameters(landscape, np.concatenate([topology.saddles.coords, pairs.birth_coords[ring]]))
    assert len(saddles) == 4
    for true_saddle in HIMMELBLAU_SADDLES:
        assert np.min(np.linalg.norm(saddles - true_saddle, axis=1)) <= reach
    maximum = to_parameters(landscape, pairs.death_coords[ring])[0]
    assert np.linalg.norm(maximum - HIMMELBLAU_MAXIMUM) <= reach

    superlevel = topology.superlevel
    peaks = to_parameters(landscape, superlevel.maxima.coords)
    assert np.min(np.linalg.norm(peaks - HIMMELBLAU_MAXIMUM, axis=1)) <= reach


def test_himmelblau_runs_grouped_by_final_basin(himmelblau_run):
    landscape = landscape_artifact.read_slice(himmelblau_run.landscape)
    topology = topology_artifact.read_slice(himmelblau_run.topology)
    minima = to_parameters(landscape, topology.minima.coords)

    # Descent from (0.5, 0.5) and from (2.0, 1.0) both end at (3, 2).
    basin_32 = int(np.argmin(np.linalg.norm(minima - HIMMELBLAU_MINIMA[0], axis=1)))
    assert topology.final_basins["descent0"] == basin_32
    assert topology.final_basins["descent4"] == basin_32
    finals = [topology.final_basins[f"descent{k}"] for k in range(4)]
    assert sorted(finals) == [0, 1, 2, 3]
    assert topology.runs_by_basin[basin_32] == ["descent0", "descent4"]
    assert sorted(topology.runs_by_basin) == [0, 1, 2, 3]
    with h5py.File(himmelblau_run.topology, "r") as f:
        stored = json.loads(f["slices"][topology.name].attrs["runs_by_basin"])
    assert stored == {str(basin): runs for basin, runs in topology.runs_by_basin.items()}
    for name, assigned in topology.assignments.items():
        assert assigned[-1] == topology.final_basins[name]
        assert (assigned >= 0).all()


def test_himmelblau_artifact_fields(himmelblau_run):
    with h5py.File(himmelblau_run.topology, "r") as f:
        assert f.attrs["schema_version"] == 2
        settings = json.loads(f.attrs["settings"])
        assert settings["superlevel"] is True
        assert settings["min_persistence"] == 1.0
        group = f["slices"][next(iter(f["slices"]))]
        assert group["pyramid/stride"][()].tolist() == [1, 2, 4, 8, 16, 32]
        assert group["summary/betti"].shape == (2, 101)
        assert group["superlevel/pairs/birth"].dtype == np.float64
        assert isinstance(group["pyramid"].attrs["unstable"], (bool, np.bool_))

    topology = topology_artifact.read_slice(himmelblau_run.topology)
    assert topology.threshold_rule == "min_persistence option"
    assert topology.summary.significant.tolist() == [4, 1]
    assert not topology.pyramid.unstable
    assert topology.pyramid.recommended_level >= 2


def test_double_well_run(tmp_path):
    run = build_run(tmp_path, "double_well", [(0.3, 0.4), (-0.2, -0.5)], 41, [])
    landscape = landscape_artifact.read_slice(run.landscape)
    topology = topology_artifact.read_slice(run.topology)
    reach = cell_diagonal(landscape)

    minima = to_parameters(landscape, topology.minima.coords)
    assert len(minima) == 2
    for true_minimum in [(1.0, 0.0), (-1.0, 0.0)]:
        assert np.min(np.linalg.norm(minima - true_minimum, axis=1)) <= reach
    saddles = to_parameters(landscape, topology.saddles.coords)
    assert len(saddles) == 1
    assert np.linalg.norm(saddles[0]) <= reach
    assert topology.superlevel is None
    assert {topology.final_basins["descent0"], topology.final_basins["descent1"]} == {0, 1}


def write_landscape(path, alpha, beta, grids, coords):
    """Write a landscape.h5 with one slice 'pca' holding the given metric grids."""
    with h5py.File(path, "w") as f:
        write_root_attrs(f, schema="doodl3/landscape", schema_version=1, settings={}, upstream={})
        group = create_slice(
            f, "pca", center=np.zeros(2), directions=np.eye(2), alpha=alpha, beta=beta,
            metric_names=list(grids), explained_variance=np.array([0.6, 0.4]), attrs={"method": "pca"},
        )
        for name, grid in grids.items():
            group[name][...] = grid
        group["evaluated"][...] = True
        steps = len(coords)
        write_projection(group, "seed0", Projection(
            coords=coords, residual=np.zeros(steps), loss=np.zeros(steps),
            loss_on_plane=np.zeros(steps), step=np.arange(steps),
        ))


def noisy_double_well(sigma):
    alpha = np.linspace(-2.0, 2.0, 81)
    beta = np.linspace(-1.0, 1.0, 41)
    a, b = np.meshgrid(alpha, beta, indexing="ij")
    noise = np.random.default_rng(1).normal(0.0, sigma, a.shape)
    return alpha, beta, (a**2 - 1) ** 2 + 0.25 * a + b**2 + noise


def test_noisy_double_well_reads_stderr(tmp_path):
    sigma = 0.02
    alpha, beta, loss = noisy_double_well(sigma)
    run = RunFolder(tmp_path)
    write_landscape(run.landscape, alpha, beta, {"loss": loss, "loss_stderr": np.full(loss.shape, sigma)},
                    np.array([(0.2, 0.5), (0.9, 0.1)]))

    run_topology(run)
    topology = topology_artifact.read_slice(run.topology)

    assert topology.threshold == pytest.approx(NOISE_MULTIPLE * np.sqrt(2) * sigma)
    assert topology.threshold_rule.startswith("5 x sqrt(2) x the median loss standard error")
    assert len(topology.minima) == 2
    assert topology.final_basins == {"seed0": 1}


def test_noisy_double_well_without_stderr(tmp_path):
    alpha, beta, loss = noisy_double_well(0.02)
    run = RunFolder(tmp_path)
    write_landscape(run.landscape, alpha, beta, {"loss": loss}, np.array([(0.9, 0.1)]))

    run_topology(run)
    topology = topology_artifact.read_slice(run.topology)

    assert topology.threshold_rule.startswith("5% of the median depth")


def test_version_1_file_still_read(tmp_path):
    alpha, beta, loss = noisy_double_well(0.0)
    run = RunFolder(tmp_path)
    write_landscape(run.landscape, alpha, beta, {"loss": loss}, np.array([(0.9, 0.1)]))
    run_topology(run)
    with h5py.File(run.topology, "r+") as f:
        f.attrs["schema_version"] = 1
        group = f["slices/pca"]
        for name in ("saddles", "summary", "pyramid"):
            del group[name]
        del group.attrs["locator"]

    topology = topology_artifact.read_slice(run.topology)

    assert len(topology.minima) == 2
    assert topology.summary is None
    assert topology.pyramid is None
    assert topology.saddles is None
    assert topology.superlevel is None


def test_cli_superlevel_option(tmp_path):
    alpha, beta, loss = noisy_double_well(0.0)
    run = RunFolder(tmp_path)
    write_landscape(run.landscape, alpha, beta, {"loss": loss}, np.array([(0.9, 0.1)]))

    result = runner.invoke(app, ["topology", str(tmp_path), "--superlevel"])

    assert result.exit_code == 0, result.output
    topology = topology_artifact.read_slice(run.topology)
    assert topology.superlevel is not None
    # The highest loss of the double well on this grid is at the corner (2, +-1).
    assert topology.superlevel.maxima.value[0] == loss.max()
    assert topology.superlevel.pairs.birth.max() == loss.max()


def test_cli_invalid_stderr_message(tmp_path):
    alpha, beta, loss = noisy_double_well(0.0)
    run = RunFolder(tmp_path)
    write_landscape(run.landscape, alpha, beta, {"loss": loss, "loss_stderr": np.full(loss.shape, -1.0)},
                    np.array([(0.9, 0.1)]))

    result = runner.invoke(app, ["topology", str(tmp_path)])

    assert result.exit_code == 1
    assert "slice 'pca'" in result.output
    assert "negative standard errors" in result.output


def test_ring_valley_one_significant_ring(tmp_path):
    starts = [(1.6, 0.0), (0.0, 1.6), (-1.6, 0.2), (0.3, -1.6), (0.4, 0.3)]
    run = build_run(tmp_path, "ring", starts, 61, [])

    topology = topology_artifact.read_slice(run.topology)
    landscape = landscape_artifact.read_slice(run.landscape)

    rings = topology.pairs.significant & (topology.pairs.dim == 1)
    components = topology.pairs.significant & (topology.pairs.dim == 0)
    assert rings.sum() == 1
    assert components.sum() == 1
    # The ring is born once the grid samples nearest the unit circle close the loop,
    # a few hundredths above the true minimum 0 at this spacing.
    assert topology.pairs.birth[rings][0] < 0.05
    center_value = landscape.loss[tuple(topology.pairs.death_cell[rings][0])]
    assert topology.pairs.death[rings][0] == pytest.approx(center_value)
    death_point = to_parameters(landscape, topology.pairs.death_coords[rings][0])
    assert np.linalg.norm(death_point) <= cell_diagonal(landscape)
