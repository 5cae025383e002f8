import h5py
import pytest

from doodl3_cli.artifacts._common import write_root_attrs
from doodl3_cli.errors import ArtifactError, ConfigError, RunFolderError
from doodl3_cli.runfolder import FactorySpec, RunFolder, call_factory, resolve_factory

CONFIG = """
[model]
factory = "doodl3_cli.zoo:mlp"
kwargs = { in_features = 4, hidden = [3], classes = 2 }
[data]
factory = "doodl3_cli.zoo:iris"
[loss]
factory = "torch.nn.functional:cross_entropy"
"""


def _artifact(path, schema, upstream, content_id):
    with h5py.File(path, "w") as f:
        write_root_attrs(f, schema=schema, schema_version=1, settings={}, upstream=upstream, content_id=content_id)


def _full_run(tmp_path) -> RunFolder:
    run = RunFolder(tmp_path)
    _artifact(run.trajectory, "doodl3/trajectory", {}, "t1")
    _artifact(run.landscape, "doodl3/landscape", {"trajectory.h5": "t1"}, "l1")
    _artifact(run.topology, "doodl3/topology", {"landscape.h5": "l1"}, "p1")
    _artifact(run.dynamics, "doodl3/dynamics", {"trajectory.h5": "t1", "landscape.h5": "l1", "topology.h5": "p1"}, "d1")
    run.report.write_text("<html></html>")
    return run


def test_stale_nothing_when_ids_match(tmp_path):
    assert _full_run(tmp_path).stale_stages() == []


def test_stale_new_checkpoints_rerun_everything(tmp_path):
    run = _full_run(tmp_path)
    _artifact(run.trajectory, "doodl3/trajectory", {}, "t2")

    assert run.stale_stages() == ["sample", "topology", "dynamics", "report"]


def test_stale_topology_change_reruns_dynamics(tmp_path):
    run = _full_run(tmp_path)
    _artifact(run.topology, "doodl3/topology", {"landscape.h5": "l1"}, "p2")

    assert run.stale_stages() == ["dynamics", "report"]


def test_stale_missing_report_only(tmp_path):
    run = _full_run(tmp_path)
    run.report.unlink()

    assert run.stale_stages() == ["report"]


def test_stale_ignores_file_times(tmp_path):
    run = _full_run(tmp_path)
    run.trajectory.touch()

    assert run.stale_stages() == []


def test_load_config_parses_sections(tmp_path):
    (tmp_path / "doodl3.toml").write_text(CONFIG)

    config = RunFolder(tmp_path).load_config()

    assert config.model.factory == "doodl3_cli.zoo:mlp"
    assert config.model.kwargs["hidden"] == [3]
    assert config.batch_size == 2048


def test_load_config_missing_section(tmp_path):
    (tmp_path / "doodl3.toml").write_text(CONFIG.replace("[loss]", "[other]"))

    with pytest.raises(ConfigError, match=r"\[loss\]"):
        RunFolder(tmp_path).load_config()


def test_load_config_invalid_toml(tmp_path):
    (tmp_path / "doodl3.toml").write_text("[model\n")

    with pytest.raises(ConfigError, match="invalid TOML"):
        RunFolder(tmp_path).load_config()


@pytest.mark.parametrize(
    ("evaluation", "message"),
    [('device = "tpu"', "[evaluation].device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
     ("device = 0", "[evaluation].device must be auto, cpu, cuda or cuda:N, got 0"),
     ("batch_size = true", "[evaluation].batch_size must be a positive integer, got True")],
)
def test_load_config_invalid_evaluation(tmp_path, evaluation, message):
    (tmp_path / "doodl3.toml").write_text(CONFIG + f"[evaluation]\n{evaluation}\n")

    with pytest.raises(ConfigError) as info:
        RunFolder(tmp_path).load_config()

    assert str(info.value).startswith(f"{tmp_path / 'doodl3.toml'}: {message}")


def test_load_config_accepts_cuda_index(tmp_path):
    (tmp_path / "doodl3.toml").write_text(CONFIG + '[evaluation]\ndevice = "cuda:1"\n')

    assert RunFolder(tmp_path).load_config().device == "cuda:1"


def test_load_config_folder_named_config(tmp_path):
    (tmp_path / "doodl3.toml").mkdir()

    with pytest.raises(ConfigError, match="doodl3.toml: is a folder, not a file"):
        RunFolder(tmp_path).load_config()


def test_require_exists_names_folder(tmp_path):
    with pytest.raises(RunFolderError, match="run folder not found"):
        RunFolder(tmp_path / "missing").require_exists()


def test_factory_from_file(tmp_path):
    (tmp_path / "mine.py").write_text("def build(width):\n    return ['layer'] * width\n")

    result = call_factory(FactorySpec("model", "mine.py:build", {"width": 2}), base=tmp_path)

    assert result == ["layer", "layer"]


def test_factory_import_error_names_module(tmp_path):
    with pytest.raises(ConfigError, match="module 'no_such_module' cannot be imported"):
        resolve_factory(FactorySpec("model", "no_such_module:build"), base=tmp_path)


def test_factory_that_raises(tmp_path):
    (tmp_path / "broken.py").write_text("def build():\n    raise RuntimeError('boom')\n")

    with pytest.raises(ConfigError, match="raised RuntimeError: boom"):
        call_factory(FactorySpec("data", "broken.py:build"), base=tmp_path)


def test_stale_incomplete_landscape(tmp_path):
    run = _full_run(tmp_path)
    with h5py.File(run.landscape, "a") as f:
        f.create_dataset("slices/pca/evaluated", data=[[True, False]])

    assert run.stale_stages() == ["sample", "topology", "dynamics", "report"]


def test_stale_newer_schema_version(tmp_path):
    run = _full_run(tmp_path)
    with h5py.File(run.topology, "a") as f:
        f.attrs["schema_version"] = 99

    assert run.stale_stages() == ["topology", "dynamics", "report"]


def test_stale_rejects_newer_trajectory(tmp_path):
    run = _full_run(tmp_path)
    with h5py.File(run.trajectory, "a") as f:
        f.attrs["schema_version"] = 99

    with pytest.raises(ArtifactError, match="schema version 99"):
        run.stale_stages()


def test_stale_unreadable_artifact(tmp_path):
    run = _full_run(tmp_path)
    run.dynamics.write_bytes(b"not hdf5")

    assert run.stale_stages() == ["dynamics", "report"]
