"""Everything the report shows, read from the artifacts of a run folder.

trajectory.h5 is required. landscape.h5, topology.h5 and dynamics.h5 are optional:
a missing one leaves its sections out of the page with a note naming the command
that writes it, and an unreadable one does the same with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from doodl3_cli.artifacts import dynamics as dynamics_artifact
from doodl3_cli.artifacts import landscape as landscape_artifact
from doodl3_cli.artifacts import topology as topology_artifact
from doodl3_cli.artifacts import trajectory as trajectory_artifact
from doodl3_cli.artifacts._common import attr_json, attr_str, open_artifact
from doodl3_cli.artifacts.dynamics import SliceDynamics
from doodl3_cli.artifacts.landscape import LandscapeSlice
from doodl3_cli.artifacts.topology import SliceTopology
from doodl3_cli.artifacts.trajectory import Trajectory
from doodl3_cli.dynamics.trajectories import TrajectoryDiagnostics
from doodl3_cli.errors import ArtifactError, with_run_path
from doodl3_cli.runfolder import RunFolder

log = logging.getLogger(__name__)

T = TypeVar("T")

# Each optional artifact: its stage, its reader module, and the attribute of RunFolder that is its path.
ARTIFACTS = (
    ("record", trajectory_artifact, "trajectory"),
    ("sample", landscape_artifact, "landscape"),
    ("topology", topology_artifact, "topology"),
    ("dynamics", dynamics_artifact, "dynamics"),
)


@dataclass
class Provenance:
    """The root attributes of one artifact, as the provenance section lists them.

    Attributes
    ----------
    path : Path
        The artifact file.
    stage : str
        The doodl3 command that writes it.
    attrs : dict
        ``schema``, ``schema_version``, ``doodl3_version``, ``created``,
        ``content_id`` (str, None when absent), ``settings`` and ``upstream`` (parsed JSON).
    """

    path: Path
    stage: str
    attrs: dict[str, Any]


@dataclass
class RunContent:
    """The artifacts of one run folder, read into memory for the report.

    Attributes
    ----------
    run : RunFolder
    trajectories : list of Trajectory
        Every recorded run, in recording order.
    landscapes : list of LandscapeSlice
        Every slice of landscape.h5, without the P-sized vectors; empty when absent.
    lines : list of LandscapeLine
        Every line of landscape.h5 (one-dimensional slices between final states);
        empty when absent or when landscape.h5 predates lines.
    topologies : dict of str to SliceTopology
        By slice name; empty when topology.h5 is absent.
    dynamics : dict of str to SliceDynamics
        By slice name; empty when dynamics.h5 is absent.
    diagnostics : dict of str to TrajectoryDiagnostics
        By trajectory name, from dynamics.h5.
    ensemble : EnsembleDiagnostics or None
        The ensemble measures of dynamics.h5 (distances, prediction disagreement);
        None when the file has none.
    findings : list of Finding
        Flagged training segments and ensemble findings of dynamics.h5, empty when
        it has none.
    provenance : list of Provenance
        One entry per artifact present.
    problems : dict of str to str
        Stage name to the reason its artifact could not be read (file missing or unreadable).
    stale : list of str
        Stages whose artifact was computed from inputs that have changed since.
    """

    run: RunFolder
    trajectories: list[Trajectory]
    landscapes: list[LandscapeSlice] = field(default_factory=list)
    lines: list[Any] = field(default_factory=list)
    topologies: dict[str, SliceTopology] = field(default_factory=dict)
    dynamics: dict[str, SliceDynamics] = field(default_factory=dict)
    diagnostics: dict[str, TrajectoryDiagnostics] = field(default_factory=dict)
    ensemble: Any = None
    findings: list[Any] = field(default_factory=list)
    provenance: list[Provenance] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)
    stale: list[str] = field(default_factory=list)

    def command(self, stage: str, settings: dict | None = None) -> str:
        """Return what wrote the artifact of `stage` for this run, using its stored `settings` when they name a source.

        trajectory.h5 stores the checkpoint folder in ``settings["source"]``, or
        ``"Recorder"`` when the Python API wrote it during training.
        """
        if stage == "record":
            source = settings.get("source") if isinstance(settings, dict) else None
            if source == "Recorder":
                return "doodl3_cli.record.Recorder, during training"
            return f"doodl3 record {self.run.path} --from {source or 'DIR'}"
        return f"doodl3 {stage} {self.run.path}"


def read_run_content(run: RunFolder) -> RunContent:
    """Read every artifact of `run` that the report shows.

    Raises
    ------
    RunFolderError
        When the run folder does not exist.
    ArtifactError
        When trajectory.h5 is missing or unreadable, or contains no trajectory.
    """
    run.require_exists()
    if not run.trajectory.is_file():
        raise ArtifactError(
            f"{run.trajectory}: not found, and the report needs the recorded checkpoints; "
            f"run `doodl3 record {run.path} --from DIR` first"
        )
    # NOTE: read_trajectory also loads params [T, P], which the report does not use.
    # For very large models this costs T * P * 4 bytes of memory while the report is built.
    trajectories = trajectory_artifact.read_all_trajectories(run.trajectory)
    if not trajectories:
        raise ArtifactError(
            f"{run.trajectory}: contains no trajectory; record checkpoints with `doodl3 record {run.path} --from DIR`"
        )
    content = RunContent(run=run, trajectories=trajectories)

    content.landscapes = _optional(content, "sample", run.landscape, lambda: [
        landscape_artifact.read_slice(run.landscape, name, with_vectors=False)
        for name in landscape_artifact.list_slices(run.landscape)
    ]) or []
    content.lines = _optional(content, "sample", run.landscape, lambda: _read_lines(run.landscape)) or []
    content.topologies = _optional(content, "topology", run.topology, lambda: {
        name: topology_artifact.read_slice(run.topology, name) for name in topology_artifact.list_slices(run.topology)
    }) or {}
    content.dynamics = _optional(content, "dynamics", run.dynamics, lambda: {
        name: dynamics_artifact.read_slice(run.dynamics, name) for name in dynamics_artifact.list_slices(run.dynamics)
    }) or {}
    if "dynamics" not in content.problems:
        content.diagnostics = _optional(content, "dynamics", run.dynamics, lambda: {
            name: dynamics_artifact.read_trajectory(run.dynamics, name)
            for name in dynamics_artifact.list_trajectories(run.dynamics)
        }) or {}
    if "dynamics" not in content.problems:
        content.ensemble = _optional(content, "dynamics", run.dynamics, lambda: _read_optional_part(run.dynamics, "read_ensemble"))
        content.findings = _optional(content, "dynamics", run.dynamics,
                                     lambda: _read_optional_part(run.dynamics, "read_findings")) or []

    content.provenance = _read_provenance(content)
    content.stale = [
        stage for stage in run.stale_stages()
        if stage != "report" and stage not in content.problems
    ]
    for stage in content.stale:
        log.warning("%s is stale: its inputs changed after it was written; rerun `%s`", stage, content.command(stage))
    return content


def _read_lines(path: Path) -> list[Any]:
    """Read every line of landscape.h5; none from a file written before lines were part of the layout."""
    list_lines = getattr(landscape_artifact, "list_lines", None)
    if list_lines is None:
        return []
    return [landscape_artifact.read_line(path, name) for name in list_lines(path)]


def _read_optional_part(path: Path, reader: str) -> Any:
    """Call ``dynamics_artifact.<reader>(path)``; None when this version of the module has no such reader."""
    function = getattr(dynamics_artifact, reader, None)
    return function(path) if function is not None else None


def _optional(content: RunContent, stage: str, path: Path, read: Callable[[], T]) -> T | None:
    """Run `read` for an optional artifact; record why when the file is missing or unreadable."""
    if not path.is_file():
        content.problems.setdefault(stage, f"{path.name} not found")
        return None
    try:
        return read()
    except ArtifactError as exc:
        problem = with_run_path(str(exc), content.run.path)
        if stage not in content.problems:
            log.warning("leaving %s out of the report: %s", path.name, problem)
            content.problems[stage] = problem
        return None


def _read_provenance(content: RunContent) -> list[Provenance]:
    """Read the root attributes of every artifact that exists and opens."""
    entries = []
    for stage, module, attribute in ARTIFACTS:
        path = getattr(content.run, attribute)
        if not path.is_file() or stage in content.problems:
            continue
        try:
            with open_artifact(path, schema=module.SCHEMA, max_version=module.SCHEMA_VERSION, command=module.COMMAND) as f:
                attrs = {
                    "schema": attr_str(f, "schema"),
                    "schema_version": int(f.attrs.get("schema_version", -1)),
                    "doodl3_version": attr_str(f, "doodl3_version"),
                    "created": attr_str(f, "created"),
                    "content_id": attr_str(f, "content_id"),
                    "settings": attr_json(f, "settings", {}),
                    "upstream": attr_json(f, "upstream", {}),
                }
        except ArtifactError as exc:
            log.warning("provenance of %s not shown: %s", path.name, exc)
            content.problems.setdefault(stage, str(exc))
            continue
        entries.append(Provenance(path=path, stage=stage, attrs=attrs))
    return entries
