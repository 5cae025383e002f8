"""trajectory.h5: the recorded checkpoints of one or more training runs.

Layout (schema ``doodl3/trajectory``, version 2)::

    /layout/{name, shape, offset, numel, role, dtype}    one row per parameter tensor
    /buffer_layout/{...}                                 same, for buffers (BatchNorm statistics)
    /trajectories/<run>/params         float32 [T, P]   resizable, chunked by row
    /trajectories/<run>/buffers        float32 [T, B]
    /trajectories/<run>/step           int64   [T]
    /trajectories/<run>/epoch          float64 [T]      NaN where unknown
    /trajectories/<run>/metrics/<key>  float64 [T]      NaN where not logged
    /trajectories/<run>/source         str     [T]      checkpoint path or "live" (UTF-8, at most 4096 bytes)
    /trajectories/<run>/source_digest  str     [T]      sha256 hex digest of the file or of the row

The file is written by one writer at a time in SWMR mode, so readers may open it
while it grows. Rows are appended and flushed one checkpoint at a time; the group
attribute ``rows`` is the commit point. The writer holds an exclusive ``flock`` on the
sidecar file ``.trajectory.h5.lock`` (which stores its PID), so a second writer fails
at once, and a writer that finds the superblock still marked open although it holds
the lock concludes that the previous writer was killed and clears the mark.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from doodl3_cli.artifacts._common import (
    WriterLock,
    attr_str,
    check_schema,
    open_artifact,
    read_str_dataset,
    remove_stale_temporaries,
    temporary_path,
    write_root_attrs,
    write_str_dataset,
    writer_active,
)
from doodl3_cli.errors import ArtifactError, CheckpointError

log = logging.getLogger(__name__)

READ_ATTEMPTS = 5
SCHEMA = "doodl3/trajectory"
# Version 2 stores `source` and `source_digest` as fixed-length strings. Version 1 used
# variable-length strings, which HDF5 keeps in a global heap that SWMR writing does not
# protect, so a writer killed mid-append could leave rows that fail with "bad heap index".
SCHEMA_VERSION = 2
SOURCE_BYTES = 4096
SOURCE_DTYPE = h5py.string_dtype("utf-8", SOURCE_BYTES)
DIGEST_DTYPE = h5py.string_dtype("ascii", 64)
COMMAND = "doodl3 record RUN --from DIR"
ROW_DATASETS = ("params", "buffers", "step", "epoch", "source", "source_digest")


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


@contextlib.contextmanager
def open_trajectory(path: Path) -> Iterator[h5py.File]:
    """Open trajectory.h5 read-only as an SWMR reader, also after its writer was killed.

    A writer killed while it was not yet (or no longer) in SWMR mode leaves the file
    marked open for ordinary writing, which HDF5 SWMR readers reject. Such a file is
    then opened read-only while ignoring that mark, as ``h5clear`` would, without
    changing the file.

    Raises
    ------
    ArtifactError
        When the file is missing, is not HDF5, or has another schema or version.
    """
    # A live writer makes a plain open fail (the file grows under it), while an SWMR
    # reader of a damaged file retries for minutes, so the writer lock decides.
    swmr = writer_active(Path(path))
    try:
        with open_artifact(path, schema=SCHEMA, max_version=SCHEMA_VERSION, command=COMMAND, swmr=swmr) as f:
            yield f
            return
    except ArtifactError as exc:
        cause = str(exc.__cause__)
        if "not already open for SWMR writing" not in cause and "already open for write" not in cause:
            raise
    # NOTE: a live writer also sets this mark for the few milliseconds in which it opens the
    # file and prepares its group. A read in that window may fail with an HDF5 error.
    log.info("%s: marked open by a writer outside SWMR mode; reading it while ignoring the mark", path)
    f = _open_clearing_status_flags(Path(path), writable=False)
    with f:
        check_schema(f, schema=SCHEMA, max_version=SCHEMA_VERSION, command=COMMAND)
        yield f


def read_str_rows(dataset: h5py.Dataset, rows: int) -> list[str]:
    """Read the first `rows` elements of a string dataset as str.

    Only committed rows are read, because the string elements of rows that a killed
    writer did not commit may point to heap objects that never reached the disk.
    """
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in dataset[:rows]]


def _retry_while_writing(read):
    """Retry `read(path, ...)` a few times when it fails while a writer holds the file.

    A reader that opens the file just as a writer starts or extends it can see
    metadata from before and after the change. Such a read fails with an HDF5
    error or a missing group; a second look a moment later sees a consistent file.
    """

    @functools.wraps(read)
    def wrapper(path, *args, **kwargs):
        for attempt in range(READ_ATTEMPTS):
            try:
                return read(path, *args, **kwargs)
            except (ArtifactError, OSError, RuntimeError, KeyError):
                if attempt == READ_ATTEMPTS - 1 or not writer_active(Path(path)):
                    raise
                log.debug("%s: read during a write failed, retrying", path)
                time.sleep(0.1 * (attempt + 1))

    return wrapper


@_retry_while_writing
def read_layouts(path: Path) -> tuple[Layout, Layout]:
    """Return the (parameter, buffer) layouts of a trajectory file."""
    with open_trajectory(path) as f:
        return read_layout_group(f["layout"]), read_layout_group(f["buffer_layout"])


@_retry_while_writing
def list_trajectories(path: Path) -> list[str]:
    """Return the names of the recorded trajectories, in creation order."""
    with open_trajectory(path) as f:
        group = f.get("trajectories")
        if group is None:
            return []
        names = list(group.keys())
        order = {n: int(group[n].attrs.get("index", i)) for i, n in enumerate(names)}
        return sorted(names, key=order.__getitem__)


@_retry_while_writing
def read_trajectory(path: Path, name: str) -> Trajectory:
    """Read one trajectory into memory.

    Raises
    ------
    ArtifactError
        When the trajectory is not in the file.
    """
    with open_trajectory(path) as f:
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
            source=read_str_rows(group["source"], n),
            source_digest=read_str_rows(group["source_digest"], n),
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
            for digest in read_str_rows(sub["source_digest"], n):
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
        they are created here. Metrics with other keys passed to `append` are logged
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
        self._file: h5py.File | None = None
        self._lock = WriterLock(self.path, writer="Recorder or TrajectoryWriter", keep_sidecar=True)
        self._lock.acquire()
        try:
            if not self.path.is_file():
                self._create(settings or {}, attrs or {}, metric_keys)
            self._file = self._open()
            if self._needs_new_objects(attrs or {}, metric_keys):
                self._file.close()
                self._file = None
                self._rewrite(attrs or {}, metric_keys)
                self._file = self._open()
            self._group = self._file["trajectories"][self.trajectory]
            self._drop_uncommitted_rows()
            self._file.swmr_mode = True
        except BaseException:
            if self._file is not None:
                self._file.close()
            self._lock.release()
            raise
        self._dropped_metrics: set[str] = set()
        self._rows = int(self._group.attrs["rows"])
        self._digests = set(read_str_rows(self._group["source_digest"], self._rows))

    def _create(self, settings: dict[str, Any], attrs: dict[str, Any], metric_keys) -> None:
        # A new file is built under a temporary name and renamed into place, so a writer
        # killed while creating it leaves no file rather than a half-written one.
        remove_stale_temporaries(self.path)
        tmp = temporary_path(self.path)
        try:
            with h5py.File(tmp, "w", libver="latest") as f:
                write_root_attrs(f, schema=SCHEMA, schema_version=SCHEMA_VERSION, settings=settings, upstream={})
                write_layout(f.create_group("layout"), self.layout)
                write_layout(f.create_group("buffer_layout"), self.buffer_layout)
                f.create_group("trajectories")
                self._file = f
                self._group = self._prepare_group(attrs, metric_keys)
            os.replace(tmp, self.path)
        finally:
            self._file = None
            if tmp.exists():
                tmp.unlink()

    def _open(self, path: Path | None = None) -> h5py.File:
        path = self.path if path is None else path
        try:
            f = h5py.File(path, "a", libver="latest")
        except OSError as exc:
            if "already open for write" not in str(exc):
                raise ArtifactError(
                    f"{self.path}: cannot be opened for writing ({exc}); if another program has it open, "
                    "close it and rerun"
                ) from exc
            # This process holds the writer lock, so the writer that marked the file open is gone.
            log.warning("%s: clearing the open-for-write mark left by a writer that was killed", self.path)
            f = _open_clearing_status_flags(path)

        try:
            check_schema(f, schema=SCHEMA, max_version=SCHEMA_VERSION, command=COMMAND)
            stored = read_layout_group(f["layout"])
        except Exception:
            f.close()
            raise
        if not stored.same_structure(self.layout):
            f.close()
            mismatch = describe_layout_mismatch(stored, self.layout)
            raise CheckpointError(
                f"{self.path}: the model's parameters do not match the recorded layout ({mismatch}); "
                "record this model into a new run folder"
            )
        return f

    def _needs_new_objects(self, attrs: dict[str, Any], metric_keys) -> bool:
        """Return whether the trajectory, one of its metrics or one of its attributes must be written."""
        runs = self._file["trajectories"]
        if self.trajectory not in runs:
            return True
        group = runs[self.trajectory]
        if any(key not in group["metrics"] for key in metric_keys):
            return True
        return any(
            key not in group.attrs or not np.array_equal(np.asarray(group.attrs[key]), np.asarray(_to_attr(value)))
            for key, value in attrs.items()
        )

    def _rewrite(self, attrs: dict[str, Any], metric_keys) -> None:
        """Add the trajectory, its new metrics and attributes in a copy of the file, then rename the copy into place.

        HDF5 creates no objects in SWMR mode. Creating them in place outside SWMR mode
        is not safe against a kill either, because HDF5 may write a link before the
        object it names, and a killed writer then leaves a name that cannot be opened.
        The copy costs one read and one write of the file per new trajectory (or new
        metric, or changed attribute), and a kill at any moment leaves the previous file.
        """
        remove_stale_temporaries(self.path)
        tmp = temporary_path(self.path)
        started = time.monotonic()
        try:
            shutil.copyfile(self.path, tmp)
            self._file = self._open(tmp)
            self._group = self._prepare_group(attrs, metric_keys)
            self._drop_uncommitted_rows()
            self._file.close()
            self._file = None
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        finally:
            if self._file is not None:
                self._file.close()
                self._file = None
            tmp.unlink(missing_ok=True)
        log.info("%s: added trajectory %r, metrics or attributes through a copy of the file (%.2f s)",
                 self.path, self.trajectory, time.monotonic() - started)

    def _prepare_group(self, attrs: dict[str, Any], metric_keys) -> h5py.Group:
        runs = self._file["trajectories"]
        if self.trajectory in runs:
            group = runs[self.trajectory]
            for key, value in attrs.items():
                group.attrs[key] = _to_attr(value)
            _create_metrics(group, metric_keys)
            return group

        group = runs.create_group(self.trajectory)
        group.attrs["index"] = len(runs) - 1
        group.attrs["rows"] = 0
        for key, value in attrs.items():
            group.attrs[key] = _to_attr(value)
        p = max(self.layout.size, 1)
        b = self.buffer_layout.size
        # Uncompressed: gzip gains little on trained float32 weights and took most of the time of
        # a Recorder.record call (benchmarks/bench_recorder.py).
        group.create_dataset(
            "params", shape=(0, p), maxshape=(None, p), dtype=np.float32, chunks=(1, min(p, 1 << 18)),
        )
        group.create_dataset(
            "buffers", shape=(0, b), maxshape=(None, b), dtype=np.float32, chunks=(1, min(b, 1 << 18)) if b else True
        )
        group.create_dataset("step", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(1024,))
        group.create_dataset("epoch", shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(1024,))
        group.create_dataset(
            "source", shape=(0,), maxshape=(None,), dtype=SOURCE_DTYPE, chunks=(64,), compression="gzip", compression_opts=1
        )
        group.create_dataset("source_digest", shape=(0,), maxshape=(None,), dtype=DIGEST_DTYPE, chunks=(256,))
        group.create_group("metrics")
        _create_metrics(group, metric_keys)
        return group

    def _drop_uncommitted_rows(self) -> None:
        # A writer killed inside `append` leaves rows past the committed count. Their string
        # elements may point into a global heap collection that never reached the disk, and
        # overwriting such an element makes HDF5 free that object ("bad heap index"). Shrinking
        # the datasets discards those rows without touching the heap.
        rows = int(self._group.attrs["rows"])
        datasets = [self._group[name] for name in ROW_DATASETS] + list(self._group["metrics"].values())
        for dataset in datasets:
            if dataset.shape[0] > rows:
                log.warning("%s: dropping uncommitted row(s) %d.. of %s", self.path, rows, dataset.name)
                dataset.resize(rows, axis=0)

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
        for name in ROW_DATASETS:
            g[name].resize(n + 1, axis=0)
        g["params"][n] = params
        if buffers.size:
            g["buffers"][n] = buffers
        g["step"][n] = int(step)
        g["epoch"][n] = float(epoch)
        g["source"][n] = _fit_text(g["source"], source, "source")
        g["source_digest"][n] = _fit_text(g["source_digest"], digest, "source_digest")
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
        # The row count attribute is the commit point: readers ignore rows past it. The row is
        # flushed first because HDF5 may write dirty metadata of one flush in any order.
        self._file.flush()
        g.attrs["rows"] = n + 1
        self._file.flush()
        self._rows = n + 1
        self._digests.add(digest)

    def close(self) -> None:
        """Close the file, store the content id of what it now holds and release the lock."""
        if self._file is None:
            return
        try:
            # Written while still in SWMR mode, so that no moment of this writer leaves the
            # file marked open for ordinary writing, which SWMR readers reject.
            self._file.attrs["content_id"] = trajectory_content_id(self._file)
            self._file.close()
        finally:
            self._file = None
            self._lock.release()

    def __enter__(self) -> "TrajectoryWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _create_metrics(group: h5py.Group, keys) -> None:
    """Create a float64 dataset under ``metrics/`` for each key it lacks, NaN for the rows already recorded."""
    metrics = group["metrics"]
    rows = int(group.attrs["rows"])
    for key in keys:
        if key not in metrics:
            metrics.create_dataset(key, data=np.full(rows, np.nan), maxshape=(None,), dtype=np.float64, chunks=(1024,))


def _fit_text(dataset: h5py.Dataset, text: str, what: str) -> str | bytes:
    """Return `text` as the element type of `dataset`: str for variable length, else encoded bytes.

    Raises
    ------
    CheckpointError
        When the text does not fit the fixed length.
    """
    info = h5py.check_string_dtype(dataset.dtype)
    if info is None or info.length is None:
        return text
    data = text.encode(info.encoding)
    if len(data) > info.length:
        raise CheckpointError(
            f"{text[:80]}...: {what} is {len(data)} bytes, more than the {info.length} that {dataset.name} can store; "
            "move the checkpoints to a shorter path"
        )
    return data


def _to_attr(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    if value is None:
        return "null"
    return value


def describe_layout_mismatch(stored: Layout, new: Layout) -> str:
    """Name at most five missing, unexpected and reshaped tensors between two layouts."""
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


def _hdf5_library() -> ctypes.CDLL:
    """Return the HDF5 shared library that h5py has loaded, for calls h5py does not wrap.

    Raises
    ------
    ArtifactError
        When the library cannot be found.
    """
    candidates = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                name = os.path.basename(line.split()[-1]) if line.split() else ""
                if name.startswith("libhdf5") and not name.startswith("libhdf5_hl") and ".so" in name:
                    candidates.append(line.split()[-1])
    except OSError:
        pass
    package = os.path.dirname(h5py.__file__)
    for pattern in ("../h5py.libs/libhdf5-*.so*", ".dylibs/libhdf5.*.dylib"):
        candidates += [p for p in glob.glob(os.path.join(package, pattern)) if "hdf5_hl" not in p]
    if not candidates:
        raise ArtifactError(
            "cannot find the HDF5 library that h5py uses, so the open-for-write mark of a killed writer "
            "cannot be cleared; clear it with `h5clear -s FILE` (HDF5 tools) and rerun"
        )
    return ctypes.CDLL(candidates[0])


def _open_clearing_status_flags(path: Path, *, writable: bool = True) -> h5py.File:
    """Open `path` while clearing the superblock's open-for-write status flags.

    HDF5 (1.10 and later) marks the superblock while a writer has the file open and
    rejects every other writer until the mark is gone; a writer killed by SIGKILL never
    removes it. h5clear removes it by opening the file with the private file-access
    property ``clear_status_flags`` (a bool), and this does the same through h5py's HDF5.
    Opened for writing, the cleared flags are written back; call it so only while
    holding the `WriterLock`, which proves that no writer is alive. Opened read-only,
    the file is left as it is.

    A writer killed in SWMR mode may also leave data past the end of allocation (EOA)
    that the superblock records, and HDF5 rejects reads there ("addr overflow"). So the
    EOA is raised to the file's size, as ``h5clear -s --increment=0`` does. Read-only,
    that changes only HDF5's view of the open file.
    """
    library = _hdf5_library()
    library.H5Pset.argtypes = [ctypes.c_int64, ctypes.c_char_p, ctypes.c_void_p]
    library.H5Pset.restype = ctypes.c_int

    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
    clear = ctypes.c_bool(True)
    if library.H5Pset(fapl.id, b"clear_status_flags", ctypes.byref(clear)) < 0:
        raise ArtifactError(
            f"{path}: HDF5 rejected the request to clear the open-for-write mark left by a killed writer; "
            "clear it with `h5clear -s` (HDF5 tools) and rerun"
        )
    try:
        if not writable:
            fapl.set_file_locking(False, True)
        file_id = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDWR if writable else h5py.h5f.ACC_RDONLY, fapl=fapl)
    except OSError as exc:
        raise ArtifactError(
            f"{path}: cannot be opened after clearing the mark of a killed writer ({exc}); "
            "the file may be damaged: move it away and rerun `doodl3 record` to record anew"
        ) from exc
    library.H5Fincrement_filesize.argtypes = [ctypes.c_int64, ctypes.c_uint64]
    library.H5Fincrement_filesize.restype = ctypes.c_int
    if library.H5Fincrement_filesize(file_id.id, 0) < 0:
        file_id.close()
        raise ArtifactError(
            f"{path}: HDF5 rejected the request to extend the end of allocation past the data of a killed "
            "writer; run `h5clear -s --increment=0` on it (HDF5 tools) and rerun"
        )
    return h5py.File(file_id)
