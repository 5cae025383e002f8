import hashlib
import json
import re

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from doodl3_cli import zoo
from doodl3_cli.checkpoints import (
    checkpoint_digest,
    file_digest,
    flatten_model,
    load_checkpoint,
    match_layout,
    model_layouts,
    natural_key,
    read_checkpoint,
    read_training_fields,
    select_submodule,
    split_wrapper_prefixes,
    step_from_name,
    strip_wrapper_prefixes,
    tied_aliases,
)
from doodl3_cli.errors import CheckpointError


class CreatesFile:
    """An object whose unpickling opens `path` for writing, creating the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _bn_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))


def test_natural_key_orders_numbers():
    names = ["step-10.pt", "step-9.pt", "step-100.pt", "step-0.pt", "step-11.pt"]

    assert sorted(names, key=natural_key) == ["step-0.pt", "step-9.pt", "step-10.pt", "step-11.pt", "step-100.pt"]


@pytest.mark.parametrize(
    ("name", "step"),
    [("step-120.pt", 120), ("run3-step-0045.pth", 45), ("epoch=2-step=7.pt", 7), ("final.pt", None)],
)
def test_step_from_name(name, step):
    assert step_from_name(name) == step


def test_strip_prefixes_stacked():
    tensor = torch.zeros(1)
    state = {"module._orig_mod.0.weight": tensor, "module._orig_mod.0.bias": tensor}

    assert list(strip_wrapper_prefixes(state)) == ["0.weight", "0.bias"]


def test_strip_prefixes_needs_every_key():
    tensor = torch.zeros(1)
    state = {"module.0.weight": tensor, "head.weight": tensor}

    assert list(strip_wrapper_prefixes(state)) == ["module.0.weight", "head.weight"]


def test_load_plain_state_dict(tmp_path):
    torch.manual_seed(0)
    model = zoo.mlp(8, [4], 3)
    path = tmp_path / "step-1.pt"
    torch.save(model.state_dict(), path)

    state, meta = load_checkpoint(path)

    assert list(state) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor)
    assert meta == {}


def test_load_nested_with_optimizer(tmp_path):
    torch.manual_seed(0)
    model = zoo.mlp(8, [4], 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(2, 8)).sum().backward()
    optimizer.step()
    path = tmp_path / "last.pt"
    torch.save({"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 17, "epoch": 2.5}, path)

    state, meta = load_checkpoint(path)

    assert list(state) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert torch.equal(state["2.bias"], model.state_dict()["2.bias"])
    assert meta == {"step": 17, "epoch": 2.5}


def test_load_strips_dataparallel_prefix(tmp_path):
    wrapped = nn.DataParallel(zoo.mlp(8, [4], 3))
    path = tmp_path / "step-1.pt"
    torch.save(wrapped.state_dict(), path)

    state, _ = load_checkpoint(path)

    assert list(state) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_load_rejects_code_in_pickle(tmp_path):
    target = tmp_path / "created-by-unpickling"
    path = tmp_path / "step-1.pt"
    torch.save({"0.weight": torch.zeros(2, 2), "payload": CreatesFile(target)}, path)

    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint(path)

    assert not target.exists()
    # Control: full unpickling runs the payload, so the check above can fail.
    torch.load(path, weights_only=False)
    assert target.exists()


def test_load_rejects_non_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint\n")

    with pytest.raises(CheckpointError, match=re.escape(f"{path}: cannot be loaded as a PyTorch checkpoint")):
        load_checkpoint(path)


def test_load_rejects_dict_without_tensors(tmp_path):
    path = tmp_path / "step-1.pt"
    torch.save({"step": 1, "lr": 0.1}, path)

    with pytest.raises(CheckpointError, match=re.escape(f"{path}: contains no state_dict")):
        load_checkpoint(path)


def test_layouts_batchnorm():
    layout, buffer_layout = model_layouts(_bn_model())

    assert [(e.name, e.shape, e.offset, e.role) for e in layout.entries] == [
        ("0.weight", (3, 4), 0, "weight"),
        ("0.bias", (3,), 12, "bias"),
        ("1.weight", (3,), 15, "norm"),
        ("1.bias", (3,), 18, "norm"),
        ("3.weight", (2, 3), 21, "weight"),
        ("3.bias", (2,), 27, "bias"),
    ]
    assert layout.size == 29
    assert [(e.name, e.offset, e.role) for e in buffer_layout.entries] == [
        ("1.running_mean", 0, "buffer"),
        ("1.running_var", 3, "buffer"),
    ]
    assert buffer_layout.size == 6


def test_flatten_model_values():
    torch.manual_seed(0)
    model = _bn_model()
    model(torch.randn(5, 4))
    layout, buffer_layout = model_layouts(model)

    params, buffers = flatten_model(model, layout, buffer_layout)

    expected_params = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    expected_buffers = torch.cat([model[1].running_mean, model[1].running_var]).numpy()
    assert params.dtype == np.float32
    np.testing.assert_array_equal(params, expected_params)
    np.testing.assert_array_equal(buffers, expected_buffers)


def test_match_layout_flattens(tmp_path):
    torch.manual_seed(0)
    model = zoo.mlp(8, [4], 3)
    layout, _ = model_layouts(model)
    state = model.state_dict()

    vector = match_layout(state, layout, path=tmp_path / "step-1.pt")

    np.testing.assert_array_equal(vector, torch.cat([t.reshape(-1) for t in state.values()]).numpy())


def test_match_layout_lists_five_shapes(tmp_path):
    layout, _ = model_layouts(zoo.mlp(64, [8, 8, 8], 10))
    state = zoo.mlp(64, [16, 16, 16], 10).state_dict()
    path = tmp_path / "step-3.pt"

    with pytest.raises(CheckpointError) as info:
        match_layout(state, layout, path=path)

    message = str(info.value)
    assert message.startswith(f"{path}: does not match the model in doodl3.toml")
    listed = re.findall(r"'([^']+)'", message)
    assert listed == [
        "0.weight (16, 64) (model (8, 64))",
        "0.bias (16,) (model (8,))",
        "2.weight (16, 16) (model (8, 8))",
        "2.bias (16,) (model (8,))",
        "4.weight (16, 16) (model (8, 8))",
    ]
    assert "and 2 more" in message


def test_match_layout_lists_five_missing(tmp_path):
    layout, _ = model_layouts(zoo.mlp(64, [8, 8, 8], 10))
    state = {f"encoder.{name}": tensor for name, tensor in zoo.mlp(64, [8, 8, 8], 10).state_dict().items()}
    path = tmp_path / "step-3.pt"

    with pytest.raises(CheckpointError) as info:
        match_layout(state, layout, path=path)

    message = str(info.value)
    assert message.startswith(str(path))
    assert re.findall(r"'([^']+)'", message) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight"]
    assert "and 3 more" in message


def test_file_digest_is_sha256(tmp_path):
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 8193
    path.write_bytes(data)

    assert file_digest(path) == hashlib.sha256(data).hexdigest()


def test_split_prefixes_reports_stripped():
    tensor = torch.zeros(1)

    state, stripped = split_wrapper_prefixes({"_orig_mod.module.0.weight": tensor, "_orig_mod.module.0.bias": tensor})

    assert list(state) == ["0.weight", "0.bias"]
    assert stripped == "_orig_mod.module."


def test_select_submodule_by_names():
    state = {"model.0.weight": torch.zeros(4, 4), "model.0.bias": torch.zeros(4), "ema.0.weight": torch.zeros(4, 4)}

    kept, prefix, dropped = select_submodule(state, ["0.weight", "0.bias"])

    assert prefix == "model."
    assert list(kept) == ["0.weight", "0.bias"]
    assert dropped == ["ema.0.weight"]


def test_select_submodule_without_names():
    state = {"net.0.weight": torch.zeros(8, 8), "net.0.bias": torch.zeros(8), "val_acc.total": torch.tensor(3.0)}

    kept, prefix, dropped = select_submodule(state, None)

    assert prefix == "net."
    assert list(kept) == ["0.weight", "0.bias"]
    assert dropped == ["val_acc.total"]


def test_tied_aliases_of_model():
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))
    model[1].weight = model[0].weight

    assert tied_aliases(model) == {"0.weight": ["1.weight"]}
    assert model_layouts(model)[0].names == ["0.weight"]


def test_safetensors_fields_from_header(tmp_path):
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2, dtype=torch.float16)}, path, metadata={"step": "40", "epoch": "1.5", "note": "x"})

    checkpoint = read_checkpoint(path)

    assert read_training_fields(path) == {"step": 40, "epoch": 1.5}
    assert checkpoint.meta == {"step": 40, "epoch": 1.5}
    assert checkpoint.dtypes == ["float16"]
    assert checkpoint.state["w"].dtype == torch.float16


def test_folder_digest_ignores_optimizer(tmp_path):
    folder = tmp_path / "checkpoint-10"
    folder.mkdir()
    safetensors.torch.save_file({"w": torch.ones(2)}, folder / "model.safetensors")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    torch.save({"state": {}}, folder / "optimizer.pt")
    before = checkpoint_digest(folder)

    torch.save({"state": {"moved": 1}}, folder / "optimizer.pt")
    unchanged = checkpoint_digest(folder)
    safetensors.torch.save_file({"w": torch.zeros(2)}, folder / "model.safetensors")

    assert unchanged == before
    assert checkpoint_digest(folder) != before
    assert read_training_fields(folder) == {"global_step": 10}


def test_shard_index_names_missing_tensor(tmp_path):
    folder = tmp_path / "step-5"
    folder.mkdir()
    safetensors.torch.save_file({"a": torch.ones(2)}, folder / "part-1.safetensors")
    index = {"weight_map": {"a": "part-1.safetensors", "b": "part-1.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    with pytest.raises(CheckpointError) as info:
        read_checkpoint(folder)

    assert str(info.value) == (
        f"{folder / 'model.safetensors.index.json'}: 1 tensors listed in the index are in none of its shards, "
        "e.g. ['b']; the checkpoint is incomplete"
    )


def test_load_error_names_cause_without_escape_codes(tmp_path):
    path = tmp_path / "step-1.pt"
    path.write_text("not a checkpoint")

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)

    message = str(info.value)
    assert message.startswith(f"{path}: cannot be loaded as a PyTorch checkpoint (")
    assert "move it out of the folder or replace it" in message
    assert "\x1b" not in message
    assert "\n" not in message
