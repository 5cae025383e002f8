"""`doodl3 run` reruns exactly the stages whose inputs changed."""

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from doodl3_cli.cli import app
from doodl3_cli.demo import DemoOptions, prepare_demo_run
from doodl3_cli.pipeline import PipelineOptions, run_pipeline
from doodl3_cli.runfolder import RunFolder
from doodl3_cli.sample import SampleOptions

SMALL = DemoOptions(seeds=[0, 1], learning_rates=[0.3], steps=30, record_every=3, hidden=[8])
OPTIONS = PipelineOptions(sample=SampleOptions(resolution=9))


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> RunFolder:
    run = prepare_demo_run(tmp_path_factory.mktemp("stale") / "run", SMALL)
    assert run_pipeline(run, OPTIONS) == ["sample", "topology", "dynamics", "report"]
    return run


def _copy(run: RunFolder, tmp_path: Path) -> RunFolder:
    target = tmp_path / "copy"
    shutil.copytree(run.path, target)
    return RunFolder(target)


def test_pipeline_up_to_date_runs_nothing(analysed, tmp_path):
    run = _copy(analysed, tmp_path)

    assert run_pipeline(run, OPTIONS) == []


def test_pipeline_missing_topology_reruns_downstream(analysed, tmp_path):
    run = _copy(analysed, tmp_path)
    run.topology.unlink()

    assert run_pipeline(run, OPTIONS) == ["topology", "dynamics", "report"]


def test_pipeline_missing_report_only(analysed, tmp_path):
    run = _copy(analysed, tmp_path)
    run.report.unlink()

    assert run_pipeline(run, OPTIONS) == ["report"]


def test_pipeline_forced_stage_and_downstream(analysed, tmp_path):
    run = _copy(analysed, tmp_path)

    ran = run_pipeline(run, OPTIONS, force_stages=frozenset({"topology"}))

    assert ran == ["topology", "dynamics", "report"]


def test_run_option_forces_its_stage(analysed, tmp_path):
    run = _copy(analysed, tmp_path)

    result = CliRunner().invoke(app, ["run", str(run.path), "--min-persistence", "0.01"])

    assert result.exit_code == 0, result.output
    assert "topology: wrote" in result.output
    assert "sample: wrote" not in result.output
    assert "dynamics: wrote" in result.output
