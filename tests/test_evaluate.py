import copy
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from doodl3_cli import zoo
from doodl3_cli.checkpoints import flatten_model, model_layouts
from doodl3_cli.errors import ConfigError, UsageError
from doodl3_cli.evaluate import (
    MIN_GROUPS, EvaluationSetup, Evaluator, batch_stderr, materialise_data, plain_cross_entropy, resolve_device,
    sample_cross_entropy,
)


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
    with pytest.raises(UsageError, match="--device"):
        resolve_device("tpu")


def _float64_losses(model: nn.Module, vector: np.ndarray, layout, inputs, targets, groups: int) -> np.ndarray:
    """Per-group mean losses of the model at `vector`, computed in float64 with a plain forward."""
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        for entry in layout.entries:
            reference.get_parameter(entry.name).copy_(
                torch.as_tensor(vector[entry.offset : entry.offset + entry.numel], dtype=torch.float64).reshape(entry.shape)
            )
        out = reference(inputs.double())
    size = -(-inputs.shape[0] // groups)
    return np.array([
        F.cross_entropy(out[start : start + size], targets[start : start + size]).item()
        for start in range(0, inputs.shape[0], size)
    ]), np.array([min(size, inputs.shape[0] - start) for start in range(0, inputs.shape[0], size)])


def test_evaluate_plane_matches_float64_reference():
    torch.manual_seed(1)
    model = zoo.mlp(64, [32, 16], 10)
    layout, buffer_layout = model_layouts(model)
    center, buffers = flatten_model(model, layout, buffer_layout)
    rng = np.random.default_rng(1)
    directions = 0.05 * rng.standard_normal((2, layout.size))
    coefficients = rng.uniform(-1, 1, size=(9, 2))
    setup = _setup(model)
    evaluator = Evaluator(setup, layout, buffer_layout, buffers, points_per_pass=4)

    plane = evaluator.evaluate_plane(center, directions, coefficients)
    direct = evaluator.evaluate((center[None] + coefficients @ directions).astype(np.float32))

    assert evaluator._first_linear() == "0"
    np.testing.assert_allclose(plane["loss"], direct["loss"], rtol=2e-6)
    np.testing.assert_array_equal(plane["accuracy"], direct["accuracy"])
    for k in range(coefficients.shape[0]):
        point = (center + coefficients[k] @ directions).astype(np.float32).astype(np.float64)
        losses, sizes = _float64_losses(model, point, layout, setup.inputs, setup.targets, MIN_GROUPS)
        assert plane["loss"][k] == pytest.approx(np.sum(losses * sizes) / sizes.sum(), rel=2e-6)


def test_loss_stderr_from_group_losses():
    torch.manual_seed(2)
    model = zoo.mlp(64, [16], 10)
    layout, buffer_layout = model_layouts(model)
    center, buffers = flatten_model(model, layout, buffer_layout)
    setup = _setup(model, batch_size=5000)

    result = Evaluator(setup, layout, buffer_layout, buffers).evaluate(center[None])

    losses, sizes = _float64_losses(model, center.astype(np.float64), layout, setup.inputs, setup.targets, MIN_GROUPS)
    weights = sizes / sizes.sum()
    mean = np.sum(weights * losses)
    expected = np.sqrt(len(losses) / (len(losses) - 1) * np.sum(weights**2 * (losses - mean) ** 2))
    assert len(losses) == MIN_GROUPS
    assert result["loss_stderr"][0] == pytest.approx(expected, rel=1e-5)
    assert 0 < result["loss_stderr"][0] < result["loss"][0]


def test_batch_stderr_single_batch_is_nan():
    value = batch_stderr(torch.ones((3, 1), dtype=torch.float64), torch.ones(1, dtype=torch.float64))

    assert torch.isnan(value).all()


def _batchnorm_model() -> nn.Module:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    model.train()
    with torch.no_grad():
        inputs, _ = zoo.digits("all")
        for start in range(0, 1797, 300):
            model(inputs[start : start + 300])
    return model.eval()


def test_batchnorm_fixed_uses_center_statistics():
    model = _batchnorm_model()
    layout, buffer_layout = model_layouts(model)
    center, buffers = flatten_model(model, layout, buffer_layout)
    setup = _setup(model)

    result = Evaluator(setup, layout, buffer_layout, buffers).evaluate(center[None])

    with torch.no_grad():
        expected = F.cross_entropy(model(setup.inputs).double(), setup.targets).item()
    assert result["loss"][0] == pytest.approx(expected, rel=1e-6)


def test_batchnorm_recompute_matches_reestimated_model():
    model = _batchnorm_model()
    layout, buffer_layout = model_layouts(model)
    center, buffers = flatten_model(model, layout, buffer_layout)
    before = {name: value.clone() for name, value in model.named_buffers()}
    setup = _setup(model)
    point = center + 0.2 * np.random.default_rng(3).standard_normal(layout.size).astype(np.float32)
    evaluator = Evaluator(setup, layout, buffer_layout, buffers, batchnorm="recompute", recompute_samples=300, seed=5)

    result = evaluator.evaluate(np.stack([center, point]))

    subset = torch.randperm(1797, generator=torch.Generator().manual_seed(5))[:300].sort().values
    for k, vector in enumerate((center, point)):
        reference = copy.deepcopy(model)
        with torch.no_grad():
            for entry in layout.entries:
                reference.get_parameter(entry.name).copy_(
                    torch.as_tensor(vector[entry.offset : entry.offset + entry.numel]).reshape(entry.shape)
                )
            reference[1].reset_running_stats()
            reference[1].momentum = None
            reference.train()
            reference(setup.inputs[subset])
            reference.eval()
            expected = F.cross_entropy(reference(setup.inputs).double(), setup.targets).item()
        assert result["loss"][k] == pytest.approx(expected, rel=1e-5)
    for name, value in model.named_buffers():
        assert torch.equal(value, before[name]), name
    assert model[1].momentum == 0.1
    assert not model[1].training
    assert evaluator.recompute_samples == 300


def test_batchnorm_policies_differ_away_from_center():
    model = _batchnorm_model()
    layout, buffer_layout = model_layouts(model)
    center, buffers = flatten_model(model, layout, buffer_layout)
    point = center + 0.3 * np.random.default_rng(8).standard_normal(layout.size).astype(np.float32)
    setup = _setup(model)

    fixed = Evaluator(setup, layout, buffer_layout, buffers).evaluate(point[None])
    recomputed = Evaluator(setup, layout, buffer_layout, buffers, batchnorm="recompute").evaluate(point[None])

    assert abs(fixed["loss"][0] - recomputed["loss"][0]) > 1e-3


def test_evaluator_rejects_unknown_batchnorm_policy():
    model = zoo.mlp(64, [8], 10)
    layout, buffer_layout = model_layouts(model)

    with pytest.raises(ConfigError, match="--batchnorm 'train'"):
        Evaluator(_setup(model), layout, buffer_layout, np.empty(0), batchnorm="train")


def test_loss_function_matches_evaluate():
    torch.manual_seed(6)
    model = zoo.mlp(64, [8], 10)
    layout, buffer_layout = model_layouts(model)
    center, buffers = flatten_model(model, layout, buffer_layout)
    evaluator = Evaluator(_setup(model), layout, buffer_layout, buffers)

    value = evaluator.loss_function()(torch.as_tensor(center, dtype=torch.float64)).item()

    assert value == pytest.approx(evaluator.evaluate(center[None])["loss"][0], rel=1e-6)


def test_convolutional_model_matches_plain_forward():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)).eval()
    layout, buffer_layout = model_layouts(model)
    base, buffers = flatten_model(model, layout, buffer_layout)
    points = np.stack([base, base * 0.7])
    setup = _setup(model)

    result = Evaluator(setup, layout, buffer_layout, buffers, points_per_pass=2).evaluate(points)

    reference_model = copy.deepcopy(model)
    for k in range(2):
        loss, accuracy = _reference(reference_model, points[k], layout, setup.inputs, setup.targets)
        assert result["loss"][k] == pytest.approx(loss, rel=1e-5)
        assert result["accuracy"][k] == pytest.approx(accuracy, abs=1e-12)


def test_sample_cross_entropy_matches_torch_in_both_layouts():
    torch.manual_seed(3)
    logits = 4 * torch.randn(5, 10, 300)
    targets = torch.randint(0, 10, (300,))
    expected = F.cross_entropy(logits.transpose(1, 2).reshape(-1, 10), targets.repeat(5), reduction="none").reshape(5, 300)

    for outputs in (logits.transpose(1, 2), logits.transpose(1, 2).contiguous()):
        losses, predicted = sample_cross_entropy(outputs, targets)
        torch.testing.assert_close(losses, expected)
        torch.testing.assert_close(predicted, outputs.argmax(dim=-1))


@pytest.mark.parametrize(("loss_fn", "plain"), [
    (F.cross_entropy, True),
    (functools.partial(F.cross_entropy), True),
    (nn.CrossEntropyLoss(), True),
    (functools.partial(F.cross_entropy, label_smoothing=0.1), False),
    (nn.CrossEntropyLoss(weight=torch.ones(10)), False),
    (nn.CrossEntropyLoss(reduction="sum"), False),
    (F.nll_loss, False),
])
def test_plain_cross_entropy_recognises_only_default_options(loss_fn, plain):
    assert plain_cross_entropy(loss_fn) is plain


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, functools.partial(F.cross_entropy, label_smoothing=0.2)])
def test_plane_tanh_stack_any_loss(loss_fn):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 24), nn.Tanh(), nn.Dropout(0.5), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    layout, buffer_layout = model_layouts(model)
    center, buffers = flatten_model(model, layout, buffer_layout)
    rng = np.random.default_rng(4)
    directions = 0.1 * rng.standard_normal((2, layout.size))
    coefficients = rng.uniform(-1, 1, size=(7, 2))
    inputs, targets = zoo.digits("all")
    setup = EvaluationSetup(model, inputs, targets, loss_fn, 700, torch.device("cpu"))

    plane = Evaluator(setup, layout, buffer_layout, buffers, points_per_pass=3).evaluate_plane(center, directions, coefficients)

    reference = copy.deepcopy(model).double()
    for k in range(coefficients.shape[0]):
        point = torch.as_tensor((center + coefficients[k] @ directions).astype(np.float32), dtype=torch.float64)
        torch.nn.utils.vector_to_parameters(point, reference.parameters())
        with torch.no_grad():
            out = reference(inputs.double())
        assert plane["loss"][k] == pytest.approx(loss_fn(out, targets).item(), rel=2e-6)
        assert plane["accuracy"][k] == (out.argmax(1) == targets).double().mean().item()


def test_accuracy_counts_the_first_of_tied_maxima():
    model = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    layout, buffer_layout = model_layouts(model)
    center, buffers = flatten_model(model, layout, buffer_layout)
    setup = _setup(model)

    plane = Evaluator(setup, layout, buffer_layout, buffers).evaluate_plane(center, np.zeros((2, layout.size)), np.zeros((1, 2)))

    assert plane["accuracy"][0] == pytest.approx((setup.targets == 0).double().mean().item())
    assert plane["loss"][0] == pytest.approx(np.log(10), rel=1e-6)
