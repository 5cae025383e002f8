"""Fixtures shared across the test suite: real digits data, a real training loop, run folders."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from doodl3_cli import zoo

# The zoo MLP that the test doodl3.toml files build: 64 inputs, one hidden layer of 8, 10 classes.
MLP_KWARGS = {"in_features": 64, "hidden": [8], "classes": 10}

CheckpointCallback = Callable[[int, nn.Module, torch.optim.Optimizer, float], None]


@pytest.fixture(scope="session")
def digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The first 128 samples of the bundled digits train split: float32 [128, 64] and int64 [128]."""
    inputs, targets = zoo.digits(split="train")
    return inputs[:128], targets[:128]


@pytest.fixture
def train_sgd(digits_batch) -> Callable[..., None]:
    """Return ``train(model, *, steps, every, on_checkpoint, lr=0.5)``: full-batch SGD on `digits_batch`.

    ``on_checkpoint(step, model, optimizer, loss)`` runs after the forward pass of every
    step divisible by `every` and of the final step, before that step's update, so
    `step` is the number of updates applied so far and `loss` is the loss of those weights.
    """
    inputs, targets = digits_batch

    def train(model: nn.Module, *, steps: int, every: int, on_checkpoint: CheckpointCallback, lr: float = 0.5) -> None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        model.train()
        for step in range(steps + 1):
            loss = F.cross_entropy(model(inputs), targets)
            if step % every == 0 or step == steps:
                on_checkpoint(step, model, optimizer, loss.item())
            if step == steps:
                return
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return train


@pytest.fixture
def mlp_checkpoints(tmp_path, train_sgd) -> tuple[Path, dict[int, dict[str, torch.Tensor]]]:
    """Train the `MLP_KWARGS` zoo MLP for 12 steps and save its state_dict every 3 steps.

    Returns the folder, holding ``step-0.pt``, ``step-3.pt``, ..., ``step-12.pt``, and a
    map from step to a copy of the state_dict saved at that step.
    """
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    states: dict[int, dict[str, torch.Tensor]] = {}

    def save(step: int, model: nn.Module, optimizer: torch.optim.Optimizer, loss: float) -> None:
        states[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(model.state_dict(), folder / f"step-{step}.pt")

    torch.manual_seed(0)
    train_sgd(zoo.mlp(**MLP_KWARGS), steps=12, every=3, on_checkpoint=save)
    return folder, states


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict) and not value:
        return "{}"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


@pytest.fixture
def write_config() -> Callable[..., Path]:
    """Return ``write(run, model_factory=..., model_kwargs=...)``, which writes run/doodl3.toml.

    The model defaults to the `MLP_KWARGS` zoo MLP, the data to the digits train split
    and the loss to cross entropy. The run folder is created when missing.
    """

    def write(run: Path, model_factory: str = "doodl3_cli.zoo:mlp", model_kwargs: dict | None = None) -> Path:
        kwargs = MLP_KWARGS if model_kwargs is None else model_kwargs
        run.mkdir(parents=True, exist_ok=True)
        path = run / "doodl3.toml"
        path.write_text(
            "[model]\n"
            f"factory = {_toml_value(model_factory)}\n"
            f"kwargs = {_toml_value(kwargs)}\n\n"
            "[data]\n"
            'factory = "doodl3_cli.zoo:digits"\n\n'
            "[loss]\n"
            'factory = "torch.nn.functional:cross_entropy"\n',
            encoding="utf-8",
        )
        return path

    return write


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    """A zygote process that forks doodl3 commands (see tests/forked.py), one per test module."""
    from tests import forked

    process = forked.Zygote(tmp_path_factory.mktemp("zygote"))
    yield process
    process.close()
