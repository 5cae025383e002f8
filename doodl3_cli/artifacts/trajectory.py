"""trajectory.h5: the recorded checkpoints of one or more training runs.

Layout (schema ``doodl3/trajectory``, version 1)::

    /layout/{name, shape, offset, numel, role, dtype}    one row per parameter tensor
    /buffer_layout/{...}                                 same, for buffers (BatchNorm statistics)
    /trajectories/<run>/params         float32 [T, P]   resizable, chunked by row
    /trajectories/<run>/buffers        float32 [T, B]
    /trajectories/<run>/step           int64   [T]
    /trajectories/<run>/epoch          float64 [T]      NaN where unknown
    /trajectories/<run>/metrics/<key>  float64 [T]      NaN where not logged
    /trajectories/<run>/source         str     [T]      checkpoint path or "live"
    /trajectories/<run>/source_digest  str     [T]      sha256 of the file or of the row

The file is written by one writer at a time in SWMR mode, so readers may open it
while it grows. Rows are appended and flushed one checkpoint at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from doodl3_cli.artifacts._common import (
    STR_DTYPE,
    attr_json,
    attr_str,
    open_artifact,
    read_str_dataset,
    write_root_attrs,
    write_str_dataset,
)
from doodl3_cli.errors import ArtifactError, CheckpointError

log = logging.getLogger(__name__)

SCHEMA = "doodl3/trajectory"
SCHEMA_VERSION = 1
COMMAND = "doodl3 record RUN --from DIR"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a flattened layout."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    role: str
    dtype: str


@dataclass
class Layout:
    """The flattening of a set of named tensors into one float32 vector."""

    entries: list[TensorEntry] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Total number of scalars, P."""
        return sum(e.numel for e in self.entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @classmethod
    def from_tensors(cls, tensors: dict[str, Any], roles: dict[str, str] | None = None) -> "Layout":
        """Build a layout from named tensors (torch or numpy), in their given order."""
        entries = []
        offset = 0
        for name, tensor in tensors.items():
            shape = tuple(int(s) for s in tensor.shape)
            numel = int(np.prod(shape)) if shape else 1
            role = (roles or {}).get(name) or ("bias" if name.endswith("bias") else "weight")
            entries.append(TensorEntry(name, shape, offset, numel, role, str(tensor.dtype).replace("torch.", "")))
            offset += numel
        return cls(entries)

    def same_structure(self, other: "Layout") -> bool:
        """True when both layouts have the same names and shapes in the same order."""
        return [(e.name, e.shape) for e in self.entries] == [(e.name, e.shape) for e in other.entries]


@dataclass
class Trajectory:
    """One recorded training run, read into memory.

    Attributes
    ----------
    params : ndarray of shape (T, P), float32
    buffers : ndarray of shape (T, B), float32
    step : ndarray of shape (T,), int64
    epoch : ndarray of shape (T,), float64, NaN where unknown
    metrics : dict of str to ndarray of shape (T,), float64
    source, source_digest : list of str, length T
    attrs : dict
        What distinguishes the run (seed, learning rate, ...).
    """

    name: str
    params: np.ndarray
    buffers: np.ndarray
    step: np.ndarray
    epoch: np.ndarray
    metrics: dict[str, np.ndarray]
    source: list[str]
    source_digest: list[str]
    attrs: dict[str, Any]


def write_layout(group: h5py.Group, layout: Layout) -> None:
    """Write `layout` as parallel datasets in `group`."""
    write_str_dataset(group, "name", [e.name for e in layout.entries])
    write_str_dataset(group, "shape", [json.dumps(list(e.shape)) for e in layout.entries])
    group.create_dataset("offset", data=np.array([e.offset for e in layout.entries], dtype=np.int64))
    group.create_dataset("numel", data=np.array([e.numel for e in layout.entries], dtype=np.int64))
    write_str_dataset(group, "role", [e.role for e in layout.entries])
    write_str_dataset(group, "dtype", [e.dtype for e in layout.entries])


def read_layout_group(group: h5py.Group) -> Layout:
    """Read a layout written by `write_layout`."""
    if "name" not in group:
        return Layout([])
    names = read_str_dataset(group["name"])
    shapes = [tuple(json.loads(s)) for s in read_str_dataset(group["shape"])]
    offsets = group["offset"][()]
    numels = group["numel"][()]
    roles = read_str_dataset(group["role"])
    dtypes = read_str_dataset(group["dtype"]) if "dtype" in group else ["float32"] * len(names)
    return Layout(
        [TensorEntry(n, s, int(o), int(c), r, d) for n, s, o, c, r, d in zip(names, shapes, offsets, numels, roles, dtypes)]
    )


def read_layouts(path: Path) -> tuple[Layout, Layout]:
    """Return the (parameter, buffer) layouts of a trajectory file."""
    with open_artifact(path, schema=SCHEMA, max_version=SCHEMA_VERSION, command=COMMAND, swmr=True) as f:
        return read_layout_group(f["layout"]), read_layout_group(f["buffer_layout"])


def list_trajectories(path: Path) -> list[str]:
    """Return the names of the recorded trajectories, in creation order."""
    with open_artifact(path, schema=SCHEMA, max_version=SCHEMA_VERSION, command=COMMAND, swmr=True) as f:
        group = f.get("trajectories")
        if group is None:
            return []
        names = list(group.keys())
        order = {n: int(group[n].attrs.get("index", i)) for i, n in enumerate(names)}
        return sorted(names, key=order.__getitem__)


def read_trajectory(path: Path, name: str) -> Trajectory:
    """Read one trajectory into memory.

    Raises
    ------
    ArtifactError
        When the trajectory is not in the file.
    """
    with open_artifact(path, schema=SCHEMA, max_version=SCHEMA_VERSION, command=COMMAND, swmr=True) as f:
        group = f.get(f"trajectories/{name}")
        if group is None:
            available = ", ".join(f["trajectories"].keys()) if "trajectories" in f else "none"
            raise ArtifactError(f"{path}: trajectory '{name}' not found (recorded: {available})")
        n = int(group.attrs.get("rows", group["step"].shape[0]))
        metrics = {k: group["metrics"][k][:n].astype(np.float64) for k in group["metrics"].keys()}
        attrs = {k: _attr_value(group, k) for k in group.attrs.keys() if k not in ("rows", "index")}
        return Trajectory(
            name=name,
            params=group["params"][:n],
            buffers=group["buffers"][:n],
            step=group["step"][:n],
            epoch=group["epoch"][:n],
            metrics=metrics,
            source=read_str_dataset(group["source"])[:n],
            source_digest=read_str_dataset(group["source_digest"])[:n],
            attrs=attrs,
        )


def read_all_trajectories(path: Path) -> list[Trajectory]:
    """Read every trajectory in the file, in creation order."""
    return [read_trajectory(path, name) for name in list_trajectories(path)]


def _attr_value(obj: h5py.HLObject, key: str) -> Any:
    value = obj.attrs[key]
    if isinstance(value, (bytes, str)):
        return attr_str(obj, key)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def digest_bytes(data: bytes) -> str:
    """Return the sha256 hex digest of `data`."""
    return hashlib.sha256(data).hexdigest()


def trajectory_content_id(f: h5py.File) -> str:
    """Return a content id computed from every trajectory's rows and digests.

    It changes exactly when a row is added or a trajectory is created, so downstream
    stages computed from the same checkpoints stay up to date across reruns of record.
    """
    h = hashlib.sha256()
    group = f.get("trajectories")
    if group is not None:
        for name in sorted(group.keys()):
            sub = group[name]
            n = int(sub.attrs.get("rows", 0))
            h.update(name.encode())
            for digest in read_str_dataset(sub["source_digest"])[:n]:
                h.update(digest.encode())
    return h.hexdigest()[:32]


class TrajectoryWriter:
    """Append checkpoints of one trajectory to trajectory.h5, as the only writer.

    Parameters
    ----------
    path : Path
        trajectory.h5; created when missing.
    layout, buffer_layout : Layout
        Flattening of parameters and buffers. Must match the file's layout when the
        file already exists.
    trajectory : str
        Name of the trajectory group; created when missing, extended otherwise.
    attrs : dict
        Run attributes (seed, learning rate, ...) stored on the group.
    settings : dict
        Options of the command that records; stored in the root `settings` attribute
        of a new file.
    metric_keys : sequence of str
        Metrics to store per row. HDF5 forbids new datasets once SWMR mode is on, so
        they are created here; metrics with other keys passed to `append` are logged
        once and dropped.

    Raises
    ------
    ArtifactError
        When another process holds the file open for writing.
    CheckpointError
        When the layout differs from the one already in the file.
    """

    def __init__(
        self,
        path: Path,
        *,
        layout: Layout,
        buffer_layout: Layout,
        trajectory: str,
        attrs: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
        metric_keys: list[str] | tuple[str, ...] = (),
    ):
        self.path = Path(path)
        self.trajectory = trajectory
        self.layout = layout
        self.buffer_layout = buffer_layout
        self._file = self._open(settings or {})
        self._group = self._prepare_group(attrs or {})
        self._prepare_metrics(metric_keys)
        self._file.swmr_mode = True
        self._dropped_metrics: set[str] = set()
        self._rows = int(self._group.attrs["rows"])
        self._digests = set(read_str_dataset(self._group["source_digest"])[: self._rows])

    def _open(self, settings: dict[str, Any]) -> h5py.File:
        exists = self.path.is_file()
        try:
            f = h5py.File(self.path, "a", libver="latest")
        except (OSError, BlockingIOError) as exc:
            # HDF5 reports a held file lock as "unable to lock file", and a file that a
            # writer has open (or left marked open by crashing) as "already open for write".
            text = str(exc).lower()
            if "lock" in text or "already open" in text:
                raise ArtifactError(
                    f"{self.path}: already open for writing by another process; wait for it to finish "
                    "(one writer per trajectory.h5). If no writer is running, one crashed and left the "
                    f"file marked open, and HDF5's h5clear tool removes that mark ({exc})"
                ) from exc
            raise ArtifactError(f"{self.path}: cannot be opened for writing ({exc})") from exc

        # In one process HDF5 shares an open file between handles instead of locking it, so a
        # second writer only shows as the SWMR write mode that the first one switched on.
        if f.swmr_mode:
            f.close()
            raise ArtifactError(
                f"{self.path}: already open for writing in this process; close the other Recorder "
                "or TrajectoryWriter first (one writer per trajectory.h5)"
            )

        if not exists or "schema" not in f.attrs:
            write_root_attrs(f, schema=SCHEMA, schema_version=SCHEMA_VERSION, settings=settings, upstream={})
            write_layout(f.create_group("layout"), self.layout)
            write_layout(f.create_group("buffer_layout"), self.buffer_layout)
            f.create_group("trajectories")
            return f

        try:
            from doodl3_cli.artifacts._common import check_schema

            check_schema(f, schema=SCHEMA, max_version=SCHEMA_VERSION, command=COMMAND)
            stored = read_layout_group(f["layout"])
        except Exception:
            f.close()
            raise
        if not stored.same_structure(self.layout):
            f.close()
            mismatch = _describe_mismatch(stored, self.layout)
            raise CheckpointError(
                f"{self.path}: the model's parameters do not match the recorded layout ({mismatch}); "
                "record this model into a new run folder"
            )
        return f

    def _prepare_group(self, attrs: dict[str, Any]) -> h5py.Group:
        runs = self._file["trajectories"]
        if self.trajectory in runs:
            group = runs[self.trajectory]
            for key, value in attrs.items():
                group.attrs[key] = _to_attr(value)
            return group

        group = runs.create_group(self.trajectory)
        group.attrs["index"] = len(runs) - 1
        group.attrs["rows"] = 0
        for key, value in attrs.items():
            group.attrs[key] = _to_attr(value)
        p = max(self.layout.size, 1)
        b = self.buffer_layout.size
        group.create_dataset(
            "params", shape=(0, p), maxshape=(None, p), dtype=np.float32,
            chunks=(1, min(p, 1 << 18)), compression="gzip", compression_opts=1, shuffle=True,
        )
        group.create_dataset(
            "buffers", shape=(0, b), maxshape=(None, b), dtype=np.float32, chunks=(1, min(b, 1 << 18)) if b else True
        )
        group.create_dataset("step", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(1024,))
        group.create_dataset("epoch", shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(1024,))
        group.create_dataset("source", shape=(0,), maxshape=(None,), dtype=STR_DTYPE, chunks=(256,))
        group.create_dataset("source_digest", shape=(0,), maxshape=(None,), dtype=STR_DTYPE, chunks=(256,))
        group.create_group("metrics")
        return group

    def _prepare_metrics(self, keys: list[str] | tuple[str, ...]) -> None:
        metrics = self._group["metrics"]
        rows = int(self._group.attrs["rows"])
        for key in keys:
            if key not in metrics:
                metrics.create_dataset(
                    key, data=np.full(rows, np.nan), maxshape=(None,), dtype=np.float64, chunks=(1024,)
                )

    @property
    def rows(self) -> int:
        """Number of checkpoints recorded in this trajectory."""
        return self._rows

    @property
    def last_step(self) -> int | None:
        """Training step of the last recorded checkpoint, or None when there is none."""
        return int(self._group["step"][self._rows - 1]) if self._rows else None

    def has_digest(self, digest: str) -> bool:
        """True when a checkpoint with this digest is already recorded in the trajectory."""
        return digest in self._digests

    def append(
        self,
        params: np.ndarray,
        buffers: np.ndarray,
        *,
        step: int,
        epoch: float = float("nan"),
        metrics: dict[str, float] | None = None,
        source: str = "live",
        source_digest: str | None = None,
    ) -> None:
        """Append one checkpoint and flush it to disk.

        Parameters
        ----------
        params : ndarray of shape (P,)
            Flattened parameters; cast to float32.
        buffers : ndarray of shape (B,)
            Flattened buffers; cast to float32.
        step : int
            Training step of the checkpoint.
        """
        params = np.asarray(params, dtype=np.float32).reshape(-1)
        buffers = np.asarray(buffers, dtype=np.float32).reshape(-1)
        if params.shape[0] != self.layout.size:
            raise CheckpointError(
                f"{source}: {params.shape[0]} parameters, the layout of {self.path} has {self.layout.size}"
            )
        digest = source_digest or digest_bytes(params.tobytes())
        n = self._rows
        g = self._group
        for name in ("params", "buffers", "step", "epoch", "source", "source_digest"):
            g[name].resize(n + 1, axis=0)
        g["params"][n] = params
        if buffers.size:
            g["buffers"][n] = buffers
        g["step"][n] = int(step)
        g["epoch"][n] = float(epoch)
        g["source"][n] = source
        g["source_digest"][n] = digest
        for key, dataset in g["metrics"].items():
            dataset.resize(n + 1, axis=0)
            dataset[n] = float((metrics or {}).get(key, np.nan))
        unknown = set(metrics or {}) - set(g["metrics"].keys()) - self._dropped_metrics
        if unknown:
            log.warning(
                "%s/%s: metrics %s were not given at the first record call and are not stored",
                self.path, self.trajectory, sorted(unknown),
            )
            self._dropped_metrics |= unknown
        # The row count attribute is the commit point: readers ignore rows past it.
        g.attrs["rows"] = n + 1
        self._file.flush()
        self._rows = n + 1
        self._digests.add(digest)

    def close(self) -> None:
        """Close the file and store the content id of what it now holds."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        with h5py.File(self.path, "a", libver="latest") as f:
            f.attrs["content_id"] = trajectory_content_id(f)

    def __enter__(self) -> "TrajectoryWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _to_attr(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    if value is None:
        return "null"
    return value


def _describe_mismatch(stored: Layout, new: Layout) -> str:
    stored_map = {e.name: e.shape for e in stored.entries}
    new_map = {e.name: e.shape for e in new.entries}
    missing = [n for n in stored_map if n not in new_map][:5]
    extra = [n for n in new_map if n not in stored_map][:5]
    shapes = [f"{n}: {stored_map[n]} vs {new_map[n]}" for n in stored_map if n in new_map and stored_map[n] != new_map[n]][:5]
    parts = []
    if missing:
        parts.append(f"missing {missing}")
    if extra:
        parts.append(f"unexpected {extra}")
    if shapes:
        parts.append(f"shape {shapes}")
    return "; ".join(parts) or "different order"
