"""The run folder: artifact paths, doodl3.toml loading and staleness.

A run folder contains ``doodl3.toml`` (how to rebuild model, data and loss) and one
HDF5 artifact per stage. Staleness is decided from content ids: a stage is stale
when its artifact is missing or records an upstream content id that differs from
the upstream artifact's current one.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from doodl3_cli.artifacts._common import attr_json, read_content_id
from doodl3_cli.errors import ConfigError, Doodl3Error, RunFolderError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

import h5py

log = logging.getLogger(__name__)

CONFIG_NAME = "doodl3.toml"

# The devices that `--device` and [evaluation].device accept.
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")

STAGE_FILES = {
    "record": "trajectory.h5",
    "sample": "landscape.h5",
    "topology": "topology.h5",
    "dynamics": "dynamics.h5",
    "report": "report.html",
}

# Each stage and the artifacts it reads; optional inputs are used when present.
STAGE_INPUTS = {
    "sample": ("trajectory.h5",),
    "topology": ("landscape.h5",),
    "dynamics": ("trajectory.h5", "landscape.h5", "topology.h5"),
    "report": ("trajectory.h5", "landscape.h5", "topology.h5", "dynamics.h5"),
}


@dataclass
class FactorySpec:
    """A callable named in doodl3.toml, with the keyword arguments to call it with."""

    section: str
    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    """The parsed contents of doodl3.toml."""

    path: Path
    model: FactorySpec
    data: FactorySpec
    loss: FactorySpec
    batch_size: int = 2048
    device: str = "auto"


class RunFolder:
    """Paths of one run folder.

    Parameters
    ----------
    path : Path
        The run folder.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.config_path = self.path / CONFIG_NAME
        self.trajectory = self.path / STAGE_FILES["record"]
        self.landscape = self.path / STAGE_FILES["sample"]
        self.topology = self.path / STAGE_FILES["topology"]
        self.dynamics = self.path / STAGE_FILES["dynamics"]
        self.report = self.path / STAGE_FILES["report"]

    def require_exists(self) -> None:
        """Raise RunFolderError unless the run folder is an existing directory."""
        quoted = shlex.quote(str(self.path))
        if not self.path.exists():
            raise RunFolderError(
                f"{self.path}: run folder not found; create it with `doodl3 record {quoted} --from DIR` "
                f"or `doodl3 demo {quoted}`"
            )
        if not self.path.is_dir():
            raise RunFolderError(f"{self.path}: is a file, not a folder; pass the run folder that contains the artifacts")

    def load_config(self) -> RunConfig:
        """Parse doodl3.toml.

        Raises
        ------
        ConfigError
            When the file is missing or a folder, is not valid TOML, lacks a section,
            or has an invalid ``[evaluation]`` value.
        """
        if self.config_path.is_dir():
            raise ConfigError(
                f"{self.config_path}: is a folder, not a file; move it away and write doodl3.toml with [model], "
                "[data] and [loss] factories (see configs/digits-mlp.toml)"
            )
        if not self.config_path.is_file():
            raise ConfigError(
                f"{self.config_path}: not found; write it with [model], [data] and [loss] factories "
                "(see configs/digits-mlp.toml) so doodl3 can rebuild the model"
            )
        try:
            raw = tomllib.loads(self.config_path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{self.config_path}: invalid TOML ({exc}); fix the file") from exc
        except OSError as exc:
            raise ConfigError(f"{self.config_path}: cannot be read ({exc}); check its permissions") from exc

        specs = {}
        for section in ("model", "data", "loss"):
            table = raw.get(section)
            if not isinstance(table, dict) or not isinstance(table.get("factory"), str):
                raise ConfigError(
                    f"{self.config_path}: section [{section}] with a string 'factory' is missing; "
                    'add e.g. factory = "package.module:callable"'
                )
            kwargs = table.get("kwargs", {})
            if not isinstance(kwargs, dict):
                raise ConfigError(f"{self.config_path}: [{section}].kwargs must be a table, got {kwargs!r}")
            specs[section] = FactorySpec(section, table["factory"], kwargs)

        evaluation = raw.get("evaluation", {})
        if not isinstance(evaluation, dict):
            raise ConfigError(f"{self.config_path}: [evaluation] must be a table, got {evaluation!r}")
        batch_size = evaluation.get("batch_size", 2048)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(
                f"{self.config_path}: [evaluation].batch_size must be a positive integer, got {batch_size!r}"
            )
        device = evaluation.get("device", "auto")
        if not isinstance(device, str) or not DEVICE_PATTERN.fullmatch(device):
            raise ConfigError(
                f"{self.config_path}: [evaluation].device must be auto, cpu, cuda or cuda:N, got {device!r}; fix the file"
            )
        return RunConfig(self.config_path, specs["model"], specs["data"], specs["loss"], batch_size, device)

    def stale_stages(self) -> list[str]:
        """Return the stages whose artifact must be (re)computed, in pipeline order.

        A stage is stale when its artifact is missing, unreadable or of a schema
        version this doodl3 cannot read. It is also stale when it is incomplete (a
        landscape grid with cells not yet evaluated), when it was computed from
        other content than its inputs contain now, or when it is downstream of a
        stale stage. The report is compared by file
        presence only and is rebuilt whenever an analysis stage is stale.

        Raises
        ------
        ArtifactError
            When trajectory.h5 has a schema this doodl3 cannot read: no stage can
            run until it is rewritten or doodl3 is upgraded.
        """
        from doodl3_cli.artifacts._common import check_schema
        from doodl3_cli.artifacts.trajectory import COMMAND, SCHEMA, SCHEMA_VERSION

        if self.trajectory.is_file():
            with _open_quietly(self.trajectory) as f:
                if f is not None:
                    check_schema(f, schema=SCHEMA, max_version=SCHEMA_VERSION, command=COMMAND)

        stale: list[str] = []
        for stage in ("sample", "topology", "dynamics"):
            upstream_stale = any(self._depends_on(stage, earlier) for earlier in stale)
            reason = "an input is recomputed" if upstream_stale else self._stale_reason(stage)
            if reason:
                log.info("%s is stale: %s", STAGE_FILES[stage], reason)
                stale.append(stage)
        if stale or not self.report.is_file():
            stale.append("report")
        return stale

    def _stale_reason(self, stage: str) -> str | None:
        """Say why the artifact of `stage` must be recomputed, or None when it is current."""
        from doodl3_cli.artifacts import _common

        path = self.path / STAGE_FILES[stage]
        if not path.is_file():
            return "missing"
        schema, max_version = _stage_schema(stage)
        with _open_quietly(path) as f:
            if f is None:
                return "unreadable"
            try:
                _common.check_schema(f, schema=schema, max_version=max_version, command=f"doodl3 {stage}")
            except Doodl3Error as exc:
                return str(exc)
            recorded = attr_json(f, "upstream", {})
            if stage == "sample" and any(
                not bool(np.all(group["evaluated"][()])) for group in f.get("slices", {}).values() if "evaluated" in group
            ):
                return "grid not completely evaluated"
        for name in STAGE_INPUTS[stage]:
            current = read_content_id(self.path / name)
            if current != recorded.get(name):
                return f"{name} changed since"
        return None

    @staticmethod
    def _depends_on(stage: str, other: str) -> bool:
        return STAGE_FILES[other] in STAGE_INPUTS.get(stage, ())


def _stage_schema(stage: str) -> tuple[str, int]:
    """Return (schema name, newest readable version) of the artifact of `stage`."""
    from doodl3_cli.artifacts import dynamics, landscape, topology

    modules = {"sample": landscape, "topology": topology, "dynamics": dynamics}
    if stage not in modules:
        raise ValueError(f"stage must be one of {', '.join(modules)}, got {stage!r}")
    return modules[stage].SCHEMA, modules[stage].SCHEMA_VERSION


@contextlib.contextmanager
def _open_quietly(path: Path) -> Iterator[h5py.File | None]:
    """Open an artifact read-only, yielding None instead of raising when it cannot be opened."""
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError:
        yield None
        return
    with f:
        yield f


def resolve_factory(spec: FactorySpec, *, base: Path) -> Callable[..., Any]:
    """Import the callable named by `spec.factory`.

    Parameters
    ----------
    spec : FactorySpec
        ``package.module:callable`` or ``path/to/file.py:callable`` (relative paths
        are resolved against `base`, the run folder).
    base : Path
        Folder against which relative file paths are resolved.

    Raises
    ------
    ConfigError
        When the module or file cannot be imported or lacks the callable.
    """
    target = spec.factory
    module_part, sep, attr = target.rpartition(":")
    where = f"[{spec.section}].factory = {target!r} in {base / CONFIG_NAME}"
    if not sep or not module_part or not attr:
        raise ConfigError(f"{where}: expected 'package.module:callable' or 'path/to/file.py:callable'")

    if module_part.endswith(".py"):
        file_path = Path(module_part)
        if not file_path.is_absolute():
            file_path = base / file_path
        if not file_path.is_file():
            raise ConfigError(f"{where}: file {file_path} not found; fix the path")
        module_name = f"doodl3_user_{abs(hash(str(file_path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(module_name, file_path)
        if module_spec is None or module_spec.loader is None:
            raise ConfigError(f"{where}: {file_path} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # user code may raise anything while importing
            raise ConfigError(f"{where}: importing {file_path} failed ({type(exc).__name__}: {exc})") from exc
    else:
        try:
            module = importlib.import_module(module_part)
        except Exception as exc:  # user code may raise anything while importing
            raise ConfigError(
                f"{where}: module '{module_part}' cannot be imported ({type(exc).__name__}: {exc}); "
                "install it or fix the import path"
            ) from exc

    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ConfigError(f"{where}: '{attr}' is not a callable in module '{module_part}'")
    return factory


def call_factory(spec: FactorySpec, *, base: Path) -> Any:
    """Import and call the factory of `spec` with its keyword arguments."""
    factory = resolve_factory(spec, base=base)
    try:
        return factory(**spec.kwargs)
    except Exception as exc:  # user factories may raise anything
        raise ConfigError(
            f"[{spec.section}].factory = {spec.factory!r} in {base / CONFIG_NAME} raised "
            f"{type(exc).__name__}: {exc}; fix the factory or its kwargs"
        ) from exc
