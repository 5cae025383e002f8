import h5py
import numpy as np
import pytest

from doodl3_cli.artifacts.landscape import partial_path, read_slice
from doodl3_cli.artifacts.trajectory import read_all_trajectories
from doodl3_cli.demo import DemoOptions, prepare_demo_run
from doodl3_cli.errors import UsageError
from doodl3_cli.runfolder import RunFolder
from doodl3_cli.sample import SampleOptions, run_sample

SMALL = DemoOptions(seeds=[0, 1], learning_rates=[0.3, 1.2], steps=40, record_every=4, hidden=[16])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> RunFolder:
    return prepare_demo_run(tmp_path_factory.mktemp("run") / "demo", SMALL)


def _copy_run(run: RunFolder, tmp_path) -> RunFolder:
    target = tmp_path / "copy"
    target.mkdir(parents=True)
    for name in ("doodl3.toml", "trajectory.h5"):
        (target / name).write_bytes((run.path / name).read_bytes())
    return RunFolder(target)


def test_sample_projections_match_numpy_pca(recorded, tmp_path):
    run = _copy_run(recorded, tmp_path)

    run_sample(run, SampleOptions(resolution=9))

    landscape = read_slice(run.landscape)
    trajectories = read_all_trajectories(run.trajectory)
    matrix = np.concatenate([t.params for t in trajectories]).astype(np.float64)
    _, _, vt = np.linalg.svd(matrix - matrix.mean(axis=0), full_matrices=False)
    for t in trajectories:
        expected = (t.params.astype(np.float64) - landscape.center.astype(np.float64)) @ vt[:2].T
        got = landscape.projections[t.name].coords
        signs = np.sign(np.sum(expected * got, axis=0))
        np.testing.assert_allclose(got, expected * signs, atol=1e-5)


def test_sample_grid_covers_every_checkpoint(recorded, tmp_path):
    run = _copy_run(recorded, tmp_path)

    run_sample(run, SampleOptions(resolution=7, margin=0.1))

    landscape = read_slice(run.landscape)
    coords = np.concatenate([p.coords for p in landscape.projections.values()])
    assert landscape.alpha[0] < coords[:, 0].min()
    assert coords[:, 0].max() < landscape.alpha[-1]
    assert landscape.beta[0] < coords[:, 1].min()
    assert coords[:, 1].max() < landscape.beta[-1]
    assert landscape.evaluated.all()
    assert np.isfinite(landscape.loss).all()
    assert ((landscape.metrics["accuracy"] >= 0) & (landscape.metrics["accuracy"] <= 1)).all()


def test_sample_center_is_lowest_loss_final_state(recorded, tmp_path):
    run = _copy_run(recorded, tmp_path)

    run_sample(run, SampleOptions(resolution=5))

    landscape = read_slice(run.landscape)
    finals = {name: p.loss[-1] for name, p in landscape.projections.items()}
    best = min(finals, key=finals.get)
    assert landscape.attrs["center_trajectory"] == best
    np.testing.assert_allclose(landscape.projections[best].coords[-1], [0.0, 0.0], atol=1e-9)
    assert landscape.projections[best].residual[-1] == pytest.approx(0.0, abs=1e-9)


class _Interrupt(Exception):
    pass


def test_sample_resumes_bit_for_bit(recorded, tmp_path):
    uninterrupted = _copy_run(recorded, tmp_path / "a")
    run_sample(uninterrupted, SampleOptions(resolution=33))
    interrupted = _copy_run(recorded, tmp_path / "b")

    def stop_after_first_block(done, total):
        if 0 < done < total:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        run_sample(interrupted, SampleOptions(resolution=33), progress=stop_after_first_block)
    assert not interrupted.landscape.exists()
    with h5py.File(partial_path(interrupted.landscape), "r") as f:
        partial = f["slices/pca/evaluated"][()]
    assert 0 < partial.sum() < partial.size

    run_sample(interrupted, SampleOptions(resolution=33))

    a = read_slice(uninterrupted.landscape)
    b = read_slice(interrupted.landscape)
    assert np.array_equal(a.loss, b.loss)
    assert np.array_equal(a.metrics["accuracy"], b.metrics["accuracy"])


def test_sample_other_recipe_resamples(recorded, tmp_path):
    run = _copy_run(recorded, tmp_path)
    run_sample(run, SampleOptions(resolution=5))

    run_sample(run, SampleOptions(resolution=6))

    assert read_slice(run.landscape).loss.shape == (6, 6)


def test_sample_rewrites_newer_schema_landscape(recorded, tmp_path):
    run = _copy_run(recorded, tmp_path)
    run_sample(run, SampleOptions(resolution=5))
    expected = read_slice(run.landscape).loss
    with h5py.File(run.landscape, "a") as f:
        f.attrs["schema_version"] = 99

    run_sample(run, SampleOptions(resolution=5))

    with h5py.File(run.landscape, "r") as f:
        assert int(f.attrs["schema_version"]) == 2
    assert np.array_equal(read_slice(run.landscape).loss, expected)


def test_sample_explicit_center_and_bad_name(recorded, tmp_path):
    run = _copy_run(recorded, tmp_path)

    run_sample(run, SampleOptions(resolution=5, center="lr0.3-seed1:0"))

    landscape = read_slice(run.landscape)
    assert landscape.attrs["center_trajectory"] == "lr0.3-seed1"
    assert landscape.attrs["center_index"] == 0
    with pytest.raises(UsageError, match="trajectory 'nope' not found"):
        run_sample(run, SampleOptions(resolution=5, center="nope"))
