"""Benchmark of the `sample` evaluation engine against `loss-landscapes` and a naive per-point loop.

Every engine evaluates the full-batch cross-entropy of the same model on all 1,797
digits at every point of a G x G grid, in one process, with pinned thread counts,
best of several repetitions. The machine's float32 matmul throughput is measured
in the same run, and each engine is reported as the fraction of it that the
model's forward FLOPs reach. doodl3's grid is checked against a float64
recomputation at a sample of grid points.

Usage::

    python benchmarks/bench_sample.py --threads 2 --repeat 3

`loss-landscapes` (PyPI, 3.0.6) is needed only here: ``pip install loss-landscapes==3.0.6``.
It chooses its own random directions, so the benchmark seeds torch before each call
and rebuilds those directions with the library's helpers. Its grid is then compared
with float64 losses at the grid points its documentation describes and at the
points its loop actually reaches.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from doodl3_cli import zoo
from doodl3_cli.checkpoints import flatten_model, model_layouts
from doodl3_cli.directions import random_directions
from doodl3_cli.evaluate import EvaluationSetup, Evaluator


def small_cnn() -> nn.Sequential:
    """Two 3x3 convolutions and a linear classifier for the 8x8 digits."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3), nn.ReLU(),
        nn.Conv2d(8, 16, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )


def forward_flops(model: nn.Module, samples: int) -> float:
    """Multiply-add FLOPs (2 per multiply-add) of one forward pass over `samples` 8x8 inputs."""
    flops = 0.0
    hooks = []

    def count(module, inputs, output):
        nonlocal flops
        if isinstance(module, nn.Linear):
            flops += 2.0 * output.shape[0] * module.in_features * module.out_features
        elif isinstance(module, nn.Conv2d):
            kernel = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            flops += 2.0 * output.numel() * kernel

    for module in model.modules():
        hooks.append(module.register_forward_hook(count))
    with torch.no_grad():
        model(torch.zeros(samples, 64))
    for hook in hooks:
        hook.remove()
    return flops


def matmul_throughput(repeat: int) -> float:
    """Best float32 matmul rate in FLOP/s on 1024 x 1024 matrices."""
    a = torch.randn(1024, 1024)
    b = torch.randn(1024, 1024)
    torch.mm(a, b)
    best = np.inf
    for _ in range(repeat * 3):
        started = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - started) / 10)
    return 2.0 * 1024**3 / best


def best_time(function, repeat: int, label: str) -> tuple[float, object]:
    best, result = np.inf, None
    for _ in range(repeat):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
        print(f"{label}: {time.perf_counter() - started:.3f} s", file=sys.stderr, flush=True)
    return best, result


def grid_coefficients(resolution: int) -> np.ndarray:
    axis = np.linspace(-1.0, 1.0, resolution)
    a, b = np.meshgrid(axis, axis, indexing="ij")
    return np.stack([a.reshape(-1), b.reshape(-1)], axis=1)


def doodl3_engine(model, layout, buffer_layout, buffers, center, directions, coefficients, x, y, points_per_pass):
    setup = EvaluationSetup(model, x, y, F.cross_entropy, 2048, torch.device("cpu"))
    evaluator = Evaluator(setup, layout, buffer_layout, buffers, points_per_pass=points_per_pass)
    return lambda: evaluator.evaluate_plane(center, directions, coefficients)["loss"]


def naive_engine(model, center, directions, coefficients, x, y):
    """Evaluate one point at a time: write the parameters into the model, run one forward pass and one loss."""
    work = copy.deepcopy(model)
    parameters = list(work.parameters())

    def run():
        losses = np.empty(coefficients.shape[0])
        with torch.no_grad():
            for k, (a, b) in enumerate(coefficients):
                vector = torch.as_tensor((center + a * directions[0] + b * directions[1]).astype(np.float32))
                torch.nn.utils.vector_to_parameters(vector, parameters)
                losses[k] = F.cross_entropy(work(x), y).item()
        return losses

    return run


def loss_landscapes_engine(model, resolution, x, y, seed: int = 0):
    import loss_landscapes
    import loss_landscapes.metrics

    metric = loss_landscapes.metrics.Loss(F.cross_entropy, x, y)

    def run():
        torch.manual_seed(seed)
        with torch.no_grad():
            return loss_landscapes.random_plane(model, metric, distance=1, steps=resolution, normalization="filter", deepcopy_model=True)

    return run


def loss_landscapes_directions(model, resolution, seed: int = 0) -> np.ndarray:
    """Rebuild the two step vectors that `random_plane` draws under `torch.manual_seed(seed)`, as (2, P) float64.

    The library's own helpers run in the order `random_plane` calls them (uniform
    draw, near-orthogonal draw, filter normalisation). Each vector is then scaled so
    that one step is |center| / resolution, as `random_plane` scales them.
    """
    from loss_landscapes.model_interface.model_parameters import orthogonal_to, rand_u_like
    from loss_landscapes.model_interface.model_wrapper import wrap_model

    torch.manual_seed(seed)
    start = wrap_model(copy.deepcopy(model)).get_module_parameters()
    steps = []
    first = rand_u_like(start)
    second = orthogonal_to(first)
    for direction in (first, second):
        direction.filter_normalize_(start)
        vector = np.concatenate([p.detach().numpy().reshape(-1) for p in direction]).astype(np.float64)
        steps.append(vector * (start.model_norm() / resolution) / np.linalg.norm(vector))
    return np.stack(steps)


def loss_landscapes_offsets(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Step offsets (along direction one, along direction two) of `random_plane`'s grid entries.

    Returns the offsets that the library's docstring describes, (i - G/2, j - G/2),
    and those its loop reaches: even columns are one step further along direction two.
    """
    i, j = np.meshgrid(np.arange(resolution), np.arange(resolution), indexing="ij")
    intended = np.stack([i - resolution / 2, j - resolution / 2], axis=-1).astype(np.float64)
    reached = intended.copy()
    reached[0::2, :, 1] += 1
    return intended, reached


def loss_landscapes_check(model, resolution, x, y, grid, seed: int = 0, count: int = 25) -> dict:
    """Compare `random_plane`'s grid with float64 losses at the grid points it describes and at those it reaches."""
    center = np.concatenate([p.detach().numpy().reshape(-1) for p in model.parameters()]).astype(np.float64)
    steps = loss_landscapes_directions(model, resolution, seed)
    intended, reached = loss_landscapes_offsets(resolution)
    reference = copy.deepcopy(model).double()
    parameters = list(reference.parameters())
    picks = np.random.default_rng(1).choice(resolution * resolution, size=min(count, resolution * resolution), replace=False)
    errors = {"described grid": 0.0, "reached grid": 0.0}
    with torch.no_grad():
        for name, offsets in (("described grid", intended), ("reached grid", reached)):
            for k in picks:
                i, j = divmod(int(k), resolution)
                torch.nn.utils.vector_to_parameters(torch.as_tensor(center + offsets[i, j] @ steps), parameters)
                exact = F.cross_entropy(reference(x.double()), y).item()
                errors[name] = max(errors[name], abs(grid[i, j] - exact) / abs(exact))

    displaced = copy.deepcopy(model)
    import loss_landscapes
    import loss_landscapes.metrics
    torch.manual_seed(seed)
    with torch.no_grad():
        loss_landscapes.random_plane(displaced, loss_landscapes.metrics.Loss(F.cross_entropy, x, y), distance=1,
                                     steps=resolution, normalization="filter", deepcopy_model=False)
    after = np.concatenate([p.detach().numpy().reshape(-1) for p in displaced.parameters()]).astype(np.float64)
    errors["model displacement after the call"] = float(np.linalg.norm(after - center) / np.linalg.norm(center))
    errors["center on grid"] = bool(np.any(np.all(intended == 0, axis=-1)))
    return errors


def float64_check(model, center, directions, coefficients, x, y, losses, count: int = 25) -> float:
    """Largest relative error of `losses` against float64 recomputation at `count` grid points."""
    reference = copy.deepcopy(model).double()
    parameters = list(reference.parameters())
    picks = np.random.default_rng(0).choice(coefficients.shape[0], size=min(count, coefficients.shape[0]), replace=False)
    worst = 0.0
    with torch.no_grad():
        for k in picks:
            a, b = coefficients[k]
            vector = torch.as_tensor((center + a * directions[0] + b * directions[1]).astype(np.float32).astype(np.float64))
            torch.nn.utils.vector_to_parameters(vector, parameters)
            exact = F.cross_entropy(reference(x.double()), y).item()
            worst = max(worst, abs(losses[k] - exact) / abs(exact))
    return worst


def bench_case(name, model, resolution, x, y, repeat, points_per_pass, with_peer):
    layout, buffer_layout = model_layouts(model)
    center, buffers = flatten_model(model, layout, buffer_layout)
    directions = random_directions(center, layout, seed=0)
    coefficients = grid_coefficients(resolution)
    flops = forward_flops(model, x.shape[0]) * coefficients.shape[0]

    rows = {}
    engine = doodl3_engine(model, layout, buffer_layout, buffers, center, directions, coefficients, x, y, points_per_pass)
    rows["doodl3"], losses = best_time(engine, repeat, f"{name} doodl3")
    doodl3_error = float64_check(model, center.astype(np.float64), directions, coefficients, x, y, losses)
    naive = naive_engine(model, center.astype(np.float64), directions, coefficients, x, y)
    rows["naive loop"], naive_losses = best_time(naive, repeat, f"{name} naive loop")
    naive_error = float64_check(model, center.astype(np.float64), directions, coefficients, x, y, naive_losses)
    if with_peer:
        rows["loss-landscapes 3.0.6"], peer_grid = best_time(
            loss_landscapes_engine(model, resolution, x, y), repeat, f"{name} loss-landscapes"
        )
        peer = loss_landscapes_check(model, resolution, x, y, peer_grid)
    else:
        peer = None
    return {"case": name, "points": int(coefficients.shape[0]), "flops": flops, "seconds": rows,
            "float64_error": {"doodl3": doodl3_error, "naive loop": naive_error,
                              "loss-landscapes 3.0.6": None if peer is None else peer["described grid"]},
            "loss_landscapes_check": peer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions per engine; the best is kept")
    parser.add_argument("--points-per-pass", type=int, default=16)
    parser.add_argument("--no-peer", action="store_true", help="skip loss-landscapes")
    parser.add_argument("--cases", default="mlp41,mlp81,cnn41", help="comma-separated cases: mlp41, mlp81, cnn41")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    x, y = zoo.digits("all")
    rate = matmul_throughput(args.repeat)
    mlp = zoo.mlp(64, [64, 32], 10).eval()
    cnn = small_cnn().eval()
    cases = {
        "mlp41": ("digits MLP 64-64-32-10, 41x41", mlp, 41),
        "mlp81": ("digits MLP 64-64-32-10, 81x81", mlp, 81),
        "cnn41": ("digits CNN 8-16 conv, 41x41", cnn, 41),
    }
    results = [
        bench_case(name, model, resolution, x, y, args.repeat, args.points_per_pass, not args.no_peer)
        for key, (name, model, resolution) in cases.items() if key in args.cases.split(",")
    ]

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads")
    print(f"float32 matmul throughput (1024^3, best of {args.repeat * 3}): {rate / 1e9:.1f} GFLOP/s\n")
    print("| case | engine | seconds | vs doodl3 | fraction of matmul rate | max rel. error vs float64 |")
    print("|---|---|---|---|---|---|")
    for result in results:
        base = result["seconds"]["doodl3"]
        for engine, seconds in result["seconds"].items():
            error = result["float64_error"].get(engine)
            print(
                f"| {result['case']} | {engine} | {seconds:.3f} | {seconds / base:.2f}x | "
                f"{result['flops'] / seconds / rate:.0%} | {'n/a' if error is None else f'{error:.1e}'} |"
            )
    for result in results:
        if result["loss_landscapes_check"] is not None:
            check = result["loss_landscapes_check"]
            print(f"\n{result['case']}, loss-landscapes against float64: max rel. error {check['described grid']:.1e} at the "
                  f"grid points it describes, {check['reached grid']:.1e} at the points its loop reaches; center on the grid: "
                  f"{check['center on grid']}; model moved by {check['model displacement after the call']:.1e} "
                  "of its norm after a call without deepcopy")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"matmul_flops_per_s": rate, "threads": args.threads, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
