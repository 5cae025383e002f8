"""Ensemble figures and findings sentences on hand-built inputs with known results."""

import json

import numpy as np
import plotly.io as pio
import pytest

from doodl3_cli.artifacts.landscape import LandscapeLine
from doodl3_cli.artifacts.trajectory import Trajectory
from doodl3_cli.dynamics.diagnostics import Finding
from doodl3_cli.report import ensemble
from doodl3_cli.report.findings import finding_sentence


def _trajectory(name: str, final: list[float]) -> Trajectory:
    params = np.array([[0.0, 0.0], final], dtype=np.float32)
    return Trajectory(
        name=name, params=params, buffers=np.zeros((2, 0), np.float32), step=np.array([0, 1]),
        epoch=np.full(2, np.nan), metrics={}, source=["live"] * 2, source_digest=["a", "b"], attrs={},
    )


def test_final_distances_are_euclidean():
    runs = [_trajectory("a", [0.0, 0.0]), _trajectory("b", [3.0, 4.0]), _trajectory("c", [6.0, 8.0])]

    names, distances = ensemble.final_distances(runs)

    assert names == ["a", "b", "c"]
    assert distances == pytest.approx(np.array([[0.0, 5.0, 10.0], [5.0, 0.0, 5.0], [10.0, 5.0, 0.0]]))


def test_distance_summary_by_basin():
    distances = np.array([[0.0, 5.0, 10.0], [5.0, 0.0, 5.0], [10.0, 5.0, 0.0]])

    text = ensemble.distance_summary(["a", "b", "c"], distances, {"a": 0, "b": 0, "c": 1})

    assert text == ("On the slice's basins, runs that end in the same basin are 5 apart on average (1 pairs) and "
                    "runs that end in different basins are 7.5 apart (2 pairs).")


def test_distance_matrix_is_capped():
    names = [f"run{k}" for k in range(5)]

    fig = ensemble.distance_matrix_figure(names, np.ones((5, 5)), max_runs=3)

    assert fig.data[0].x == ("run0", "run1", "run2")
    assert "the first 3 of 5 runs are shown" in fig.layout.title.text


def test_barrier_figure_marks_peak():
    t = np.linspace(-0.25, 1.25, 7)
    line = LandscapeLine(
        name="a-b", t=t, metrics={"loss": 1.0 + np.sin(np.pi * t) ** 2}, evaluated=np.ones(7, bool),
        attrs={"start": "a", "end": "b", "distance": 5.0, "barrier": 1.0, "barrier_t": 0.5},
    )

    fig = ensemble.barrier_figure([line])

    curve, peak = fig.data
    assert curve.name == "a to b"
    assert peak.x == (0.5,)
    assert peak.y[0] == pytest.approx(2.0)
    assert "barrier 1" in peak.text[0]
    json.loads(pio.to_json(fig))
    assert "<td>a-b</td><td>a</td><td>b</td>" in ensemble.barrier_table([line]).replace("\n", "")


def test_disagreement_figure_values():
    disagreement = np.array([[0.0, 0.25], [0.25, 0.0]])

    fig = ensemble.disagreement_figure(["a", "b"], disagreement)

    assert [list(row) for row in fig.data[0].z] == [[0.0, 25.0], [25.0, 0.0]]
    json.loads(pio.to_json(fig))


@pytest.mark.parametrize(
    ("finding", "sentence"),
    [
        (
            Finding(kind="oscillation", severity="warning", runs=["r1"], steps=[10, 40],
                    evidence={"mean_cosine": -0.91234, "checkpoints": 4}, suggestion="lower the learning rate"),
            "Oscillation in r1 between steps 10 and 40 (evidence: mean cosine -0.9123; checkpoints 4). "
            "Suggested change: lower the learning rate.",
        ),
        (
            Finding(kind="sharpness", severity="warning", runs=["r1", "r2"], steps=[150, 300],
                    evidence={"top_eigenvalues": [7.3778, 2.0]}, suggestion=""),
            "Sharpness in r1, r2 at steps 150, 300 (evidence: top eigenvalues 7.378, 2).",
        ),
    ],
)
def test_finding_sentence(finding, sentence):
    assert finding_sentence(finding) == sentence
