"""Loading PyTorch checkpoints and flattening models into the trajectory layout."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from doodl3_cli.artifacts.trajectory import Layout
from doodl3_cli.errors import CheckpointError

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth")
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
STEP_KEYS = ("global_step", "step", "iteration")
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
MAX_KEYS_IN_MESSAGE = 5


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """Map each parameter name to its role: "norm", "bias" or "weight"."""
    roles = {}
    for name, _ in model.named_parameters():
        module_name = name.rpartition(".")[0]
        module = model.get_submodule(module_name) if module_name else model
        if isinstance(module, NORM_TYPES):
            roles[name] = "norm"
        elif name.endswith("bias"):
            roles[name] = "bias"
        else:
            roles[name] = "weight"
    return roles


def model_layouts(model: nn.Module) -> tuple[Layout, Layout]:
    """Return the (parameter, buffer) layouts of a model.

    Only floating-point tensors are laid out; integer buffers such as BatchNorm's
    `num_batches_tracked` do not affect evaluation and are skipped.
    """
    params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    buffers = {n: b for n, b in model.named_buffers() if b.is_floating_point()}
    return Layout.from_tensors(params, parameter_roles(model)), Layout.from_tensors(buffers, {n: "buffer" for n in buffers})


def flatten(tensors: dict[str, torch.Tensor], layout: Layout) -> np.ndarray:
    """Concatenate the tensors named by `layout` into one float32 vector of shape (P,)."""
    out = np.empty(layout.size, dtype=np.float32)
    for entry in layout.entries:
        out[entry.offset : entry.offset + entry.numel] = (
            tensors[entry.name].detach().to("cpu", torch.float32).reshape(-1).numpy()
        )
    return out


def flatten_model(model: nn.Module, layout: Layout, buffer_layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """Return the model's current (parameters [P], buffers [B]) as float32 vectors."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    return flatten(params, layout), flatten(buffers, buffer_layout)


def file_digest(path: Path) -> str:
    """Return the sha256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a PyTorch checkpoint safely and find its state_dict.

    Loading uses ``weights_only=True``, so a file that needs arbitrary unpickling is
    rejected rather than executed.

    Returns
    -------
    state : dict of str to Tensor
        The weights, with wrapper prefixes removed when every key shares them.
    meta : dict
        Scalar fields found next to the weights (``step``, ``epoch``, ...).

    Raises
    ------
    CheckpointError
        When the file cannot be loaded or holds no tensors.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot be loaded as a PyTorch checkpoint ({first_line})") from exc

    meta: dict[str, Any] = {}
    state = obj
    if isinstance(obj, dict):
        for key in NESTED_KEYS:
            if isinstance(obj.get(key), dict) and any(isinstance(v, torch.Tensor) for v in obj[key].values()):
                state = obj[key]
                break
        meta = {k: v for k, v in obj.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path}: holds no state_dict (expected a dict of tensors, or one nested under "
            f"{', '.join(NESTED_KEYS)})"
        )

    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return strip_wrapper_prefixes(state), meta


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove `module.` and `_orig_mod.` prefixes, repeatedly, while every key shares one."""
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                log.debug("stripped wrapper prefix %r", prefix)
                changed = True
    return state


def match_layout(state: dict[str, torch.Tensor], layout: Layout, *, path: Path, what: str = "parameters") -> np.ndarray:
    """Flatten `state` into `layout`, raising CheckpointError on missing keys or shapes.

    The error names the file and at most a few offending keys.
    """
    missing = [e.name for e in layout.entries if e.name not in state]
    wrong = [
        f"{e.name} {tuple(state[e.name].shape)} (model {e.shape})"
        for e in layout.entries
        if e.name in state and tuple(state[e.name].shape) != e.shape
    ]
    if missing or wrong:
        parts = []
        if missing:
            more = f" and {len(missing) - MAX_KEYS_IN_MESSAGE} more" if len(missing) > MAX_KEYS_IN_MESSAGE else ""
            parts.append(f"missing {what} {missing[:MAX_KEYS_IN_MESSAGE]}{more}")
        if wrong:
            more = f" and {len(wrong) - MAX_KEYS_IN_MESSAGE} more" if len(wrong) > MAX_KEYS_IN_MESSAGE else ""
            parts.append(f"shape mismatch {wrong[:MAX_KEYS_IN_MESSAGE]}{more}")
        raise CheckpointError(
            f"{path}: does not match the model in doodl3.toml ({'; '.join(parts)}); "
            "check that [model] builds the architecture that wrote this checkpoint"
        )
    return flatten(state, layout)


_NUMBER = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that orders embedded numbers numerically (`ckpt-10` after `ckpt-9`)."""
    return tuple(int(part) if part.isdigit() else part for part in _NUMBER.split(name))


def step_from_name(name: str) -> int | None:
    """Return the last number in a file name, or None when it has none."""
    numbers = _NUMBER.findall(Path(name).stem)
    return int(numbers[-1]) if numbers else None
