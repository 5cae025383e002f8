"""Benchmark the topology stage of one slice against gudhi's vertex cubical complex.

For each grid size the script samples Himmelblau's function on [-5, 5]^2, once
clean and once with Gaussian noise (standard deviation 0.5, with a matching
``loss_stderr`` grid so the noise-derived threshold applies). It reports:

- ``vertex complex``: ``gudhi.CubicalComplex(vertices=...)`` persistence with
  ``vertices_of_persistence_pairs``, the diagram with locations and nothing else;
- ``fast diagram``: `doodl3_cli.topology.vertex_diagram`, after checking that it
  equals the vertex complex's diagram pair for pair;
- ``stage``: `doodl3_cli.topology.analyse_slice`, the whole stage for one slice
  (diagram, cell locations, summaries, resolution pyramid with bottleneck
  distances, basins and the assignment of 100 checkpoints).

Each time is the median of ``--repeats`` runs.

Usage::

    python benchmarks/bench_topology.py [--sizes 1001 2001] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import gudhi
import numpy as np

from doodl3_cli.topology import analyse_slice, vertex_diagram, wall_nonfinite

NOISE = 0.5


def himmelblau_grid(size: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    axis = np.linspace(-5.0, 5.0, size)
    a, b = np.meshgrid(axis, axis, indexing="ij")
    loss = (a**2 + b - 11) ** 2 + (a + b**2 - 7) ** 2
    if noise:
        loss = loss + np.random.default_rng(0).normal(0.0, noise, loss.shape)
    return axis, loss


def median_seconds(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def vertex_complex(filtration: np.ndarray):
    complex_ = gudhi.CubicalComplex(vertices=filtration)
    complex_.compute_persistence(min_persistence=0.0)
    complex_.vertices_of_persistence_pairs()
    return complex_


def check_fast_diagram(filtration: np.ndarray, nonfinite: np.ndarray) -> int:
    """Compare the fast diagram with the vertex complex's; return the number of pairs."""
    fast = vertex_diagram(filtration, nonfinite)
    slow = sorted((d, b, e) for d, (b, e) in vertex_complex(filtration).persistence(min_persistence=0.0))
    if sorted(zip(fast.dim.tolist(), fast.birth.tolist(), fast.death.tolist())) != slow:
        raise SystemExit("the fast diagram differs from gudhi's vertex complex")
    return len(slow)


def bench(size: int, noise: float, repeats: int) -> dict:
    axis, loss = himmelblau_grid(size, noise)
    stderr = np.full(loss.shape, noise) if noise else None
    filtration, nonfinite, _ = wall_nonfinite(loss)
    path = np.column_stack([np.linspace(0.5, 3.0, 100), np.linspace(0.5, 2.0, 100)])
    pairs = check_fast_diagram(filtration, nonfinite)

    slow = median_seconds(lambda: vertex_complex(filtration), repeats)
    fast = median_seconds(lambda: vertex_diagram(filtration, nonfinite), repeats)
    stage = median_seconds(lambda: analyse_slice("s", loss, axis, axis, {"run": path}, loss_stderr=stderr), repeats)
    topology = analyse_slice("s", loss, axis, axis, {"run": path}, loss_stderr=stderr)
    return {
        "grid": f"{size}x{size}", "noise": noise, "pairs": pairs, "minima": len(topology.minima),
        "locator": topology.locator, "vertex complex": slow, "fast diagram": fast, "stage": stage,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1001, 2001])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, gudhi {gudhi.__version__}, numpy {np.__version__}")
    print("| grid | noise | pairs | minima | locator | vertex complex (s) | fast diagram (s) | stage (s) "
          "| vertex complex / stage |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for noise in (0.0, NOISE):
            row = bench(size, noise, args.repeats)
            print(f"| {row['grid']} | {row['noise']:g} | {row['pairs']} | {row['minima']} | {row['locator']} "
                  f"| {row['vertex complex']:.3f} | {row['fast diagram']:.3f} | {row['stage']:.3f} "
                  f"| {row['vertex complex'] / row['stage']:.1f} |")


if __name__ == "__main__":
    main()
