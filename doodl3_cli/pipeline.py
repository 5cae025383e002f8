"""Running stages in order: what `doodl3 run` and `doodl3 demo` call."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from doodl3_cli.errors import ArtifactError
from doodl3_cli.runfolder import RunFolder
from doodl3_cli.sample import SampleOptions, run_sample

log = logging.getLogger(__name__)

ANALYSIS_STAGES = ("sample", "topology", "dynamics", "report")

ProgressFactory = Callable[[str], Callable[[int, int], None]]


@dataclass
class PipelineOptions:
    """Options of every analysis stage, as `doodl3 run` passes them on."""

    sample: SampleOptions = field(default_factory=SampleOptions)
    min_persistence: float | None = None
    tau: float | None = None


def run_stage(run: RunFolder, stage: str, options: PipelineOptions, *, progress: ProgressFactory | None = None) -> Path:
    """Run one analysis stage and return the artifact it wrote.

    Raises
    ------
    ValueError
        When `stage` is not one of ``sample``, ``topology``, ``dynamics``, ``report``.
    """
    if stage == "sample":
        callback = progress("sampling the landscape") if progress else None
        return run_sample(run, options.sample, progress=callback)
    if stage == "topology":
        from doodl3_cli.topology import run_topology

        return run_topology(run, min_persistence=options.min_persistence)
    if stage == "dynamics":
        from doodl3_cli.dynamics.stage import run_dynamics

        return run_dynamics(run, tau=options.tau)
    if stage == "report":
        from doodl3_cli.report.page import write_report

        return write_report(run)
    raise ValueError(f"stage must be one of {', '.join(ANALYSIS_STAGES)}, got {stage!r}")


def run_pipeline(
    run: RunFolder,
    options: PipelineOptions,
    *,
    force: bool = False,
    force_stages: frozenset[str] = frozenset(),
    progress: ProgressFactory | None = None,
    on_stage: Callable[[str, Path], None] | None = None,
) -> list[str]:
    """Run every analysis stage whose artifact is missing or stale.

    Staleness is checked again before each stage, so a stage that reruns makes
    every stage that reads its artifact rerun too.

    Parameters
    ----------
    force : bool
        Rerun every stage, even those that are up to date.
    force_stages : frozenset of str
        Stages to rerun even when up to date, e.g. because their options changed.
    on_stage : callable, optional
        Called as ``on_stage(stage, artifact_path)`` after each stage.

    Returns
    -------
    list of str
        The stages that ran, in order.

    Raises
    ------
    ArtifactError
        When trajectory.h5 is missing: nothing can be analysed before `record`.
    ValueError
        When `force_stages` names an unknown stage.
    """
    unknown = set(force_stages) - set(ANALYSIS_STAGES)
    if unknown:
        raise ValueError(f"force_stages must be among {', '.join(ANALYSIS_STAGES)}, got {sorted(unknown)}")
    run.require_exists()
    if not run.trajectory.is_file():
        raise ArtifactError(
            f"{run.trajectory}: not found; record checkpoints first with `doodl3 record {run.path} --from DIR`"
        )

    ran: list[str] = []
    for stage in ANALYSIS_STAGES:
        report_outdated = stage == "report" and bool(ran)
        if not (force or report_outdated or stage in force_stages or stage in run.stale_stages()):
            log.info("%s is up to date", stage)
            continue
        log.info("running %s", stage)
        path = run_stage(run, stage, options, progress=progress)
        ran.append(stage)
        if on_stage is not None:
            on_stage(stage, path)
    return ran
