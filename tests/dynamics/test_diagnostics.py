"""Tests of the training flags and findings on real runs trained on the digits data."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from doodl3_cli import zoo
from doodl3_cli.artifacts.trajectory import Layout, read_all_trajectories, read_layouts
from doodl3_cli.demo import DemoOptions, train_ensemble
from doodl3_cli.dynamics.diagnostics import (
    find_divergence, find_loss_instability, find_oscillation, find_plateaus, segments,
)
from doodl3_cli.dynamics.ensemble import diagnose_ensemble, learning_rate
from doodl3_cli.dynamics.hessian import predicted_probabilities, top_hessian_eigenvalue
from doodl3_cli.dynamics.trajectories import update_diagnostics
from doodl3_cli.evaluate import build_setup
from doodl3_cli.record import Recorder
from doodl3_cli.runfolder import RunFolder

from tests.conftest import MLP_KWARGS


def train_run(run, name, *, lr, steps, init_scale=1.0, seed=0):
    """Train the conftest MLP by full-batch gradient descent on the digits train split, recording every step."""
    inputs, targets = zoo.digits(split="train")
    torch.manual_seed(seed)
    model = zoo.mlp(**MLP_KWARGS)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(init_scale)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with Recorder(run.path, model, trajectory=name, attrs={"learning_rate": lr}) as recorder:
        for step in range(steps + 1):
            loss = F.cross_entropy(model(inputs), targets)
            recorder.record(step, loss=loss.item(), lr=lr)
            if step == steps:
                return
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    """Diagnose three runs: lr 1.6 (above 2 / sharpness), lr 0.3, and lr 0.3 from a near-zero initialisation."""
    threads = torch.get_num_threads()
    # One thread fixes the order of the float32 reductions, so the trained runs do not depend on the thread count.
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("ensemble")
    run = RunFolder(path)
    (path / "doodl3.toml").write_text(
        "[model]\n"
        'factory = "doodl3_cli.zoo:mlp"\n'
        "kwargs = { in_features = 64, hidden = [8], classes = 10 }\n\n"
        "[data]\n"
        'factory = "doodl3_cli.zoo:digits"\n\n'
        "[loss]\n"
        'factory = "torch.nn.functional:cross_entropy"\n',
        encoding="utf-8",
    )
    train_run(run, "high-lr", lr=1.6, steps=40)
    train_run(run, "moderate-lr", lr=0.3, steps=40)
    train_run(run, "near-zero-init", lr=0.3, steps=40, init_scale=1e-3)

    trajectories = read_all_trajectories(run.trajectory)
    layout, _ = read_layouts(run.trajectory)
    setup = build_setup(run.load_config(), base=run.path)
    result = diagnose_ensemble(trajectories, layout, setup)
    torch.set_num_threads(threads)
    return result


def kinds_of(result, run):
    return {f.kind for f in result.findings if run in f.runs}


def test_high_learning_rate_flagged_oscillating(ensemble):
    oscillation = [f for f in ensemble.findings if f.kind == "oscillation" and f.runs == ["high-lr"]]

    assert oscillation
    assert all(f.evidence["mean_cosine"] < -0.5 for f in oscillation)
    assert all(f.evidence["checkpoints"] >= 3 for f in oscillation)
    assert "1.6" in oscillation[0].suggestion


def test_high_learning_rate_exceeds_stability_limit(ensemble):
    high = ensemble.trajectories[ensemble.runs.index("high-lr")]
    sharpness = [f for f in ensemble.findings if f.kind == "sharpness" and f.runs == ["high-lr"]]

    assert high.sharpness_step.tolist() == [0, 20, 40]
    assert high.sharpness[-1] > 2.0 / 1.6
    assert len(sharpness) == 1
    assert sharpness[0].evidence["stability_limit"] == pytest.approx(1.25)
    assert 40 in sharpness[0].steps


def test_moderate_learning_rate_not_flagged(ensemble):
    moderate = ensemble.trajectories[ensemble.runs.index("moderate-lr")]

    assert kinds_of(ensemble, "moderate-lr") == set()
    assert (moderate.sharpness < 2.0 / 0.3).all()


def test_near_zero_init_flagged_plateau(ensemble):
    plateaus = [f for f in ensemble.findings if f.kind == "plateau" and f.runs == ["near-zero-init"]]

    assert plateaus
    assert plateaus[0].steps[0] == 0
    assert plateaus[0].evidence["loss_end"] > 2.2
    assert plateaus[0].evidence["mean_efficiency"] < 0.05 * plateaus[0].evidence["reference_efficiency"]


def test_ensemble_measures(ensemble):
    n_samples = zoo.digits(split="train")[0].shape[0]

    assert ensemble.final_distance.shape == (3, 3)
    assert np.allclose(np.diag(ensemble.final_distance), 0.0)
    assert np.allclose(ensemble.final_distance, ensemble.final_distance.T)
    assert ensemble.disagreement.shape == (3, 3)
    assert np.allclose(np.diag(ensemble.disagreement), 0.0)
    assert ensemble.entropy.shape == (n_samples,)
    assert ((ensemble.entropy >= 0) & (ensemble.entropy <= np.log(10) + 1e-9)).all()


def test_segments_minimum_length():
    mask = np.array([True, True, False, True, True, True, False, True])

    assert segments(mask, 3) == [(3, 5)]
    assert segments(mask, 1) == [(0, 1), (3, 5), (7, 7)]


def test_oscillation_on_alternating_path():
    # A path that zig-zags across a valley: the updates alternate between (0.1, -1) and (0.1, 1).
    params = np.cumsum([[0.0, 0.0]] + [[0.1, 1.0 if t % 2 else -1.0] for t in range(10)], axis=0)
    diagnostics = update_diagnostics("zigzag", params, np.arange(11))

    findings = find_oscillation(diagnostics)

    assert len(findings) == 1
    assert findings[0].steps == [1, 9]


def test_divergence_on_rising_and_infinite_loss():
    loss = np.array([1.0, 0.8, 0.9, 1.2, 1.6, 2.0, np.inf])
    diagnostics = update_diagnostics("diverging", np.zeros((7, 2)), np.arange(7), loss)

    findings = find_divergence(diagnostics)

    assert [f.steps for f in findings] == [[6, 6], [1, 5]]
    assert all(f.severity == "error" for f in findings)


def test_learning_rate_prefers_metric(tmp_path):
    run = RunFolder(tmp_path)
    train_run(run, "short", lr=0.7, steps=2)

    trajectory = read_all_trajectories(run.trajectory)[0]

    assert learning_rate(trajectory) == pytest.approx(0.7)


def test_hessian_eigenvalue_of_himmelblau_minimum(tmp_path):
    # At the minimum (3, 2) the Hessian of Himmelblau's function is [[74, 20], [20, 34]],
    # whose largest eigenvalue is 54 + sqrt(800).
    run = RunFolder(tmp_path)
    (tmp_path / "doodl3.toml").write_text(
        (Path(__file__).resolve().parents[2] / "configs" / "himmelblau.toml").read_text(encoding="utf-8"),
        encoding="utf-8",
    )
    setup = build_setup(run.load_config(), base=run.path)
    layout = Layout.from_tensors({name: p.detach().numpy() for name, p in setup.model.named_parameters()})

    eigenvalue = top_hessian_eigenvalue(setup, layout, np.array([3.0, 2.0]))

    assert eigenvalue == pytest.approx(54.0 + np.sqrt(800.0), rel=1e-4)


def test_non_classifier_skips_predictions(tmp_path):
    run = RunFolder(tmp_path)
    (tmp_path / "doodl3.toml").write_text(
        (Path(__file__).resolve().parents[2] / "configs" / "himmelblau.toml").read_text(encoding="utf-8"),
        encoding="utf-8",
    )
    setup = build_setup(run.load_config(), base=run.path)
    layout = Layout.from_tensors({name: p.detach().numpy() for name, p in setup.model.named_parameters()})

    assert predicted_probabilities(setup, layout, np.array([3.0, 2.0])) is None


def test_loss_instability_window_and_steps():
    # 30 intervals: steady descent, then 10 intervals of which 6 rise by 20 %, then descent again.
    loss = [2.0 * 0.97**t for t in range(11)]
    for t in range(10):
        loss.append(loss[-1] * (1.2 if t % 5 in (0, 2, 4) else 0.7))
    while len(loss) < 31:
        loss.append(loss[-1] * 0.97)
    steps = 5 * np.arange(31)
    diagnostics = update_diagnostics("bouncing", np.zeros((31, 2)), steps, np.array(loss))

    findings = find_loss_instability(diagnostics, learning_rate=1.2)

    assert len(findings) == 1
    assert findings[0].evidence["rising_intervals"] == 6
    assert findings[0].evidence["window"] == 20
    assert findings[0].evidence["intervals"] == 10
    # The rises are the intervals 10 to 19, between the checkpoints at steps 50 and 100.
    assert findings[0].steps == [50, 100]
    assert "0.6" in findings[0].suggestion


def test_loss_instability_ignores_short_runs_and_descent():
    descending = update_diagnostics("smooth", np.zeros((12, 2)), np.arange(12), 2.0 * 0.9 ** np.arange(12))
    short = update_diagnostics("short", np.zeros((6, 2)), np.arange(6), np.array([1.0, 2.0, 1.0, 2.0, 1.0, 2.0]))

    assert find_loss_instability(descending) == []
    assert find_loss_instability(short) == []


def test_demo_high_lr_flagged_unstable(tmp_path):
    """Train the demo with two seeds per learning rate. The lr 1.2 runs bounce between checkpoints 5 steps apart, and the lr 0.3 runs do not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = RunFolder(tmp_path)
        names = train_ensemble(run, DemoOptions(seeds=[0, 1], learning_rates=[0.3, 1.2]))
    finally:
        torch.set_num_threads(threads)

    flagged = set()
    for trajectory in read_all_trajectories(run.trajectory):
        diagnostics = update_diagnostics(trajectory.name, trajectory.params, trajectory.step, trajectory.metrics["loss"])
        if find_loss_instability(diagnostics, learning_rate=trajectory.attrs["learning_rate"]):
            flagged.add(trajectory.name)

    assert names == ["lr0.3-seed0", "lr0.3-seed1", "lr1.2-seed0", "lr1.2-seed1"]
    assert flagged == {"lr1.2-seed0", "lr1.2-seed1"}


def test_plateau_flat_but_not_rising_loss():
    # Unit steps along a line, with a reference rate of 1 loss unit per unit of path.
    params = np.arange(8, dtype=np.float64)[:, None] * np.array([[1.0, 0.0]])
    flat = update_diagnostics("flat", params, np.arange(8), np.full(8, 2.0))
    rising = update_diagnostics("rising", params, np.arange(8), 2.0 + 0.3 * np.arange(8))

    assert [f.steps for f in find_plateaus(flat, best_loss=0.1, reference_rate=1.0)] == [[0, 7]]
    assert find_plateaus(rising, best_loss=0.1, reference_rate=1.0) == []
