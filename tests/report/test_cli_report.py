"""`doodl3 report` through the typer app: the --plotly-js option."""

import h5py
from typer.testing import CliRunner

from doodl3_cli.cli import app
from doodl3_cli.report.html import PLOTLY_FILE

runner = CliRunner()


def test_report_plotly_js_beside(run_copy):
    result = runner.invoke(app, ["report", str(run_copy.path), "--plotly-js", "beside"])

    assert result.exit_code == 0, result.output
    assert f"wrote {run_copy.report}" in result.output
    assert (run_copy.path / PLOTLY_FILE).is_file()
    assert f'src="{PLOTLY_FILE}"' in run_copy.report.read_text(encoding="utf-8")


def test_report_rejects_unknown_plotly_js(run_copy):
    result = runner.invoke(app, ["report", str(run_copy.path), "--plotly-js", "cdn"])

    assert result.exit_code == 2
    assert "'cdn' is not one of 'inline', 'beside'" in result.output
    assert not (run_copy.path / PLOTLY_FILE).exists()


def test_report_unreadable_landscape_warns_once(run_copy):
    with h5py.File(run_copy.landscape, "a") as f:
        f.attrs["schema_version"] = 99

    result = runner.invoke(app, ["report", str(run_copy.path)])

    warnings = [line for line in result.output.splitlines() if "leaving landscape.h5 out of the report" in line]
    assert result.exit_code == 0, result.output
    assert len(warnings) == 1, result.output
    assert f"`doodl3 sample {run_copy.path}`" in warnings[0]
    assert "RUN" not in warnings[0]
