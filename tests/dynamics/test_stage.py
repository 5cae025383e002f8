"""Tests of the dynamics stage on real landscape.h5 and trajectory.h5 files."""

import json

import h5py
import numpy as np
import pytest

from doodl3_cli.artifacts import dynamics as dynamics_artifact
from doodl3_cli.artifacts._common import read_content_id, write_root_attrs
from doodl3_cli.artifacts.landscape import Projection, create_slice, write_projection
from doodl3_cli.artifacts.trajectory import Layout, TrajectoryWriter, read_trajectory
from doodl3_cli.dynamics.morse import REGION_OUTSIDE, box_index
from doodl3_cli.dynamics.stage import run_dynamics
from doodl3_cli.dynamics.trajectories import update_diagnostics
from doodl3_cli.errors import AnalysisError, ArtifactError
from doodl3_cli.runfolder import RunFolder

ALPHA = np.linspace(-2.0, 2.0, 41)
BETA = np.linspace(-1.5, 1.5, 31)
STARTS = {"run-a": (0.4, 1.0), "run-b": (-0.3, -1.2)}


def double_well(w):
    w = np.asarray(w, dtype=np.float64)
    return (w[..., 0] ** 2 - 1.0) ** 2 + w[..., 1] ** 2


def double_well_gradient(w):
    return np.array([4.0 * w[0] * (w[0] ** 2 - 1.0), 2.0 * w[1]])


def gradient_descent(start, *, steps=60, lr=0.05, every=5):
    """Return (params [T, 2], step [T]) of plain gradient descent on the double well."""
    w = np.array(start, dtype=np.float64)
    params, step = [w.copy()], [0]
    for t in range(1, steps + 1):
        w = w - lr * double_well_gradient(w)
        if t % every == 0:
            params.append(w.copy())
            step.append(t)
    return np.array(params), np.array(step)


def write_trajectories(run, starts=STARTS):
    layout = Layout.from_tensors({"w": np.zeros(2, dtype=np.float32)})
    for name, start in starts.items():
        params, step = gradient_descent(start)
        with TrajectoryWriter(
            run.trajectory, layout=layout, buffer_layout=Layout([]), trajectory=name, metric_keys=["loss"]
        ) as writer:
            for row, t in zip(params, step):
                writer.append(row, np.zeros(0), step=int(t), metrics={"loss": float(double_well(row))})


def write_landscape(run, *, loss=None, extra_projections=None, starts=STARTS):
    a, b = np.meshgrid(ALPHA, BETA, indexing="ij")
    loss = double_well(np.stack([a, b], axis=-1)) if loss is None else loss
    with h5py.File(run.landscape, "w") as f:
        write_root_attrs(
            f,
            schema="doodl3/landscape",
            schema_version=1,
            settings={},
            upstream={"trajectory.h5": read_content_id(run.trajectory)},
        )
        group = create_slice(
            f,
            "pca",
            center=np.zeros(2),
            directions=np.eye(2),
            alpha=ALPHA,
            beta=BETA,
            metric_names=["loss"],
            explained_variance=np.array([0.7, 0.3]),
            attrs={"method": "pca"},
        )
        group["loss"][...] = loss
        group["evaluated"][...] = True
        projections = {name: read_trajectory(run.trajectory, name).params.astype(np.float64) for name in starts}
        projections.update(extra_projections or {})
        for name, coords in projections.items():
            values = double_well(coords)
            write_projection(
                group,
                name,
                Projection(
                    coords=coords,
                    residual=np.zeros(len(coords)),
                    loss=values,
                    loss_on_plane=values,
                    step=np.arange(len(coords)),
                ),
            )


@pytest.fixture
def run(tmp_path):
    folder = RunFolder(tmp_path)
    write_trajectories(folder)
    write_landscape(folder)
    return folder


def test_stage_writes_provenance(run):
    path = run_dynamics(run)

    assert path == run.dynamics
    with h5py.File(path, "r") as f:
        assert f.attrs["schema"] == "doodl3/dynamics"
        assert f.attrs["schema_version"] == 2
        assert json.loads(f.attrs["upstream"]) == {
            "trajectory.h5": read_content_id(run.trajectory),
            "landscape.h5": read_content_id(run.landscape),
        }
        assert json.loads(f.attrs["settings"])["tau"] is None
    assert [p.name for p in run.path.iterdir() if p.name.endswith(".tmp")] == []


def test_stage_finds_both_wells(run):
    run_dynamics(run)

    result = dynamics_artifact.read_slice(run.dynamics, "pca")

    i, j, _ = box_index(ALPHA, BETA, np.array([(-1.0, 0.0), (1.0, 0.0), (0.0, 0.0)]))
    left, right, saddle = result.morse.morse_set[i, j]
    assert result.morse.attractor.sum() == 2
    assert result.morse.attractor[[left, right]].all()
    assert {(saddle, left), (saddle, right)} <= {tuple(p) for p in result.morse.order.tolist()}
    assert result.map == "gradient"


def test_stage_groups_runs_by_final_minimum(tmp_path):
    starts = {"a": (0.4, 1.0), "b": (-0.3, -1.2), "c": (1.8, -1.0), "d": (-0.05, 0.5)}
    folder = RunFolder(tmp_path)
    write_trajectories(folder, starts)
    write_landscape(folder, starts=starts, extra_projections={"not-a-run": np.zeros((3, 2))})
    run_dynamics(folder)

    result = dynamics_artifact.read_slice(folder.dynamics, "pca")
    findings = dynamics_artifact.read_findings(folder.dynamics)

    i, j, _ = box_index(ALPHA, BETA, np.array([(-1.0, 0.0), (1.0, 0.0)]))
    left, right = result.morse.morse_set[i, j]
    assert result.ensemble.groups == {int(right): ["a", "c"], int(left): ["b", "d"]}
    assert result.ensemble.runs == ["a", "b", "c", "d"]
    splits = [f for f in findings if f.kind == "ensemble_split"]
    assert len(splits) == 1
    assert splits[0].evidence["groups"] == {str(right): ["a", "c"], str(left): ["b", "d"]}


def test_stage_without_config_skips_model_probes(run):
    run_dynamics(run)

    ensemble = dynamics_artifact.read_ensemble(run.dynamics)

    assert ensemble.runs == ["run-a", "run-b"]
    assert ensemble.disagreement is None
    assert ensemble.entropy is None
    assert all(t.sharpness is None for t in ensemble.trajectories)
    distance = np.linalg.norm(
        read_trajectory(run.trajectory, "run-a").params[-1].astype(np.float64)
        - read_trajectory(run.trajectory, "run-b").params[-1].astype(np.float64)
    )
    assert ensemble.final_distance[0, 1] == pytest.approx(distance)


def test_stage_stores_conley_indices(run):
    run_dynamics(run)

    result = dynamics_artifact.read_slice(run.dynamics, "pca")

    i, j, _ = box_index(ALPHA, BETA, np.array([(-1.0, 0.0), (1.0, 0.0), (0.0, 0.0)]))
    left, right, saddle = result.morse.morse_set[i, j]
    assert result.morse.conley_index.shape == (result.morse.n_sets, 3)
    assert result.morse.conley_index[left].tolist() == [1, 0, 0]
    assert result.morse.conley_index[right].tolist() == [1, 0, 0]
    assert result.morse.conley_index[saddle].tolist() == [0, 1, 0]
    assert result.tau == pytest.approx(3.0 / 8.0, rel=0.05)
    assert "local-minimum" in result.tau_rule
    assert result.grad_alpha.shape == (41, 31)
    np.testing.assert_array_equal(result.alpha, ALPHA)


def test_stage_places_checkpoints_in_their_basins(run):
    run_dynamics(run)

    result = dynamics_artifact.read_slice(run.dynamics, "pca")

    i, j, _ = box_index(ALPHA, BETA, np.array([(1.0, 0.0), (-1.0, 0.0)]))
    right, left = result.morse.morse_set[i, j]
    assert sorted(result.placements) == ["run-a", "run-b"]
    assert result.placements["run-a"].shape == (13,)
    assert result.placements["run-a"][-1] == right
    assert result.placements["run-b"][-1] == left


def test_stage_trajectory_diagnostics(run):
    run_dynamics(run)

    for name in STARTS:
        stored = dynamics_artifact.read_trajectory(run.dynamics, name)
        trajectory = read_trajectory(run.trajectory, name)
        expected = update_diagnostics(name, trajectory.params, trajectory.step, trajectory.metrics["loss"])

        np.testing.assert_array_equal(stored.step, trajectory.step)
        np.testing.assert_array_equal(stored.step_length, expected.step_length)
        np.testing.assert_array_equal(stored.cosine, expected.cosine)
        np.testing.assert_array_equal(stored.speed, expected.speed)
        np.testing.assert_array_equal(stored.loss, trajectory.metrics["loss"])
        assert stored.path_over_displacement == expected.path_over_displacement
    assert dynamics_artifact.list_trajectories(run.dynamics) == ["run-a", "run-b"]


def test_stage_uses_given_tau(run):
    run_dynamics(run, tau=0.2)

    result = dynamics_artifact.read_slice(run.dynamics)
    with h5py.File(run.dynamics, "r") as f:
        settings = json.loads(f.attrs["settings"])

    assert result.tau == 0.2
    assert result.tau_rule == "given"
    assert settings["tau"] == 0.2


@pytest.mark.parametrize("tau", [0.0, -0.5, float("nan"), float("inf")])
def test_stage_rejects_bad_tau(run, tau):
    with pytest.raises(AnalysisError, match="tau must be a positive finite time"):
        run_dynamics(run, tau=tau)
    assert not run.dynamics.exists()


def test_stage_records_topology_content_id(run):
    with h5py.File(run.topology, "w") as f:
        content_id = write_root_attrs(f, schema="doodl3/topology", schema_version=1, settings={}, upstream={})

    run_dynamics(run)

    with h5py.File(run.dynamics, "r") as f:
        assert json.loads(f.attrs["upstream"])["topology.h5"] == content_id


def test_stage_missing_landscape_raises(run):
    run.landscape.unlink()
    with pytest.raises(ArtifactError, match=r"landscape\.h5: artifact not found"):
        run_dynamics(run)


def test_stage_missing_trajectory_raises(run):
    run.trajectory.unlink()
    with pytest.raises(ArtifactError, match=r"trajectory\.h5: artifact not found"):
        run_dynamics(run)


def test_stage_handles_nonfinite_cells(run):
    a, b = np.meshgrid(ALPHA, BETA, indexing="ij")
    loss = double_well(np.stack([a, b], axis=-1))
    loss[:4, :4] = np.nan
    loss[-1, -1] = np.inf
    write_landscape(run, loss=loss)

    run_dynamics(run)

    result = dynamics_artifact.read_slice(run.dynamics)
    assert result.attrs["invalid_cells"] > 17
    assert (result.morse.regions[:4, :4] == REGION_OUTSIDE).all()
    assert result.morse.regions[-1, -1] == REGION_OUTSIDE
    assert np.isnan(result.grad_alpha[:4, :4]).all()
    assert result.morse.attractor.sum() == 2


def test_stage_marks_projections_outside_the_grid(run):
    write_landscape(run, extra_projections={"far": np.array([[5.0, 0.0], [1.0, 0.0], [np.nan, 0.0]])})

    run_dynamics(run)

    result = dynamics_artifact.read_slice(run.dynamics)
    placement = result.placements["far"]
    assert placement[0] == REGION_OUTSIDE
    assert placement[1] >= 0
    assert placement[2] == REGION_OUTSIDE


def test_read_missing_slice_raises(run):
    run_dynamics(run)
    with pytest.raises(ArtifactError, match="slice 'other' not found"):
        dynamics_artifact.read_slice(run.dynamics, "other")
