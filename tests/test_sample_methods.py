"""Every direction method, the line slice and the recipe rules of `sample`, on a recorded digits ensemble."""

import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from doodl3_cli.artifacts.landscape import list_lines, list_slices, read_line, read_slice
from doodl3_cli.artifacts.trajectory import read_all_trajectories, read_layouts
from doodl3_cli.cli import app
from doodl3_cli.demo import DemoOptions, prepare_demo_run
from doodl3_cli.directions import random_directions
from doodl3_cli.errors import ConfigError
from doodl3_cli.runfolder import RunFolder
from doodl3_cli.sample import SampleOptions, line_positions, loss_barrier, run_sample

THREE_RUNS = DemoOptions(seeds=[0, 1, 2], learning_rates=[0.5], steps=20, record_every=5, hidden=[8])
NAMES = ["lr0.5-seed0", "lr0.5-seed1", "lr0.5-seed2"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> RunFolder:
    return prepare_demo_run(tmp_path_factory.mktemp("run") / "demo", THREE_RUNS)


@pytest.fixture
def run(recorded, tmp_path) -> RunFolder:
    target = tmp_path / "copy"
    target.mkdir()
    for name in ("doodl3.toml", "trajectory.h5"):
        (target / name).write_bytes((recorded.path / name).read_bytes())
    return RunFolder(target)


def test_random_slice_stores_seeded_directions(run):
    run_sample(run, SampleOptions(resolution=5, directions="random", seed=7))

    landscape = read_slice(run.landscape)
    layout, _ = read_layouts(run.trajectory)
    assert list_slices(run.landscape) == ["random"]
    expected = random_directions(landscape.center, layout, seed=7)
    np.testing.assert_allclose(landscape.directions, expected, rtol=1e-12)
    assert landscape.attrs["normalisation"].startswith("filter")
    assert landscape.attrs["recipe"]["seed"] == 7
    assert np.isfinite(landscape.metrics["loss_stderr"]).all()
    assert (landscape.metrics["loss_stderr"] > 0).all()


def test_random_projection_reconstructs_checkpoints(run):
    run_sample(run, SampleOptions(resolution=5, directions="random"))

    landscape = read_slice(run.landscape)
    trajectories = {t.name: t for t in read_all_trajectories(run.trajectory)}
    for name, projection in landscape.projections.items():
        offsets = trajectories[name].params.astype(np.float64) - landscape.center
        in_plane = projection.coords @ landscape.directions
        np.testing.assert_allclose(np.linalg.norm(offsets - in_plane, axis=1), projection.residual, rtol=1e-9)
        np.testing.assert_allclose((offsets - in_plane) @ landscape.directions.T, 0.0, atol=1e-6)


def test_endpoints_plane_holds_three_final_states(run):
    run_sample(run, SampleOptions(resolution=5, directions="endpoints", runs=tuple(NAMES)))

    landscape = read_slice(run.landscape)
    assert landscape.attrs["center_trajectory"] == NAMES[0]
    for name in NAMES:
        assert landscape.projections[name].residual[-1] == pytest.approx(0.0, abs=1e-4)
    np.testing.assert_allclose(landscape.projections[NAMES[0]].coords[-1], [0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(landscape.directions @ landscape.directions.T, np.eye(2), atol=1e-12)


def test_endpoints_two_runs_add_random_direction(run):
    run_sample(run, SampleOptions(resolution=4, directions="endpoints", runs=tuple(NAMES[:2]), seed=3))

    landscape = read_slice(run.landscape)
    assert landscape.attrs["recipe"]["runs"] == NAMES[:2]
    assert landscape.projections[NAMES[1]].residual[-1] == pytest.approx(0.0, abs=1e-4)
    assert landscape.projections[NAMES[2]].residual[-1] > 1e-3


def test_hessian_slice_stores_eigenvalues(run):
    run_sample(run, SampleOptions(resolution=3, directions="hessian"))

    landscape = read_slice(run.landscape)
    eigenvalues = json.loads(landscape.attrs["eigenvalues"])
    assert len(eigenvalues) == 2
    assert eigenvalues[0] >= eigenvalues[1]
    assert eigenvalues[0] > 0
    np.testing.assert_allclose(landscape.directions @ landscape.directions.T, np.eye(2), atol=1e-8)


def test_axes_slice_uses_named_parameters(run):
    run_sample(run, SampleOptions(resolution=4, directions="axes", axes=("0.weight[3,7]", "2.bias[1]")))

    landscape = read_slice(run.landscape)
    layout, _ = read_layouts(run.trajectory)
    offsets = {e.name: e.offset for e in layout.entries}
    assert landscape.directions[0, offsets["0.weight"] + 3 * 64 + 7] == 1.0
    assert landscape.directions[1, offsets["2.bias"] + 1] == 1.0
    assert landscape.directions.sum() == 2.0
    assert json.loads(landscape.attrs["axes"]) == ["0.weight[3,7]", "2.bias[1]"]


def test_axes_default_to_largest_spread(run):
    run_sample(run, SampleOptions(resolution=3, directions="axes"))

    landscape = read_slice(run.landscape)
    finals = np.stack([t.params[-1] for t in read_all_trajectories(run.trajectory)]).astype(np.float64)
    spread = finals.std(axis=0)
    chosen = np.flatnonzero(landscape.directions.any(axis=0))
    assert set(chosen) == set(np.argsort(spread)[-2:])


def test_file_slice_and_changed_file_recomputes(run, tmp_path):
    layout, _ = read_layouts(run.trajectory)
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npy"
    np.save(path, 0.1 * rng.standard_normal((2, layout.size)))
    run_sample(run, SampleOptions(resolution=3, directions="file", directions_file=path))
    first = read_slice(run.landscape)

    replacement = 0.2 * rng.standard_normal((2, layout.size))
    np.save(path, replacement)
    run_sample(run, SampleOptions(resolution=3, directions="file", directions_file=path))

    second = read_slice(run.landscape)
    np.testing.assert_array_equal(second.directions, replacement)
    assert not np.array_equal(first.loss, second.loss)


def test_file_slice_rejects_wrong_layout(run, tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, np.ones((2, 5)))

    with pytest.raises(ConfigError, match=r"expected shape \(2, \d+\)"):
        run_sample(run, SampleOptions(resolution=3, directions="file", directions_file=path))


def test_other_method_replaces_stale_slice(run):
    run_sample(run, SampleOptions(resolution=3))
    run_sample(run, SampleOptions(resolution=3, directions="random", seed=1))
    seed_one = read_slice(run.landscape)

    run_sample(run, SampleOptions(resolution=3, directions="random", seed=2))

    seed_two = read_slice(run.landscape)
    assert list_slices(run.landscape) == ["random"]
    assert not np.array_equal(seed_one.directions, seed_two.directions)
    assert not np.array_equal(seed_one.loss, seed_two.loss)


def test_line_loss_barrier(run):
    run_sample(run, SampleOptions(resolution=11, margin=0.2, line=f"{NAMES[0]}:{NAMES[2]}"))

    line = read_line(run.landscape)
    landscape = read_slice(run.landscape)
    assert list_lines(run.landscape) == [f"{NAMES[0]}--{NAMES[2]}"]
    assert list_slices(run.landscape) == ["pca"]
    np.testing.assert_allclose(line.t, np.arange(-2, 13) / 10)
    assert line.loss[2] == pytest.approx(landscape.projections[NAMES[0]].loss[-1], rel=1e-5)
    assert line.loss[12] == pytest.approx(landscape.projections[NAMES[2]].loss[-1], rel=1e-5)
    inside = line.loss[2:13] - ((1 - line.t[2:13]) * line.loss[2] + line.t[2:13] * line.loss[12])
    assert line.attrs["barrier"] == pytest.approx(inside.max(), abs=1e-12)
    assert line.attrs["barrier"] >= 0
    assert line.evaluated.all()


def test_line_positions_include_both_runs():
    t = line_positions(5, 0.3)

    assert t[0] == -0.5
    assert t[-1] == 1.5
    assert 0.0 in t
    assert 1.0 in t


def test_loss_barrier_of_a_bump():
    t = np.linspace(-0.5, 1.5, 9)
    loss = 1.0 + 2.0 * t + np.where((t >= 0) & (t <= 1), np.sin(np.pi * t), 0.0)

    barrier, where = loss_barrier(t, loss)

    assert barrier == pytest.approx(1.0)
    assert where == 0.5


def test_recompute_policy_without_batchnorm_equals_fixed(run, tmp_path):
    run_sample(run, SampleOptions(resolution=4))
    fixed = read_slice(run.landscape)

    run_sample(run, SampleOptions(resolution=4, batchnorm="recompute", recompute_samples=100))

    recomputed = read_slice(run.landscape)
    assert recomputed.attrs["batchnorm_policy"] == "recompute"
    assert recomputed.attrs["batchnorm_samples"] == 100
    np.testing.assert_allclose(recomputed.loss, fixed.loss, rtol=1e-6)
    with h5py.File(run.landscape, "r") as f:
        assert f.attrs["schema_version"] == 2


def test_cli_sample_random_and_rules(run):
    runner = CliRunner()

    ok = runner.invoke(app, ["sample", str(run.path), "--resolution", "3", "--directions", "random", "--seed", "4"])
    axes_without_method = runner.invoke(app, ["sample", str(run.path), "--axes", "0.weight[0,0],0.weight[0,1]"])
    unknown = runner.invoke(app, ["sample", str(run.path), "--directions", "diagonal"])
    bad_line = runner.invoke(app, ["sample", str(run.path), "--line", "a-b"])

    assert ok.exit_code == 0, ok.output
    assert read_slice(run.landscape).attrs["recipe"]["seed"] == 4
    assert axes_without_method.exit_code == 2
    assert "only applies with --directions axes" in axes_without_method.output
    assert unknown.exit_code == 2
    assert "pca, random, endpoints, hessian, axes, file" in unknown.output
    assert bad_line.exit_code == 2


def test_cli_progress_is_plain_when_piped(run):
    result = CliRunner().invoke(app, ["sample", str(run.path), "--resolution", "3"])

    assert result.exit_code == 0, result.output
    assert "sampling the landscape: 9/9" in result.output
    assert "\x1b[" not in result.output
