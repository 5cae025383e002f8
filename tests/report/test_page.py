import html
import json
import re

import h5py
import numpy as np
import plotly.offline
import pytest

from doodl3_cli.artifacts import dynamics as dynamics_artifact
from doodl3_cli.artifacts import landscape as landscape_artifact
from doodl3_cli.artifacts import topology as topology_artifact
from doodl3_cli.artifacts.trajectory import list_trajectories
from doodl3_cli.errors import ArtifactError, Doodl3Error, RunFolderError
from doodl3_cli.report.figures import format_number
from doodl3_cli.report.findings import finding_sentence
from doodl3_cli.report.html import PLOTLY_FILE
from doodl3_cli.report.page import write_report
from doodl3_cli.runfolder import RunFolder
from doodl3_cli.topology import run_topology

ALL_FIGURES = [
    "landscape-contour-pca",
    "landscape-surface-pca",
    "persistence-pca",
    "barcode-pca",
    "pyramid-pca",
    "morse-graph-pca",
    "flow-field-pca",
    "training-diagnostics",
    "ensemble-distances",
    "ensemble-disagreement",
    "ensemble-barriers",
]


def _outside_plotlyjs(page: str) -> str:
    """The page without the embedded plotly.js bundle, which contains URLs and NaN of its own."""
    return page.replace(plotly.offline.get_plotlyjs(), "")


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name} in a figure")


def _figure_payloads(page: str) -> dict[str, tuple[list, dict]]:
    """Parse (data, layout) of every Plotly.newPlot call strictly: NaN and Infinity raise."""
    decoder = json.JSONDecoder(parse_constant=_reject_constant)
    separator = re.compile(r"\s*,\s*")
    payloads = {}
    for match in re.finditer(r"Plotly\.newPlot\(\s*", page):
        position = match.end()
        values = []
        for _ in range(3):
            value, position = decoder.raw_decode(page, position)
            values.append(value)
            position = separator.match(page, position).end()
        div_id, data, layout = values
        payloads[div_id] = (data, layout)
    return payloads


def _figure_ids(page: str) -> list[str]:
    return re.findall(r'<div class="figure" id="([^"]+)-box">', page)


def _title(layout: dict) -> str:
    return layout["title"]["text"]


def _summary_rows(page: str) -> dict[str, list[str]]:
    """Cell texts of the summary table, by run name."""
    section = page[page.index('<section id="summary">'):page.index("</section>")]
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", section, flags=re.S):
        cells = [html.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)]
        if cells:
            rows[cells[0]] = cells
    return rows


def test_report_path_and_atomic_write(analysed_run, analysed_report):
    assert analysed_report == analysed_run.report
    assert analysed_report.is_file()
    assert list(analysed_run.path.glob(".report.html*")) == []


def test_plotlyjs_embedded_exactly_once(analysed_report):
    page = analysed_report.read_text(encoding="utf-8")
    bundle = plotly.offline.get_plotlyjs()

    assert page.count(bundle) == 1
    assert page.count("plotly.js bundled with plotly.py") == 1


def test_page_references_no_network(analysed_report):
    page = analysed_report.read_text(encoding="utf-8")
    rest = _outside_plotlyjs(page)

    assert re.findall(r"<script[^>]*\bsrc\s*=", page) == []
    assert "https://cdn" not in rest
    assert re.findall(r"""(?:src|href)\s*=\s*["']?https?:""", rest) == []
    assert "mathjax" not in rest.lower()


def test_figure_json_has_no_nan(analysed_report):
    page = analysed_report.read_text(encoding="utf-8")
    rest = _outside_plotlyjs(page)

    payloads = _figure_payloads(rest)

    assert sorted(payloads) == sorted(ALL_FIGURES)
    assert re.findall(r"[\[,:]\s*(?:NaN|-?Infinity)\b", rest) == []


def test_one_figure_div_per_figure(analysed_report):
    page = analysed_report.read_text(encoding="utf-8")

    assert _figure_ids(page) == ALL_FIGURES
    assert page.count('class="figure"') == len(ALL_FIGURES)


def test_sections_in_order_with_intro(analysed_report):
    page = analysed_report.read_text(encoding="utf-8")
    anchors = re.findall(r'<section id="([^"]+)">', page)

    assert anchors == ["summary", "landscape", "topology", "dynamics", "diagnostics", "ensemble", "provenance"]
    assert page.count('<p class="intro">') == len(anchors)


def test_summary_row_per_run_with_final_state(analysed_run, analysed_report):
    page = analysed_report.read_text(encoding="utf-8")
    rows = _summary_rows(page)
    landscape = landscape_artifact.read_slice(analysed_run.landscape, with_vectors=False)
    topology = topology_artifact.read_slice(analysed_run.topology)
    dynamics = dynamics_artifact.read_slice(analysed_run.dynamics)

    names = list_trajectories(analysed_run.trajectory)
    assert sorted(rows) == sorted(names)
    for name in names:
        cells = rows[name]
        projection = landscape.projections[name]
        seed = int(name.rsplit("seed", 1)[1])
        learning_rate = name[2:name.index("-")]

        assert cells[1] == str(seed)
        assert cells[2] == learning_rate
        assert format_number(projection.loss[-1]) in cells
        assert format_number(projection.residual[-1]) in cells
        basin = topology.final_basins[name]
        if basin >= 0:
            assert any(c.startswith(f"m{basin} (minimum loss") for c in cells)
        region = int(dynamics.placements[name][-1])
        if region >= 0:
            assert f"Morse set {region}" in cells


def test_contour_draws_every_run_and_minima(analysed_run, analysed_report):
    page = analysed_report.read_text(encoding="utf-8")
    data, layout = _figure_payloads(page)["landscape-contour-pca"]
    names = {trace.get("name") for trace in data}
    topology = topology_artifact.read_slice(analysed_run.topology)

    assert set(list_trajectories(analysed_run.trajectory)) <= names
    assert "significant minima" in names
    assert "basin boundaries" in names
    assert "Morse sets: attractors" in names
    minima = next(trace for trace in data if trace.get("name") == "significant minima")
    assert len(minima["x"]) == len(topology.minima)
    assert "explains" in _title(layout)
    assert "left blank" not in _title(layout)


def test_contour_hover_shows_own_loss_and_residual(analysed_report):
    page = analysed_report.read_text(encoding="utf-8")
    data, _ = _figure_payloads(page)["landscape-contour-pca"]
    run_trace = next(trace for trace in data if trace.get("name") == "lr0.3-seed0")

    assert all("own loss" in text and "off-plane residual" in text for text in run_trace["text"])


def test_persistence_diagram_labels_essential(analysed_report):
    page = analysed_report.read_text(encoding="utf-8")
    data, layout = _figure_payloads(page)["persistence-pca"]
    essential = next(trace for trace in data if trace.get("name") == "H0 essential")

    assert any("never die" in a["text"] for a in layout["annotations"])
    assert len(essential["y"]) == 1
    assert essential["y"][0] >= max(y for t in data if t.get("name") == "H0" for y in t["y"])


def test_missing_dynamics_gives_note(run_copy):
    run_copy.dynamics.unlink()

    page = write_report(run_copy).read_text(encoding="utf-8")

    assert f"doodl3 dynamics {run_copy.path}" in html.unescape(page)
    assert _figure_ids(page) == ["landscape-contour-pca", "landscape-surface-pca", "persistence-pca", "barcode-pca",
                                 "pyramid-pca", "training-diagnostics", "ensemble-distances", "ensemble-barriers"]
    assert sorted(_figure_payloads(page)) == sorted(_figure_ids(page))


def test_missing_landscape_leaves_out_its_sections(run_copy):
    for path in (run_copy.landscape, run_copy.topology, run_copy.dynamics):
        path.unlink()

    page = html.unescape(write_report(run_copy).read_text(encoding="utf-8"))

    assert _figure_ids(page) == ["training-diagnostics", "ensemble-distances"]
    for command in ("doodl3 sample", "doodl3 topology", "doodl3 dynamics"):
        assert f"{command} {run_copy.path}" in page


def test_missing_trajectory_raises(run_copy):
    run_copy.trajectory.unlink()

    with pytest.raises(ArtifactError, match=r"trajectory\.h5.*doodl3 record .* --from DIR"):
        write_report(run_copy)
    assert not any(run_copy.path.glob(".report.html*"))


def test_missing_run_folder_raises(tmp_path):
    with pytest.raises(RunFolderError, match="run folder not found"):
        write_report(RunFolder(tmp_path / "absent"))


def test_unreadable_topology_is_noted(run_copy):
    run_copy.topology.write_bytes(b"not an HDF5 file")

    page = html.unescape(write_report(run_copy).read_text(encoding="utf-8"))

    assert "persistence-pca" not in _figure_ids(page)
    assert "cannot be opened as HDF5" in page
    assert f"doodl3 topology {run_copy.path}" in page


def test_nonfinite_cells_are_masked_and_counted(run_copy):
    with h5py.File(run_copy.landscape, "a") as f:
        group = f["slices/pca"]
        loss = group["loss"][()]
        loss[0, 0], loss[0, 1], loss[-1, 0] = np.nan, np.inf, -np.inf
        group["loss"][...] = loss
        group.attrs["nonfinite_cells"] = 3
    run_topology(run_copy)
    # The flow on a grid with non-finite cells is covered by test_robustness, which runs the dynamics stage.
    run_copy.dynamics.unlink()

    page = write_report(run_copy).read_text(encoding="utf-8")
    payloads = _figure_payloads(_outside_plotlyjs(page))
    contour_data, contour_layout = payloads["landscape-contour-pca"]
    surface_data, surface_layout = payloads["landscape-surface-pca"]

    cells = loss.size
    assert f"3 of {cells} grid cells are NaN or infinite and are left blank" in _title(contour_layout)
    assert f"3 of {cells} grid cells are NaN or infinite and are left blank" in _title(surface_layout)
    z = contour_data[0]["z"]
    assert z[0][0] is None
    assert z[1][0] is None
    assert z[0][-1] is None
    assert sum(value is None for row in z for value in row) == 3
    finite = loss[np.isfinite(loss)]
    assert contour_data[0]["zmin"] == pytest.approx(finite.min())
    assert contour_data[0]["zmax"] == pytest.approx(finite.max())
    assert surface_data[0]["cmax"] == pytest.approx(finite.max())


def test_contour_z_is_transposed(run_copy):
    with h5py.File(run_copy.landscape, "r") as f:
        loss = f["slices/pca/loss"][()]

    page = write_report(run_copy).read_text(encoding="utf-8")
    contour = _figure_payloads(page)["landscape-contour-pca"][0][0]

    # plotly indexes z as [y][x], the grid as [alpha][beta].
    assert contour["z"][2][5] == pytest.approx(loss[5, 2])
    assert contour["z"][7][1] == pytest.approx(loss[1, 7])


def test_stale_topology_is_warned(run_copy):
    with h5py.File(run_copy.landscape, "a") as f:
        f.attrs["content_id"] = "0" * 32

    page = html.unescape(write_report(run_copy).read_text(encoding="utf-8"))

    assert re.search(r'class="warning">topology is out of date', page)
    assert f"doodl3 topology {run_copy.path}" in page
    assert "changed since, now " + "0" * 32 in page


def test_provenance_lists_every_artifact(analysed_run, analysed_report):
    page = html.unescape(analysed_report.read_text(encoding="utf-8"))
    provenance = page[page.index('<section id="provenance">'):]

    for path in (analysed_run.trajectory, analysed_run.landscape, analysed_run.topology, analysed_run.dynamics):
        with h5py.File(path, "r") as f:
            content_id = f.attrs["content_id"]
            created = f.attrs["created"]
        assert f"<h3>{path.name}</h3>" in provenance
        assert content_id in provenance
        assert created in provenance
    assert "resolution = 9" in provenance
    assert "(current)" in provenance
    # The demo records through the Python API, not from a checkpoint folder.
    assert "doodl3_cli.record.Recorder, during training" in provenance
    assert "--from DIR" not in provenance


def test_plotlyjs_beside_written_once(run_copy):
    page = write_report(run_copy, plotly_js="beside").read_text(encoding="utf-8")
    bundle = run_copy.path / PLOTLY_FILE

    assert bundle.read_text(encoding="utf-8") == plotly.offline.get_plotlyjs()
    assert plotly.offline.get_plotlyjs() not in page
    assert re.findall(r"<script[^>]*\bsrc\s*=\s*\"([^\"]+)\"", page) == [PLOTLY_FILE]
    assert sorted(_figure_payloads(page)) == sorted(ALL_FIGURES)
    assert list(run_copy.path.glob(".*.tmp")) == []


def test_unknown_plotlyjs_mode_raises(run_copy):
    with pytest.raises(Doodl3Error, match=r"--plotly-js: expected one of inline, beside, got 'cdn'"):
        write_report(run_copy, plotly_js="cdn")
    assert not (run_copy.path / PLOTLY_FILE).exists()


def test_barrier_table_matches_landscape_line(analysed_run, analysed_report):
    page = html.unescape(analysed_report.read_text(encoding="utf-8"))
    line = landscape_artifact.read_line(analysed_run.landscape)
    data, _ = _figure_payloads(page)["ensemble-barriers"]

    assert f"<td>{line.name}</td><td>lr0.3-seed0</td><td>lr1.2-seed0</td>" in page.replace("\n", "")
    assert format_number(line.attrs["barrier"]) in page
    assert data[0]["name"] == "lr0.3-seed0 to lr1.2-seed0"
    assert data[0]["y"] == pytest.approx(line.loss.tolist())


def test_disagreement_matches_dynamics(analysed_run, analysed_report):
    measures = dynamics_artifact.read_ensemble(analysed_run.dynamics)
    data, _ = _figure_payloads(analysed_report.read_text(encoding="utf-8"))["ensemble-disagreement"]

    assert data[0]["x"] == measures.runs
    assert np.array(data[0]["z"]) == pytest.approx(100 * measures.disagreement)


def test_summary_states_stored_findings(analysed_run, analysed_report):
    page = html.unescape(analysed_report.read_text(encoding="utf-8"))
    summary = page[page.index('<section id="summary">'):page.index('<section id="landscape">')]
    findings = dynamics_artifact.read_findings(analysed_run.dynamics)

    assert "<h3>Findings</h3>" in summary
    assert summary.count("<li") == len(findings) + 2
    for finding in findings:
        assert finding_sentence(finding) in summary


def test_training_figure_without_sharpness(analysed_report):
    _, layout = _figure_payloads(analysed_report.read_text(encoding="utf-8"))["training-diagnostics"]
    titles = [annotation["text"] for annotation in layout["annotations"]]

    assert titles[:3] == ["loss", "speed (parameter distance per step)", "cosine between successive updates"]
    assert not any(title.startswith("sharpness") for title in titles)


def test_topology_without_pyramid_gets_note(run_copy):
    with h5py.File(run_copy.topology, "a") as f:
        del f["slices/pca/pyramid"]

    page = html.unescape(write_report(run_copy).read_text(encoding="utf-8"))

    assert "pyramid-pca" not in _figure_ids(page)
    assert "contains no resolution pyramid" in page
    assert f"doodl3 topology {run_copy.path}" in page


def test_demo_contour_uses_log_scale(analysed_run, analysed_report):
    landscape = landscape_artifact.read_slice(analysed_run.landscape, with_vectors=False)
    data, layout = _figure_payloads(analysed_report.read_text(encoding="utf-8"))["landscape-contour-pca"]
    finite = landscape.loss[np.isfinite(landscape.loss)]
    expect_log = finite.max() / finite.min() > 100

    assert ("colours on a log scale" in _title(layout)) == expect_log
    if expect_log:
        assert data[0]["zmax"] == pytest.approx(np.log10(finite.max()))
        assert data[0]["customdata"][3][4] == pytest.approx(landscape.loss[4, 3])


def test_morse_pyramid_table_matches_dynamics(analysed_run, analysed_report):
    page = html.unescape(analysed_report.read_text(encoding="utf-8"))
    dynamics = dynamics_artifact.read_slice(analysed_run.dynamics)
    section = page[page.index('<section id="dynamics">'):page.index('<section id="diagnostics">')]

    assert "<h3>Morse graph across grid resolutions</h3>" in section
    for level in dynamics.pyramid:
        mapping = ", ".join(f"{k} to {'none' if s < 0 else s}" for k, s in enumerate(level.finest_set.tolist()))
        assert f"<td>{level.stride}</td>" in section
        assert mapping in section
