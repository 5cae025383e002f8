import importlib.util
import json
import logging
import os
import re

import h5py
import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn
from typer.testing import CliRunner

from doodl3_cli import zoo
from doodl3_cli.artifacts.trajectory import read_layouts, read_trajectory
from doodl3_cli.cli import app
from doodl3_cli.errors import CheckpointError
from doodl3_cli.record import IngestResult, Recorder, find_checkpoints, record_directory, record_subfolders

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
    assert trajectory.attrs == {"stripped_prefix": prefix}
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
    assert message.startswith(f"{folder / 'step-0.pt'}: does not match the model in {run / 'doodl3.toml'}")
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

    with pytest.raises(CheckpointError) as info:
        record_directory(tmp_path / "run", folder)

    assert str(info.value) == (
        f"{folder / 'step-6.pt'}: loading needs arbitrary unpickling of the global 'io.open', which "
        "weights_only=True rejects; if you trust where this file came from, rerun with --trust-checkpoints"
    )
    assert not target.exists()
    assert not (tmp_path / "run").exists()


def test_ingest_trusted_pickle(tmp_path, mlp_checkpoints):
    folder, states = mlp_checkpoints
    target = tmp_path / "created-by-unpickling"
    torch.save({**states[6], "payload": CreatesFile(target)}, folder / "step-6.pt")

    result = record_directory(tmp_path / "run", folder, trust=True)

    assert result.added == 5
    assert target.exists()


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
    assert message.startswith(f"{folder}: {names[0]} and {names[1]} both have step 3 by ")
    assert "pass --order name or --order mtime" in message
    assert "--trajectory NAME" in message
    assert not (tmp_path / "run").exists()


def test_ingest_needs_a_step(tmp_path, mlp_checkpoints):
    _, states = mlp_checkpoints
    folder = tmp_path / "unnumbered"
    folder.mkdir()
    torch.save(states[0], folder / "final.pt")

    with pytest.raises(CheckpointError) as info:
        record_directory(tmp_path / "run", folder)

    assert str(info.value).startswith(f"{folder}: no training step found by stored step or file name for ['final.pt']")
    assert "--order name" in str(info.value)

    record_directory(tmp_path / "run", folder, order="name")

    assert read_trajectory(tmp_path / "run" / "trajectory.h5", "unnumbered").step.tolist() == [0]


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


TIED_FACTORY = """\
from torch import nn


class TiedClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(10, 6, bias=False)
        self.decoder = nn.Linear(6, 10)
        self.head = nn.Linear(6, 6, bias=False)
        self.tail = nn.Linear(6, 6, bias=False)
        self.tail.weight = self.head.weight

    def forward(self, x):
        return self.decoder(self.tail(self.head(self.encoder(x))))


def build():
    return TiedClassifier()
"""


def _mlp_states(count: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Return `count` state_dicts of the MLP_KWARGS zoo MLP with different random weights."""
    states = []
    for k in range(count):
        torch.manual_seed(seed * 100 + k)
        states.append({name: t.detach().clone() for name, t in zoo.mlp(**MLP_KWARGS).state_dict().items()})
    return states


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ingest_half_precision(tmp_path, write_config, dtype):
    folder = tmp_path / "half"
    folder.mkdir()
    states = [{k: v.to(dtype) for k, v in state.items()} for state in _mlp_states()]
    for step, state in zip((10, 20, 30), states):
        torch.save(state, folder / f"step-{step}.pt")
    write_config(tmp_path / "run")

    record_directory(tmp_path / "run", folder)
    record_directory(tmp_path / "bare", folder)

    name = str(dtype).replace("torch.", "")
    for run, layout_dtype in (("run", "float32"), ("bare", name)):
        path = tmp_path / run / "trajectory.h5"
        trajectory = read_trajectory(path, "half")
        assert trajectory.params.dtype == np.float32
        assert trajectory.attrs["checkpoint_dtypes"] == f'["{name}"]'
        assert {e.dtype for e in read_layouts(path)[0].entries} == {layout_dtype}
        names = list(states[0])
        for row, state in enumerate(states):
            expected = np.concatenate([state[n].to(torch.float32).reshape(-1).numpy() for n in names])
            np.testing.assert_array_equal(trajectory.params[row], expected)


def test_ingest_lightning_checkpoints(tmp_path, write_config, caplog):
    folder = tmp_path / "lightning"
    folder.mkdir()
    states = _mlp_states()
    for k, state in enumerate(states):
        model_keys = {f"model.{name}": tensor for name, tensor in state.items()}
        metric_keys = {"train_acc.correct": torch.tensor(5.0), "train_acc.total": torch.tensor(9.0)}
        checkpoint = {
            "epoch": k, "global_step": 50 * k, "pytorch-lightning_version": "2.4.0",
            "state_dict": {**model_keys, **metric_keys},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1, 2, 3]}]}],
            "lr_schedulers": [{"last_epoch": k}],
            "hyper_parameters": {"lr": 0.1, "seed": 7, "hidden": [8]},
        }
        torch.save(checkpoint, folder / f"epoch={k}-step={50 * k}.ckpt")
    write_config(tmp_path / "run")

    with caplog.at_level(logging.INFO, logger="doodl3_cli.checkpoints"):
        record_directory(tmp_path / "run", folder, attrs={"seed": 3})

    trajectory = read_trajectory(tmp_path / "run" / "trajectory.h5", "lightning")
    assert trajectory.step.tolist() == [0, 50, 100]
    assert trajectory.epoch.tolist() == [0.0, 1.0, 2.0]
    assert trajectory.attrs == {"lr": 0.1, "seed": 3, "stripped_prefix": "model."}
    names = list(states[0])
    for row, state in enumerate(states):
        np.testing.assert_array_equal(trajectory.params[row], _flat(state, names))
    assert "kept 4 tensors under prefix 'model.', dropped 2 other tensors" in caplog.text
    assert "['train_acc.correct', 'train_acc.total']" in caplog.text
    assert "['hyper_parameters', 'lr_schedulers', 'optimizer_states']" in caplog.text


def test_ingest_safetensors_files(tmp_path):
    folder = tmp_path / "st"
    folder.mkdir()
    states = _mlp_states()
    for k, state in enumerate(states):
        # The stored step runs against the file names, so only the header metadata orders them.
        safetensors.torch.save_file(state, folder / f"weights-{9 - k}.safetensors", metadata={"step": str(7 * k)})

    record_directory(tmp_path / "run", folder)

    trajectory = read_trajectory(tmp_path / "run" / "trajectory.h5", "st")
    assert trajectory.step.tolist() == [0, 7, 14]
    # safetensors stores tensors sorted by name, so a layout taken from the file follows that order.
    names = read_layouts(tmp_path / "run" / "trajectory.h5")[0].names
    assert names == ["0.bias", "0.weight", "2.bias", "2.weight"]
    for row, state in enumerate(states):
        np.testing.assert_array_equal(trajectory.params[row], _flat(state, names))


def _write_sharded(folder, state, shards: int = 2) -> None:
    """Write `state` as a sharded safetensors checkpoint with its index JSON, as Hugging Face does."""
    folder.mkdir(parents=True)
    names = list(state)
    weight_map = {}
    for index in range(shards):
        shard = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n].contiguous() for n in names[index::shards]}
        safetensors.torch.save_file(part, folder / shard)
        weight_map.update({n: shard for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_ingest_hf_trainer_folders(tmp_path, write_config):
    output = tmp_path / "output"
    states = _mlp_states(4)
    for k, state in enumerate(states[:2]):
        _write_sharded(output / f"checkpoint-{500 * (k + 1)}", state)
    safetensors.torch.save_file(states[2], _mkdir(output / "checkpoint-1500") / "model.safetensors")
    torch.save(states[3], _mkdir(output / "checkpoint-2000") / "pytorch_model.bin")
    for k, step in enumerate((500, 1000, 1500, 2000)):
        folder = output / f"checkpoint-{step}"
        torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
        if step != 2000:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": 0.25 * (k + 1)}))
    (output / "runs").mkdir()
    write_config(tmp_path / "run")

    result = record_directory(tmp_path / "run", output, trajectory="hf")

    assert result == IngestResult("hf", added=4, skipped=0, total=4)
    trajectory = read_trajectory(tmp_path / "run" / "trajectory.h5", "hf")
    assert trajectory.step.tolist() == [500, 1000, 1500, 2000]
    assert trajectory.epoch[:3].tolist() == [0.25, 0.5, 0.75]
    assert np.isnan(trajectory.epoch[3])
    names = list(states[0])
    for row, state in enumerate(states):
        np.testing.assert_array_equal(trajectory.params[row], _flat(state, names))
    assert record_directory(tmp_path / "run", output, trajectory="hf").skipped == 4
    with pytest.raises(CheckpointError, match=re.escape(f"--from {output / 'checkpoint-500'}: is one checkpoint folder")):
        record_directory(tmp_path / "run", output / "checkpoint-500")


def _mkdir(path):
    path.mkdir(parents=True)
    return path


def test_ingest_tied_weights(tmp_path, write_config):
    run = tmp_path / "run"
    write_config(run, model_factory="tied.py:build", model_kwargs={})
    (run / "tied.py").write_text(TIED_FACTORY)
    spec = importlib.util.spec_from_file_location("tied_factory", run / "tied.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = tmp_path / "tied"
    folder.mkdir()
    models = []
    for step in (1, 2):
        torch.manual_seed(step)
        model = module.build()
        models.append(model)
        # safetensors cannot store shared tensors, so keep the tied weight under its second name only.
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "head.weight"}
        safetensors.torch.save_file(state, folder / f"step-{step}.safetensors")
        torch.save(model.state_dict(), folder / f"step-{step + 10}.pt")

    record_directory(run, folder)
    record_directory(tmp_path / "bare", folder, order="name")

    layout, _ = read_layouts(run / "trajectory.h5")
    assert layout.names == ["encoder.weight", "decoder.weight", "decoder.bias", "head.weight"]
    assert layout.size == 60 + 60 + 10 + 36
    bare_layout, _ = read_layouts(tmp_path / "bare" / "trajectory.h5")
    assert sorted(bare_layout.names) == ["decoder.bias", "decoder.weight", "encoder.weight", "tail.weight"]
    assert bare_layout.size == layout.size
    trajectory = read_trajectory(run / "trajectory.h5", "tied")
    assert trajectory.step.tolist() == [1, 2, 11, 12]
    for row, model in enumerate(models + models):
        expected = np.concatenate([p.detach().reshape(-1).numpy() for p in model.parameters()])
        np.testing.assert_array_equal(trajectory.params[row], expected)


def test_ingest_epoch_only_and_mtime(tmp_path):
    folder = tmp_path / "epochs"
    folder.mkdir()
    states = _mlp_states()
    for k, (name, state) in enumerate(zip(("last.pt", "best.pt", "first.pt"), states)):
        torch.save({"model_state_dict": state, "epoch": 2 * k}, folder / name)
        os.utime(folder / name, ns=(10**18 + k * 10**9, 10**18 + (2 - k) * 10**9))

    record_directory(tmp_path / "run", folder, trajectory="by-epoch")
    record_directory(tmp_path / "run", folder, trajectory="by-mtime", order="mtime")

    by_epoch = read_trajectory(tmp_path / "run" / "trajectory.h5", "by-epoch")
    assert by_epoch.step.tolist() == [0, 2, 4]
    assert by_epoch.source == [str(folder / n) for n in ("last.pt", "best.pt", "first.pt")]
    by_mtime = read_trajectory(tmp_path / "run" / "trajectory.h5", "by-mtime")
    assert by_mtime.step.tolist() == [0, 1, 2]
    assert by_mtime.source == [str(folder / n) for n in ("first.pt", "best.pt", "last.pt")]


def test_ingest_per_subfolder(tmp_path):
    source = tmp_path / "sweep"
    for seed in (0, 1):
        folder = _mkdir(source / f"seed{seed}")
        for k, state in enumerate(_mlp_states(2, seed=seed)):
            torch.save({"state_dict": state, "step": 10 * k, "hparams": {"seed": seed, "learning_rate": 0.1}}, folder / f"s{k}.pt")
    (source / "logs").mkdir()
    (source / "logs" / "events.txt").write_text("not a checkpoint\n")

    results = record_subfolders(tmp_path / "run", source)

    assert results == [IngestResult("seed0", 2, 0, 2), IngestResult("seed1", 2, 0, 2)]
    path = tmp_path / "run" / "trajectory.h5"
    assert [read_trajectory(path, n).attrs for n in ("seed0", "seed1")] == [
        {"seed": 0, "learning_rate": 0.1}, {"seed": 1, "learning_rate": 0.1},
    ]


@pytest.mark.parametrize(
    "options, message",
    [
        (["--per-subfolder", "--trajectory", "a"], "--per-subfolder names each trajectory after its subfolder"),
        (["--until-idle", "5m"], "only applies with --follow"),
        (["--follow", "--until-idle", "soon"], "expected a positive duration such as 90, 30s, 5m or 1h, got 'soon'"),
        (["--order", "size"], "expected one of auto, step, name, mtime, got 'size'"),
        (["--follow", "--order", "name"], "--follow records one folder in the order checkpoints arrive"),
    ],
    ids=["subfolder-and-name", "idle-without-follow", "bad-duration", "unknown-order", "follow-with-order"],
)
def test_cli_record_rejects_options(tmp_path, options, message):
    source = _mkdir(tmp_path / "checkpoints")

    result = CliRunner().invoke(app, ["record", str(tmp_path / "run"), "--from", str(source), *options])

    assert result.exit_code == 2
    assert message in " ".join(result.output.replace("│", " ").split())
    assert not (tmp_path / "run").exists()


def test_cli_record_per_subfolder(tmp_path):
    source = tmp_path / "sweep"
    for seed in (0, 1):
        folder = _mkdir(source / f"seed{seed}")
        for k, state in enumerate(_mlp_states(2, seed=seed)):
            torch.save(state, folder / f"step-{5 * k}.pt")

    result = CliRunner().invoke(app, ["record", str(tmp_path / "run"), "--from", str(source), "--per-subfolder", "--attr", "lr=0.1"])

    assert result.exit_code == 0, result.output
    path = tmp_path / "run" / "trajectory.h5"
    assert result.stdout.splitlines() == [
        f"seed0: 2 checkpoints added, 0 already recorded, 2 in {path}",
        f"seed1: 2 checkpoints added, 0 already recorded, 2 in {path}",
    ]
    assert read_trajectory(path, "seed1").attrs == {"lr": 0.1}
