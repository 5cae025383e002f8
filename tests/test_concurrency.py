"""Two writers on one artifact, and readers while a stage writes, with the commands in forked children.

A second writer fails at once with one error line that names the file. A reader
either succeeds or fails with one error line. No command hangs, because every
wait has a timeout (see forked.py).
"""

import os

import h5py
import numpy as np
import pytest

from doodl3_cli.artifacts import topology as topology_artifact
from doodl3_cli.artifacts._common import WriterLock, attr_json, read_content_id, writer_active
from doodl3_cli.artifacts.landscape import partial_path, read_slice
from doodl3_cli.artifacts.trajectory import read_trajectory
from doodl3_cli.demo import DemoOptions, prepare_demo_run
from doodl3_cli.runfolder import RunFolder
from doodl3_cli.sample import SampleOptions, run_sample

from tests import forked

SMALL = DemoOptions(seeds=[0, 1], learning_rates=[0.5], steps=20, record_every=5, hidden=[16])
# A grid that keeps a one-thread sample busy for a few seconds, in small chunks.
SLOW_SAMPLE = ("--resolution", "161", "--points-per-pass", "16")
CHUNK = 32




@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> RunFolder:
    """A recorded demo run, sampled on a 15 x 15 grid and analysed by topology."""
    from doodl3_cli.topology import run_topology

    run = prepare_demo_run(tmp_path_factory.mktemp("run") / "demo", SMALL)
    run_sample(run, SampleOptions(resolution=15))
    run_topology(run)
    return run


def _start_slow_sample(zygote, run: RunFolder) -> int:
    """Start a sample of SLOW_SAMPLE and return its PID once it evaluates the grid."""
    pid = zygote.start("sample", run.path, *SLOW_SAMPLE, chunk=CHUNK)
    partial = partial_path(run.landscape)
    forked.wait_for(lambda: partial.exists(), timeout=60, description=f"{partial} to appear")
    return pid


def _one_error_line(finished) -> str:
    assert finished.exit_code == 1, finished.stderr
    assert "Traceback" not in finished.stderr
    assert len(finished.error_lines) == 1, finished.stderr
    return finished.error_lines[0]


def test_second_sample_fails_at_once(analysed, zygote, tmp_path):
    run = forked.copy_run(analysed, tmp_path / "run", names=("doodl3.toml", "trajectory.h5"))
    first = _start_slow_sample(zygote, run)

    second = zygote.run("sample", run.path, *SLOW_SAMPLE, chunk=CHUNK, timeout=60)
    still_writing = writer_active(run.landscape)

    line = _one_error_line(second)
    assert line.startswith(f"error: {run.landscape}: already open for writing by another process (PID {first}, lock ")
    assert still_writing
    finished = zygote.wait(first, timeout=120)
    assert finished.exit_code == 0, finished.stderr
    assert read_slice(run.landscape).evaluated.all()


def test_second_record_fails_at_once(zygote, tmp_path, mlp_checkpoints):
    folder, _ = mlp_checkpoints
    run = tmp_path / "run"
    follower = zygote.start(
        "record", run, "--from", folder, "--follow", "--until-idle", "60", "--poll-interval", "0.05"
    )
    forked.wait_for(lambda: writer_active(run / "trajectory.h5"), timeout=60, description="record to hold the writer lock")

    second = zygote.run("record", run, "--from", folder, timeout=60)

    line = _one_error_line(second)
    assert line.startswith(
        f"error: {run / 'trajectory.h5'}: already open for writing by another process (PID {follower}, lock "
    )
    # The lock goes with its holder, also on SIGKILL, so the next record resumes.
    assert forked.killed(zygote.kill(follower))
    again = zygote.run("record", run, "--from", folder, timeout=60)
    assert again.exit_code == 0, again.stderr
    assert read_trajectory(run / "trajectory.h5", "checkpoints").step.tolist() == [0, 3, 6, 9, 12]


@pytest.mark.parametrize("stage", ["topology", "dynamics", "report"])
def test_locked_artifact_rejects_second_writer(analysed, zygote, tmp_path, stage):
    run = forked.copy_run(analysed, tmp_path / "run", names=("doodl3.toml", "trajectory.h5", "landscape.h5", "topology.h5"))
    artifact = run.path / {"topology": "topology.h5", "dynamics": "dynamics.h5", "report": "report.html"}[stage]
    before = artifact.read_bytes() if artifact.exists() else None
    args = (stage, "--sharpness-checkpoints", "0") if stage == "dynamics" else (stage,)

    with WriterLock(artifact):
        second = zygote.run(*args, run.path, timeout=60)

    line = _one_error_line(second)
    assert line.startswith(f"error: {artifact}: already open for writing by another process (PID {os.getpid()}, lock ")
    assert (artifact.read_bytes() if artifact.exists() else None) == before
    assert list(run.path.glob(".*.tmp")) == []


def test_concurrent_topology_runs_leave_one_whole_file(analysed, zygote, tmp_path):
    run = forked.copy_run(analysed, tmp_path / "run")

    pids = [zygote.start("topology", run.path) for _ in range(3)]
    results = [zygote.wait(pid, timeout=60) for pid in pids]

    assert all(result is not None for result in results)
    for result in results:
        if result.exit_code != 0:
            assert _one_error_line(result).startswith(f"error: {run.topology}: already open for writing")
    assert any(result.exit_code == 0 for result in results)
    written = topology_artifact.read_slice(run.topology)
    expected = topology_artifact.read_slice(analysed.topology)
    assert np.array_equal(written.basins, expected.basins)
    assert np.array_equal(written.pairs.birth, expected.pairs.birth)
    assert list(run.path.glob(".*.tmp")) == []


def test_topology_during_first_sample_fails_clearly(analysed, zygote, tmp_path):
    run = forked.copy_run(analysed, tmp_path / "run", names=("doodl3.toml", "trajectory.h5"))
    writer = _start_slow_sample(zygote, run)

    reader = zygote.run("topology", run.path, timeout=60)

    line = _one_error_line(reader)
    assert line.startswith(f"error: {run.landscape}: artifact not found, and a process (PID {writer}) is writing it")
    assert not run.topology.exists()
    assert zygote.kill(writer) is not None


def test_readers_during_resample_use_previous_landscape(analysed, zygote, tmp_path):
    run = forked.copy_run(analysed, tmp_path / "run")
    previous_id = read_content_id(run.landscape)
    writer = _start_slow_sample(zygote, run)

    topology = zygote.run("topology", run.path, timeout=60)
    report = zygote.run("report", run.path, timeout=120)

    assert topology.exit_code == 0, topology.stderr
    assert report.exit_code == 0, report.stderr
    with h5py.File(run.topology, "r") as f:
        assert attr_json(f, "upstream") == {"landscape.h5": previous_id}
    assert run.report.read_text(encoding="utf-8").rstrip().endswith("</html>")
    assert forked.killed(zygote.kill(writer))
    assert read_content_id(run.landscape) == previous_id


def test_sample_while_record_writes(zygote, tmp_path, mlp_checkpoints, write_config):
    folder, _ = mlp_checkpoints
    run = tmp_path / "run"
    write_config(run)
    follower = zygote.start(
        "record", run, "--from", folder, "--follow", "--until-idle", "60", "--poll-interval", "0.05"
    )
    path = run / "trajectory.h5"
    forked.wait_for(lambda: path.exists() and writer_active(path), timeout=60, description="record to start writing")

    reader = zygote.run("sample", run, "--resolution", "5", timeout=120)

    assert writer_active(path)
    if reader.exit_code == 0:
        assert read_slice(run / "landscape.h5").evaluated.all()
    else:
        _one_error_line(reader)
    assert forked.killed(zygote.kill(follower))
