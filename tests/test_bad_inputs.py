"""Every subcommand against bad inputs: exit code, one line naming the culprit, run folder unchanged.

One run folder is built per module from real training on the bundled digits: two
runs of five checkpoints and a 9x9 slice. Each case damages its own copy of it and
checks that the failing command left the copy as it was.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from doodl3_cli import zoo
from doodl3_cli.cli import app
from doodl3_cli.dynamics.stage import run_dynamics
from doodl3_cli.record import record_directory, record_subfolders
from doodl3_cli.report.page import write_report
from doodl3_cli.runfolder import RunFolder
from doodl3_cli.sample import SampleOptions, run_sample
from doodl3_cli.topology import run_topology

runner = CliRunner()

CONFIG = """\
[model]
factory = "doodl3_cli.zoo:mlp"
kwargs = { in_features = 64, hidden = [8], classes = 10 }

[data]
factory = "doodl3_cli.zoo:digits"

[loss]
factory = "torch.nn.functional:cross_entropy"
"""

ARTIFACTS = ("trajectory.h5", "landscape.h5", "topology.h5", "dynamics.h5", "report.html")


def _train(folder: Path, *, seed: int, hidden: list[int]) -> None:
    """Save the state_dict of a zoo MLP at steps 0, 3, ..., 12 of full-batch SGD on 128 digits."""
    inputs, targets = zoo.digits(split="train")
    inputs, targets = inputs[:128], targets[:128]
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    model = zoo.mlp(64, hidden, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(13):
        loss = F.cross_entropy(model(inputs), targets)
        if step % 3 == 0:
            torch.save(model.state_dict(), folder / f"step-{step}.pt")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@dataclass
class Inputs:
    """The module's shared files.

    `checkpoints` has subfolders s0 and s1 of the MLP that `CONFIG` builds (8 hidden
    units), `wide_checkpoints` the checkpoints of one with 16 hidden units. `run` contains doodl3.toml and every
    artifact of s0 and s1, `single_run` doodl3.toml and a trajectory.h5 of one
    checkpoint.
    """

    checkpoints: Path
    wide_checkpoints: Path
    run: Path
    single_run: Path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("bad_inputs")
    checkpoints = root / "checkpoints"
    for seed in (0, 1):
        _train(checkpoints / f"s{seed}", seed=seed, hidden=[8])
    _train(root / "wide", seed=0, hidden=[16])

    run = RunFolder(root / "run")
    run.path.mkdir()
    run.config_path.write_text(CONFIG, encoding="utf-8")
    record_subfolders(run.path, checkpoints)
    run_sample(run, SampleOptions(resolution=9))
    run_topology(run)
    run_dynamics(run, sharpness_checkpoints=0)
    write_report(run, plotly_js="beside")

    single = root / "single"
    (single / "one").mkdir(parents=True)
    shutil.copy(checkpoints / "s0" / "step-12.pt", single / "one" / "step-12.pt")
    (single / "doodl3.toml").write_text(CONFIG, encoding="utf-8")
    record_directory(single, single / "one")
    return Inputs(checkpoints, root / "wide", run.path, single)


def _digests(folder: Path) -> dict[str, str]:
    """Map each file under `folder` (relative path) to its sha256."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*")) if path.is_file()
    }


# --- ways to damage a copy of the run folder or its inputs ---------------------------


def _set_schema_version(name: str, version: int) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        with h5py.File(run / name, "r+") as f:
            f.attrs["schema_version"] = version

    return damage


def _truncate(name: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        path = run / name
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    return damage


def _config(text: str) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        (run / "doodl3.toml").write_text(text, encoding="utf-8")

    return damage


def _factory_file(body: str, factory: str) -> Callable[[Path], None]:
    """Write factories.py into the run folder and point [model] or [data] at one of its callables."""

    def damage(run: Path) -> None:
        (run / "factories.py").write_text(body, encoding="utf-8")
        section, _, callable_name = factory.partition(":")
        text = CONFIG.replace(
            'factory = "doodl3_cli.zoo:mlp"' if section == "model" else 'factory = "doodl3_cli.zoo:digits"',
            f'factory = "factories.py:{callable_name}"',
        )
        (run / "doodl3.toml").write_text(text, encoding="utf-8")

    return damage


def _all_nan_loss(run: Path) -> None:
    with h5py.File(run / "landscape.h5", "r+") as f:
        for name in ("loss", "loss_stderr", "accuracy"):
            f["slices/pca"][name][...] = np.nan


def _config_folder(run: Path) -> None:
    (run / "doodl3.toml").unlink()
    (run / "doodl3.toml").mkdir()


def _config_folder_without_trajectory(run: Path) -> None:
    _config_folder(run)
    (run / "trajectory.h5").unlink()


def _empty_run(run: Path) -> None:
    for path in run.iterdir():
        path.unlink()


def _bytes_attrs(run: Path) -> None:
    """Rewrite every str attribute of the HDF5 artifacts as fixed-length bytes, as MATLAB or h5py 2 write text."""

    def rewrite(obj: h5py.HLObject) -> None:
        for key, value in list(obj.attrs.items()):
            if isinstance(value, str):
                obj.attrs[key] = np.bytes_(value.encode("utf-8"))

    for name in ARTIFACTS[:4]:
        with h5py.File(run / name, "r+") as f:
            rewrite(f)
            f.visititems(lambda _, obj: rewrite(obj))


def _with_file(folder: Callable[[Inputs, Path], Path], name: str, content: Callable[[Path], bytes]) -> Callable[[Inputs, Path], Path]:
    """A checkpoint folder copied from `folder`, with `name` added (content computed from the copy)."""

    def make(inputs: Inputs, tmp: Path) -> Path:
        source = folder(inputs, tmp)
        copy = tmp / "source"
        shutil.copytree(source, copy)
        (copy / name).write_bytes(content(copy))
        return copy

    return make


def _seed0(inputs: Inputs, tmp: Path) -> Path:
    return inputs.checkpoints / "s0"


def _wide(inputs: Inputs, tmp: Path) -> Path:
    return inputs.wide_checkpoints


def _empty_folder(inputs: Inputs, tmp: Path) -> Path:
    folder = tmp / "empty"
    folder.mkdir()
    return folder


def _missing_folder(inputs: Inputs, tmp: Path) -> Path:
    return tmp / "missing"


def _a_file(inputs: Inputs, tmp: Path) -> Path:
    return inputs.checkpoints / "s0" / "step-0.pt"


@dataclass
class Case:
    """One bad input: how to damage a copy of the run, the command line, and the expected failure.

    `base` names the `Inputs` run folder that is copied. `args` may contain ``{run}``
    (the damaged copy) and ``{source}`` (the folder that `source` returns). `culprits`
    must all appear in the error line, after the same substitution. `usage` marks
    the usage errors that typer reports itself, in its own multi-line format. A case
    that exits 0 must name its culprits in a warning, and may change only the files
    of the run folder in `changes`.
    """

    id: str
    args: list[str]
    exit_code: int
    culprits: list[str]
    damage: Callable[[Path], None] | None = None
    source: Callable[[Inputs, Path], Path] | None = None
    usage: bool = False
    base: str = "run"
    changes: tuple[str, ...] = ()


STAGES = ["sample", "topology", "dynamics", "report", "run"]

CASES = [
    # A missing run folder, for every command that reads one.
    *[Case(f"{command}-missing-run", [command, "{run}/missing"], 1, ["{run}/missing: run folder not found"])
      for command in STAGES],
    # An empty run folder: each stage names the first input it lacks.
    Case("sample-empty-run", ["sample", "{run}"], 1, ["{run}/trajectory.h5: artifact not found"], _empty_run),
    Case("topology-empty-run", ["topology", "{run}"], 1, ["{run}/landscape.h5: artifact not found"], _empty_run),
    Case("dynamics-empty-run", ["dynamics", "{run}"], 1, ["{run}/landscape.h5: artifact not found"], _empty_run),
    Case("report-empty-run", ["report", "{run}"], 1, ["{run}/trajectory.h5: not found"], _empty_run),
    Case("run-empty-run", ["run", "{run}"], 1, ["{run}/trajectory.h5"], _empty_run),
    # record: missing, empty and wrong --from folders, and bad checkpoints among good ones.
    Case("record-missing-from", ["record", "{run}", "--from", "{source}"], 2, ["--from {source}: folder not found"],
         source=_missing_folder),
    Case("record-from-is-file", ["record", "{run}", "--from", "{source}"], 2, ["--from {source}: is a file"],
         source=_a_file),
    Case("record-empty-from", ["record", "{run}", "--from", "{source}"], 1, ["--from {source}: no checkpoint files"],
         source=_empty_folder),
    Case("record-not-a-checkpoint", ["record", "{run}", "--from", "{source}", "--trajectory", "extra"], 1,
         ["{source}/notes.pt"], source=_with_file(_seed0, "notes.pt", lambda copy: b"these are my notes\n")),
    Case("record-truncated-checkpoint", ["record", "{run}", "--from", "{source}", "--trajectory", "extra"], 1,
         ["{source}/step-15.pt"],
         source=_with_file(_seed0, "step-15.pt", lambda copy: (copy / "step-12.pt").read_bytes()[:1000])),
    Case("record-other-architecture", ["record", "{run}", "--from", "{source}", "--trajectory", "wide"], 1,
         ["{source}/step-0.pt: does not match the layout recorded in {run}/trajectory.h5"], source=_wide),
    # Artifacts from a newer doodl3.
    Case("sample-newer-trajectory", ["sample", "{run}", "--resolution", "5"], 1,
         ["{run}/trajectory.h5: schema version 99"], _set_schema_version("trajectory.h5", 99)),
    Case("record-newer-trajectory", ["record", "{run}", "--from", "{source}", "--trajectory", "again"], 1,
         ["{run}/trajectory.h5: schema version 99"], _set_schema_version("trajectory.h5", 99), source=_seed0),
    Case("topology-newer-landscape", ["topology", "{run}"], 1,
         ["{run}/landscape.h5: schema version 99"], _set_schema_version("landscape.h5", 99)),
    Case("dynamics-newer-landscape", ["dynamics", "{run}"], 1,
         ["{run}/landscape.h5: schema version 99"], _set_schema_version("landscape.h5", 99)),
    # The report leaves out a part that it cannot read, with a warning, and still writes the page.
    Case("report-newer-dynamics", ["report", "{run}", "--plotly-js", "beside"], 0,
         ["WARNING leaving dynamics.h5 out of the report: {run}/dynamics.h5: schema version 99"],
         _set_schema_version("dynamics.h5", 99), changes=("report.html",)),
    Case("run-newer-trajectory", ["run", "{run}"], 1,
         ["{run}/trajectory.h5: schema version 99"], _set_schema_version("trajectory.h5", 99)),
    # Artifacts truncated mid-file.
    Case("sample-truncated-trajectory", ["sample", "{run}", "--resolution", "5"], 1,
         ["{run}/trajectory.h5: cannot be opened as HDF5"], _truncate("trajectory.h5")),
    Case("record-truncated-trajectory", ["record", "{run}", "--from", "{source}", "--trajectory", "again"], 1,
         ["{run}/trajectory.h5"], _truncate("trajectory.h5"), source=_seed0),
    Case("topology-truncated-landscape", ["topology", "{run}"], 1,
         ["{run}/landscape.h5: cannot be opened as HDF5"], _truncate("landscape.h5")),
    Case("dynamics-truncated-landscape", ["dynamics", "{run}"], 1,
         ["{run}/landscape.h5: cannot be opened as HDF5"], _truncate("landscape.h5")),
    Case("report-truncated-dynamics", ["report", "{run}", "--plotly-js", "beside"], 0,
         ["WARNING leaving dynamics.h5 out of the report: {run}/dynamics.h5: cannot be opened as HDF5"],
         _truncate("dynamics.h5"), changes=("report.html",)),
    # doodl3.toml names a factory that does not import, raises, or returns the wrong thing.
    Case("sample-factory-not-importable", ["sample", "{run}", "--resolution", "5"], 1,
         ["[model].factory = 'doodl3_no_such_module:mlp' in {run}/doodl3.toml", "cannot be imported"],
         _config(CONFIG.replace("doodl3_cli.zoo:mlp", "doodl3_no_such_module:mlp"))),
    Case("record-factory-raises", ["record", "{run}", "--from", "{source}", "--trajectory", "again"], 1,
         ["[model].factory = 'factories.py:model' in {run}/doodl3.toml raised RuntimeError: no GPU left"],
         _factory_file("def model(**kwargs):\n    raise RuntimeError('no GPU left')\n", "model:model"), source=_seed0),
    Case("sample-factory-import-fails", ["sample", "{run}", "--resolution", "5"], 1,
         ["[data].factory = 'factories.py:data' in {run}/doodl3.toml", "importing {run}/factories.py failed",
          "ZeroDivisionError"],
         _factory_file("SCALE = 1 / 0\n\ndef data():\n    pass\n", "data:data")),
    Case("sample-data-factory-wrong-type", ["sample", "{run}", "--resolution", "5"], 1,
         ["[data] in {run}/doodl3.toml: returned int"], _factory_file("def data():\n    return 3\n", "data:data")),
    Case("sample-config-is-folder", ["sample", "{run}", "--resolution", "5"], 1,
         ["{run}/doodl3.toml: is a folder, not a file"], _config_folder),
    Case("sample-config-device-invalid", ["sample", "{run}", "--resolution", "5"], 1,
         ["{run}/doodl3.toml: [evaluation].device must be auto, cpu, cuda or cuda:N, got 'tpu'"],
         _config(CONFIG + '\n[evaluation]\ndevice = "tpu"\n')),
    Case("demo-config-is-folder", ["demo", "{run}", "--seeds", "1", "--steps", "4"], 1,
         ["{run}/doodl3.toml: is a folder, not a file"], _config_folder_without_trajectory),
    # Grid specs: zero or negative resolution, an empty range.
    Case("sample-zero-resolution", ["sample", "{run}", "--resolution", "0"], 2, ["--resolution"], usage=True),
    Case("sample-negative-resolution", ["sample", "{run}", "--resolution", "-4"], 2, ["--resolution"], usage=True),
    Case("run-zero-resolution", ["run", "{run}", "--resolution", "0"], 2, ["--resolution"], usage=True),
    Case("demo-zero-resolution", ["demo", "{run}/new", "--resolution", "0"], 2, ["--resolution"], usage=True),
    Case("sample-empty-extent", ["sample", "{run}", "--extent", "1,1,-1,1"], 2, ["--extent", "'1,1,-1,1'"], usage=True),
    Case("run-empty-extent", ["run", "{run}", "--extent", "-1,1,2,2"], 2, ["--extent", "'-1,1,2,2'"], usage=True),
    # Options that name something that does not exist.
    Case("sample-line-unknown-run", ["sample", "{run}", "--resolution", "5", "--line", "s0:nope"], 2,
         ["--line: trajectory 'nope' not found; recorded: s0, s1"]),
    Case("sample-center-unknown-run", ["sample", "{run}", "--resolution", "5", "--center", "nope"], 2,
         ["--center: trajectory 'nope' not found"]),
    Case("run-center-out-of-range", ["run", "{run}", "--center", "s1:7"], 2,
         ["--center 's1:7': index 7 out of range for 5 checkpoints"]),
    Case("sample-axes-unknown-parameter", ["sample", "{run}", "--directions", "axes", "--axes", "9.weight[0,0],0.bias[1]"], 2,
         ["--axes '9.weight[0,0]': parameter '9.weight' not found"]),
    Case("sample-device-invalid", ["sample", "{run}", "--device", "tpu"], 2, ["--device", "'tpu'"], usage=True),
    Case("dynamics-unknown-map", ["dynamics", "{run}", "--map", "flow"], 2, ["--map", "'flow'"], usage=True),
    # A slice whose every cell is non-finite.
    Case("topology-all-nan-slice", ["topology", "{run}"], 1,
         ["{run}/landscape.h5: slice 'pca': all 81 cells of the loss grid are NaN or infinite"], _all_nan_loss),
    Case("dynamics-all-nan-slice", ["dynamics", "{run}", "--sharpness-checkpoints", "0"], 1,
         ["{run}/landscape.h5: slice 'pca': no cell of the 9x9 loss grid has a finite gradient"], _all_nan_loss),
    # Too few checkpoints for PCA directions.
    Case("sample-too-few-checkpoints", ["sample", "{run}", "--resolution", "5"], 1,
         ["{run}/trajectory.h5: PCA directions need at least 3 recorded checkpoints, found 1 (one: 1)"],
         base="single_run"),
]


def _substitute(text: str, run: Path, source: Path | None) -> str:
    return text.replace("{run}", str(run)).replace("{source}", str(source))


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case, inputs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(getattr(inputs, case.base), run)
    if case.damage is not None:
        case.damage(run)
    source = case.source(inputs, tmp_path) if case.source is not None else None
    before = _digests(tmp_path)

    result = runner.invoke(app, [_substitute(arg, run, source) for arg in case.args])

    assert result.exit_code == case.exit_code, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    if case.exit_code == 0:
        message = result.stderr
    elif case.usage:
        message = " ".join(result.stderr.split())
        assert "Invalid value for" in message, result.stderr
    else:
        # Log lines of the work done before the failure come first; the error is one line, the last.
        assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.stderr
        message = lines[-1]
    for culprit in case.culprits:
        assert _substitute(culprit, run, source) in message
    after = _digests(tmp_path)
    for name in case.changes:
        before.pop(f"run/{name}"), after.pop(f"run/{name}")
    assert after == before


def test_bytes_attributes_read(inputs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(inputs.run, run)
    _bytes_attrs(run)
    (run / "report.html").unlink()
    inputs_before = {name: digest for name, digest in _digests(run).items() if name in ARTIFACTS[:4]}

    report = runner.invoke(app, ["report", str(run), "--plotly-js", "beside"])
    topology = runner.invoke(app, ["topology", str(run)])
    dynamics = runner.invoke(app, ["dynamics", str(run), "--sharpness-checkpoints", "0"])

    assert report.exit_code == 0, report.output
    assert topology.exit_code == 0, topology.output
    assert dynamics.exit_code == 0, dynamics.output
    assert (run / "report.html").is_file()
    after = _digests(run)
    assert after["trajectory.h5"] == inputs_before["trajectory.h5"]
    assert after["landscape.h5"] == inputs_before["landscape.h5"]


def test_numpy_data_factory_samples(inputs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(inputs.run, run)
    _factory_file(
        "from sklearn.datasets import load_digits\n\n"
        "def data():\n"
        "    digits = load_digits()\n"
        "    return digits.data[:64] / 16.0, digits.target[:64]\n",
        "data:data",
    )(run)

    result = runner.invoke(app, ["sample", str(run), "--resolution", "3"])

    assert result.exit_code == 0, result.output
    with h5py.File(run / "landscape.h5", "r") as f:
        assert np.isfinite(f["slices/pca/loss"][()]).all()


def _run_subprocess(args: list[str], log: Path) -> int:
    """Run doodl3 in a child process with stderr to `log` and colours forced on, as a misconfigured batch job might."""
    env = {**os.environ, "FORCE_COLOR": "1", "TERM": "xterm-256color", "COLUMNS": "60"}
    with log.open("wb") as stderr:
        return subprocess.run(
            [sys.executable, "-m", "doodl3_cli", *args], stdout=subprocess.DEVNULL, stderr=stderr, env=env, timeout=120
        ).returncode


def test_log_file_plain_on_error(tmp_path):
    log = tmp_path / "job.log"
    missing = tmp_path / "a run folder [v2]"

    code = _run_subprocess(["topology", str(missing)], log)

    text = log.read_bytes().decode("utf-8")
    assert code == 1
    assert "\x1b" not in text
    assert "\r" not in text
    assert text == (
        f"error: {missing}: run folder not found; create it with `doodl3 record '{missing}' --from DIR` "
        f"or `doodl3 demo '{missing}'`\n"
    )


def test_log_file_line_per_phase(inputs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(inputs.run, run)
    # Without doodl3.toml, dynamics skips the Hessian, which keeps this run to a few seconds.
    for name in ("topology.h5", "doodl3.toml"):
        (run / name).unlink()
    log = tmp_path / "job.log"

    code = _run_subprocess(["run", str(run)], log)

    text = log.read_bytes().decode("utf-8")
    assert code == 0, text
    assert "\x1b" not in text
    assert "\r" not in text
    for stage in ("topology", "dynamics", "report"):
        assert f"INFO running {stage}\n" in text
    assert "running sample" not in text


def test_debug_prints_plain_traceback(tmp_path):
    log = tmp_path / "job.log"
    missing = tmp_path / "missing"

    code = _run_subprocess(["--debug", "topology", str(missing)], log)

    text = log.read_bytes().decode("utf-8")
    assert code == 1
    assert text.startswith("Traceback (most recent call last):\n")
    assert f"doodl3_cli.errors.RunFolderError: {missing}: run folder not found" in text
    assert "locals" not in text
    assert "\x1b" not in text
    assert "error:" not in text
