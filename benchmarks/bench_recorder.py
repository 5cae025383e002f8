"""Measure what `Recorder.record` costs inside a training loop, for a 10M-parameter MLP.

Times one `record` call (flatten the parameters, append one row to trajectory.h5 and
flush it) against one training step (forward, backward and SGD update on a batch of
random inputs) of the same model, and prints both and their ratio.

Usage::

    python benchmarks/bench_recorder.py [--calls 10] [--batch 256] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from doodl3_cli.record import Recorder


def build_model() -> nn.Module:
    """Return an MLP 1000 -> 3000 -> 2000 -> 500 with 10,005,500 float32 parameters."""
    return nn.Sequential(nn.Linear(1000, 3000), nn.ReLU(), nn.Linear(3000, 2000), nn.ReLU(), nn.Linear(2000, 500))


def time_training_steps(model: nn.Module, batch: int, steps: int) -> list[float]:
    """Return the wall-clock seconds of `steps` SGD steps on random data."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    inputs = torch.randn(batch, 1000)
    targets = torch.randint(0, 500, (batch,))
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
        seconds.append(time.perf_counter() - started)
    return seconds


def time_record_calls(model: nn.Module, calls: int) -> list[float]:
    """Return the wall-clock seconds of `calls` Recorder.record calls into a fresh run folder."""
    seconds = []
    with tempfile.TemporaryDirectory() as folder, Recorder(Path(folder), model, trajectory="bench") as recorder:
        for step in range(calls):
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(1e-3)
            started = time.perf_counter()
            recorder.record(step, loss=float(step))
            seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10, help="record calls and training steps to time")
    parser.add_argument("--batch", type=int, default=256, help="batch size of a training step")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build_model()
    parameters = sum(p.numel() for p in model.parameters())
    time_training_steps(model, args.batch, 2)
    steps = time_training_steps(model, args.batch, args.calls)
    records = time_record_calls(model, args.calls)

    step_s = statistics.median(steps)
    record_s = statistics.median(records)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"model: {parameters:,} parameters ({parameters * 4 / 2**20:.1f} MiB float32)")
    print(f"training step (batch {args.batch}): median {step_s * 1e3:.1f} ms over {args.calls}")
    print(f"Recorder.record: median {record_s * 1e3:.1f} ms over {args.calls} (min {min(records) * 1e3:.1f}, max {max(records) * 1e3:.1f})")
    print(f"ratio record / training step: {record_s / step_s:.2f}")


if __name__ == "__main__":
    main()
