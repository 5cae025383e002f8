import datetime as dt
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from doodl3_cli import __version__
from doodl3_cli.artifacts._common import attr_str
from doodl3_cli.artifacts.trajectory import (
    Layout,
    TrajectoryWriter,
    list_trajectories,
    read_all_trajectories,
    read_layouts,
    read_trajectory,
)
from doodl3_cli.errors import ArtifactError, CheckpointError

LAYOUT = Layout.from_tensors(
    {"0.weight": np.zeros((2, 3), np.float32), "0.bias": np.zeros(2, np.float32)}, {"0.bias": "bias"}
)
BUFFER_LAYOUT = Layout.from_tensors({"1.running_mean": np.zeros(2, np.float32)}, {"1.running_mean": "buffer"})

# Keeps a TrajectoryWriter open on argv[1] in another process until a line arrives on stdin.
HOLD_WRITER = """
import sys
import numpy as np
from doodl3_cli.artifacts.trajectory import Layout, TrajectoryWriter
layout = Layout.from_tensors({"0.weight": np.zeros((2, 3), np.float32), "0.bias": np.zeros(2, np.float32)})
buffer_layout = Layout.from_tensors({"1.running_mean": np.zeros(2, np.float32)})
writer = TrajectoryWriter(sys.argv[1], layout=layout, buffer_layout=buffer_layout, trajectory="run")
writer.append(np.arange(8), np.arange(2), step=0)
print("open", flush=True)
sys.stdin.readline()
writer.close()
"""


def _row(k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(8, dtype=np.float32) + 10 * k, np.array([k, -k], dtype=np.float32)


def _writer(path, **kwargs) -> TrajectoryWriter:
    options = {"trajectory": "run", "settings": {"source": "test"}}
    options.update(kwargs)
    return TrajectoryWriter(path, layout=LAYOUT, buffer_layout=BUFFER_LAYOUT, **options)


def _write_rows(path, rows: int = 2) -> list[str]:
    with _writer(path) as writer:
        for k in range(rows):
            writer.append(*_row(k), step=5 * k)
    return [hashlib.sha256(_row(k)[0].tobytes()).hexdigest() for k in range(rows)]


@pytest.fixture
def holder(tmp_path):
    """Start a process that keeps a TrajectoryWriter open on tmp_path/trajectory.h5."""
    path = tmp_path / "trajectory.h5"
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_WRITER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline() == "open\n"
    yield process, path
    if process.poll() is None:
        process.communicate("\n", timeout=30)


def test_root_attributes(tmp_path):
    path = tmp_path / "trajectory.h5"
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)

    digests = _write_rows(path)

    after = dt.datetime.now(dt.timezone.utc)
    with h5py.File(path, "r") as f:
        attrs = {key: f.attrs[key] for key in f.attrs}
    assert set(attrs) == {"schema", "schema_version", "doodl3_version", "created", "settings", "upstream", "content_id"}
    assert attrs["schema"] == "doodl3/trajectory"
    assert isinstance(attrs["schema_version"], np.int64)
    assert attrs["schema_version"] == 2
    assert attrs["doodl3_version"] == __version__
    created = dt.datetime.fromisoformat(attrs["created"])
    assert created.utcoffset() == dt.timedelta(0)
    assert before <= created <= after
    assert json.loads(attrs["settings"]) == {"source": "test"}
    assert json.loads(attrs["upstream"]) == {}
    expected_id = hashlib.sha256(b"run" + "".join(digests).encode()).hexdigest()[:32]
    assert attrs["content_id"] == expected_id


def test_read_back_rows(tmp_path, caplog):
    path = tmp_path / "trajectory.h5"
    with _writer(path, attrs={"seed": 3, "lr": 0.05, "optimizer": "sgd"}, metric_keys=["loss", "lr"]) as writer:
        writer.append(*_row(0), step=0, metrics={"loss": 2.5, "lr": 0.05}, source="ckpt/step-0.pt", source_digest="d0")
        with caplog.at_level(logging.WARNING, logger="doodl3_cli.artifacts.trajectory"):
            writer.append(*_row(1), step=40, epoch=0.5, metrics={"loss": 1.25, "accuracy": 0.5})

    trajectory = read_trajectory(path, "run")

    assert trajectory.name == "run"
    assert trajectory.params.dtype == np.float32
    np.testing.assert_array_equal(trajectory.params, np.stack([_row(0)[0], _row(1)[0]]))
    np.testing.assert_array_equal(trajectory.buffers, np.array([[0, 0], [1, -1]], np.float32))
    assert trajectory.step.dtype == np.int64
    assert trajectory.step.tolist() == [0, 40]
    assert np.isnan(trajectory.epoch[0])
    assert trajectory.epoch[1] == 0.5
    assert sorted(trajectory.metrics) == ["loss", "lr"]
    assert trajectory.metrics["loss"].tolist() == [2.5, 1.25]
    assert trajectory.metrics["lr"][0] == 0.05
    assert np.isnan(trajectory.metrics["lr"][1])
    assert trajectory.source == ["ckpt/step-0.pt", "live"]
    assert trajectory.source_digest == ["d0", hashlib.sha256(_row(1)[0].tobytes()).hexdigest()]
    assert trajectory.attrs == {"seed": 3, "lr": 0.05, "optimizer": "sgd"}
    assert "['accuracy']" in caplog.text
    assert read_layouts(path) == (LAYOUT, BUFFER_LAYOUT)


def test_reopen_extends_trajectory(tmp_path):
    path = tmp_path / "trajectory.h5"
    digests = _write_rows(path, rows=2)

    with _writer(path) as writer:
        assert writer.rows == 2
        assert writer.has_digest(digests[0])
        writer.append(*_row(2), step=10)

    assert read_trajectory(path, "run").step.tolist() == [0, 5, 10]


def test_trajectories_in_creation_order(tmp_path):
    path = tmp_path / "trajectory.h5"
    for name in ("seed1", "seed0", "a"):
        with _writer(path, trajectory=name) as writer:
            writer.append(*_row(0), step=0)

    assert list_trajectories(path) == ["seed1", "seed0", "a"]
    assert [t.name for t in read_all_trajectories(path)] == ["seed1", "seed0", "a"]


def test_unknown_trajectory_lists_recorded(tmp_path):
    path = tmp_path / "trajectory.h5"
    _write_rows(path)

    with pytest.raises(ArtifactError, match=re.escape(f"{path}: trajectory 'seed9' not found (recorded: run)")):
        read_trajectory(path, "seed9")


def test_second_writer_same_process(tmp_path):
    path = tmp_path / "trajectory.h5"
    with _writer(path) as first:
        first.append(*_row(0), step=0)
        started = time.monotonic()

        with pytest.raises(ArtifactError, match=re.escape(f"{path}: already open for writing")):
            _writer(path, trajectory="other")

        assert time.monotonic() - started < 5
        first.append(*_row(1), step=5)

    assert list_trajectories(path) == ["run"]
    assert read_trajectory(path, "run").step.tolist() == [0, 5]


def test_second_writer_other_process(holder):
    process, path = holder
    started = time.monotonic()

    with pytest.raises(ArtifactError) as info:
        _writer(path)

    assert str(info.value).startswith(f"{path}: already open for writing by another process (PID {process.pid}, lock ")

    assert time.monotonic() - started < 5
    process.communicate("\n", timeout=30)
    assert process.returncode == 0
    with _writer(path) as writer:
        writer.append(*_row(1), step=5)
    assert read_trajectory(path, "run").step.tolist() == [0, 5]


def test_read_while_writing(holder):
    _, path = holder

    assert read_trajectory(path, "run").step.tolist() == [0]


def test_rerun_after_killed_writer(holder, caplog):
    process, path = holder
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)

    with caplog.at_level(logging.WARNING, logger="doodl3_cli.artifacts.trajectory"):
        with _writer(path) as writer:
            assert writer.rows == 1
            writer.append(*_row(1), step=5)

    assert "clearing the open-for-write mark left by a writer that was killed" in caplog.text
    assert read_trajectory(path, "run").step.tolist() == [0, 5]
    with h5py.File(path, "a") as f:
        assert f["trajectories/run"].attrs["rows"] == 2


def test_writer_lock_released_on_close(tmp_path):
    path = tmp_path / "trajectory.h5"
    _write_rows(path, rows=1)

    with _writer(path) as writer:
        writer.append(*_row(1), step=5)

    assert (tmp_path / ".trajectory.h5.lock").read_text() == f"{os.getpid()}\n"
    with _writer(path) as writer:
        assert writer.rows == 2


def test_failed_open_releases_lock(tmp_path):
    path = tmp_path / "trajectory.h5"
    _write_rows(path, rows=1)
    other = Layout.from_tensors({"w": np.zeros(3, np.float32)})

    with pytest.raises(CheckpointError, match="do not match the recorded layout"):
        TrajectoryWriter(path, layout=other, buffer_layout=BUFFER_LAYOUT, trajectory="run")

    with _writer(path) as writer:
        assert writer.rows == 1


@pytest.mark.parametrize(
    "read",
    [
        read_layouts,
        list_trajectories,
        read_all_trajectories,
        lambda path: read_trajectory(path, "run"),
        lambda path: _writer(path),
    ],
    ids=["read_layouts", "list_trajectories", "read_all_trajectories", "read_trajectory", "TrajectoryWriter"],
)
def test_newer_schema_rejected(tmp_path, read):
    path = tmp_path / "trajectory.h5"
    _write_rows(path)
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = np.int64(99)

    with pytest.raises(ArtifactError) as info:
        read(path)

    message = str(info.value)
    assert message.startswith(f"{path}: schema version 99 of 'doodl3/trajectory' is not supported")
    assert "reads versions 1 to 2" in message


def test_other_schema_rejected(tmp_path):
    path = tmp_path / "trajectory.h5"
    _write_rows(path)
    with h5py.File(path, "a") as f:
        f.attrs["schema"] = "doodl3/landscape"

    with pytest.raises(ArtifactError, match=re.escape(f"{path}: expected a 'doodl3/trajectory' artifact")):
        read_trajectory(path, "run")


def test_attr_str_accepts_bytes(tmp_path):
    with h5py.File(tmp_path / "other-tool.h5", "w") as f:
        f.attrs["fixed"] = np.bytes_(b"doodl3/trajectory")
        f.attrs.create("variable", data=b'{"seed": 1}', dtype=h5py.string_dtype("ascii"))
        f.attrs.create("utf8", data="\u03b1=0.1".encode(), dtype=h5py.string_dtype("utf-8"))
        f.attrs.create("one_element", data=np.array([b"sgd"], dtype="S3"))
        f.attrs["text"] = "plain"

        assert attr_str(f, "fixed") == "doodl3/trajectory"
        assert attr_str(f, "variable") == '{"seed": 1}'
        assert attr_str(f, "utf8") == "\u03b1=0.1"
        assert attr_str(f, "one_element") == "sgd"
        assert attr_str(f, "text") == "plain"
        assert attr_str(f, "absent") is None
        assert attr_str(f, "absent", "fallback") == "fallback"
        for key in ("fixed", "variable", "utf8", "one_element", "text"):
            assert type(attr_str(f, key)) is str


def test_read_file_with_bytes_text(tmp_path):
    """A trajectory.h5 written by another tool with fixed-length byte strings reads back as str."""
    path = tmp_path / "trajectory.h5"
    with h5py.File(path, "w") as f:
        f.attrs["schema"] = np.bytes_(b"doodl3/trajectory")
        f.attrs["schema_version"] = 1
        f.attrs["content_id"] = np.bytes_(b"0123abcd")
        for group_name, layout in (("layout", LAYOUT), ("buffer_layout", BUFFER_LAYOUT)):
            group = f.create_group(group_name)
            group["name"] = np.array([e.name.encode() for e in layout.entries], dtype="S")
            group["shape"] = np.array([json.dumps(list(e.shape)).encode() for e in layout.entries], dtype="S")
            group["offset"] = np.array([e.offset for e in layout.entries], dtype=np.int64)
            group["numel"] = np.array([e.numel for e in layout.entries], dtype=np.int64)
            group["role"] = np.array([e.role.encode() for e in layout.entries], dtype="S")
        run = f.create_group("trajectories/run")
        run.attrs["rows"] = 1
        run.attrs["optimizer"] = np.bytes_(b"sgd")
        run["params"] = _row(0)[0][None, :]
        run["buffers"] = _row(0)[1][None, :]
        run["step"] = np.array([7], dtype=np.int64)
        run["epoch"] = np.array([1.0])
        run["source"] = np.array([b"step-7.pt"], dtype="S")
        run["source_digest"] = np.array([b"abc"], dtype="S")
        run.create_group("metrics")["loss"] = np.array([0.25])

    trajectory = read_trajectory(path, "run")
    layout, buffer_layout = read_layouts(path)

    assert layout.names == ["0.weight", "0.bias"]
    assert [e.shape for e in layout.entries] == [(2, 3), (2,)]
    assert [e.role for e in layout.entries] == ["weight", "bias"]
    assert buffer_layout.names == ["1.running_mean"]
    assert trajectory.source == ["step-7.pt"]
    assert trajectory.source_digest == ["abc"]
    assert trajectory.attrs == {"optimizer": "sgd"}
    assert type(trajectory.attrs["optimizer"]) is str
    assert trajectory.step.tolist() == [7]
    assert trajectory.metrics["loss"].tolist() == [0.25]


def test_read_after_killed_writer(holder):
    process, path = holder
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)

    assert read_trajectory(path, "run").step.tolist() == [0]


# Appends rows 1 to argv[2] (step 5 k, parameters 10 k + [0..7]) to a TrajectoryWriter on argv[1],
# 0.02 s apart, then closes it.
APPEND_ROWS = """
import sys, time
import numpy as np
from doodl3_cli.artifacts.trajectory import Layout, TrajectoryWriter
layout = Layout.from_tensors({"0.weight": np.zeros((2, 3), np.float32), "0.bias": np.zeros(2, np.float32)})
buffer_layout = Layout.from_tensors({"1.running_mean": np.zeros(2, np.float32)})
with TrajectoryWriter(sys.argv[1], layout=layout, buffer_layout=buffer_layout, trajectory="run") as writer:
    for k in range(1, int(sys.argv[2]) + 1):
        writer.append(np.arange(8) + 10 * k, np.array([k, -k]), step=5 * k)
        time.sleep(0.02)
"""


def test_reader_sees_rows_grow(tmp_path):
    path = tmp_path / "trajectory.h5"
    _write_rows(path, rows=1)
    writer = subprocess.Popen([sys.executable, "-c", APPEND_ROWS, str(path), "40"])
    counts = []

    while writer.poll() is None:
        trajectory = read_trajectory(path, "run")
        counts.append(len(trajectory.step))
        # Every row a reader sees is complete: its parameters match its step.
        np.testing.assert_array_equal(trajectory.params[:, 0], 2 * trajectory.step)

    assert writer.returncode == 0
    assert counts == sorted(counts)
    assert len(set(counts)) > 2
    assert read_trajectory(path, "run").step.tolist() == [5 * k for k in range(41)]


def test_truncated_file_fails_fast(tmp_path):
    path = tmp_path / "trajectory.h5"
    _write_rows(path, rows=40)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)

    with pytest.raises(ArtifactError, match="cannot be opened as HDF5"):
        read_trajectory(path, "run")
