import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from doodl3_cli import zoo
from doodl3_cli.checkpoints import flatten_model, model_layouts
from doodl3_cli.errors import ConfigError
from doodl3_cli.evaluate import EvaluationSetup, Evaluator, materialise_data, resolve_device


def _setup(model: nn.Module, batch_size: int = 500) -> EvaluationSetup:
    inputs, targets = zoo.digits("all")
    return EvaluationSetup(model.eval(), inputs, targets, F.cross_entropy, batch_size, torch.device("cpu"))


def _reference(model: nn.Module, vector: np.ndarray, layout, inputs, targets):
    with torch.no_grad():
        for entry in layout.entries:
            param = model.get_parameter(entry.name)
            param.copy_(torch.as_tensor(vector[entry.offset : entry.offset + entry.numel]).reshape(entry.shape))
        out = model(inputs).double()
        return F.cross_entropy(out, targets).item(), (out.argmax(1) == targets).double().mean().item()


def test_evaluator_matches_plain_forward():
    torch.manual_seed(0)
    model = zoo.mlp(64, [16], 10)
    layout, buffer_layout = model_layouts(model)
    base, buffers = flatten_model(model, layout, buffer_layout)
    rng = np.random.default_rng(0)
    points = base[None, :] + 0.3 * rng.standard_normal((7, layout.size)).astype(np.float32)
    setup = _setup(model)

    result = Evaluator(setup, layout, buffer_layout, buffers, points_per_pass=3).evaluate(points)

    reference_model = zoo.mlp(64, [16], 10)
    for k in range(points.shape[0]):
        loss, accuracy = _reference(reference_model, points[k], layout, setup.inputs, setup.targets)
        assert result["loss"][k] == pytest.approx(loss, rel=1e-5)
        assert result["accuracy"][k] == pytest.approx(accuracy, abs=1e-12)


class _DataDependent(nn.Module):
    """A model whose Python branch on tensor values cannot run under vmap."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        if self.linear.weight.sum() > 1e9:
            return x[:, :10]
        return self.linear(x)


def test_evaluator_falls_back_to_loop():
    torch.manual_seed(0)
    model = _DataDependent()
    layout, buffer_layout = model_layouts(model)
    base, buffers = flatten_model(model, layout, buffer_layout)
    points = np.stack([base, base * 0.5])
    setup = _setup(model)

    result = Evaluator(setup, layout, buffer_layout, buffers).evaluate(points)

    loss, _ = _reference(_DataDependent(), points[1], layout, setup.inputs, setup.targets)
    assert result["loss"][1] == pytest.approx(loss, rel=1e-5)


def test_evaluator_batch_size_does_not_change_loss():
    torch.manual_seed(3)
    model = zoo.mlp(64, [8], 10)
    layout, buffer_layout = model_layouts(model)
    base, buffers = flatten_model(model, layout, buffer_layout)

    whole = Evaluator(_setup(model, 5000), layout, buffer_layout, buffers).evaluate(base[None])
    pieces = Evaluator(_setup(model, 97), layout, buffer_layout, buffers).evaluate(base[None])

    assert pieces["loss"][0] == pytest.approx(whole["loss"][0], rel=1e-6)


def test_analytic_surface_loss_is_the_function():
    model = zoo.AnalyticSurface("himmelblau")
    layout, buffer_layout = model_layouts(model)
    setup = EvaluationSetup(model, *zoo.placeholder_inputs(3), zoo.mean_output, 16, torch.device("cpu"))
    points = np.array([[3.0, 2.0], [0.0, 0.0], [1.0, -1.0]], dtype=np.float32)

    result = Evaluator(setup, layout, buffer_layout, np.empty(0)).evaluate(points)

    np.testing.assert_allclose(result["loss"], [0.0, 170.0, 146.0], rtol=1e-6)
    assert "accuracy" not in result


def test_materialise_map_style_dataset():
    dataset = [(torch.ones(3) * i, torch.tensor(i)) for i in range(4)]

    inputs, targets = materialise_data(dataset, source="test")

    assert inputs.shape == (4, 3)
    assert targets.tolist() == [0, 1, 2, 3]


def test_materialise_rejects_mismatched_lengths():
    with pytest.raises(ConfigError, match="same non-zero length"):
        materialise_data((torch.zeros(3, 2), torch.zeros(2)), source="[data] in doodl3.toml")


def test_resolve_device_rejects_unknown():
    with pytest.raises(ConfigError, match="--device"):
        resolve_device("tpu")
