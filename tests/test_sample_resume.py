"""Resuming `sample` after SIGKILL, and sampling with two torchrun processes, against a plain run."""

import os
import random
import signal
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
from doodl3_cli.artifacts.landscape import read_slice
from doodl3_cli.demo import DemoOptions, prepare_demo_run
from doodl3_cli.runfolder import RunFolder
from doodl3_cli.sample import SampleOptions, run_sample

SMALL = DemoOptions(seeds=[0, 1], learning_rates=[0.5], steps=20, record_every=5, hidden=[16])
CHUNK = 32
RESOLUTION = 31

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


def _kill_during_grid(run: RunFolder, script: str, delay: float) -> int:
    """Start a child that samples `run`, SIGKILL it `delay` seconds after the grid starts; return its exit code."""
    child = subprocess.Popen([sys.executable, script, str(run.path)])
    while not run.landscape.exists() and child.poll() is None:
        time.sleep(0.01)
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    return child.wait(timeout=60)


def test_sample_resumes_after_sigkill_bit_for_bit(recorded, reference, tmp_path):
    expected, elapsed = reference
    script = _child_script(tmp_path)
    # landscape.h5 appears when the grid evaluation starts; kill at a random moment within it,
    # with shorter delays when a loaded machine let the child finish first.
    for attempt in range(4):
        run = _copy_run(recorded, tmp_path / f"attempt{attempt}")
        code = _kill_during_grid(run, script, random.uniform(0.05, 0.6) * elapsed / 2**attempt)
        if code == -signal.SIGKILL:
            break
    assert code == -signal.SIGKILL, "the child finished before it was killed"

    # A kill before the slice group was complete leaves nothing to check but the resume.
    try:
        with h5py.File(run.landscape, "r") as f:
            evaluated = f["slices/pca/evaluated"][()]
            loss = f["slices/pca/loss"][()]
    except (OSError, KeyError):
        evaluated = loss = None
    if evaluated is not None:
        assert np.array_equal(loss[evaluated], expected.loss[evaluated])
        assert np.isnan(loss[~evaluated]).all()
        flat = evaluated.reshape(-1)
        for start in range(0, flat.size, CHUNK):
            assert flat[start : start + CHUNK].all() or not flat[start : start + CHUNK].any()

    _sample_in_process(run)

    resumed = read_slice(run.landscape)
    assert np.array_equal(resumed.loss, expected.loss)
    assert np.array_equal(resumed.metrics["loss_stderr"], expected.metrics["loss_stderr"])
    assert np.array_equal(resumed.metrics["accuracy"], expected.metrics["accuracy"])
    assert resumed.evaluated.all()


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
