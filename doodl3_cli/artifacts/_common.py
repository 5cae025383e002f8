"""Attributes and checks shared by every doodl3 HDF5 artifact.

Every artifact carries the root attributes `schema`, `schema_version`,
`doodl3_version`, `created` (ISO 8601 UTC), `settings` (JSON of the options that
produced it) and `content_id`. Each downstream artifact stores the `content_id` of
every artifact it was computed from under the root attribute `upstream` (JSON), so
`doodl3 run` can tell exactly which stages are stale.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from doodl3_cli import __version__
from doodl3_cli.errors import ArtifactError

log = logging.getLogger(__name__)

STR_DTYPE = h5py.string_dtype(encoding="utf-8")


def utc_now() -> str:
    """Return the current time as an ISO 8601 UTC string with seconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_content_id() -> str:
    """Return a fresh random content id (32 hex characters)."""
    return uuid.uuid4().hex


def write_root_attrs(
    f: h5py.File,
    *,
    schema: str,
    schema_version: int,
    settings: dict[str, Any],
    upstream: dict[str, str],
    content_id: str | None = None,
) -> str:
    """Write the provenance attributes that every artifact carries.

    Parameters
    ----------
    f : h5py.File
        The artifact, open for writing.
    schema : str
        Schema name such as ``"doodl3/landscape"``.
    schema_version : int
        Version of that schema's layout.
    settings : dict
        Options that produced the artifact; stored as JSON.
    upstream : dict of str to str
        Map from upstream artifact file name to its content id.
    content_id : str, optional
        Content id to store; a fresh random one by default.

    Returns
    -------
    str
        The content id written.
    """
    content_id = content_id or new_content_id()
    f.attrs["schema"] = schema
    f.attrs["schema_version"] = np.int64(schema_version)
    f.attrs["doodl3_version"] = __version__
    f.attrs["created"] = utc_now()
    f.attrs["settings"] = json.dumps(settings, sort_keys=True, default=str)
    f.attrs["upstream"] = json.dumps(upstream, sort_keys=True)
    f.attrs["content_id"] = content_id
    return content_id


def attr_str(obj: h5py.HLObject, key: str, default: str | None = None) -> str | None:
    """Read a text attribute, accepting both str and bytes as other tools write them."""
    if key not in obj.attrs:
        return default
    value = obj.attrs[key]
    if isinstance(value, bytes):
        return value.decode("utf-8")
    # Some tools store a text attribute as an array of one string, shape (1,).
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    return str(value)


def attr_json(obj: h5py.HLObject, key: str, default: Any = None) -> Any:
    """Read a JSON text attribute; `default` when it is absent."""
    text = attr_str(obj, key)
    if text is None:
        return default
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(
            f"{obj.file.filename}: attribute '{key}' of '{obj.name}' is not valid JSON ({exc}); "
            "rewrite the artifact with the doodl3 stage that produces it"
        ) from exc


def check_schema(f: h5py.File, *, schema: str, max_version: int, command: str) -> int:
    """Raise ArtifactError unless `f` is a `schema` artifact that this version can read.

    Parameters
    ----------
    f : h5py.File
        The artifact, open for reading.
    schema : str
        Expected schema name.
    max_version : int
        Newest schema version this doodl3 understands.
    command : str
        The doodl3 command that writes this artifact, named in the error.

    Returns
    -------
    int
        The file's schema version.
    """
    found = attr_str(f, "schema")
    if found != schema:
        raise ArtifactError(
            f"{f.filename}: expected a '{schema}' artifact, found schema {found!r}; "
            f"rewrite it with `{command}`"
        )
    version = int(f.attrs.get("schema_version", -1))
    if version < 1 or version > max_version:
        raise ArtifactError(
            f"{f.filename}: schema version {version} of '{schema}' is not supported by doodl3 "
            f"{__version__} (reads versions 1 to {max_version}); upgrade doodl3 or rewrite it "
            f"with `{command}`"
        )
    return version


@contextlib.contextmanager
def open_artifact(
    path: Path, *, schema: str, max_version: int, command: str, swmr: bool = False
) -> Iterator[h5py.File]:
    """Open an existing artifact read-only after checking its schema.

    Parameters
    ----------
    swmr : bool
        Open as an HDF5 SWMR reader, for a file that a live writer is appending to
        (trajectory.h5 during `record`). Only for that case: an SWMR reader retries
        unreadable metadata for minutes, where a plain open fails at once.

    Raises
    ------
    ArtifactError
        When the file is missing, is not HDF5, or has another schema or version.
    """
    path = Path(path)
    if not path.is_file():
        writer = writer_pid(path)
        if writer is not None:
            raise ArtifactError(
                f"{path}: artifact not found, and a process (PID {writer}) is writing it now; "
                "wait for it to finish and rerun"
            )
        raise ArtifactError(f"{path}: artifact not found; run `{command}` first")
    try:
        f = _open_for_reading(path, swmr=swmr)
    except OSError as exc:
        if _writer_flag_set(exc):
            raise ArtifactError(
                f"{path}: is marked open by a writer; if no doodl3 process is writing it, the writer "
                "was killed: clear the flag with `h5clear -s` (HDF5 tools) and rerun"
            ) from exc
        raise ArtifactError(
            f"{path}: cannot be opened as HDF5 ({exc}); the file may be truncated, "
            f"delete it and rerun `{command}`"
        ) from exc
    with f:
        check_schema(f, schema=schema, max_version=max_version, command=command)
        yield f


def _writer_flag_set(exc: OSError) -> bool:
    return "already open for write" in str(exc)


def _open_for_reading(path: Path, *, swmr: bool) -> h5py.File:
    """Open read-only, as an HDF5 SWMR reader when `swmr` is set."""
    return h5py.File(path, "r", locking=False, swmr=swmr)


def read_content_id(path: Path) -> str | None:
    """Return the content id of an artifact, or None when the file is missing or unreadable."""
    try:
        with _open_for_reading(Path(path), swmr=False) as f:
            return attr_str(f, "content_id")
    except (OSError, FileNotFoundError):
        return None


def lock_path(path: Path) -> Path:
    """Return the writer lock sidecar of the artifact at `path`: ``.<name>.lock`` next to it."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def writer_pid(path: Path) -> int | None:
    """Return the PID of the live process that holds the writer lock of `path`, or None.

    Returns 0 for a holder whose PID cannot be read from the sidecar.
    """
    try:
        fd = os.open(lock_path(path), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else 0
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def writer_active(path: Path) -> bool:
    """Return whether a live process holds the writer lock of the artifact at `path`."""
    return writer_pid(path) is not None


class WriterLock:
    """Exclusive writer lock on an artifact, held through ``flock`` on a sidecar file.

    The sidecar ``.<name>.lock`` next to the artifact stores the PID of the holder. The
    operating system releases a ``flock`` when its process dies, also on SIGKILL, so a
    stale lock never blocks a rerun. HDF5 drops its own lock once SWMR writing starts,
    and an artifact written under a temporary name has no open file to lock, which is
    why doodl3 keeps a lock of its own.

    Parameters
    ----------
    path : Path
        The artifact.
    writer : str
        What the holder is called in the message for a second writer in the same process.
    keep_sidecar : bool
        Leave the sidecar in place on release. When False it is removed first, and
        `acquire` checks that the sidecar it locked is still the one at its path, so a
        writer that locked a removed sidecar retries instead of sharing the lock.
    """

    def __init__(self, path: Path, *, writer: str = "writer", keep_sidecar: bool = False):
        self.artifact = Path(path)
        self.path = lock_path(self.artifact)
        self.writer = writer
        self.keep_sidecar = keep_sidecar
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise at once.

        Raises
        ------
        ArtifactError
            When another writer, in this process or another one, holds the lock.
        """
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise self._held_error(holder) from None
            if self._still_linked(fd):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def _still_linked(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _held_error(self, holder: str) -> ArtifactError:
        if holder == str(os.getpid()):
            return ArtifactError(
                f"{self.artifact}: already open for writing in this process; close the other {self.writer} "
                f"first (one writer per {self.artifact.name})"
            )
        return ArtifactError(
            f"{self.artifact}: already open for writing by another process (PID {holder}, lock "
            f"{self.path}); wait for it to finish or stop it (one writer per {self.artifact.name})"
        )

    def release(self) -> None:
        """Release the lock, removing the sidecar first unless `keep_sidecar` is set."""
        if self._fd is None:
            return
        if not self.keep_sidecar:
            self.path.unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "WriterLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def temporary_path(path: Path) -> Path:
    """Return a fresh temporary name next to `path`: ``.<name>.<pid>.<random>.tmp``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of writers of `path` that were killed.

    Call it only while holding the writer lock of `path`: every writer creates its
    temporaries while it holds that lock, so any that remain belong to a dead writer.
    """
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        log.info("removing %s, left by a writer that was killed", stale)
        stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_h5(path: Path, *, locked: bool = False) -> Iterator[h5py.File]:
    """Write a whole-file artifact under a temporary name and rename it into place.

    A stage killed midway leaves the previous version (or nothing), never a
    half-written file that a later stage would trust. The writer lock of `path` is
    held while the file is written, so a second concurrent writer fails at once.

    Parameters
    ----------
    path : Path
        The artifact.
    locked : bool
        The caller already holds the `WriterLock` of `path`.

    Raises
    ------
    ArtifactError
        When another writer holds the lock of `path`.
    """
    path = Path(path)
    lock = None if locked else WriterLock(path)
    if lock is not None:
        lock.acquire()
    try:
        remove_stale_temporaries(path)
        tmp = temporary_path(path)
        try:
            with h5py.File(tmp, "w") as f:
                yield f
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        if lock is not None:
            lock.release()


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` as UTF-8 under a temporary name next to `path` and rename it into place.

    The caller holds the writer lock of the artifact that `path` belongs to.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def named_group(f: h5py.File, kind: str, name: str | None, *, path: Path, rerun: str) -> h5py.Group:
    """Return the group `name` under ``/slices`` or ``/lines``; the first one when `name` is None.

    Raises
    ------
    ArtifactError
        When the file contains no such group, or none of that name. The message
        names the file, the groups present and the command `rerun` to write them.
    """
    singular = kind[:-1]
    groups = f.get(kind)
    if groups is None or len(groups) == 0:
        raise ArtifactError(f"{path}: contains no {singular}; rerun `{rerun}`")
    if name is None:
        name = next(iter(groups.keys()))
    if name not in groups:
        raise ArtifactError(
            f"{path}: {singular} '{name}' not found ({kind}: {', '.join(groups.keys())}); "
            f"name one of these, or rerun `{rerun}`"
        )
    return groups[name]


def write_str_dataset(group: h5py.Group, name: str, values: list[str]) -> h5py.Dataset:
    """Write a one-dimensional UTF-8 variable-length string dataset."""
    return group.create_dataset(name, data=np.array(values, dtype=object), dtype=STR_DTYPE)


def read_str_dataset(dataset: h5py.Dataset) -> list[str]:
    """Read a string dataset as a list of str, whether stored as str or bytes."""
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in dataset[()]]
