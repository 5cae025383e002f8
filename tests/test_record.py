import re

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from doodl3_cli import zoo
from doodl3_cli.artifacts.trajectory import read_layouts, read_trajectory
from doodl3_cli.errors import CheckpointError
from doodl3_cli.record import IngestResult, Recorder, find_checkpoints, record_directory

STEPS = [0, 3, 6, 9, 12]

# The model that the doodl3.toml of the write_config fixture builds.
MLP_KWARGS = {"in_features": 64, "hidden": [8], "classes": 10}

BN_FACTORY = """\
from torch import nn


def build():
    return nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))
"""


class CreatesFile:
    """An object whose unpickling opens `path` for writing, creating the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _flat(state: dict[str, torch.Tensor], names: list[str]) -> np.ndarray:
    return np.concatenate([state[name].reshape(-1).numpy() for name in names]).astype(np.float32)


def _content_id(path) -> str:
    with h5py.File(path, "r") as f:
        return f.attrs["content_id"]


def _train_recording(tmp_path, train_sgd, model: nn.Module):
    """Train `model`, recording it live into tmp_path/live and saving step-N.pt into tmp_path/checkpoints."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    with Recorder(tmp_path / "live", model, trajectory="seed0", attrs={"seed": 0}) as recorder:

        def on_checkpoint(step, model, optimizer, loss):
            recorder.record(step, loss=loss)
            torch.save(model.state_dict(), folder / f"step-{step}.pt")

        train_sgd(model, steps=12, every=3, on_checkpoint=on_checkpoint)
    return tmp_path / "live" / "trajectory.h5", folder


def test_recorder_matches_ingest(tmp_path, train_sgd, write_config):
    torch.manual_seed(0)
    live_path, folder = _train_recording(tmp_path, train_sgd, zoo.mlp(**MLP_KWARGS))
    write_config(tmp_path / "ingest")

    result = record_directory(tmp_path / "ingest", folder, trajectory="seed0", attrs={"seed": 0})

    ingest_path = tmp_path / "ingest" / "trajectory.h5"
    assert result == IngestResult("seed0", added=5, skipped=0, total=5)
    assert read_layouts(live_path) == read_layouts(ingest_path)
    with h5py.File(live_path, "r") as live, h5py.File(ingest_path, "r") as ingest:
        assert set(live) == set(ingest) == {"layout", "buffer_layout", "trajectories"}
        for group in ("layout", "buffer_layout"):
            assert set(live[group]) == set(ingest[group])
            for name in live[group]:
                assert live[group][name][()].tolist() == ingest[group][name][()].tolist()
        assert set(live["trajectories/seed0"]) == set(ingest["trajectories/seed0"])

    live = read_trajectory(live_path, "seed0")
    ingest = read_trajectory(ingest_path, "seed0")
    assert live.params.shape == (5, 64 * 8 + 8 + 8 * 10 + 10)
    np.testing.assert_array_equal(live.params, ingest.params)
    assert live.buffers.shape == ingest.buffers.shape == (5, 0)
    assert live.step.tolist() == ingest.step.tolist() == STEPS
    assert live.attrs == ingest.attrs == {"seed": 0}
    assert live.source == ["live"] * 5
    assert ingest.source == [str(folder / f"step-{step}.pt") for step in STEPS]
    assert sorted(live.metrics) == ["loss"]
    assert ingest.metrics == {}


def test_ingest_natural_order(tmp_path, mlp_checkpoints):
    folder, states = mlp_checkpoints

    record_directory(tmp_path / "run", folder)

    assert [p.name for p in find_checkpoints(folder)] == [f"step-{step}.pt" for step in STEPS]
    trajectory = read_trajectory(tmp_path / "run" / "trajectory.h5", "checkpoints")
    assert trajectory.step.tolist() == STEPS
    assert trajectory.source == [str(folder / f"step-{step}.pt") for step in STEPS]
    names = list(states[0])
    for row, step in enumerate(STEPS):
        np.testing.assert_array_equal(trajectory.params[row], _flat(states[step], names))
    assert np.isnan(trajectory.epoch).all()


@pytest.mark.parametrize("step_key", ["step", "global_step"])
def test_ingest_orders_by_stored_step(tmp_path, train_sgd, step_key):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    states = {}

    def save(step, model, optimizer, loss):
        states[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        # The number in each name runs against the training order, so only the stored step can order them.
        checkpoint = {"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), step_key: step, "epoch": step / 4}
        torch.save(checkpoint, folder / f"ckpt-{12 - step}.pt")

    torch.manual_seed(0)
    train_sgd(zoo.mlp(**MLP_KWARGS), steps=12, every=3, on_checkpoint=save)

    record_directory(tmp_path / "run", folder, trajectory="nested")

    trajectory = read_trajectory(tmp_path / "run" / "trajectory.h5", "nested")
    assert trajectory.step.tolist() == STEPS
    assert trajectory.epoch.tolist() == [0.0, 0.75, 1.5, 2.25, 3.0]
    assert trajectory.source == [str(folder / f"ckpt-{12 - step}.pt") for step in STEPS]
    names = list(states[0])
    for row, step in enumerate(STEPS):
        np.testing.assert_array_equal(trajectory.params[row], _flat(states[step], names))


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_ingest_strips_wrapper_prefix(tmp_path, mlp_checkpoints, write_config, prefix):
    plain, states = mlp_checkpoints
    folder = tmp_path / "wrapped"
    folder.mkdir()
    for step, state in states.items():
        torch.save({prefix + name: tensor for name, tensor in state.items()}, folder / f"step-{step}.pt")
    write_config(tmp_path / "run")

    record_directory(tmp_path / "run", folder)

    trajectory = read_trajectory(tmp_path / "run" / "trajectory.h5", "wrapped")
    names = list(states[0])
    assert [e.name for e in read_layouts(tmp_path / "run" / "trajectory.h5")[0].entries] == names
    for row, step in enumerate(STEPS):
        np.testing.assert_array_equal(trajectory.params[row], _flat(states[step], names))


def test_ingest_dataparallel_training(tmp_path, train_sgd, write_config):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    states = {}

    def save(step, model, optimizer, loss):
        states[step] = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
        torch.save(model.state_dict(), folder / f"step-{step}.pt")

    torch.manual_seed(0)
    train_sgd(nn.DataParallel(zoo.mlp(**MLP_KWARGS)), steps=12, every=3, on_checkpoint=save)
    write_config(tmp_path / "run")

    record_directory(tmp_path / "run", folder)

    trajectory = read_trajectory(tmp_path / "run" / "trajectory.h5", "checkpoints")
    names = list(states[0])
    for row, step in enumerate(STEPS):
        np.testing.assert_array_equal(trajectory.params[row], _flat(states[step], names))


def test_rerun_adds_nothing(tmp_path, mlp_checkpoints):
    folder, _ = mlp_checkpoints
    path = tmp_path / "run" / "trajectory.h5"
    record_directory(tmp_path / "run", folder)
    first_id = _content_id(path)

    again = record_directory(tmp_path / "run", folder)

    assert again == IngestResult("checkpoints", added=0, skipped=5, total=5)
    assert _content_id(path) == first_id
    assert read_trajectory(path, "checkpoints").step.tolist() == STEPS

    torch.manual_seed(1)
    torch.save(zoo.mlp(**MLP_KWARGS).state_dict(), folder / "step-15.pt")
    extended = record_directory(tmp_path / "run", folder)

    assert extended == IngestResult("checkpoints", added=1, skipped=5, total=6)
    assert _content_id(path) != first_id
    assert read_trajectory(path, "checkpoints").step.tolist() == STEPS + [15]


def test_ingest_mismatch_names_file(tmp_path, mlp_checkpoints, write_config):
    folder, _ = mlp_checkpoints
    run = tmp_path / "run"
    write_config(run, model_kwargs={"in_features": 64, "hidden": [8, 8, 8, 8], "classes": 10})

    with pytest.raises(CheckpointError) as info:
        record_directory(run, folder)

    message = str(info.value)
    assert message.startswith(f"{folder / 'step-0.pt'}: does not match the model in doodl3.toml")
    assert "missing parameters ['4.weight', '4.bias', '6.weight', '6.bias', '8.weight'] and 1 more" in message
    assert "'2.weight (10, 8) (model (8, 8))', '2.bias (10,) (model (8,))'" in message
    assert not (run / "trajectory.h5").exists()

    # With [model] corrected, the same folder records.
    write_config(run)
    assert record_directory(run, folder).added == 5


def test_ingest_rejects_code_in_pickle(tmp_path, mlp_checkpoints):
    folder, states = mlp_checkpoints
    target = tmp_path / "created-by-unpickling"
    torch.save({**states[6], "payload": CreatesFile(target)}, folder / "step-6.pt")

    with pytest.raises(CheckpointError, match=re.escape(f"{folder / 'step-6.pt'}: cannot be loaded")):
        record_directory(tmp_path / "run", folder)

    assert not target.exists()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "names", [("ckpt-a.pt", "ckpt-b.pt"), ("step-3.pt", "step-3.pth")], ids=["stored", "file-name"]
)
def test_ingest_rejects_duplicate_steps(tmp_path, mlp_checkpoints, names):
    _, states = mlp_checkpoints
    folder = tmp_path / "duplicates"
    folder.mkdir()
    for name, step in zip(names, (3, 6)):
        torch.save({"state_dict": states[step], "step": 3}, folder / name)

    with pytest.raises(CheckpointError) as info:
        record_directory(tmp_path / "run", folder)

    message = str(info.value)
    assert message.startswith(f"--from {folder}: several checkpoints have the same step [3]")
    assert "--trajectory NAME" in message
    assert not (tmp_path / "run").exists()


def test_ingest_needs_a_step(tmp_path, mlp_checkpoints):
    _, states = mlp_checkpoints
    folder = tmp_path / "unnumbered"
    folder.mkdir()
    torch.save(states[0], folder / "final.pt")

    with pytest.raises(CheckpointError, match=re.escape(f"{folder / 'final.pt'}: no training step")):
        record_directory(tmp_path / "run", folder)


def test_ingest_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no checkpoints here\n")

    with pytest.raises(CheckpointError, match=re.escape(f"--from {tmp_path / 'empty'}: no checkpoint files")):
        record_directory(tmp_path / "run", tmp_path / "empty")

    assert not (tmp_path / "run").exists()


def test_batchnorm_buffers(tmp_path, train_sgd, write_config):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))
    live_path, folder = _train_recording(tmp_path, train_sgd, model)
    run = tmp_path / "ingest"
    write_config(run, model_factory="net.py:build", model_kwargs={})
    (run / "net.py").write_text(BN_FACTORY)

    record_directory(run, folder, trajectory="seed0")

    ingest_path = run / "trajectory.h5"
    layout, buffer_layout = read_layouts(ingest_path)
    assert (layout, buffer_layout) == read_layouts(live_path)
    assert [(e.name, e.role) for e in layout.entries if e.name.startswith("1.")] == [("1.weight", "norm"), ("1.bias", "norm")]
    assert [(e.name, e.shape, e.offset, e.role) for e in buffer_layout.entries] == [
        ("1.running_mean", (8,), 0, "buffer"),
        ("1.running_var", (8,), 8, "buffer"),
    ]
    assert not any("num_batches_tracked" in e.name for e in layout.entries + buffer_layout.entries)

    live = read_trajectory(live_path, "seed0")
    ingest = read_trajectory(ingest_path, "seed0")
    np.testing.assert_array_equal(live.params, ingest.params)
    np.testing.assert_array_equal(live.buffers, ingest.buffers)
    for row, step in enumerate(STEPS):
        state = torch.load(folder / f"step-{step}.pt", weights_only=True)
        np.testing.assert_array_equal(ingest.buffers[row], _flat(state, ["1.running_mean", "1.running_var"]))
        np.testing.assert_array_equal(ingest.params[row], _flat(state, layout.names))
    # The running statistics moved during training, so the rows differ.
    assert not np.array_equal(ingest.buffers[0], ingest.buffers[-1])


def test_batchnorm_buffers_without_config(tmp_path, train_sgd):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))
    live_path, folder = _train_recording(tmp_path, train_sgd, model)

    record_directory(tmp_path / "bare", folder, trajectory="seed0")

    _, buffer_layout = read_layouts(tmp_path / "bare" / "trajectory.h5")
    assert buffer_layout.names == ["1.running_mean", "1.running_var"]
    np.testing.assert_array_equal(
        read_trajectory(tmp_path / "bare" / "trajectory.h5", "seed0").buffers,
        read_trajectory(live_path, "seed0").buffers,
    )


def test_ingest_rejects_earlier_step(tmp_path, mlp_checkpoints):
    folder, states = mlp_checkpoints
    run = tmp_path / "run"
    early = folder / "step-3.pt"
    kept = tmp_path / "step-3.pt"
    early.rename(kept)
    record_directory(run, folder, trajectory="seed0")
    kept.rename(early)

    with pytest.raises(CheckpointError, match=r"step 3 is not after step 12"):
        record_directory(run, folder, trajectory="seed0")

    assert read_trajectory(run / "trajectory.h5", "seed0").step.tolist() == [0, 6, 9, 12]
