import json
import logging
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from doodl3_cli import zoo
from doodl3_cli.artifacts.trajectory import read_trajectory
from doodl3_cli.follow import FolderWatcher, record_follow

MLP_KWARGS = {"in_features": 64, "hidden": [8], "classes": 10}

# Copies staged checkpoint files into a followed folder the way a training job saves them:
# argv[1] is a JSON list of [staged file, destination, mode, pause before it in seconds].
# "direct" writes the file in one call, "rename" writes a hidden temporary file and renames
# it into place, "pieces" writes it in 8 pieces 0.05 s apart, each flushed to disk.
WRITER = """
import json, os, sys, time
for staged, destination, mode, pause in json.loads(sys.argv[1]):
    time.sleep(pause)
    data = open(staged, "rb").read()
    if mode == "direct":
        with open(destination, "wb") as f:
            f.write(data)
    elif mode == "rename":
        temporary = os.path.join(os.path.dirname(destination), "." + os.path.basename(destination) + ".tmp")
        with open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, destination)
    elif mode == "pieces":
        size = len(data) // 8 + 1
        with open(destination, "wb") as f:
            for start in range(0, len(data), size):
                f.write(data[start:start + size])
                f.flush()
                os.fsync(f.fileno())
                time.sleep(0.05)
    else:
        raise SystemExit(f"unknown mode {mode}")
"""


def _stage(tmp_path, count: int) -> list[tuple[object, np.ndarray]]:
    """Save `count` MLP state_dicts into tmp_path/staged; return (file, flat float32 params) pairs."""
    staged = tmp_path / "staged"
    staged.mkdir()
    out = []
    for k in range(count):
        torch.manual_seed(k)
        state = zoo.mlp(**MLP_KWARGS).state_dict()
        path = staged / f"{k}.pt"
        torch.save(state, path)
        out.append((path, np.concatenate([t.reshape(-1).numpy() for t in state.values()])))
    return out


def test_follow_ingests_while_writing(tmp_path, caplog):
    staged = _stage(tmp_path, 4)
    source = tmp_path / "checkpoints"
    source.mkdir()
    modes = ["direct", "pieces", "rename", "direct"]
    plan = [[str(path), str(source / f"step-{10 * k}.pt"), mode, 0.3] for k, ((path, _), mode) in enumerate(zip(staged, modes))]
    writer = subprocess.Popen([sys.executable, "-c", WRITER, json.dumps(plan)])

    with caplog.at_level(logging.INFO, logger="doodl3_cli.follow"):
        result = record_follow(tmp_path / "run", source, poll_interval=0.05, settle_polls=6, until_idle=2.0)

    assert writer.wait(timeout=30) == 0
    assert result.failed == {}
    assert (result.added, result.skipped, result.total) == (4, 0, 4)
    trajectory = read_trajectory(tmp_path / "run" / "trajectory.h5", "checkpoints")
    assert trajectory.step.tolist() == [0, 10, 20, 30]
    for row, (_, params) in enumerate(staged):
        np.testing.assert_array_equal(trajectory.params[row], params)
    assert "no new checkpoint in" in caplog.text

    again = record_follow(tmp_path / "run", source, poll_interval=0.01, settle_polls=1, until_idle=0.2)
    assert (again.added, again.skipped, again.total) == (0, 4, 4)


def test_follow_reports_broken_file(tmp_path):
    staged = _stage(tmp_path, 1)
    source = tmp_path / "checkpoints"
    source.mkdir()
    (source / "step-0.pt").write_bytes(staged[0][0].read_bytes())
    (source / "step-5.pt").write_bytes(b"truncated")

    result = record_follow(tmp_path / "run", source, poll_interval=0.01, settle_polls=1, retries=2, until_idle=0.5)

    assert list(result.failed) == [str(source / "step-5.pt")]
    assert result.failed[str(source / "step-5.pt")].startswith(f"{source / 'step-5.pt'}: cannot be loaded as a PyTorch checkpoint")
    assert read_trajectory(tmp_path / "run" / "trajectory.h5", "checkpoints").step.tolist() == [0]


def test_watcher_waits_for_settled_size(tmp_path):
    path = tmp_path / "step-1.pt"
    path.write_bytes(b"a")
    watcher = FolderWatcher(tmp_path, settle_polls=2)

    assert watcher.poll() == ([], True)
    assert watcher.poll() == ([], False)
    path.write_bytes(b"ab")
    assert watcher.poll() == ([], True)
    assert watcher.poll() == ([], False)
    assert watcher.poll() == ([path], False)


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT")
def test_follow_cli_stops_on_interrupt(tmp_path):
    staged = _stage(tmp_path, 1)
    source = tmp_path / "checkpoints"
    source.mkdir()
    (source / "step-0.pt").write_bytes(staged[0][0].read_bytes())
    process = subprocess.Popen(
        [sys.executable, "-m", "doodl3_cli", "record", str(tmp_path / "run"), "--from", str(source), "--follow",
         "--poll-interval", "0.05"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert process.stdout.readline() == f"recorded step 0 from {source / 'step-0.pt'}\n"

    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=30)

    assert process.returncode == 0, stderr
    assert stdout == f"checkpoints: 1 checkpoints added, 0 already recorded, 1 in {tmp_path / 'run' / 'trajectory.h5'}\n"
    # A cleanly closed file opens for writing without the mark that a killed writer leaves.
    with h5py.File(tmp_path / "run" / "trajectory.h5", "a") as f:
        assert f["trajectories/checkpoints"].attrs["rows"] == 1
