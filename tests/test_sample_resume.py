"""Resuming `sample` after SIGKILL at random moments, and sampling with two torchrun processes, against a plain run."""

import os
import random
import socket
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest
import torch

from doodl3_cli import sample
from doodl3_cli.artifacts.landscape import partial_path, read_slice
from doodl3_cli.demo import DemoOptions, prepare_demo_run
from doodl3_cli.runfolder import RunFolder
from doodl3_cli.sample import SampleOptions, run_sample

from tests import forked

SMALL = DemoOptions(seeds=[0, 1], learning_rates=[0.5], steps=20, record_every=5, hidden=[16])
CHUNK = 32
RESOLUTION = 31
SAMPLE_ARGS = ("--resolution", str(RESOLUTION), "--points-per-pass", "16")
OTHER_ARGS = ("--resolution", "25", "--margin", "0.4", "--points-per-pass", "16")

CHILD = """
import sys
import torch
from doodl3_cli import sample
from doodl3_cli.runfolder import RunFolder
from doodl3_cli.sample import SampleOptions, run_sample

torch.set_num_threads(1)
sample.CHUNK_POINTS = {chunk}
run_sample(RunFolder(sys.argv[1]), SampleOptions(resolution={resolution}, points_per_pass=16))
"""


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> RunFolder:
    return prepare_demo_run(tmp_path_factory.mktemp("run") / "demo", SMALL)


@pytest.fixture(scope="module")
def reference(recorded, tmp_path_factory):
    """The grid of one uninterrupted single-process, single-thread run, and how long it took."""
    run = _copy_run(recorded, tmp_path_factory.mktemp("reference"))
    started = time.monotonic()
    _sample_in_process(run)
    return read_slice(run.landscape), time.monotonic() - started


def _sample_in_process(run: RunFolder) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sample, "CHUNK_POINTS", CHUNK)
        try:
            run_sample(run, SampleOptions(resolution=RESOLUTION, points_per_pass=16))
        finally:
            torch.set_num_threads(threads)


def _copy_run(run: RunFolder, folder) -> RunFolder:
    target = folder / "copy"
    target.mkdir(parents=True)
    for name in ("doodl3.toml", "trajectory.h5"):
        (target / name).write_bytes((run.path / name).read_bytes())
    return RunFolder(target)


def _child_script(tmp_path) -> str:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(CHILD.format(chunk=CHUNK, resolution=RESOLUTION)))
    return str(path)




def _assert_same_grid(found, expected) -> None:
    assert found.evaluated.all()
    assert np.array_equal(found.alpha, expected.alpha)
    assert np.array_equal(found.beta, expected.beta)
    for metric in ("loss", "loss_stderr", "accuracy"):
        assert np.array_equal(found.metrics[metric], expected.metrics[metric], equal_nan=True), metric


def _check_killed(run: RunFolder, expected) -> None:
    """Check that a killed sample left either the whole grid `expected` or a partial grid that matches it.

    A partial file that a kill left unreadable (killed while HDF5 wrote its metadata)
    is discarded by the next sample with a warning, so it passes here.
    """
    partial = partial_path(run.landscape)
    if run.landscape.exists():
        # Killed after the rename, while the command was still ending.
        _assert_same_grid(read_slice(run.landscape), expected)
        assert not partial.exists()
        return
    if not partial.exists():
        return
    try:
        with h5py.File(partial, "r") as f:
            evaluated = f["slices/pca/evaluated"][()]
            loss = f["slices/pca/loss"][()]
    except (OSError, KeyError):
        return
    assert np.array_equal(loss[evaluated], expected.loss[evaluated])
    # Metrics are flushed before the mask, so a kill between the two leaves values in cells not yet marked.
    pending = loss[~evaluated]
    assert (np.isnan(pending) | (pending == expected.loss[~evaluated])).all()
    flat = evaluated.reshape(-1)
    for start in range(0, flat.size, CHUNK):
        assert flat[start : start + CHUNK].all() or not flat[start : start + CHUNK].any()


def test_sample_resumes_after_sigkills_bit_for_bit(recorded, reference, zygote, tmp_path):
    expected, _ = reference
    timing = _copy_run(recorded, tmp_path / "timing")
    full = zygote.run("sample", timing.path, *SAMPLE_ARGS, chunk=CHUNK)
    assert full.exit_code == 0, full.stderr
    _assert_same_grid(read_slice(timing.landscape), expected)

    generator = random.Random(0)
    run = _copy_run(recorded, tmp_path / "run0")
    kills = 0
    for attempt in range(40):
        pid = zygote.start("sample", run.path, *SAMPLE_ARGS, chunk=CHUNK)
        # A moment anywhere in a whole sample: start-up, the grid, the projections, the rename.
        time.sleep(generator.uniform(0, full.seconds))
        result = zygote.kill(pid)
        if forked.killed(result):
            kills += 1
            _check_killed(run, expected)
            if kills == 10:
                break
        else:
            # The rest of the grid took less than the moment drawn: check it, then start over.
            assert result.exit_code == 0, result.stderr
            _assert_same_grid(read_slice(run.landscape), expected)
            run = _copy_run(recorded, tmp_path / f"run{attempt + 1}")
    assert kills == 10

    rerun = zygote.run("sample", run.path, *SAMPLE_ARGS, chunk=CHUNK)

    assert rerun.exit_code == 0, rerun.stderr
    _assert_same_grid(read_slice(run.landscape), expected)
    assert not partial_path(run.landscape).exists()
    assert sorted(p.name for p in run.path.iterdir()) == ["doodl3.toml", "landscape.h5", "trajectory.h5"]


def test_resample_other_recipe_keeps_landscape_until_done(recorded, reference, zygote, tmp_path):
    expected_old, _ = reference
    fresh = _copy_run(recorded, tmp_path / "uninterrupted")
    uninterrupted = zygote.run("sample", fresh.path, *OTHER_ARGS, chunk=CHUNK)
    assert uninterrupted.exit_code == 0, uninterrupted.stderr
    expected_new = read_slice(fresh.landscape)
    run = _copy_run(recorded, tmp_path / "run")
    first = zygote.run("sample", run.path, *SAMPLE_ARGS, chunk=CHUNK)
    assert first.exit_code == 0, first.stderr
    old_bytes = run.landscape.read_bytes()

    generator = random.Random(1)
    partial = partial_path(run.landscape)
    kills = 0
    while kills < 3:
        pid = zygote.start("sample", run.path, *OTHER_ARGS, chunk=CHUNK)
        forked.wait_for(lambda: partial.exists(), timeout=60, description=f"{partial} to appear")
        time.sleep(generator.uniform(0, 0.5) * uninterrupted.seconds)
        result = zygote.kill(pid)
        assert forked.killed(result), f"the re-sample finished before it was killed: {result.stderr}"
        kills += 1

        assert run.landscape.read_bytes() == old_bytes
        _assert_same_grid(read_slice(run.landscape), expected_old)

    rerun = zygote.run("sample", run.path, *OTHER_ARGS, chunk=CHUNK)

    assert rerun.exit_code == 0, rerun.stderr
    _assert_same_grid(read_slice(run.landscape), expected_new)
    assert not partial.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_gloo_processes_match_single_process(recorded, reference, tmp_path):
    expected, _ = reference
    run = _copy_run(recorded, tmp_path)
    script = _child_script(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), script, str(run.path)],
        check=True, timeout=300, env=env,
    )

    distributed = read_slice(run.landscape)
    assert np.array_equal(distributed.loss, expected.loss)
    assert np.array_equal(distributed.metrics["loss_stderr"], expected.metrics["loss_stderr"])
    assert distributed.evaluated.all()
    assert set(distributed.projections) == set(expected.projections)
