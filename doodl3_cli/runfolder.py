"""The run folder: artifact paths, doodl3.toml loading and staleness.

A run folder holds ``doodl3.toml`` (how to rebuild model, data and loss) and one
HDF5 artifact per stage. Staleness is decided from content ids: a stage is stale
when its artifact is missing or records an upstream content id that differs from
the upstream artifact's current one.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from doodl3_cli.artifacts._common import attr_json, read_content_id
from doodl3_cli.errors import ConfigError, RunFolderError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

import h5py

log = logging.getLogger(__name__)

CONFIG_NAME = "doodl3.toml"

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
        if not self.path.exists():
            raise RunFolderError(
                f"{self.path}: run folder not found; create it with `doodl3 record {self.path} --from DIR` "
                f"or `doodl3 demo {self.path}`"
            )
        if not self.path.is_dir():
            raise RunFolderError(f"{self.path}: not a directory; pass the run folder that holds the artifacts")

    def load_config(self) -> RunConfig:
        """Parse doodl3.toml.

        Raises
        ------
        ConfigError
            When the file is missing, is not valid TOML, or lacks a section.
        """
        if not self.config_path.is_file():
            raise ConfigError(
                f"{self.config_path}: not found; write it with [model], [data] and [loss] factories "
                "(see configs/digits-mlp.toml) so doodl3 can rebuild the model"
            )
        try:
            raw = tomllib.loads(self.config_path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{self.config_path}: invalid TOML ({exc}); fix the file") from exc

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
        batch_size = evaluation.get("batch_size", 2048)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(
                f"{self.config_path}: [evaluation].batch_size must be a positive integer, got {batch_size!r}"
            )
        device = evaluation.get("device", "auto")
        return RunConfig(self.config_path, specs["model"], specs["data"], specs["loss"], batch_size, str(device))

    def stale_stages(self) -> list[str]:
        """Return the stages whose artifact is missing or computed from other upstream content.

        The report is compared by file presence and the content ids embedded in it
        are not parsed, so the report is rebuilt whenever any analysis stage reruns.
        """
        stale: list[str] = []
        for stage in ("sample", "topology", "dynamics"):
            path = self.path / STAGE_FILES[stage]
            if stage in stale or not path.is_file():
                stale.append(stage)
                continue
            try:
                with h5py.File(path, "r", locking=False) as f:
                    recorded = attr_json(f, "upstream", {})
            except OSError:
                stale.append(stage)
                continue
            for name in STAGE_INPUTS[stage]:
                current = read_content_id(self.path / name)
                if current is not None and recorded.get(name) != current:
                    stale.append(stage)
                    break
                if current is None and name in recorded:
                    stale.append(stage)
                    break
            if any(self._depends_on(stage, earlier) for earlier in stale):
                if stage not in stale:
                    stale.append(stage)
        if stale or not self.report.is_file():
            stale.append("report")
        return stale

    @staticmethod
    def _depends_on(stage: str, other: str) -> bool:
        return STAGE_FILES[other] in STAGE_INPUTS.get(stage, ())


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
