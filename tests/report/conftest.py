"""A small real run with every artifact, built once for the report tests."""

import shutil
from pathlib import Path

import pytest

from doodl3_cli.demo import DemoOptions, prepare_demo_run
from doodl3_cli.dynamics.stage import run_dynamics
from doodl3_cli.report.page import write_report
from doodl3_cli.runfolder import RunFolder
from doodl3_cli.sample import SampleOptions, run_sample
from doodl3_cli.topology import run_topology

SMALL = DemoOptions(seeds=[0, 1], learning_rates=[0.3, 1.2], steps=40, record_every=4, hidden=[16])
RESOLUTION = 9
# The line between the final states of a smooth run and an oscillating one, for the loss barrier.
LINE = "lr0.3-seed0:lr1.2-seed0"


@pytest.fixture(scope="session")
def analysed_run(tmp_path_factory) -> RunFolder:
    """Every stage up to dynamics on a two-seed, two-learning-rate digits ensemble (read-only)."""
    run = prepare_demo_run(tmp_path_factory.mktemp("report") / "demo", SMALL)
    run_sample(run, SampleOptions(resolution=RESOLUTION, line=LINE))
    run_topology(run)
    # The top Hessian eigenvalue takes minutes on 2 cores; the sharpness panel is tested on hand-built diagnostics.
    run_dynamics(run, sharpness_checkpoints=0)
    return run


@pytest.fixture()
def run_copy(analysed_run, tmp_path) -> RunFolder:
    """A private copy of `analysed_run` that a test may change."""
    target = tmp_path / "run"
    shutil.copytree(analysed_run.path, target)
    return RunFolder(target)


@pytest.fixture(scope="session")
def analysed_report(analysed_run) -> Path:
    """report.html of `analysed_run`, written once."""
    return write_report(analysed_run)
