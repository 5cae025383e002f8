"""Directions that span a two-dimensional slice of parameter space."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from doodl3_cli.artifacts.trajectory import Layout
from doodl3_cli.errors import AnalysisError, ConfigError, UsageError

log = logging.getLogger(__name__)


@dataclass
class PlaneDirections:
    """Two orthonormal directions and what they explain.

    Attributes
    ----------
    directions : ndarray of shape (2, P), float64
        Orthonormal rows.
    explained_variance : ndarray of shape (2,), float64
        Fraction of the checkpoints' total variance along each direction.
    singular_values : ndarray of shape (2,), float64
    """

    directions: np.ndarray
    explained_variance: np.ndarray
    singular_values: np.ndarray


# PCA of fewer checkpoints has no second direction once the mean is removed.
MIN_PCA_CHECKPOINTS = 3


def pca_directions(
    checkpoints: list[np.ndarray], *, column_block: int | None = None, source: str = "trajectory.h5"
) -> PlaneDirections:
    """Compute the top two principal directions of all checkpoints jointly.

    The checkpoints of every trajectory are treated as one set, so every run lands
    in one shared plane. PCA is the standard mean-centred one, computed through the
    T x T Gram matrix in float64 and streamed over blocks of parameter columns.
    Neither a float64 copy of the T x P matrix nor a P x P matrix is formed, and
    the cost is O(T^2 P) time. Each direction's sign is fixed so that its entry of
    largest magnitude is positive, which makes the result reproducible.

    Parameters
    ----------
    checkpoints : list of ndarray of shape (T_i, P)
        Flattened parameters of each trajectory.
    column_block : int, optional
        Parameter columns per block (default: about 32 MiB of float64 per block).
    source : str, optional
        The file the checkpoints were read from, named in errors.

    Raises
    ------
    AnalysisError
        When fewer than 3 checkpoints are given or they span fewer than two dimensions.
    """
    total = sum(int(c.shape[0]) for c in checkpoints)
    if total < MIN_PCA_CHECKPOINTS:
        raise AnalysisError(
            f"{source}: PCA directions need at least {MIN_PCA_CHECKPOINTS} recorded checkpoints, found {total}; "
            "record more checkpoints, or sample with --directions random"
        )
    size = int(checkpoints[0].shape[1])
    block = int(column_block or max(1, (1 << 22) // total))

    def centred_columns(start: int) -> np.ndarray:
        columns = np.concatenate([np.asarray(c[:, start : start + block], dtype=np.float64) for c in checkpoints])
        return columns - columns.mean(axis=0, keepdims=True)

    gram = np.zeros((total, total))
    for start in range(0, size, block):
        columns = centred_columns(start)
        gram += columns @ columns.T
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues = np.clip(eigenvalues[order], 0.0, None)
    eigenvectors = eigenvectors[:, order]

    total_variance = float(eigenvalues.sum())
    if total_variance <= 0 or eigenvalues[1] <= total_variance * 1e-14:
        raise AnalysisError(
            f"{source}: the {total} recorded checkpoints span fewer than two dimensions, so no PCA plane exists; "
            "record checkpoints from more steps or more runs"
        )

    singular = np.sqrt(eigenvalues[:2])
    directions = np.empty((size, 2))
    for start in range(0, size, block):
        directions[start : start + block] = centred_columns(start).T @ eigenvectors[:, :2]
    directions /= np.linalg.norm(directions, axis=0, keepdims=True)
    for k in range(2):
        if directions[np.argmax(np.abs(directions[:, k])), k] < 0:
            directions[:, k] *= -1
    return PlaneDirections(directions.T.copy(), eigenvalues[:2] / total_variance, singular)


def project(points: np.ndarray, center: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project points onto the plane through `center` spanned by two directions.

    The coordinates are the least-squares solution of ``offset = coords @ directions``,
    so they are exact for directions that are not orthogonal or not of unit norm
    (random, axes, file), and equal to plain dot products for orthonormal ones.

    Parameters
    ----------
    points : ndarray of shape (T, P)
    center : ndarray of shape (P,)
    directions : ndarray of shape (2, P), linearly independent rows

    Returns
    -------
    coords : ndarray of shape (T, 2), float64
        (alpha, beta) of each point.
    residual : ndarray of shape (T,), float64
        Euclidean distance of each point from the plane.
    """
    directions = np.asarray(directions, dtype=np.float64)
    offsets = np.asarray(points, dtype=np.float64) - np.asarray(center, dtype=np.float64)
    gram = directions @ directions.T
    coords = np.linalg.solve(gram, directions @ offsets.T).T
    in_plane = coords @ directions
    residual = np.linalg.norm(offsets - in_plane, axis=1)
    return coords, residual


BIAS_RULES = ("zero", "scale")


def filter_normalise(direction: np.ndarray, center: np.ndarray, layout: Layout, *, bias: str = "zero") -> np.ndarray:
    """Scale a direction filter by filter to the norms of the center (Li et al., 2018).

    For every tensor with two or more dimensions, each filter (the slice along the
    first, output-channel dimension) of the direction is scaled to the Euclidean
    norm of the same filter at the center. Tensors with fewer dimensions (biases,
    normalisation affine parameters) are set to zero when `bias` is ``zero`` or
    scaled as one whole vector to the center's norm when it is ``scale``. A filter
    whose direction or center is all zeros becomes zero.

    Parameters
    ----------
    direction, center : ndarray of shape (P,)
    layout : Layout
        The flattening of the parameters.
    bias : {"zero", "scale"}

    Returns
    -------
    ndarray of shape (P,), float64

    Raises
    ------
    ConfigError
        When `bias` is not a known rule.
    """
    if bias not in BIAS_RULES:
        raise ConfigError(f"--bias {bias!r}: invalid rule; use one of {', '.join(BIAS_RULES)}")
    direction = np.asarray(direction, dtype=np.float64)
    center = np.asarray(center, dtype=np.float64)
    out = np.zeros_like(direction)

    for entry in layout.entries:
        part = slice(entry.offset, entry.offset + entry.numel)
        if len(entry.shape) >= 2:
            rows = (entry.shape[0], -1)
            d = direction[part].reshape(rows)
            c = center[part].reshape(rows)
            out[part] = (d * _ratio(np.linalg.norm(c, axis=1), np.linalg.norm(d, axis=1))[:, None]).reshape(-1)
        elif bias == "scale":
            d = direction[part]
            out[part] = d * _ratio(np.linalg.norm(center[part]), np.linalg.norm(d))
    return out


def _ratio(numerator, denominator):
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, numerator / safe, 0.0)


def random_directions(center: np.ndarray, layout: Layout, *, seed: int, bias: str = "zero") -> np.ndarray:
    """Draw two Gaussian directions and filter-normalise them to the center.

    The draws come from ``numpy.random.default_rng(seed)`` in float64, so the same
    seed and layout always give the same directions. The directions are not
    orthogonalised: in high dimensions they are nearly orthogonal already, and
    orthogonalising would undo the filter normalisation.

    Parameters
    ----------
    center : ndarray of shape (P,)
    layout : Layout
    seed : int
    bias : {"zero", "scale"}
        Rule for tensors with fewer than two dimensions; see `filter_normalise`.

    Returns
    -------
    ndarray of shape (2, P), float64

    Raises
    ------
    AnalysisError
        When the model has no tensor with two or more dimensions and `bias` is ``zero``.
    """
    rng = np.random.default_rng(seed)
    raw = rng.standard_normal((2, layout.size))
    directions = np.stack([filter_normalise(raw[k], center, layout, bias=bias) for k in range(2)])
    if not np.any(directions[0]) or not np.any(directions[1]):
        raise AnalysisError(
            "random directions are all zero: the model has no weight with two or more dimensions "
            "(or the center's weights are zero); use --bias scale"
        )
    return directions


def endpoint_directions(endpoints: np.ndarray, *, random_direction: np.ndarray | None = None) -> np.ndarray:
    """Span the plane through the final states of three runs (or two runs and a direction).

    The first direction is the unit vector from endpoint 0 to endpoint 1. The
    second is the component of (endpoint 2 - endpoint 0), or of `random_direction`
    when only two endpoints are given, orthogonal to the first, scaled to unit norm.
    With the center at endpoint 0, every endpoint lies in the plane.

    Parameters
    ----------
    endpoints : ndarray of shape (2, P) or (3, P)
    random_direction : ndarray of shape (P,), optional
        Required with two endpoints.

    Returns
    -------
    ndarray of shape (2, P), float64, orthonormal rows

    Raises
    ------
    AnalysisError
        When the endpoints coincide or are collinear.
    """
    endpoints = np.asarray(endpoints, dtype=np.float64)
    first = endpoints[1] - endpoints[0]
    length = np.linalg.norm(first)
    if length == 0:
        raise AnalysisError("the first two endpoint runs end at the same parameters, so they span no direction; choose other --runs")
    first /= length

    if endpoints.shape[0] >= 3:
        second = endpoints[2] - endpoints[0]
    elif random_direction is not None:
        second = np.asarray(random_direction, dtype=np.float64).copy()
    else:
        raise AnalysisError("endpoint directions need three runs, or two runs and a random direction")
    second -= (second @ first) * first
    width = np.linalg.norm(second)
    if width <= 1e-12 * max(np.linalg.norm(endpoints[-1] - endpoints[0]), 1e-300):
        raise AnalysisError("the endpoint runs end on one line, so they span no plane; choose other --runs")
    return np.stack([first, second / width])


def hessian_directions(
    loss_of: Callable[[torch.Tensor], torch.Tensor], center: np.ndarray, *, tolerance: float = 1e-6, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Compute the two largest eigenvalues and eigenvectors of the loss Hessian at the center.

    Hessian-vector products come from ``torch.func`` (forward-over-reverse:
    ``jvp`` of ``grad``) in float64; scipy's ``eigsh`` (ARPACK's implicitly
    restarted Lanczos method) finds the two algebraically largest eigenpairs
    from a seeded start vector.

    Parameters
    ----------
    loss_of : callable
        Maps a float64 parameter vector of shape (P,) to the scalar mean loss.
    center : ndarray of shape (P,)
    tolerance : float
        Relative accuracy of the eigenvalues requested from ARPACK.
    seed : int
        Seed of the Lanczos start vector.

    Returns
    -------
    eigenvalues : ndarray of shape (2,), float64, in decreasing order
    directions : ndarray of shape (2, P), float64, orthonormal eigenvectors with
        their entry of largest magnitude positive

    Raises
    ------
    AnalysisError
        When the model has fewer than three parameters or Lanczos does not converge.
    """
    size = int(np.asarray(center).shape[0])
    if size < 3:
        raise AnalysisError(f"Hessian directions need a model with at least 3 parameters, it has {size}; use --directions axes")
    point = torch.as_tensor(np.asarray(center, dtype=np.float64))
    gradient = torch.func.grad(loss_of)

    def hvp(vector: np.ndarray) -> np.ndarray:
        tangent = torch.as_tensor(np.asarray(vector, dtype=np.float64).reshape(-1))
        _, product = torch.func.jvp(gradient, (point,), (tangent,))
        return product.detach().numpy()

    operator = LinearOperator((size, size), matvec=hvp, dtype=np.float64)
    start = np.random.default_rng(seed).standard_normal(size)
    try:
        eigenvalues, eigenvectors = eigsh(operator, k=2, which="LA", tol=tolerance, v0=start)
    except ArpackNoConvergence as exc:
        raise AnalysisError(f"Lanczos iteration for the Hessian directions did not converge ({exc}); use --directions pca or random") from exc

    order = np.argsort(eigenvalues)[::-1]
    directions = eigenvectors[:, order].T.copy()
    for k in range(2):
        if directions[k, np.argmax(np.abs(directions[k]))] < 0:
            directions[k] *= -1
    return eigenvalues[order], directions


def parse_axis(spec: str, layout: Layout) -> int:
    """Turn ``name[i,j,...]`` (or ``name`` for a scalar tensor) into a flat parameter index.

    Raises
    ------
    UsageError
        When the tensor is not in the layout or the index is malformed or out of range.
    """
    name, bracket, rest = spec.partition("[")
    entries = {e.name: e for e in layout.entries}
    if name not in entries:
        shown = ", ".join(list(entries)[:6])
        raise UsageError(f"--axes {spec!r}: parameter '{name}' not found; the model has {shown}, ...")
    entry = entries[name]
    if not bracket:
        index: tuple[int, ...] = ()
    else:
        if not rest.endswith("]"):
            raise UsageError(f"--axes {spec!r}: expected NAME[i,j,...], e.g. {name}[{','.join('0' * len(entry.shape))}]")
        try:
            index = tuple(int(part) for part in rest[:-1].split(",") if part.strip())
        except ValueError as exc:
            raise UsageError(f"--axes {spec!r}: indices must be integers") from exc
    if len(index) != len(entry.shape) or any(not 0 <= i < s for i, s in zip(index, entry.shape)):
        raise UsageError(f"--axes {spec!r}: {name} has shape {list(entry.shape)}; give one in-range index per dimension")
    return entry.offset + (int(np.ravel_multi_index(index, entry.shape)) if index else 0)


def axis_name(index: int, layout: Layout) -> str:
    """Return ``name[i,j,...]`` for a flat parameter index; the inverse of `parse_axis`."""
    for entry in layout.entries:
        if entry.offset <= index < entry.offset + entry.numel:
            if not entry.shape:
                return entry.name
            position = np.unravel_index(index - entry.offset, entry.shape)
            return f"{entry.name}[{','.join(str(int(i)) for i in position)}]"
    raise ConfigError(f"parameter index {index} is outside the layout of {layout.size} parameters")


def axis_directions(layout: Layout, *, axes: tuple[str, str] | None = None, finals: np.ndarray | None = None) -> tuple[np.ndarray, list[int]]:
    """Span the plane of two coordinate axes of parameter space.

    Parameters
    ----------
    layout : Layout
    axes : pair of str, optional
        Named axes such as ``0.weight[3,7]``.
    finals : ndarray of shape (R, P), optional
        Final states of R >= 2 runs; used when `axes` is None to choose the two
        scalar parameters with the largest standard deviation across runs.

    Returns
    -------
    directions : ndarray of shape (2, P), float64, unit basis vectors
    indices : list of two int, the flat parameter indices

    Raises
    ------
    UsageError
        When the axes are malformed or identical.
    AnalysisError
        When no axes are given and fewer than two runs are recorded.
    """
    if axes is not None:
        indices = [parse_axis(spec, layout) for spec in axes]
        if indices[0] == indices[1]:
            raise UsageError(f"--axes {','.join(axes)}: the two axes are the same parameter; name two different ones")
    else:
        if finals is None or finals.shape[0] < 2:
            raise AnalysisError("choosing axes by spread needs at least two recorded runs; name them with --axes NAME[i],NAME[j]")
        spread = np.asarray(finals, dtype=np.float64).std(axis=0)
        indices = [int(i) for i in np.argsort(spread, kind="stable")[::-1][:2]]
    directions = np.zeros((2, layout.size))
    directions[0, indices[0]] = 1.0
    directions[1, indices[1]] = 1.0
    return directions, indices


def file_directions(path: Path, layout: Layout) -> np.ndarray:
    """Load two user-supplied directions from .npy (shape (2, P)) or .h5 (dataset ``directions``).

    Raises
    ------
    ConfigError
        When the file is missing, unreadable, or its directions do not match the
        layout, are not finite, are zero or are parallel.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--directions-file {path}: file not found")
    try:
        if path.suffix == ".npy":
            directions = np.load(path, allow_pickle=False)
        elif path.suffix in (".h5", ".hdf5"):
            with h5py.File(path, "r") as f:
                if "directions" not in f:
                    raise ConfigError(f"--directions-file {path}: no dataset 'directions' at the root; store a (2, P) array there")
                directions = f["directions"][()]
        else:
            raise ConfigError(f"--directions-file {path}: expected a .npy or .h5 file, got '{path.suffix}'")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--directions-file {path}: cannot be read ({exc})") from exc

    directions = np.asarray(directions, dtype=np.float64)
    if directions.shape != (2, layout.size):
        raise ConfigError(
            f"--directions-file {path}: expected shape (2, {layout.size}) to match the model's parameters, "
            f"got {directions.shape}"
        )
    if not np.isfinite(directions).all():
        raise ConfigError(f"--directions-file {path}: contains NaN or infinite values")
    norms = np.linalg.norm(directions, axis=1)
    if (norms == 0).any():
        raise ConfigError(f"--directions-file {path}: direction {int(np.argmin(norms))} is all zeros")
    cosine = abs(directions[0] @ directions[1]) / (norms[0] * norms[1])
    if cosine > 1 - 1e-9:
        raise ConfigError(f"--directions-file {path}: the two directions are parallel (|cos| = {cosine:.12f}), so they span no plane")
    return directions


def file_digest(path: Path) -> str:
    """Return the SHA-256 hex digest of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
