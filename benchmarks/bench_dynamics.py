"""Benchmark doodl3's Morse graph against CMGDB's on the time-tau gradient map of Himmelblau's function.

Both sides compute the Morse sets, Hasse edges and Conley indices of the same box
map on the same uniform grid (see tests/dynamics/test_cmgdb.py for the setup), and
the script checks that the graphs are identical before it reports the times.
CMGDB gets a vectorised batch map. Each side's time is split into the time spent
evaluating the point map (RK4 integration of the flow, shared code) and the rest
(the combinatorial work).

Usage::

    python benchmarks/bench_dynamics.py [--sizes 256 512]

Needs the test extra (``pip install -e '.[test]'``) for CMGDB.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

# The CMGDB setup is shared with the oracle test, which lives in the tests package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from doodl3_cli.dynamics.morse import morse_graph, outer_approximation
from tests.dynamics.test_cmgdb import cmgdb_morse_graph, doodl3_sets, time_tau_setup
from tests.dynamics.test_morse import himmelblau


class TimedMap:
    """A point map that adds up the seconds spent inside it."""

    def __init__(self, point_map):
        self.point_map = point_map
        self.seconds = 0.0
        self.points = 0

    def __call__(self, points):
        started = time.perf_counter()
        result = self.point_map(points)
        self.seconds += time.perf_counter() - started
        self.points += len(points)
        return result


def bench(size: int) -> dict:
    """Time both programs on a size x size grid over [-5, 5]^2 and compare their graphs."""
    alpha = beta = np.linspace(-5.0, 5.0, size)
    loss, valid, point_map = time_tau_setup(himmelblau, alpha, beta)

    ours_map = TimedMap(point_map)
    started = time.perf_counter()
    ours = morse_graph(outer_approximation(alpha, beta, ours_map, valid), loss, valid)
    ours_total = time.perf_counter() - started

    their_map = TimedMap(point_map)
    started = time.perf_counter()
    their_sets, their_edges, their_betti = cmgdb_morse_graph(their_map, alpha, beta)
    their_total = time.perf_counter() - started

    our_sets = doodl3_sets(ours)
    identical = set(our_sets) == set(their_sets) and len(our_sets) == len(their_sets)
    if identical:
        relabel = [our_sets.index(s) for s in their_sets]
        edges = {(relabel[a], relabel[b]) for a, b in their_edges}
        identical = edges == {tuple(e) for e in ours.hasse_edges.tolist()} and all(
            ours.conley_index[relabel[v]].tolist() == their_betti[v] for v in range(len(their_sets))
        )
    return {
        "size": size,
        "morse_sets": ours.n_sets,
        "identical": identical,
        "doodl3_s": ours_total,
        "doodl3_map_s": ours_map.seconds,
        "doodl3_points": ours_map.points,
        "cmgdb_s": their_total,
        "cmgdb_map_s": their_map.seconds,
        "cmgdb_points": their_map.points,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="grid sizes, powers of two")
    args = parser.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    for size in args.sizes:
        row = bench(size)
        rest_ours = row["doodl3_s"] - row["doodl3_map_s"]
        rest_theirs = row["cmgdb_s"] - row["cmgdb_map_s"]
        print(
            f"{size}x{size}: {row['morse_sets']} Morse sets, identical graph: {row['identical']}; "
            f"doodl3 {row['doodl3_s']:.2f} s ({row['doodl3_map_s']:.2f} s map, {row['doodl3_points']} points), "
            f"CMGDB {row['cmgdb_s']:.2f} s ({row['cmgdb_map_s']:.2f} s map, {row['cmgdb_points']} points); "
            f"CMGDB / doodl3: total {row['cmgdb_s'] / row['doodl3_s']:.2f}x, "
            f"without the map {rest_theirs / rest_ours:.2f}x"
        )


if __name__ == "__main__":
    main()
