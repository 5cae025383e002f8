import re

import pytest
import typer
from typer.testing import CliRunner

from doodl3_cli.cli import _reported_errors, app
from doodl3_cli.errors import RunFolderError, UsageError, with_run_path
from doodl3_cli.record import record_directory

runner = CliRunner()


def _error_line(result) -> str:
    """Return the single line that a failed command printed on stderr, checking the failure shape."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def _usage_error(result) -> str:
    """Return stderr of a usage error with typer's box drawing and line wrapping removed."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return " ".join(re.sub("[\u2500-\u257f]", " ", result.stderr).split())


def test_sample_missing_run(tmp_path):
    run = tmp_path / "missing"

    result = runner.invoke(app, ["sample", str(run)])

    line = _error_line(result)
    assert line.startswith(f"error: {run}: run folder not found")
    assert f"doodl3 record {run} --from DIR" in line


def test_topology_before_sample(tmp_path):
    result = runner.invoke(app, ["topology", str(tmp_path)])

    line = _error_line(result)
    assert line.startswith(f"error: {tmp_path / 'landscape.h5'}: artifact not found")
    assert f"`doodl3 sample {tmp_path}`" in line


def test_sample_factory_not_importable(tmp_path, mlp_checkpoints, write_config):
    folder, _ = mlp_checkpoints
    run = tmp_path / "run"
    record_directory(run, folder)
    write_config(run, model_factory="doodl3_no_such_module:mlp")

    result = runner.invoke(app, ["sample", str(run), "--resolution", "3"])

    line = _error_line(result)
    assert f"[model].factory = 'doodl3_no_such_module:mlp' in {run / 'doodl3.toml'}" in line
    assert "module 'doodl3_no_such_module' cannot be imported" in line
    assert not (run / "landscape.h5").exists()


def test_record_mismatch(tmp_path, mlp_checkpoints, write_config):
    folder, _ = mlp_checkpoints
    run = tmp_path / "run"
    write_config(run, model_kwargs={"in_features": 64, "hidden": [16], "classes": 10})

    result = runner.invoke(app, ["record", str(run), "--from", str(folder)])

    line = _error_line(result)
    assert line.startswith(f"error: {folder / 'step-0.pt'}: does not match the model in {run / 'doodl3.toml'}")
    assert "'0.weight (8, 64) (model (16, 64))'" in line
    assert "check that [model] builds the architecture" in line


def test_record_valid_folder(tmp_path, mlp_checkpoints, write_config):
    folder, _ = mlp_checkpoints
    run = tmp_path / "run"
    write_config(run)

    result = runner.invoke(app, ["record", str(run), "--from", str(folder), "--attr", "seed=0"])

    assert result.exit_code == 0, result.output
    assert result.stdout == f"checkpoints: 5 checkpoints added, 0 already recorded, 5 in {run / 'trajectory.h5'}\n"


def test_record_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()

    result = runner.invoke(app, ["record", str(tmp_path / "run"), "--from", str(empty)])

    line = _error_line(result)
    assert line.startswith(f"error: --from {empty}: no checkpoint files (.pt, .pth, .bin, .ckpt, .safetensors) or checkpoint folders found")
    assert not (tmp_path / "run").exists()


def test_extent_min_above_max(tmp_path):
    result = runner.invoke(app, ["sample", str(tmp_path), "--extent", "1,0,0,1"])

    message = _usage_error(result)
    assert "Invalid value for --extent: expected four finite numbers ALPHA_MIN,ALPHA_MAX,BETA_MIN,BETA_MAX with min < max" in message
    assert "got '1,0,0,1'" in message


def test_attr_without_equals(tmp_path, mlp_checkpoints):
    folder, _ = mlp_checkpoints
    run = tmp_path / "run"

    result = runner.invoke(app, ["record", str(run), "--from", str(folder), "--attr", "seed"])

    message = _usage_error(result)
    assert "Invalid value for --attr: expected KEY=VALUE, got 'seed'" in message
    assert not run.exists()


def test_debug_reraises(tmp_path):
    run = tmp_path / "missing"

    result = runner.invoke(app, ["--debug", "sample", str(run)])

    assert result.exit_code == 1
    assert isinstance(result.exception, RunFolderError)
    assert str(result.exception).startswith(f"{run}: run folder not found")
    assert "error:" not in result.stderr


@pytest.mark.parametrize("command", ["sample", "topology", "dynamics", "run"])
def test_missing_run_every_command(tmp_path, command):
    run = tmp_path / "missing"

    result = runner.invoke(app, [command, str(run)])

    assert _error_line(result).startswith(f"error: {run}: run folder not found")


def test_extent_rejects_infinite(tmp_path):
    result = CliRunner().invoke(app, ["sample", str(tmp_path), "--extent", "-inf,inf,-5,5"])

    assert result.exit_code == 2
    assert "finite" in result.output + (result.stderr or "")


def test_demo_keeps_user_config(tmp_path):
    (tmp_path / "doodl3.toml").write_text("# mine\n")

    result = CliRunner().invoke(app, ["demo", str(tmp_path), "--seeds", "1", "--steps", "4"])

    assert result.exit_code == 1
    assert "not the demo's configuration" in result.stderr
    assert (tmp_path / "doodl3.toml").read_text() == "# mine\n"


def test_sample_model_differs_from_recording(tmp_path, mlp_checkpoints, write_config):
    folder, _ = mlp_checkpoints
    run = tmp_path / "run"
    write_config(run)
    record_directory(run, folder)
    write_config(run, model_kwargs={"in_features": 64, "hidden": [16], "classes": 10})

    result = runner.invoke(app, ["sample", str(run), "--resolution", "3"])

    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert "[model] builds parameters that differ from those recorded" in result.stderr
    assert "0.weight: (8, 64) vs (16, 64)" in result.stderr
    assert not (run / "landscape.h5").exists()


def test_reported_errors_keep_typer_exit():
    with pytest.raises(typer.Exit) as info:
        with _reported_errors():
            raise typer.Exit(code=3)

    assert info.value.exit_code == 3


def test_reported_errors_usage_exit_code(capsys):
    with pytest.raises(typer.Exit) as info:
        with _reported_errors():
            raise UsageError("--center 'nope': trajectory not found")

    assert info.value.exit_code == 2
    assert capsys.readouterr().err == "error: --center 'nope': trajectory not found\n"


def test_reported_errors_unexpected_one_line(capsys):
    with pytest.raises(typer.Exit) as info:
        with _reported_errors():
            {}["missing key"]

    assert info.value.exit_code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unexpected KeyError: 'missing key'; rerun with `doodl3 --debug ...`")
    assert err.count("\n") == 1


def test_reported_errors_multiline_message_joined(capsys):
    with pytest.raises(typer.Exit):
        with _reported_errors():
            raise RunFolderError("first line\n  second line")

    assert capsys.readouterr().err == "error: first line second line\n"


def test_run_placeholder_replaced_quoted(tmp_path):
    run = tmp_path / "my run"

    message = with_run_path("x.h5: artifact not found; run `doodl3 sample RUN` first, then `doodl3 record RUN --from DIR`", run)

    assert message == f"x.h5: artifact not found; run `doodl3 sample '{run}'` first, then `doodl3 record '{run}' --from DIR`"


def test_library_usage_error_exits_2(tmp_path):
    missing = tmp_path / "missing"

    result = runner.invoke(app, ["record", str(tmp_path / "run"), "--from", str(missing)])

    assert result.exit_code == 2
    assert result.stderr == f"error: --from {missing}: folder not found; pass the folder that contains the checkpoints\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("command", "option"), [("sample", "--margin"), ("topology", "--min-persistence")])
@pytest.mark.parametrize("value", ["nan", "inf", "-0.5"])
def test_non_negative_options_reject_nan_and_negative(tmp_path, command, option, value):
    result = runner.invoke(app, [command, str(tmp_path), option, value])

    assert result.exit_code == 2
    assert f"Invalid value for '{option}': must be a finite number, 0 or more" in result.output
