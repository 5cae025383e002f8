"""Batched evaluation of a model at many parameter points.

The evaluation set is materialised once on the device. Parameter points are
evaluated many at a time with ``torch.func.functional_call`` under ``torch.vmap``;
models that cannot be vectorised fall back to one point at a time. Losses are
accumulated in float64, weighted by batch size, so the result is the mean loss over
the whole evaluation set.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from doodl3_cli.artifacts.trajectory import Layout
from doodl3_cli.errors import ConfigError, EvaluationError
from doodl3_cli.runfolder import RunConfig, call_factory, resolve_factory

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """Turn "auto", "cpu", "cuda" or "cuda:N" into a torch.device.

    Raises
    ------
    ConfigError
        When the device string is invalid or CUDA is requested but not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {device!r}: invalid device; use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r}: CUDA is not available on this machine; use --device cpu")
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: only cpu and cuda devices are supported")
    return resolved


def materialise_data(data: Any, *, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a data factory's result into one (inputs, targets) pair of tensors.

    Parameters
    ----------
    data : tuple of two tensors, or a map-style dataset of (input, target) items
    source : str
        Where the data came from, named in errors.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        inputs, targets = data
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        if len(data) == 0:
            raise ConfigError(f"{source}: the dataset is empty")
        items = [data[i] for i in range(len(data))]
        try:
            inputs = torch.stack([torch.as_tensor(x) for x, _ in items])
            targets = torch.stack([torch.as_tensor(y) for _, y in items])
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"{source}: dataset items must be (input, target) pairs of tensors ({exc})") from exc
    else:
        raise ConfigError(
            f"{source}: returned {type(data).__name__}; return (inputs, targets) tensors or a map-style dataset"
        )
    if inputs.shape[0] != targets.shape[0] or inputs.shape[0] == 0:
        raise ConfigError(
            f"{source}: inputs and targets must have the same non-zero length, got {inputs.shape[0]} and {targets.shape[0]}"
        )
    return inputs, targets


@dataclass
class EvaluationSetup:
    """Everything needed to evaluate the run's model: built from doodl3.toml."""

    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batch_size: int
    device: torch.device


def build_setup(config: RunConfig, *, base: Path, device: str | None = None) -> EvaluationSetup:
    """Build model, evaluation data and loss from a run configuration.

    The loss entry names the loss function itself (e.g. ``torch.nn.functional:cross_entropy``);
    its kwargs are bound to it. It must return the mean loss of a batch.
    """
    model = call_factory(config.model, base=base)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{config.path}: [model] factory returned {type(model).__name__}, not a torch.nn.Module")
    inputs, targets = materialise_data(call_factory(config.data, base=base), source=f"[data] in {config.path}")
    loss_fn = functools.partial(resolve_factory(config.loss, base=base), **config.loss.kwargs)
    resolved = resolve_device(device or config.device)
    return EvaluationSetup(model.to(resolved).eval(), inputs.to(resolved), targets.to(resolved), loss_fn, config.batch_size, resolved)


class Evaluator:
    """Evaluate loss (and accuracy, for classifiers) at parameter points.

    Parameters
    ----------
    setup : EvaluationSetup
    layout : Layout
        Flattening of the model's parameters; points are vectors in this layout.
    buffer_layout : Layout
    buffers : ndarray of shape (B,)
        Buffers (BatchNorm running statistics) held fixed at every point.
    points_per_pass : int
        Parameter points evaluated in one vectorised forward pass.
    """

    def __init__(self, setup: EvaluationSetup, layout: Layout, buffer_layout: Layout, buffers: np.ndarray, *, points_per_pass: int = 64):
        self.setup = setup
        self.layout = layout
        self.points_per_pass = max(1, int(points_per_pass))
        device = setup.device
        buffer_vector = torch.as_tensor(np.asarray(buffers, dtype=np.float32), device=device)
        self.buffers = {
            e.name: buffer_vector[e.offset : e.offset + e.numel].reshape(e.shape) for e in buffer_layout.entries
        }
        model_buffers = dict(setup.model.named_buffers())
        for name, value in model_buffers.items():
            self.buffers.setdefault(name, value)
        self._vectorised = True
        self._is_classifier: bool | None = None

    def _unflatten(self, points: torch.Tensor) -> dict[str, torch.Tensor]:
        k = points.shape[0]
        return {e.name: points[:, e.offset : e.offset + e.numel].reshape(k, *e.shape) for e in self.layout.entries}

    def _batch_vectorised(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        model, loss_fn = self.setup.model, self.setup.loss_fn

        def one_point(p: dict[str, torch.Tensor]):
            out = functional_call(model, (p, self.buffers), (x,))
            return loss_fn(out, y), out

        return torch.vmap(one_point)(params)

    def _batch_loop(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        model, loss_fn = self.setup.model, self.setup.loss_fn
        losses, outputs = [], []
        k = next(iter(params.values())).shape[0]
        for i in range(k):
            p = {name: value[i] for name, value in params.items()}
            out = functional_call(model, (p, self.buffers), (x,))
            losses.append(loss_fn(out, y))
            outputs.append(out)
        return torch.stack(losses), torch.stack(outputs)

    def evaluate(self, points: np.ndarray) -> dict[str, np.ndarray]:
        """Evaluate every point on the whole evaluation set.

        Parameters
        ----------
        points : ndarray of shape (K, P)
            Parameter vectors in the layout; cast to float32.

        Returns
        -------
        dict of str to ndarray of shape (K,), float64
            ``loss`` (mean over samples) and, for classifiers (outputs [N, C] with
            integer targets), ``accuracy`` in [0, 1]. Non-finite losses stay non-finite.
        """
        points = np.asarray(points, dtype=np.float32)
        if points.ndim != 2 or points.shape[1] != self.layout.size:
            raise EvaluationError(f"points must have shape (K, {self.layout.size}), got {points.shape}")
        results: dict[str, list[np.ndarray]] = {"loss": [], "accuracy": []}
        for start in range(0, points.shape[0], self.points_per_pass):
            chunk = torch.as_tensor(points[start : start + self.points_per_pass], device=self.setup.device)
            loss, accuracy = self._evaluate_chunk(chunk)
            results["loss"].append(loss)
            results["accuracy"].append(accuracy)
        out = {"loss": np.concatenate(results["loss"])}
        if self._is_classifier:
            out["accuracy"] = np.concatenate(results["accuracy"])
        return out

    @torch.no_grad()
    def _evaluate_chunk(self, chunk: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        params = self._unflatten(chunk)
        inputs, targets, batch_size = self.setup.inputs, self.setup.targets, self.setup.batch_size
        n = inputs.shape[0]
        k = chunk.shape[0]
        loss_sum = torch.zeros(k, dtype=torch.float64, device=chunk.device)
        correct = torch.zeros(k, dtype=torch.float64, device=chunk.device)

        for start in range(0, n, batch_size):
            x = inputs[start : start + batch_size]
            y = targets[start : start + batch_size]
            loss, outputs = self._forward(params, x, y)
            loss_sum += loss.to(torch.float64).reshape(k) * x.shape[0]
            if self._is_classifier is None:
                self._is_classifier = outputs.ndim == 3 and not y.is_floating_point() and y.ndim == 1
            if self._is_classifier:
                correct += (outputs.argmax(dim=-1) == y).sum(dim=-1).to(torch.float64)

        return (loss_sum / n).cpu().numpy(), (correct / n).cpu().numpy()

    def _forward(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        if self._vectorised:
            try:
                return self._batch_vectorised(params, x, y)
            except (RuntimeError, NotImplementedError, ValueError) as exc:
                log.warning(
                    "the model cannot be evaluated at many points per pass (%s); falling back to one point at a time",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                )
                self._vectorised = False
        try:
            return self._batch_loop(params, x, y)
        except Exception as exc:  # user model code may raise anything
            raise EvaluationError(
                f"evaluating the model failed ({type(exc).__name__}: {exc}); check the [model], [data] and [loss] "
                "factories in doodl3.toml"
            ) from exc
