"""Probes of the model at recorded checkpoints: the top Hessian eigenvalue and predictions.

The model, data and loss are rebuilt from doodl3.toml by
`doodl3_cli.evaluate.build_setup`, and a flattened parameter vector is loaded into
the model with ``torch.func.functional_call``, so the module itself is never changed.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.func import functional_call, grad, jvp

from doodl3_cli.artifacts.trajectory import Layout
from doodl3_cli.errors import AnalysisError
from doodl3_cli.evaluate import EvaluationSetup

log = logging.getLogger(__name__)

POWER_ITERATIONS = 50
POWER_RTOL = 1e-4


def unflatten(layout: Layout, vector: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    """Split a flattened parameter vector of shape (P,) into named float32 tensors."""
    flat = torch.as_tensor(np.asarray(vector, dtype=np.float32), device=device)
    if flat.shape != (layout.size,):
        raise AnalysisError(
            f"parameter vector has shape {tuple(flat.shape)}, expected ({layout.size},) from the trajectory layout; "
            "the checkpoints and doodl3.toml describe different models"
        )
    return {e.name: flat[e.offset:e.offset + e.numel].reshape(e.shape) for e in layout.entries}


def top_hessian_eigenvalue(
    setup: EvaluationSetup,
    layout: Layout,
    vector: np.ndarray,
    *,
    iterations: int = POWER_ITERATIONS,
    seed: int = 0,
) -> float:
    """Estimate the largest-magnitude eigenvalue of the Hessian of the loss by power iteration.

    Each iteration is one Hessian-vector product, forward-over-reverse
    (``torch.func.jvp`` of ``torch.func.grad``), on the first ``setup.batch_size``
    samples of the evaluation data in one batch. Iteration stops when the Rayleigh
    quotient changes by less than 1e-4 relative, or after `iterations` products.

    Parameters
    ----------
    setup : EvaluationSetup
        Model, data and loss, from `build_setup`.
    layout : Layout
        Flattening of the model parameters, from trajectory.h5.
    vector : ndarray of shape (P,)
        Flattened parameters of the checkpoint.
    iterations : int
        Maximum number of Hessian-vector products.
    seed : int
        Seed of the random start vector.

    Returns
    -------
    float
        The eigenvalue, in loss units per squared parameter unit. At the checkpoints
        of a run it is the sharpness that gradient descent with learning rate eta
        compares with ``2 / eta``.

    Raises
    ------
    AnalysisError
        When the vector does not fit the layout.
    """
    params = unflatten(layout, vector, setup.device)
    inputs = setup.inputs[: setup.batch_size]
    targets = setup.targets[: setup.batch_size]
    buffers = {name: value for name, value in setup.model.named_buffers()}

    def loss_of(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return setup.loss_fn(functional_call(setup.model, (p, buffers), (inputs,)), targets)

    gradient_of = grad(loss_of)

    def hvp(v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return jvp(gradient_of, (params,), (v,))[1]

    generator = torch.Generator(device="cpu").manual_seed(seed)
    v = {k: torch.randn(t.shape, generator=generator).to(t.device) for k, t in params.items()}
    v = _normalised(v)
    eigenvalue = 0.0
    for _ in range(iterations):
        w = hvp(v)
        estimate = float(sum((v[k] * w[k]).sum() for k in v))
        norm = _norm(w)
        if norm == 0.0:
            return 0.0
        v = {k: t / norm for k, t in w.items()}
        converged = abs(estimate - eigenvalue) <= POWER_RTOL * abs(estimate)
        eigenvalue = estimate
        if converged:
            break
    return eigenvalue


def predicted_probabilities(setup: EvaluationSetup, layout: Layout, vector: np.ndarray) -> np.ndarray | None:
    """Return the softmax of the model outputs on the evaluation data, for a classifier.

    Returns
    -------
    ndarray of shape (N, C), float64, or None
        Predicted class probabilities of each of the N evaluation samples. None when
        the model is not a classifier: the targets are not integer labels of shape
        (N,) or the outputs are not logits of shape (N, C) with C >= 2.
    """
    n = setup.inputs.shape[0]
    if setup.targets.is_floating_point() or tuple(setup.targets.shape) != (n,):
        return None
    params = unflatten(layout, vector, setup.device)
    buffers = {name: value for name, value in setup.model.named_buffers()}
    parts = []
    with torch.no_grad():
        for start in range(0, setup.inputs.shape[0], setup.batch_size):
            batch = setup.inputs[start:start + setup.batch_size]
            logits = functional_call(setup.model, (params, buffers), (batch,))
            if logits.ndim != 2 or logits.shape[1] < 2:
                return None
            parts.append(torch.softmax(logits.double(), dim=-1).cpu().numpy())
    return np.concatenate(parts)


def _norm(v: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in v.values())))


def _normalised(v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    norm = _norm(v)
    return {k: t / norm for k, t in v.items()}
