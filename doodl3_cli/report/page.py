"""`doodl3 report`: one HTML page with every figure of a run, which opens offline.

The page contains each figure's data inline, and plotly.js either embedded once or
written once next to it, so it requests nothing from the network. Its sections are
the summary of the runs with the findings, the landscape slice, its topology, its
dynamics, the training diagnostics, the ensemble and the provenance of every
artifact. A section whose artifact is missing is replaced by a note naming the
command that writes it.
"""

from __future__ import annotations

import html
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import plotly.offline

from doodl3_cli import __version__
from doodl3_cli.artifacts._common import WriterLock, atomic_write_text, read_content_id, remove_stale_temporaries, utc_now
from doodl3_cli.artifacts.dynamics import SliceDynamics
from doodl3_cli.artifacts.landscape import LandscapeSlice
from doodl3_cli.artifacts.topology import SliceTopology
from doodl3_cli.dynamics.morse import REGION_NONE, REGION_OUTSIDE, REGION_SEPARATRIX
from doodl3_cli.errors import Doodl3Error
from doodl3_cli.report import figures, topology_figures, training_figures
from doodl3_cli.report.content import RunContent, read_run_content
from doodl3_cli.report.ensemble import ensemble_section
from doodl3_cli.report.findings import findings_html
from doodl3_cli.report.figures import format_number, trajectory_color
from doodl3_cli.report.html import (
    PLOTLY_FILE,
    PLOTLY_JS_MODES,
    Cell,
    Section,
    figure_div,
    note,
    render_page,
    swatch,
    table,
)
from doodl3_cli.runfolder import RunFolder

log = logging.getLogger(__name__)

MAX_TABLE_ROWS = 60
ACCURACY_PATTERN = re.compile(r"acc", re.IGNORECASE)


def write_report(run: RunFolder, *, plotly_js: str = "inline") -> Path:
    """Write ``RUN/report.html`` from the artifacts of the run folder.

    The page is written under a temporary name in the run folder and renamed into
    place, so a reader never sees a half-written report. The writer lock of
    report.html is held while the page is built and written, so a second
    concurrent report of the same run folder fails at once.

    Parameters
    ----------
    run : RunFolder
        The run folder. trajectory.h5 is required; landscape.h5, topology.h5 and
        dynamics.h5 are shown when present.
    plotly_js : {"inline", "beside"}
        ``inline`` embeds plotly.js in the page, which then is one self-contained
        file. ``beside`` writes it once as ``RUN/plotly.min.js`` and the page loads
        it by a relative path, so the page must stay next to that file.

    Returns
    -------
    Path
        ``run.report``.

    Raises
    ------
    Doodl3Error
        When `plotly_js` is neither ``inline`` nor ``beside``.
    RunFolderError
        When the run folder does not exist.
    ArtifactError
        When trajectory.h5 is missing, unreadable or contains no trajectory, or
        another process is writing report.html.
    """
    if plotly_js not in PLOTLY_JS_MODES:
        raise Doodl3Error(
            f"--plotly-js: expected one of {', '.join(PLOTLY_JS_MODES)}, got {plotly_js!r}; "
            "use inline for one self-contained page"
        )
    run.require_exists()
    with WriterLock(run.report, writer="report"):
        page = _render_report(run, plotly_js)
        remove_stale_temporaries(run.report)
        remove_stale_temporaries(run.path / PLOTLY_FILE)
        if plotly_js == "beside":
            atomic_write_text(run.path / PLOTLY_FILE, plotly.offline.get_plotlyjs())
        atomic_write_text(run.report, page)
    log.info("wrote %s (%.1f MiB)", run.report, run.report.stat().st_size / 2**20)
    return run.report


def _render_report(run: RunFolder, plotly_js: str) -> str:
    content = read_run_content(run)
    sections = [
        summary_section(content),
        landscape_section(content),
        topology_section(content),
        dynamics_section(content),
        diagnostics_section(content),
        ensemble_section(content),
        provenance_section(content),
    ]
    notes = [
        note(
            f"{stage} is out of date: its inputs changed after it was written.",
            command=content.command(stage),
            warning=True,
        )
        for stage in content.stale
    ]
    checkpoints = sum(len(t.step) for t in content.trajectories)
    return render_page(
        title=f"doodl3 report: {run.path.name or run.path}",
        subtitle_lines=[
            f"Run folder {run.path.resolve()}",
            f"{len(content.trajectories)} runs, {checkpoints} checkpoints; "
            f"written {utc_now()} by doodl3 {__version__}",
        ],
        notes=notes,
        sections=sections,
        plotly_js=plotly_js,
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "slice"


def _missing_note(content: RunContent, stage: str, what: str) -> str:
    """Return the note that replaces a section whose artifact is missing or unreadable."""
    return note(f"{what} is left out: {content.problems[stage]}.", command=content.command(stage))


def _format_attr(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# --- 1. summary -----------------------------------------------------------------------------------


def summary_section(content: RunContent) -> Section:
    """Build the summary: one table row per run with its attributes, final loss and final basin and region."""
    section = Section(
        "summary", "1. Summary",
        "One row per recorded run. The final loss is each run's last checkpoint evaluated on the "
        "evaluation set; the basin and attractor region say where on the slice that checkpoint ended. "
        "The findings below state what the analysis found, with the measured evidence.",
    )
    landscape = content.landscapes[0] if content.landscapes else None
    topology = content.topologies.get(landscape.name) if landscape else None
    dynamics = content.dynamics.get(landscape.name) if landscape else None

    attr_keys = _attr_columns(content)
    accuracy_keys = sorted({k for t in content.trajectories for k in t.metrics if ACCURACY_PATTERN.search(k)})
    slice_label = f" (slice '{landscape.name}')" if landscape else ""
    headers = (
        ["run"] + attr_keys + ["checkpoints", "last step", "final loss, evaluation set", "final training loss, logged"]
        + [f"final {key}, logged" for key in accuracy_keys]
        + ["off-plane residual, final", f"basin{slice_label}", f"attractor region{slice_label}", "path / displacement"]
    )

    rows = []
    for index, trajectory in enumerate(content.trajectories):
        projection = landscape.projections.get(trajectory.name) if landscape else None
        row = [swatch(trajectory_color(index), trajectory.name)]
        row += [Cell(_format_attr(trajectory.attrs.get(key, ""))) for key in attr_keys]
        row += [
            Cell(str(len(trajectory.step)), numeric=True),
            Cell(str(int(trajectory.step[-1])) if len(trajectory.step) else "n/a", numeric=True),
            Cell(_last(projection.loss) if projection else "not sampled", numeric=projection is not None),
            Cell(_last(trajectory.metrics.get("loss")), numeric=True),
        ]
        row += [Cell(_last(trajectory.metrics.get(key)), numeric=True) for key in accuracy_keys]
        row += [
            Cell(_last(projection.residual) if projection else "not sampled", numeric=projection is not None),
            Cell(_basin_label(topology, trajectory.name)),
            Cell(_region_label(dynamics, trajectory.name)),
            Cell(_path_ratio(content, trajectory.name), numeric=True),
        ]
        rows.append(row)
    shared = _shared_attrs(content)
    if shared:
        section.add(note("Every run has " + ", ".join(f"{key} = {_format_attr(value)}" for key, value in shared.items())
                         + "."))
    section.add(table(headers, rows))
    section.add(findings_html(content))

    if not accuracy_keys:
        section.add(note(
            "No accuracy metric was logged with the checkpoints, so the table has no accuracy column. "
            "Log one (e.g. accuracy=...) when recording to see it here."
        ))
    for stage, what in (("sample", "The evaluation loss and residual"), ("topology", "The basin column"),
                        ("dynamics", "The attractor column and path ratio")):
        if stage in content.problems:
            section.add(_missing_note(content, stage, what))
    return section


def _attr_columns(content: RunContent) -> list[str]:
    """Return the trajectory attributes to show as columns: seed and learning rate first, then the rest by name.

    With more than one run, an attribute that every run has with the same value is
    left out, because `_shared_attrs` states it once above the table.
    """
    keys = {k for t in content.trajectories for k in t.attrs} - set(_shared_attrs(content))
    first = [k for k in ("seed", "learning_rate", "lr") if k in keys]
    return first + sorted(keys - set(first))


def _shared_attrs(content: RunContent) -> dict[str, Any]:
    """Return the attributes that every run has with one value, by name; empty for a single run."""
    if len(content.trajectories) < 2:
        return {}
    first, *others = content.trajectories
    return {
        key: value for key, value in sorted(first.attrs.items())
        if all(key in t.attrs and _format_attr(t.attrs[key]) == _format_attr(value) for t in others)
    }


def _last(values: np.ndarray | None) -> str:
    if values is None or len(values) == 0:
        return "not recorded"
    return format_number(values[-1])


def _basin_label(topology: SliceTopology | None, name: str) -> str:
    if topology is None:
        return "not computed"
    basin = topology.final_basins.get(name)
    if basin is None:
        return "not assigned"
    if basin < 0:
        return "none (outside the grid or on a non-finite cell)"
    if basin >= len(topology.minima):
        return f"m{basin} (not in the minima table)"
    return f"m{basin} (minimum loss {format_number(topology.minima.value[basin])})"


def _region_label(dynamics: SliceDynamics | None, name: str) -> str:
    if dynamics is None:
        return "not computed"
    placement = dynamics.placements.get(name)
    if placement is None or len(placement) == 0:
        return "not placed"
    return region_text(int(placement[-1]))


def region_text(code: int) -> str:
    """Describe a region or placement code of dynamics.h5."""
    if code >= 0:
        return f"Morse set {code}"
    return {
        REGION_NONE: "reaches no attractor",
        REGION_SEPARATRIX: "separatrix (reaches several attractors)",
        REGION_OUTSIDE: "outside the domain",
    }.get(code, f"unknown code {code}")


def _path_ratio(content: RunContent, name: str) -> str:
    diagnostics = content.diagnostics.get(name)
    return format_number(diagnostics.path_over_displacement, 3) if diagnostics else "not computed"


# --- 2. the landscape slice -----------------------------------------------------------------------


def landscape_section(content: RunContent) -> Section:
    """Build the landscape section: contour and surface of every slice with the trajectories on it."""
    section = Section(
        "landscape", "2. The loss landscape slice",
        "The slice is a plane through parameter space; colours are the loss at each grid point of the plane. "
        "Each run is a line, its checkpoints are markers coloured by step, and its final checkpoint is a "
        "diamond. Checkpoints lie off the plane by their residual, so the colour under a marker is the "
        "plane's loss there, not the checkpoint's own loss (both are in the hover text).",
    )
    if "sample" in content.problems:
        section.add(_missing_note(content, "sample", "The landscape slice"))
        return section

    for landscape in content.landscapes:
        slug = _slug(landscape.name)
        if len(content.landscapes) > 1:
            section.add(f"<h3>Slice '{html.escape(landscape.name)}'</h3>")
        topology = content.topologies.get(landscape.name)
        dynamics = content.dynamics.get(landscape.name)
        if dynamics is not None and dynamics.morse.morse_set.shape != landscape.loss.shape:
            log.warning("slice %s: dynamics grid %s differs from the landscape grid %s; Morse sets not drawn",
                        landscape.name, dynamics.morse.morse_set.shape, landscape.loss.shape)
            dynamics = None
        section.add(figure_div(figures.landscape_contour(landscape, topology=topology, dynamics=dynamics),
                               f"landscape-contour-{slug}"))
        section.add(figure_div(figures.landscape_surface(landscape), f"landscape-surface-{slug}"))
        section.add(note(f"Slice '{landscape.name}': {figures.explained_variance_note(landscape.explained_variance)}."))
        section.add(_residual_table(content, landscape))
    for stage, what in (("topology", "Minima and basin boundaries"), ("dynamics", "Morse sets")):
        if stage in content.problems:
            section.add(_missing_note(content, stage, what))
    return section


def _residual_table(content: RunContent, landscape: LandscapeSlice) -> str:
    """Tabulate how far each run's checkpoints lie from the plane, next to their own and on-plane loss."""
    headers = ["run", "max off-plane residual", "final residual", "final own loss", "final loss on the plane"]
    rows = []
    for index, trajectory in enumerate(content.trajectories):
        projection = landscape.projections.get(trajectory.name)
        if projection is None or len(projection.residual) == 0:
            continue
        finite = projection.residual[np.isfinite(projection.residual)]
        rows.append([
            swatch(trajectory_color(index), trajectory.name),
            Cell(format_number(finite.max()) if finite.size else "n/a", numeric=True),
            Cell(format_number(projection.residual[-1]), numeric=True),
            Cell(format_number(projection.loss[-1]), numeric=True),
            Cell(format_number(projection.loss_on_plane[-1]), numeric=True),
        ])
    return table(headers, rows)


# --- 3. topology ----------------------------------------------------------------------------------


def topology_section(content: RunContent) -> Section:
    """Build the topology section: persistence diagram, barcode, resolution pyramid and minima of every slice."""
    section = Section(
        "topology", "3. Topology",
        "Each point is a feature of the sublevel sets of the loss: H0 points are minima (born at their "
        "loss, dying when their basin merges into a deeper one), H1 points are rings. Distance above the "
        "diagonal is persistence; points near the diagonal are sampling noise. The barcode shows the same "
        "pairs as bars from birth to death, one panel per homology dimension. The same slice sampled at every "
        "2nd, 4th, ... point shows which features survive a coarser grid; the bottleneck distance between "
        "successive levels measures how much the diagram moves.",
    )
    if "topology" in content.problems:
        section.add(_missing_note(content, "topology", "The topology section"))
        return section

    for name, topology in content.topologies.items():
        if len(content.topologies) > 1:
            section.add(f"<h3>Slice '{html.escape(name)}'</h3>")
        section.add(figure_div(figures.persistence_diagram(topology), f"persistence-{_slug(name)}"))
        section.add(figure_div(topology_figures.barcode(topology), f"barcode-{_slug(name)}"))
        pyramid = topology_figures.pyramid_figure(topology)
        if pyramid is not None:
            section.add(figure_div(pyramid, f"pyramid-{_slug(name)}"))
        else:
            section.add(note(
                f"Slice '{name}': topology.h5 contains no resolution pyramid (it was written by an older doodl3), "
                "so the persistence across resolutions and the recommended resolution are left out.",
                command=content.command("topology"),
            ))
        section.add(_minima_table(content, topology))
        if topology.nonfinite_cells:
            section.add(note(
                f"{topology.nonfinite_cells} cells of slice '{name}' are NaN or infinite; the topology stage "
                f"treated them as a wall at loss {format_number(topology.wall_value)}."
            ))
    return section


def _minima_table(content: RunContent, topology: SliceTopology) -> str:
    minima = topology.minima
    ending = _runs_by_label(content, topology.final_basins)
    rows = [
        [
            Cell(f"m{k}"),
            Cell(format_number(minima.coords[k, 0]), numeric=True),
            Cell(format_number(minima.coords[k, 1]), numeric=True),
            Cell(format_number(minima.value[k]), numeric=True),
            Cell(format_number(minima.persistence[k]), numeric=True),
            Cell(", ".join(ending.get(k, [])) or "none"),
        ]
        for k in range(min(len(minima), MAX_TABLE_ROWS))
    ]
    text = table(["minimum", "alpha", "beta", "loss", "persistence", "runs ending in its basin"], rows)
    if len(minima) > MAX_TABLE_ROWS:
        text += note(f"Showing the {MAX_TABLE_ROWS} deepest of {len(minima)} significant minima.")
    return text


def _runs_by_label(content: RunContent, final: dict[str, int]) -> dict[int, list[str]]:
    ending: dict[int, list[str]] = {}
    for trajectory in content.trajectories:
        if trajectory.name in final:
            ending.setdefault(int(final[trajectory.name]), []).append(trajectory.name)
    return ending


# --- 4. dynamics ----------------------------------------------------------------------------------


def dynamics_section(content: RunContent) -> Section:
    """Build the dynamics section: Morse sets, the Morse graph and the flow field of every slice."""
    section = Section(
        "dynamics", "4. Dynamics",
        "The negative gradient flow of the sampled loss, decomposed into Morse sets: recurrent sets of grid "
        "boxes ordered by which reaches which. Attractors are where the flow ends; each box is coloured by the "
        "attractor it reaches, and grey boxes reach several (separatrices).",
    )
    if "dynamics" in content.problems:
        section.add(_missing_note(content, "dynamics", "The dynamics section"))
        return section

    for name, dynamics in content.dynamics.items():
        slug = _slug(name)
        if len(content.dynamics) > 1:
            section.add(f"<h3>Slice '{html.escape(name)}'</h3>")
        section.add(_morse_table(content, dynamics))
        section.add(figure_div(figures.morse_graph(dynamics), f"morse-graph-{slug}"))
        landscape = next((s for s in content.landscapes if s.name == name), None)
        section.add(figure_div(figures.flow_field(dynamics, landscape=landscape), f"flow-field-{slug}"))
        section.add(_morse_pyramid_table(dynamics))
    return section


def _morse_pyramid_table(dynamics: SliceDynamics) -> str:
    """Tabulate the Morse graph at each coarser grid level, and where each Morse set of the full grid went."""
    levels = getattr(dynamics, "pyramid", None) or []
    if not levels:
        return note(f"Slice '{dynamics.name}': dynamics.h5 contains no Morse graphs of coarser grids, so their "
                    "stability is not shown.")
    nx, ny = dynamics.morse.morse_set.shape
    rows = [[
        Cell("1 (full grid)"), Cell(f"{nx}x{ny}"), Cell(str(dynamics.morse.n_sets), numeric=True),
        Cell(str(int(dynamics.morse.attractor.sum())), numeric=True), Cell("itself"),
    ]]
    for level in levels:
        stride = int(level.stride)
        finest = np.asarray(level.finest_set).tolist()
        rows.append([
            Cell(str(stride)),
            Cell(f"{len(range(0, nx, stride))}x{len(range(0, ny, stride))}"),
            Cell(str(level.morse.n_sets), numeric=True),
            Cell(str(int(level.morse.attractor.sum())), numeric=True),
            Cell(", ".join(f"{k} to {'none' if s < 0 else s}" for k, s in enumerate(finest[:MAX_TABLE_ROWS])) or "none"),
        ])
    return "<h3>Morse graph across grid resolutions</h3>" + table(
        ["sample stride", "grid", "Morse sets", "attractors", "full-grid Morse set k lies in set"], rows,
    ) + note("A Morse set that survives every coarser grid is a feature of the flow; one that merges or vanishes "
             "at stride 2 may be an artefact of the sampling.")


def _morse_table(content: RunContent, dynamics: SliceDynamics) -> str:
    graph = dynamics.morse
    below: dict[int, list[int]] = {}
    for upper, lower in np.asarray(graph.hasse_edges).reshape(-1, 2):
        below.setdefault(int(upper), []).append(int(lower))
    final = {name: int(p[-1]) for name, p in dynamics.placements.items() if len(p)}
    ending = _runs_by_label(content, final)

    rows = []
    for s in range(min(graph.n_sets, MAX_TABLE_ROWS)):
        kind = ""
        if graph.attractor[s]:
            kind = "attractor"
        elif graph.repeller[s]:
            kind = "repeller"
        rows.append([
            Cell(str(s)),
            Cell(kind),
            Cell(str(int(graph.set_cells[s])), numeric=True),
            Cell(format_number(graph.set_min_loss[s]), numeric=True),
            Cell(figures.conley_text(graph, s)),
            Cell(", ".join(str(b) for b in sorted(below.get(s, []))) or "none"),
            Cell(", ".join(ending.get(s, [])) if graph.attractor[s] else ""),
        ])
    text = table(["Morse set", "kind", "boxes", "min loss", "Conley index", "flows directly to",
                  "runs ending in its region"], rows)
    if graph.n_sets > MAX_TABLE_ROWS:
        text += note(f"Showing the {MAX_TABLE_ROWS} lowest of {graph.n_sets} Morse sets.")
    elsewhere = [f"{name} ({region_text(code)})" for name, code in final.items() if code < 0]
    if elsewhere:
        text += note("Runs whose final checkpoint is in no single attractor's region: " + ", ".join(elsewhere) + ".")
    return text


# --- 5. training diagnostics ----------------------------------------------------------------------


def diagnostics_section(content: RunContent) -> Section:
    """Build the diagnostics section: loss, speed and update cosine of every run over its steps."""
    section = Section(
        "diagnostics", "5. Training diagnostics",
        "Each run over its training steps: the loss, the speed (distance in parameter space per step), "
        "the cosine between successive updates and, where the model could be rebuilt, the sharpness (top "
        "Hessian eigenvalue). A cosine near -1 means the run oscillates across a valley; near 1 it moves "
        "straight. Sharpness above 2 / learning rate means gradient descent with that step is unstable.",
    )
    projections = content.landscapes[0].projections if content.landscapes else None
    section.add(figure_div(
        training_figures.training_diagnostics(content.trajectories, projections=projections,
                                              diagnostics=content.diagnostics or None, findings=content.findings),
        "training-diagnostics",
    ))
    if "dynamics" in content.problems:
        section.add(_missing_note(content, "dynamics", "Speed and cosine"))
    if "sample" in content.problems:
        section.add(_missing_note(content, "sample", "The loss on the evaluation set"))
    return section


# --- 6. provenance --------------------------------------------------------------------------------


def provenance_section(content: RunContent) -> Section:
    """Build the provenance section: root attributes and slice settings of every artifact."""
    section = Section(
        "provenance", "7. Provenance",
        "Which doodl3 version wrote each artifact, when, with which settings, and the content id of each "
        "input it was computed from. An input marked 'changed since' means the artifact is out of date.",
    )
    slice_attrs = _slice_attributes(content)
    for entry in content.provenance:
        attrs = entry.attrs
        rows = [
            [Cell("written by"), Cell(content.command(entry.stage, attrs.get("settings")))],
            [Cell("schema"), Cell(f"{attrs['schema']} version {attrs['schema_version']}")],
            [Cell("doodl3 version"), Cell(attrs["doodl3_version"] or "not recorded")],
            [Cell("created"), Cell(attrs["created"] or "not recorded")],
            [Cell("content id"), Cell(attrs["content_id"] or "not recorded")],
            [Cell("inputs"), _lines_cell(_input_lines(content, attrs["upstream"]) or ["none"])],
            [Cell("settings"), key_value_cell(attrs["settings"])],
        ]
        for name, values in slice_attrs.get(entry.path.name, {}).items():
            rows.append([Cell(f"slice '{name}'"), key_value_cell(values)])
        section.add(f"<h3>{html.escape(entry.path.name)}</h3>")
        section.add(table(["attribute", "value"], rows))
    for stage, problem in content.problems.items():
        section.add(note(f"{stage}: {problem}."))
    return section


def _input_lines(content: RunContent, upstream: Any) -> list[str]:
    """List each recorded input with its content id and whether the file still has that id."""
    if not isinstance(upstream, dict):
        return [f"unreadable upstream attribute: {upstream!r}"]
    lines = []
    for name, recorded in sorted(upstream.items()):
        current = read_content_id(content.run.path / name)
        if current is None:
            state = "file missing now"
        elif current == recorded:
            state = "current"
        else:
            state = f"changed since, now {current}"
        lines.append(f"{name}: {recorded} ({state})")
    return lines


def _slice_attributes(content: RunContent) -> dict[str, dict[str, dict[str, Any]]]:
    """Collect the slice attributes by artifact file name and slice name: how each grid was sampled and analysed."""
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for landscape in content.landscapes:
        found.setdefault("landscape.h5", {})[landscape.name] = landscape.attrs
    for name, topology in content.topologies.items():
        found.setdefault("topology.h5", {})[name] = {
            "convention": topology.convention, "threshold": topology.threshold,
            "threshold_rule": topology.threshold_rule, "nonfinite_cells": topology.nonfinite_cells,
            "wall_value": topology.wall_value,
        }
    for name, dynamics in content.dynamics.items():
        found.setdefault("dynamics.h5", {})[name] = dynamics.attrs
    return found


def key_value_cell(values: Any) -> Cell:
    """Build a table cell that lists a mapping as ``key = value`` lines, with values as JSON."""
    if not isinstance(values, dict):
        return _lines_cell([json.dumps(_plain(values), sort_keys=True)])
    if not values:
        return Cell("none")
    return _lines_cell([f"{key} = {json.dumps(_plain(value), sort_keys=True)}" for key, value in sorted(values.items())])


def _lines_cell(lines: list[str]) -> Cell:
    return Cell('<span class="lines">' + "<br>".join(html.escape(line) for line in lines) + "</span>", trusted_html=True)


def _plain(value: Any) -> Any:
    """Convert numpy values and non-finite floats into JSON-safe plain values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return format_number(value)
    return value

