"""Batched evaluation of a model at many parameter points.

The evaluation set is materialised once on the device. Parameter points are
evaluated many at a time: an ``nn.Sequential`` of ``nn.Linear`` layers and
elementwise activations with one batched matrix product per layer, any other
model with ``torch.func.functional_call`` under ``torch.vmap``, and models that
cannot be vectorised one point at a time. On a plane, a first ``nn.Linear`` layer
is evaluated from three products computed once (see `Evaluator.evaluate_plane`).
Losses of groups of samples are accumulated in float64, weighted by group size,
so the result is the mean loss over the whole evaluation set, and their spread
gives its standard error.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from doodl3_cli.artifacts.trajectory import Layout
from doodl3_cli.errors import ConfigError, EvaluationError, UsageError
from doodl3_cli.runfolder import RunConfig, call_factory, resolve_factory

log = logging.getLogger(__name__)


def resolve_device(device: str, *, config_path: Path | None = None) -> torch.device:
    """Turn "auto", "cpu", "cuda" or "cuda:N" into a torch.device.

    Parameters
    ----------
    config_path : Path, optional
        The doodl3.toml whose ``[evaluation].device`` is `device`; None when it came
        from ``--device``. Errors name the one it came from.

    Raises
    ------
    UsageError
        When ``--device`` is invalid or requests CUDA on a machine without it.
    ConfigError
        The same, for ``[evaluation].device`` of `config_path`.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config_path is None:
        error, where, fix = UsageError, f"--device {device!r}", "--device cpu"
    else:
        error, where, fix = ConfigError, f"[evaluation].device = {device!r} in {config_path}", 'device = "cpu" there'
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise error(f"{where}: invalid device; use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise error(f"{where}: CUDA is not available on this machine; use {fix}")
    if resolved.type not in ("cpu", "cuda"):
        raise error(f"{where}: only cpu and cuda devices are supported; use {fix}")
    return resolved


def materialise_data(data: Any, *, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a data factory's result into one (inputs, targets) pair of tensors.

    Parameters
    ----------
    data : tuple of two tensors or numpy arrays, or a map-style dataset of (input, target) items
        Floating-point numpy arrays become float32 tensors, because numpy defaults to
        float64 where torch models are float32.
    source : str
        Where the data came from, named in errors.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in data):
        inputs, targets = (_numpy_as_tensor(t) if isinstance(t, np.ndarray) else t for t in data)
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        if len(data) == 0:
            raise ConfigError(f"{source}: the dataset is empty")
        items = [data[i] for i in range(len(data))]
        try:
            inputs = torch.stack([torch.as_tensor(x) for x, _ in items])
            targets = torch.stack([torch.as_tensor(y) for _, y in items])
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(
                f"{source}: the factory must return (inputs, targets) tensors or arrays, or a dataset of "
                f"(input, target) pairs, but indexing its {type(data).__name__} result failed ({exc})"
            ) from exc
    else:
        raise ConfigError(
            f"{source}: returned {type(data).__name__}; return (inputs, targets) tensors or a map-style dataset"
        )
    if inputs.shape[0] != targets.shape[0] or inputs.shape[0] == 0:
        raise ConfigError(
            f"{source}: inputs and targets must have the same non-zero length, got {inputs.shape[0]} and {targets.shape[0]}"
        )
    return inputs, targets


def _numpy_as_tensor(array: np.ndarray) -> torch.Tensor:
    if np.issubdtype(array.dtype, np.floating):
        return torch.as_tensor(array, dtype=torch.float32)
    return torch.as_tensor(array)


@dataclass
class EvaluationSetup:
    """Everything needed to evaluate the run's model: built from doodl3.toml."""

    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batch_size: int
    device: torch.device


def build_setup(
    config: RunConfig, *, base: Path, device: str | None = None, recorded: Path | None = None
) -> EvaluationSetup:
    """Build model, evaluation data and loss from a run configuration.

    The loss entry names the loss function itself (e.g. ``torch.nn.functional:cross_entropy``);
    its kwargs are bound to it. It must return the mean loss of a batch.

    Parameters
    ----------
    recorded : Path, optional
        trajectory.h5 whose parameter layout the model must match.

    Raises
    ------
    ConfigError
        When a factory fails, or the model's parameters differ from those recorded.
    """
    model = call_factory(config.model, base=base)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{config.path}: [model] factory returned {type(model).__name__}, not a torch.nn.Module")
    if recorded is not None:
        _check_recorded_layout(model, config, recorded)
    inputs, targets = materialise_data(call_factory(config.data, base=base), source=f"[data] in {config.path}")
    loss_fn = functools.partial(resolve_factory(config.loss, base=base), **config.loss.kwargs)
    from_config = device is None or device == config.device
    resolved = resolve_device(device or config.device, config_path=config.path if from_config else None)
    return EvaluationSetup(model.to(resolved).eval(), inputs.to(resolved), targets.to(resolved), loss_fn, config.batch_size, resolved)


def _check_recorded_layout(model: nn.Module, config: RunConfig, recorded: Path) -> None:
    from doodl3_cli.artifacts.trajectory import describe_layout_mismatch, read_layouts
    from doodl3_cli.checkpoints import model_layouts

    stored, _ = read_layouts(recorded)
    built, _ = model_layouts(model)
    if not stored.same_structure(built):
        raise ConfigError(
            f"{config.path}: [model] builds parameters that differ from those recorded in {recorded} "
            f"({describe_layout_mismatch(stored, built)}); make [model] build the recorded architecture"
        )


BATCHNORM_POLICIES = ("fixed", "recompute")
# The loss is computed on at least this many groups of samples (when there are
# that many samples), so that its standard error can be estimated from the
# per-group losses. Groups subdivide the forward batches: they add loss calls,
# not forward passes.
MIN_GROUPS = 16


@dataclass
class Evaluation:
    """Metrics of K parameter points on the whole evaluation set.

    Attributes
    ----------
    loss : ndarray of shape (K,), float64
        Mean loss over the samples, accumulated in float64.
    loss_stderr : ndarray of shape (K,), float64
        Standard error of `loss`, estimated from the per-batch losses (NaN with one batch).
    accuracy : ndarray of shape (K,), float64, or None
        Fraction of correct argmax predictions, for classifiers only.
    """

    loss: np.ndarray
    loss_stderr: np.ndarray
    accuracy: np.ndarray | None

    def as_dict(self) -> dict[str, np.ndarray]:
        """Return the metrics by name: ``loss``, ``loss_stderr`` and, for classifiers, ``accuracy``."""
        out = {"loss": self.loss, "loss_stderr": self.loss_stderr}
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy
        return out


def batch_stderr(batch_losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Estimate the standard error of a weighted mean of per-batch mean losses.

    With batch weights w_b = n_b / N (summing to 1), batch losses l_b and their
    weighted mean L, the estimate is sqrt(B / (B - 1) * sum_b w_b^2 (l_b - L)^2),
    the usual cluster estimator of the variance of a mean over B batches.

    Parameters
    ----------
    batch_losses : Tensor of shape (K, B), float64
    weights : Tensor of shape (B,), float64

    Returns
    -------
    Tensor of shape (K,), float64
        NaN when B is 1.
    """
    count = batch_losses.shape[1]
    if count < 2:
        return torch.full(batch_losses.shape[:1], float("nan"), dtype=torch.float64, device=batch_losses.device)
    mean = batch_losses @ weights
    spread = ((batch_losses - mean[:, None]) ** 2) @ (weights**2)
    return torch.sqrt(spread * count / (count - 1))


class Evaluator:
    """Evaluate loss, its standard error and (for classifiers) accuracy at parameter points.

    Parameters
    ----------
    setup : EvaluationSetup
    layout : Layout
        Flattening of the model's parameters; points are vectors in this layout.
    buffer_layout : Layout
    buffers : ndarray of shape (B,)
        Buffers (BatchNorm running statistics) of the center; used at every point
        under the ``fixed`` policy.
    points_per_pass : int
        Parameter points evaluated in one vectorised forward pass.
    batchnorm : {"fixed", "recompute"}
        ``fixed`` evaluates every point with `buffers`. ``recompute`` re-estimates
        the running statistics of every BatchNorm layer at each point from
        `recompute_samples` samples of the evaluation set (a seeded subset), then
        evaluates with them. Neither policy changes the model's own buffers.
    recompute_samples : int
        Size of the subset used by the ``recompute`` policy.
    seed : int
        Seed of the subset used by the ``recompute`` policy.

    Raises
    ------
    ConfigError
        When `batchnorm` is not a known policy.
    """

    def __init__(
        self, setup: EvaluationSetup, layout: Layout, buffer_layout: Layout, buffers: np.ndarray, *,
        points_per_pass: int = 16, batchnorm: str = "fixed", recompute_samples: int = 256, seed: int = 0,
    ):
        if batchnorm not in BATCHNORM_POLICIES:
            raise ConfigError(f"--batchnorm {batchnorm!r}: invalid policy; use one of {', '.join(BATCHNORM_POLICIES)}")
        self.setup = setup
        self.layout = layout
        self.points_per_pass = max(1, int(points_per_pass))
        self.batchnorm = batchnorm
        device = setup.device
        buffer_vector = torch.as_tensor(np.asarray(buffers, dtype=np.float32), device=device)
        self.buffers = {
            e.name: buffer_vector[e.offset : e.offset + e.numel].reshape(e.shape).clone() for e in buffer_layout.entries
        }
        for name, value in setup.model.named_buffers():
            self.buffers.setdefault(name, value.detach().clone())
        # vmap turns a convolution at K points into a grouped convolution, which is
        # slower per point on CPU than K small ones, so models with convolutions loop.
        self._vectorised = not any(isinstance(m, nn.modules.conv._ConvNd) for m in setup.model.modules())
        self._is_classifier: bool | None = None
        self._batches = _split(setup.inputs.shape[0], setup.batch_size)
        group_size = -(-setup.inputs.shape[0] // MIN_GROUPS)
        self._groups = [_split(stop - start, group_size) for start, stop in self._batches]
        self._plane_cache: dict | None = None
        self._group_matrices: dict = {}
        sizes = [stop - start for groups in self._groups for start, stop in groups]
        self._group_weights = torch.tensor(sizes, dtype=torch.float64) / setup.inputs.shape[0]
        targets = setup.targets
        self._sample_losses = (
            plain_cross_entropy(setup.loss_fn) and targets.ndim == 1 and not targets.is_floating_point()
            and targets.numel() > 0 and int(targets.min()) >= 0
        )

        self._norm_layers = [
            (name, m) for name, m in setup.model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        ]
        n = setup.inputs.shape[0]
        generator = torch.Generator().manual_seed(int(seed))
        subset = torch.randperm(n, generator=generator)[: min(int(recompute_samples), n)].sort().values
        self._recompute_inputs = setup.inputs[subset.to(setup.inputs.device)]
        self.recompute_samples = int(subset.numel())

    @property
    def batch_count(self) -> int:
        """Number of sample groups whose losses give the standard error of the loss."""
        return sum(len(groups) for groups in self._groups)

    def evaluate(self, points: np.ndarray) -> dict[str, np.ndarray]:
        """Evaluate every point on the whole evaluation set.

        Parameters
        ----------
        points : ndarray of shape (K, P)
            Parameter vectors in the layout; cast to float32.

        Returns
        -------
        dict of str to ndarray of shape (K,), float64
            ``loss`` (mean over samples), ``loss_stderr`` and, for classifiers
            (outputs [N, C] with integer targets), ``accuracy`` in [0, 1].
            Non-finite losses stay non-finite.

        Raises
        ------
        EvaluationError
            When `points` has the wrong shape or the model fails.
        """
        points = np.asarray(points, dtype=np.float32)
        if points.ndim != 2 or points.shape[1] != self.layout.size:
            raise EvaluationError(f"points must have shape (K, {self.layout.size}), got {points.shape}")
        parts = []
        for start in range(0, points.shape[0], self.points_per_pass):
            chunk = torch.as_tensor(points[start : start + self.points_per_pass], device=self.setup.device)
            parts.append(self._evaluate_chunk(self._unflatten(chunk), chunk.shape[0], first_layer=None))
        return _concatenate(parts).as_dict()

    def loss_function(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Return the mean loss over the evaluation set as a differentiable function of a flat parameter vector.

        The function runs in float64 (parameters, buffers and floating-point
        inputs cast), with the buffers of this evaluator held fixed, so it can be
        differentiated with ``torch.func`` (gradients, Hessian-vector products).

        Returns
        -------
        callable
            Maps a float64 Tensor of shape (P,) to a float64 scalar Tensor.
        """
        model, loss_fn = self.setup.model, self.setup.loss_fn
        device = self.setup.device
        buffers = {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in self.buffers.items()}
        inputs = self.setup.inputs.to(torch.float64) if self.setup.inputs.is_floating_point() else self.setup.inputs
        targets = self.setup.targets.to(torch.float64) if self.setup.targets.is_floating_point() else self.setup.targets
        n = inputs.shape[0]
        entries = self.layout.entries

        def mean_loss(vector: torch.Tensor) -> torch.Tensor:
            vector = vector.to(device)
            params = {e.name: vector[e.offset : e.offset + e.numel].reshape(e.shape) for e in entries}
            total = vector.new_zeros(())
            for start, stop in self._batches:
                out = functional_call(model, (params, buffers), (inputs[start:stop],))
                total = total + loss_fn(out, targets[start:stop]) * ((stop - start) / n)
            return total

        return mean_loss

    def evaluate_plane(self, center: np.ndarray, directions: np.ndarray, coefficients: np.ndarray) -> dict[str, np.ndarray]:
        """Evaluate the points ``center + coefficients @ directions``.

        Equal to ``evaluate`` on those points up to float32 rounding. When the
        model is an ``nn.Sequential`` whose first layer is ``nn.Linear`` and the
        policy is ``fixed``, the first layer's output at W0 + a D1 + b D2 is formed
        as W0 x + a D1 x + b D2 x from three products computed once per batch, so
        the first layer costs no matrix product per point.

        Parameters
        ----------
        center : ndarray of shape (P,)
        directions : ndarray of shape (2, P)
        coefficients : ndarray of shape (K, 2)
            (alpha, beta) of each point.

        Returns
        -------
        dict of str to ndarray of shape (K,), float64
            As for `evaluate`.
        """
        center = np.asarray(center, dtype=np.float64)
        directions = np.asarray(directions, dtype=np.float64)
        coefficients = np.asarray(coefficients, dtype=np.float64).reshape(-1, 2)
        first = self._first_linear()
        if first is None or self.batchnorm != "fixed" or not self._vectorised:
            return self.evaluate(_plane_points(center, directions, coefficients))

        cache = self._plane_products(first, center, directions)
        parts = []
        for start in range(0, coefficients.shape[0], self.points_per_pass):
            coeff = torch.as_tensor(
                coefficients[start : start + self.points_per_pass], dtype=torch.float32, device=self.setup.device
            )
            params = {
                name: torch.addmm(at_center, coeff, along).reshape(-1, *shape)
                for name, (at_center, along, shape) in cache["rest_parameters"].items()
            }
            try:
                parts.append(self._evaluate_chunk(params, coeff.shape[0], first_layer=(cache, coeff)))
            except (RuntimeError, NotImplementedError, ValueError) as exc:
                log.warning("the layers after the first cannot be vectorised (%s); evaluating one point at a time",
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                self._vectorised = False
                return self.evaluate(_plane_points(center, directions, coefficients))
        return _concatenate(parts).as_dict()

    def _first_linear(self) -> str | None:
        model = self.setup.model
        if not isinstance(model, nn.Sequential) or len(model) < 2:
            return None
        name, module = next(iter(model.named_children()))
        if not isinstance(module, nn.Linear):
            return None
        return name

    def _plane_products(self, first: str, center: np.ndarray, directions: np.ndarray) -> dict:
        key = (first, center.tobytes(), directions.tobytes())
        if self._plane_cache is not None and self._plane_cache["key"] == key:
            return self._plane_cache

        def layer_params(vector: np.ndarray) -> dict[str, torch.Tensor]:
            tensor = torch.as_tensor(vector.astype(np.float32), device=self.setup.device)
            return {
                e.name.partition(".")[2]: tensor[e.offset : e.offset + e.numel].reshape(e.shape)
                for e in self.layout.entries if e.name.partition(".")[0] == first
            }

        module = self.setup.model.get_submodule(first)
        rest = nn.Sequential(OrderedDict(list(self.setup.model.named_children())[1:])).train(self.setup.model.training)
        # A linear stack runs with samples as the last dimension: (K, features, n).
        transposed = _is_linear_stack(rest)
        outputs = []
        with torch.no_grad():
            for start, stop in self._batches:
                x = self.setup.inputs[start:stop]
                base = functional_call(module, layer_params(center), (x,))
                along = torch.stack([functional_call(module, layer_params(d), (x,)) for d in directions])
                if transposed:
                    base, along = base.T.contiguous(), along.transpose(1, 2).contiguous()
                outputs.append((base, along.reshape(2, -1)))

        def entry_tensor(vector: np.ndarray, e) -> torch.Tensor:
            return torch.as_tensor(vector[..., e.offset : e.offset + e.numel].astype(np.float32), device=self.setup.device)

        prefix = first + "."
        self._plane_cache = {
            "key": key, "outputs": outputs, "rest": rest, "first": first, "transposed": transposed,
            # Parameters of the later layers at point (a, b): center + a D1 + b D2, one addmm each.
            "rest_parameters": {
                e.name: (entry_tensor(center, e)[None, :], entry_tensor(directions, e), e.shape)
                for e in self.layout.entries if not e.name.startswith(prefix)
            },
        }
        return self._plane_cache

    def _unflatten(self, points: torch.Tensor) -> dict[str, torch.Tensor]:
        k = points.shape[0]
        return {e.name: points[:, e.offset : e.offset + e.numel].reshape(k, *e.shape) for e in self.layout.entries}

    @torch.no_grad()
    def _evaluate_chunk(self, params: dict[str, torch.Tensor], k: int, *, first_layer) -> Evaluation:
        inputs, targets = self.setup.inputs, self.setup.targets
        n = inputs.shape[0]
        device = inputs.device
        group_losses = []
        correct = torch.zeros(k, dtype=torch.float64, device=device)
        buffers = self._point_buffers(params, k)

        for b, (start, stop) in enumerate(self._batches):
            x = inputs[start:stop]
            y = targets[start:stop]
            if first_layer is not None:
                outputs = self._forward_plane(params, first_layer, b)
            else:
                outputs = self._forward(params, buffers, x)
            if self._is_classifier is None:
                self._is_classifier = outputs.ndim == 3 and not y.is_floating_point() and y.ndim == 1
            losses, predicted = self._batch_losses(outputs, y, self._groups[b])
            group_losses.append(losses)
            if self._is_classifier:
                correct += (predicted == y).sum(dim=-1).to(torch.float64)

        losses = torch.cat(group_losses, dim=1)
        weights = self._group_weights.to(device)
        return Evaluation(
            loss=(losses @ weights).cpu().numpy(),
            loss_stderr=batch_stderr(losses, weights).cpu().numpy(),
            accuracy=(correct / n).cpu().numpy() if self._is_classifier else None,
        )

    def _batch_losses(
        self, outputs: torch.Tensor, y: torch.Tensor, groups: list[tuple[int, int]]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the mean loss of every group of one batch and, for classifiers, the predicted classes.

        Plain cross-entropy is computed per sample and averaged in float64. Any
        other loss gets groups of equal size through one vectorised call, with
        points and groups flattened into one batch dimension, and a shorter last
        group through a call of its own.

        Returns
        -------
        losses : Tensor of shape (K, G), float64
        predicted : Tensor of shape (K, n), int64, or None
            The class with the largest output, the first one on ties, as ``argmax``
            returns it. None unless the model is a classifier.
        """
        if self._sample_losses and outputs.ndim == 3:
            per_sample, predicted = sample_cross_entropy(outputs, y)
            return per_sample.to(torch.float64) @ self._group_matrix(groups, outputs.device), predicted

        k = outputs.shape[0]
        size = groups[0][1] - groups[0][0]
        full = [g for g in groups if g[1] - g[0] == size]
        rest = groups[len(full):]
        stop = len(full) * size
        stacked = outputs[:, :stop].reshape(k * len(full), size, *outputs.shape[2:])
        targets = y[:stop].reshape(len(full), size, *y.shape[1:]).repeat(k, *([1] * y.ndim))
        losses = [self._vmapped_loss(stacked, targets).reshape(k, len(full))]
        for start, end in rest:
            part = outputs[:, start:end]
            losses.append(self._vmapped_loss(part, y[start:end].expand(k, *y[start:end].shape)).reshape(k, 1))
        # max().indices returns the first maximum like argmax, and is several times faster on CPU.
        predicted = outputs.max(dim=-1).indices if self._is_classifier else None
        return torch.cat(losses, dim=1).to(torch.float64), predicted

    def _group_matrix(self, groups: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
        """Return the float64 (n, G) matrix that maps per-sample losses of one batch to group means."""
        key = (tuple(groups), str(device))
        if key not in self._group_matrices:
            matrix = torch.zeros(groups[-1][1], len(groups), dtype=torch.float64, device=device)
            for g, (start, end) in enumerate(groups):
                matrix[start:end, g] = 1.0 / (end - start)
            self._group_matrices[key] = matrix
        return self._group_matrices[key]

    def _vmapped_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss_fn = self.setup.loss_fn
        try:
            return torch.vmap(loss_fn)(outputs, targets)
        except (RuntimeError, NotImplementedError, ValueError):
            return torch.stack([loss_fn(outputs[i], targets[i]).reshape(()) for i in range(outputs.shape[0])])

    def _point_buffers(self, params: dict[str, torch.Tensor], k: int) -> list[dict[str, torch.Tensor]] | None:
        if self.batchnorm == "fixed":
            return None
        if self.batchnorm == "recompute":
            return [self._recompute_buffers({name: value[i] for name, value in params.items()}) for i in range(k)]
        raise ConfigError(f"--batchnorm {self.batchnorm!r}: invalid policy; use one of {', '.join(BATCHNORM_POLICIES)}")

    def _recompute_buffers(self, point: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        buffers = {name: value.clone() for name, value in self.buffers.items()}
        if not self._norm_layers:
            return buffers
        for name, module in self._norm_layers:
            prefix = f"{name}." if name else ""
            buffers[prefix + "running_mean"].zero_()
            buffers[prefix + "running_var"].fill_(1.0)
            buffers[prefix + "num_batches_tracked"] = torch.zeros((), dtype=torch.long, device=self.setup.device)

        # momentum None makes BatchNorm keep a cumulative average over the batches seen.
        saved = [(module, module.training, module.momentum) for _, module in self._norm_layers]
        try:
            for module, _, _ in saved:
                module.train()
                module.momentum = None
            subset = self._recompute_inputs
            for start in range(0, subset.shape[0], self.setup.batch_size):
                functional_call(self.setup.model, (point, buffers), (subset[start : start + self.setup.batch_size],))
        except Exception as exc:  # user model code may raise anything
            raise EvaluationError(
                f"re-estimating the BatchNorm statistics failed ({type(exc).__name__}: {exc}); "
                "check the [model] factory in doodl3.toml or use --batchnorm fixed"
            ) from exc
        finally:
            for module, training, momentum in saved:
                module.train(training)
                module.momentum = momentum
        return buffers

    def _forward_plane(self, params: dict[str, torch.Tensor], first_layer, batch: int) -> torch.Tensor:
        cache, coeff = first_layer
        base, products = cache["outputs"][batch]
        k = coeff.shape[0]
        # One matrix product forms W0 x + a D1 x + b D2 x for every point of the chunk.
        hidden = torch.addmm(base.reshape(1, -1), coeff, products).reshape(k, *base.shape)
        rest = cache["rest"]

        if cache["transposed"]:
            return _linear_stack_forward_transposed(rest, params, hidden).transpose(1, 2)

        def one_point(p: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
            return functional_call(rest, (p, self.buffers), (h,))

        return torch.vmap(one_point)(params, hidden)

    def _batch_vectorised(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        model = self.setup.model
        if _is_linear_stack(model):
            return _linear_stack_forward(model, params, x)

        def one_point(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(model, (p, self.buffers), (x,))

        return torch.vmap(one_point)(params)

    def _batch_loop(self, params: dict[str, torch.Tensor], buffers, x: torch.Tensor) -> torch.Tensor:
        model = self.setup.model
        k = next(iter(params.values())).shape[0]
        outputs = []
        for i in range(k):
            p = {name: value[i] for name, value in params.items()}
            outputs.append(functional_call(model, (p, buffers[i] if buffers is not None else self.buffers), (x,)))
        return torch.stack(outputs)

    def _forward(self, params: dict[str, torch.Tensor], buffers, x: torch.Tensor) -> torch.Tensor:
        """Return the model outputs at every point of the chunk, a Tensor of shape (K, n, ...)."""
        if self._vectorised and buffers is None:
            try:
                return self._batch_vectorised(params, x)
            except (RuntimeError, NotImplementedError, ValueError) as exc:
                log.warning(
                    "the model cannot be evaluated at many points per pass (%s); falling back to one point at a time",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                )
                self._vectorised = False
        try:
            return self._batch_loop(params, buffers, x)
        except Exception as exc:  # user model code may raise anything
            raise EvaluationError(
                f"evaluating the model failed ({type(exc).__name__}: {exc}); check the [model], [data] and [loss] "
                "factories in doodl3.toml"
            ) from exc


# Modules that act elementwise (or not at all, in eval mode) on any tensor shape.
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.Softplus, nn.Identity, nn.Dropout)


def _is_linear_stack(model: nn.Module) -> bool:
    """True for an nn.Sequential of nn.Linear and elementwise activations, in eval mode, with no buffers."""
    return (
        isinstance(model, nn.Sequential)
        and not any(m.training for m in model)
        and any(isinstance(m, nn.Linear) for m in model)
        and all(type(m) is nn.Linear or type(m) in ELEMENTWISE for m in model)
    )


def _linear_stack_forward(model: nn.Sequential, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Evaluate a linear stack at K parameter points with batched matrix products.

    The same arithmetic as ``vmap(functional_call)`` without its per-operator
    overhead: each layer is one ``baddbmm`` over the K points.

    Parameters
    ----------
    params : dict of str to Tensor of shape (K, ...)
    x : Tensor of shape (n, in) shared by all points, or (K, n, in)

    Returns
    -------
    Tensor of shape (K, n, out)
    """
    k = next(iter(params.values())).shape[0]
    h = x if x.ndim == 3 else x.expand(k, *x.shape)
    for name, module in model.named_children():
        if type(module) is nn.Linear:
            weight = params[f"{name}.weight"]
            bias = params.get(f"{name}.bias")
            if bias is None:
                h = torch.bmm(h, weight.transpose(1, 2))
            else:
                h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
        else:
            h = module(h)
    return h


def _linear_stack_forward_transposed(model: nn.Sequential, params: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """Evaluate a linear stack at K parameter points with samples as the last dimension.

    With features first, each layer is ``W @ h`` with the samples as the wide
    dimension of the product. ReLU runs in place, so a pass touches less memory
    than in the (K, n, features) layout.

    Parameters
    ----------
    params : dict of str to Tensor of shape (K, ...)
    h : Tensor of shape (K, in, n)
        Overwritten.

    Returns
    -------
    Tensor of shape (K, out, n)
    """
    owned = True
    for name, module in model.named_children():
        if type(module) is nn.Linear:
            weight = params[f"{name}.weight"]
            bias = params.get(f"{name}.bias")
            h = torch.bmm(weight, h) if bias is None else torch.baddbmm(bias.unsqueeze(2), weight, h)
            owned = True
        elif type(module) is nn.ReLU and owned:
            h = h.relu_()
        else:
            h = module(h)
            owned = True
    return h


def plain_cross_entropy(loss_fn: Callable) -> bool:
    """True when `loss_fn` is ``F.cross_entropy`` or ``nn.CrossEntropyLoss`` with every option at its default."""
    if isinstance(loss_fn, functools.partial):
        if loss_fn.args or loss_fn.keywords:
            return False
        loss_fn = loss_fn.func
    if loss_fn is F.cross_entropy:
        return True
    return (
        type(loss_fn) is nn.CrossEntropyLoss
        and loss_fn.weight is None
        and loss_fn.ignore_index == -100
        and loss_fn.reduction == "mean"
        and loss_fn.label_smoothing == 0.0
    )


def sample_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every point and sample, the same values as ``F.cross_entropy(reduction="none")``.

    Works on any memory layout of `outputs`, including the (K, n, C) view of a
    (K, C, n) tensor, without the copy that ``F.cross_entropy`` makes of it. The
    largest logit serves both the log-sum-exp and the predicted class.

    Parameters
    ----------
    outputs : Tensor of shape (K, n, C), floating point
        Logits.
    targets : Tensor of shape (n,), int64
        Class indices in [0, C).

    Returns
    -------
    losses : Tensor of shape (K, n), dtype of `outputs`
    predicted : Tensor of shape (K, n), int64
        Index of the largest logit, the first one on ties, as ``argmax`` returns it.
    """
    top, predicted = outputs.max(dim=-1)
    log_norm = (outputs - top.unsqueeze(-1)).exp_().sum(dim=-1).log_() + top
    index = targets.reshape(1, -1, 1).expand(outputs.shape[0], -1, 1)
    return log_norm - outputs.gather(-1, index).squeeze(-1), predicted


def _plane_points(center: np.ndarray, directions: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """Return the float32 points ``center + coefficients @ directions``, of shape (K, P), formed in float64."""
    return (center[None, :] + coefficients @ directions).astype(np.float32)


def _split(n: int, size: int) -> list[tuple[int, int]]:
    """Return (start, stop) of consecutive pieces of range(n) of at most `size` items."""
    size = max(1, int(size))
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _concatenate(parts: list[Evaluation]) -> Evaluation:
    accuracy = [p.accuracy for p in parts]
    return Evaluation(
        loss=np.concatenate([p.loss for p in parts]),
        loss_stderr=np.concatenate([p.loss_stderr for p in parts]),
        accuracy=None if any(a is None for a in accuracy) else np.concatenate(accuracy),
    )
