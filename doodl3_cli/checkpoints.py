"""Loading PyTorch checkpoints and flattening models into the trajectory layout."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from doodl3_cli.artifacts.trajectory import Layout
from doodl3_cli.errors import CheckpointError

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
# Files that hold a whole model's weights inside a checkpoint folder (Hugging Face layout).
FOLDER_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TRAINER_STATE = "trainer_state.json"
LIGHTNING_VERSION_KEY = "pytorch-lightning_version"
HPARAM_KEYS = ("hyper_parameters", "hparams")
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
STEP_KEYS = ("global_step", "step", "iteration")
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
MAX_KEYS_IN_MESSAGE = 5
_REJECTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


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


def checkpoint_digest(path: Path) -> str:
    """Return the sha256 hex digest of a checkpoint file, or of the weight files of a checkpoint folder.

    A folder's digest covers the relative name and digest of each file that `load_checkpoint`
    reads (the weights, the shard index and trainer_state.json), not optimizer state.
    """
    if not path.is_dir():
        return file_digest(path)
    h = hashlib.sha256()
    for member in sorted(_folder_members(path)):
        if not member.is_file():
            raise CheckpointError(f"{member}: missing from checkpoint folder {path}; the checkpoint is incomplete")
        h.update(member.name.encode())
        h.update(file_digest(member).encode())
    return h.hexdigest()


def is_checkpoint_folder(path: Path) -> bool:
    """True when `path` is a folder holding one model's weights (a Hugging Face `checkpoint-N/`)."""
    return path.is_dir() and (
        any((path / name).is_file() for name in INDEX_FILES + FOLDER_WEIGHT_FILES)
        or len(list(path.glob("*.safetensors"))) == 1
    )


@dataclass
class Checkpoint:
    """The weights and training fields read from one checkpoint.

    Attributes
    ----------
    state : dict of str to Tensor
        The model's tensors, in the checkpoint's dtype, with wrapper prefixes removed.
    meta : dict of str to int or float
        Numeric training fields next to the weights (``global_step``, ``epoch``, ...).
    hparams : dict of str to int, float, str or bool
        Scalar hyper-parameters stored in the checkpoint (Lightning ``hyper_parameters``).
    stripped : str
        The prefix removed from every kept key ("" when none).
    dropped : list of str
        Keys of the weights that were not kept (Lightning metric states, other sub-modules).
    """

    state: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    stripped: str = ""
    dropped: list[str] = field(default_factory=list)

    @property
    def dtypes(self) -> list[str]:
        """Names of the floating-point dtypes in `state`, sorted, e.g. ``["bfloat16"]``."""
        return sorted({str(t.dtype).replace("torch.", "") for t in self.state.values() if t.is_floating_point()})


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint safely and return its (state_dict, numeric fields).

    A shorthand for `read_checkpoint` without a model layout; see there.
    """
    checkpoint = read_checkpoint(path)
    return checkpoint.state, checkpoint.meta


def read_checkpoint(
    path: Path, *, trust: bool = False, model_names: list[str] | None = None, mmap: bool = False
) -> Checkpoint:
    """Load one checkpoint of any supported format and find the model's weights in it.

    Formats: a PyTorch file (``.pt``, ``.pth``, ``.bin``) holding a state_dict or a dict
    that nests it under one of `NESTED_KEYS`; a PyTorch Lightning ``.ckpt``; a
    ``.safetensors`` file; a folder with ``model.safetensors``, ``pytorch_model.bin`` or
    a sharded index JSON and its shards, such as a Hugging Face Trainer ``checkpoint-N/``
    (its step and epoch come from ``trainer_state.json``).

    Parameters
    ----------
    path : Path
        The file or folder.
    trust : bool
        Allow arbitrary unpickling (``torch.load(weights_only=False)``). Only for files
        from a trusted source, because unpickling can run any code.
    model_names : list of str, optional
        Parameter and buffer names of the model. For a Lightning checkpoint the keys
        under the prefix that contains all of them are kept and the rest dropped; without
        names the prefix holding the most scalars is kept.
    mmap : bool
        Map PyTorch files into memory instead of reading them, for reading the
        training fields of a large file without holding its tensors.

    Raises
    ------
    CheckpointError
        When the file cannot be loaded, needs arbitrary unpickling without `trust`,
        or contains no tensors.
    """
    if path.is_dir():
        return _read_folder(path, trust=trust, model_names=model_names, mmap=mmap)
    if path.suffix == ".safetensors":
        state, meta = _read_safetensors(path)
        state, stripped = split_wrapper_prefixes(state)
        return Checkpoint(state=state, meta=meta, stripped=stripped)

    obj = _torch_load(path, trust=trust, mmap=mmap)
    return _from_torch_object(path, obj, model_names)


def read_training_fields(path: Path, *, trust: bool = False) -> dict[str, Any]:
    """Return the numeric training fields of a checkpoint without reading its tensors into memory."""
    if path.is_dir():
        return _trainer_state_fields(path)
    if path.suffix == ".safetensors":
        return _safetensors_metadata(path)
    return read_checkpoint(path, trust=trust, mmap=True).meta


def _torch_load(path: Path, *, trust: bool, mmap: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust, mmap=mmap)
    except pickle.UnpicklingError as exc:
        rejected = _REJECTED_GLOBAL.search(str(exc))
        if not trust and rejected:
            raise CheckpointError(
                f"{path}: loading needs arbitrary unpickling of the global '{rejected.group(1)}', which "
                "weights_only=True rejects; if you trust where this file came from, rerun with --trust-checkpoints"
            ) from exc
        raise _not_loadable(path, exc) from exc
    except RuntimeError as exc:
        # Files in the legacy (pre-zip) format cannot be memory-mapped.
        if mmap and "mmap" in str(exc):
            return _torch_load(path, trust=trust, mmap=False)
        raise _not_loadable(path, exc) from exc
    except Exception as exc:  # torch raises EOFError, zipfile errors, OSError, ...
        raise _not_loadable(path, exc) from exc


def _not_loadable(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path}: cannot be loaded as a PyTorch checkpoint ({_first_line(exc)}); the file may be truncated "
        "or not written by torch.save: move it out of the folder or replace it"
    )


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _first_line(exc: Exception) -> str:
    """Return the exception's type and the line of its message that names the cause.

    torch's weights_only errors open with advice about `weights_only`; the cause
    follows the words "WeightsUnpickler error:", so that line is taken when present.
    Terminal escape codes are removed.
    """
    text = _ANSI_ESCAPE.sub("", str(exc)).strip()
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].strip()
    first = text.splitlines()[0].strip() if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _from_torch_object(path: Path, obj: Any, model_names: list[str] | None) -> Checkpoint:
    meta: dict[str, Any] = {}
    hparams: dict[str, Any] = {}
    state = obj
    lightning = False
    if isinstance(obj, dict):
        lightning = LIGHTNING_VERSION_KEY in obj or (path.suffix == ".ckpt" and isinstance(obj.get("state_dict"), dict))
        for key in NESTED_KEYS:
            if isinstance(obj.get(key), dict) and any(isinstance(v, torch.Tensor) for v in obj[key].values()):
                state = obj[key]
                break
        meta = {k: v for k, v in obj.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        hparams = _scalar_hparams(obj)
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path}: contains no state_dict (expected a dict of tensors, or one nested under "
            f"{', '.join(NESTED_KEYS)})"
        )

    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not lightning:
        state, stripped = split_wrapper_prefixes(state)
        return Checkpoint(state=state, meta=meta, hparams=hparams, stripped=stripped)

    kept, prefix, dropped = select_submodule(state, model_names)
    unused = sorted(k for k in obj if k not in ("state_dict",) and not isinstance(obj[k], (int, float, str)))
    log.info(
        "%s: Lightning checkpoint: kept %d tensors under prefix %r, dropped %d other tensors %s and the "
        "entries %s", path, len(kept), prefix, len(dropped), dropped[:MAX_KEYS_IN_MESSAGE], unused,
    )
    kept, wrappers = split_wrapper_prefixes(kept)
    return Checkpoint(state=kept, meta=meta, hparams=hparams, stripped=prefix + wrappers, dropped=dropped)


def select_submodule(
    state: dict[str, torch.Tensor], model_names: list[str] | None
) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Keep the keys of `state` under the prefix that contains the model's weights.

    Returns the kept tensors with the prefix removed, the prefix and the dropped keys.
    With `model_names`, the prefix is the shortest one under which every name is
    present; without, or when none holds them all, it is the first dotted component
    whose tensors hold the most floating-point scalars (or "" when that is the
    whole checkpoint).
    """
    prefix = _prefix_holding(state, model_names) if model_names else None
    if prefix is None:
        sizes: dict[str, int] = {}
        for key, tensor in state.items():
            head = key.split(".", 1)[0] + "." if "." in key else ""
            sizes[head] = sizes.get(head, 0) + (tensor.numel() if tensor.is_floating_point() else 0)
        prefix = max(sizes, key=lambda p: (sizes[p], -len(p)))
        if len(sizes) == 1:
            prefix = ""
    kept = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    dropped = [k for k in state if not k.startswith(prefix)]
    return kept, prefix, dropped


def _prefix_holding(state: dict[str, torch.Tensor], names: list[str]) -> str | None:
    first = names[0]
    candidates = sorted({k[: len(k) - len(first)] for k in state if k == first or k.endswith("." + first)}, key=len)
    for prefix in candidates:
        if all(prefix + name in state for name in names):
            return prefix
    return None


def _scalar_hparams(obj: dict[str, Any]) -> dict[str, Any]:
    for key in HPARAM_KEYS:
        value = obj.get(key)
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, (int, float, str, bool))}
    return {}


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        state = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises SafetensorError, OSError, ...
        raise CheckpointError(f"{path}: cannot be loaded as safetensors ({_first_line(exc)})") from exc
    return state, _safetensors_metadata(path)


def _safetensors_metadata(path: Path) -> dict[str, Any]:
    """Return the numeric entries of a safetensors header's string metadata (``step``, ``epoch``)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises SafetensorError, OSError, ...
        raise CheckpointError(f"{path}: cannot be loaded as safetensors ({_first_line(exc)})") from exc
    fields = {}
    for key, text in metadata.items():
        try:
            number = float(text)
        except (TypeError, ValueError):
            continue
        fields[key] = int(number) if number.is_integer() and "." not in text else number
    return fields


def _folder_members(path: Path) -> list[Path]:
    """Return the files of a checkpoint folder that hold or describe the model's weights."""
    index = next((path / name for name in INDEX_FILES if (path / name).is_file()), None)
    if index is not None:
        members = [index] + [path / shard for shard in sorted(set(_weight_map(index).values()))]
    else:
        weights = next((path / name for name in FOLDER_WEIGHT_FILES if (path / name).is_file()), None)
        members = [weights] if weights is not None else sorted(path.glob("*.safetensors"))[:1]
    if (path / TRAINER_STATE).is_file():
        members.append(path / TRAINER_STATE)
    return members


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{index}: not a valid shard index (expected JSON with a 'weight_map' of tensor name to shard "
            f"file, {type(exc).__name__}: {exc}); rewrite it or remove it"
        ) from exc
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: 'weight_map' is a {type(weight_map).__name__}, expected an object")
    return weight_map


def _read_folder(path: Path, *, trust: bool, model_names: list[str] | None, mmap: bool) -> Checkpoint:
    members = [m for m in _folder_members(path) if m.name != TRAINER_STATE]
    if not members:
        raise CheckpointError(
            f"{path}: folder contains no model weights (expected {', '.join(FOLDER_WEIGHT_FILES + INDEX_FILES)} "
            "or one .safetensors file)"
        )
    index = members[0] if members[0].name in INDEX_FILES else None
    shards = members[1:] if index is not None else members

    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{shard}: shard named in {index} is missing; the checkpoint is incomplete")
        part = read_checkpoint(shard, trust=trust, model_names=model_names, mmap=mmap).state
        state.update(part)
    if index is not None:
        missing = sorted(set(_weight_map(index)) - set(state))
        if missing:
            raise CheckpointError(
                f"{index}: {len(missing)} tensors listed in the index are in none of its shards, e.g. "
                f"{missing[:MAX_KEYS_IN_MESSAGE]}; the checkpoint is incomplete"
            )
    state, stripped = split_wrapper_prefixes(state)
    return Checkpoint(state=state, meta=_trainer_state_fields(path), stripped=stripped)


def _trainer_state_fields(path: Path) -> dict[str, Any]:
    """Return ``global_step`` and ``epoch`` from a Hugging Face folder's trainer_state.json, if present."""
    state_file = path / TRAINER_STATE
    if not state_file.is_file():
        return {}
    try:
        trainer_state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{state_file}: not valid JSON ({exc}); the checkpoint may still be being written") from exc
    return {k: trainer_state[k] for k in ("global_step", "epoch") if isinstance(trainer_state.get(k), (int, float))}


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove `module.` and `_orig_mod.` prefixes, repeatedly, while every key shares one."""
    return split_wrapper_prefixes(state)[0]


def split_wrapper_prefixes(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Remove wrapper prefixes shared by every key; return the new state and what was removed.

    DataParallel and DistributedDataParallel add ``module.``, torch.compile adds
    ``_orig_mod.``, and wrapping one in the other stacks them in either order.
    """
    stripped = ""
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped += prefix
                changed = True
    return state, stripped


def tied_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Map each parameter that the model shares under several names to its other names.

    `model.named_parameters()` lists a tied parameter once, under its first name, so
    the layout counts it once; a checkpoint may store it under any of its names.
    """
    names_by_tensor: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_by_tensor.setdefault(id(parameter), []).append(name)
    return {names[0]: names[1:] for names in names_by_tensor.values() if len(names) > 1}


def shared_storage_aliases(state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Map the first name of each tensor stored under several names in `state` to its other names.

    ``torch.save`` keeps tied weights as one storage with several keys; this finds them
    so that a layout built from the checkpoint counts each once.
    """
    names_by_view: dict[tuple, list[str]] = {}
    for name, tensor in state.items():
        view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        names_by_view.setdefault(view, []).append(name)
    return {names[0]: names[1:] for names in names_by_view.values() if len(names) > 1}


def resolve_aliases(state: dict[str, torch.Tensor], aliases: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """Return `state` with each layout name that is absent filled in from one of its aliases."""
    resolved = dict(state)
    for name, others in aliases.items():
        if name not in resolved:
            present = next((alias for alias in others if alias in state), None)
            if present is not None:
                resolved[name] = state[present]
    return resolved


def match_layout(
    state: dict[str, torch.Tensor],
    layout: Layout,
    *,
    path: Path,
    what: str = "parameters",
    aliases: dict[str, list[str]] | None = None,
    reference: str = "the model in doodl3.toml",
    fix: str = "check that [model] builds the architecture that wrote this checkpoint",
) -> np.ndarray:
    """Flatten `state` into `layout`, raising CheckpointError on missing keys or shapes.

    Tensors of any floating-point dtype (float16, bfloat16, ...) are cast to float32.
    A layout name that is absent is looked up under its `aliases` (tied weights). The
    error names the file, at most a few offending keys, `reference` (where `layout`
    came from) and `fix` (what to do).

    Returns
    -------
    ndarray of shape (P,), float32
    """
    if aliases:
        state = resolve_aliases(state, aliases)
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
            f"{path}: does not match {reference} ({'; '.join(parts)}); {fix}"
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
