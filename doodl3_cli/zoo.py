"""Models, datasets and losses bundled for the demo and the tests.

The datasets are scikit-learn's bundled copies (digits, iris, wine, breast cancer),
so nothing is downloaded. Every data factory returns ``(inputs, targets)`` tensors:
inputs float32 ``[N, features]``, targets int64 ``[N]``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

SPLITS = ("train", "test", "all")


def mlp(in_features: int = 64, hidden: Sequence[int] = (64, 32), classes: int = 10) -> nn.Sequential:
    """Build a ReLU multilayer perceptron.

    Parameters
    ----------
    in_features : int
        Input dimension.
    hidden : sequence of int
        Width of each hidden layer.
    classes : int
        Number of output logits.
    """
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, int(size)), nn.ReLU()]
        width = int(size)
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def _split(inputs: np.ndarray, targets: np.ndarray, split: str, test_fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    if split == "all":
        chosen = (inputs, targets)
    elif split in ("train", "test"):
        x_train, x_test, y_train, y_test = train_test_split(
            inputs, targets, test_size=test_fraction, random_state=seed, stratify=targets
        )
        chosen = (x_train, y_train) if split == "train" else (x_test, y_test)
    else:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    x, y = chosen
    return torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)


def digits(split: str = "train", test_fraction: float = 0.25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return scikit-learn's bundled 8x8 digits: 1,797 images, 64 pixels scaled to [0, 1], 10 classes.

    Parameters
    ----------
    split : {"train", "test", "all"}
        Stratified split with `test_fraction` of the samples held out, or all of them.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    return _split(data.data / 16.0, data.target, split, test_fraction, seed)


def _standardised(loader, split: str, test_fraction: float, seed: int):
    data = loader()
    x = (data.data - data.data.mean(axis=0)) / data.data.std(axis=0)
    return _split(x, data.target, split, test_fraction, seed)


def iris(split: str = "train", test_fraction: float = 0.25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return scikit-learn's bundled iris data (150 samples, 4 standardised features, 3 classes)."""
    from sklearn.datasets import load_iris

    return _standardised(load_iris, split, test_fraction, seed)


def wine(split: str = "train", test_fraction: float = 0.25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return scikit-learn's bundled wine data (178 samples, 13 standardised features, 3 classes)."""
    from sklearn.datasets import load_wine

    return _standardised(load_wine, split, test_fraction, seed)


def breast_cancer(split: str = "train", test_fraction: float = 0.25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return scikit-learn's bundled breast cancer data (569 samples, 30 standardised features, 2 classes)."""
    from sklearn.datasets import load_breast_cancer

    return _standardised(load_breast_cancer, split, test_fraction, seed)


def himmelblau_value(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Himmelblau's function (x^2 + y - 11)^2 + (x + y^2 - 7)^2: four minima of value 0."""
    return (x * x + y - 11.0) ** 2 + (x + y * y - 7.0) ** 2


def double_well_value(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Double well (x^2 - 1)^2 + y^2: minima at (+-1, 0), a saddle at the origin."""
    return (x * x - 1.0) ** 2 + y * y


def ring_value(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Ring-shaped valley (x^2 + y^2 - 1)^2: minima of value 0 on the unit circle, a maximum of 1 at the origin."""
    return (x * x + y * y - 1.0) ** 2


SURFACES = {"himmelblau": himmelblau_value, "double_well": double_well_value, "ring": ring_value}


class AnalyticSurface(nn.Module):
    """A two-parameter model whose loss is a known function of its parameters.

    The single parameter `position` (shape [2]) is the point (x, y); `forward`
    returns the function value once per input row, so with `mean_output` as the loss
    the loss landscape is exactly the analytic surface.

    Parameters
    ----------
    surface : {"himmelblau", "double_well", "ring"}
    start : sequence of two floats
        Initial position.
    """

    def __init__(self, surface: str = "himmelblau", start: Sequence[float] = (0.0, 0.0)):
        super().__init__()
        if surface not in SURFACES:
            raise ValueError(f"surface must be one of {', '.join(SURFACES)}, got {surface!r}")
        self.surface = surface
        self.position = nn.Parameter(torch.tensor([float(v) for v in start], dtype=torch.float32))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        value = SURFACES[self.surface](self.position[0], self.position[1])
        return value.expand(inputs.shape[0])


def analytic_surface(surface: str = "himmelblau") -> AnalyticSurface:
    """Build an `AnalyticSurface` (factory for doodl3.toml)."""
    return AnalyticSurface(surface)


def placeholder_inputs(count: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `count` zero inputs and targets, for models whose output ignores its input."""
    return torch.zeros(count, 1), torch.zeros(count, dtype=torch.int64)


def mean_output(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Loss that is the mean of the model's outputs (pairs with `AnalyticSurface`)."""
    return outputs.mean()
