"""The findings of the summary: plain sentences with their evidence.

The sentences come from two sources. The first is where the runs ended: the basins
of topology.h5 and the attractor regions of dynamics.h5. The second is the findings
that the dynamics stage stored in dynamics.h5 (oscillation, plateaus, divergence,
sharpness, ensemble splits), each with its measured evidence and a suggested change.
"""

from __future__ import annotations

import html
from typing import Any, Sequence

from doodl3_cli.dynamics.diagnostics import SEGMENT_KINDS
from doodl3_cli.report.content import RunContent
from doodl3_cli.report.figures import format_number

MAX_FINDINGS = 40
# Kinds whose `steps` are the first and last step of a segment; the others list checkpoint steps.
SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


def endpoint_sentences(content: RunContent) -> list[str]:
    """Describe which basin and which attractor region the runs ended in, one sentence per artifact."""
    sentences = []
    topology = next(iter(content.topologies.values()), None)
    if topology is not None and topology.final_basins:
        groups = _group_by(topology.final_basins)
        total = len(topology.final_basins)
        described = [f"{_basin_name(b)}: {_members(runs, total)}" for b, runs in sorted(groups.items())]
        count = sum(1 for b in groups if b >= 0)
        sentences.append(
            f"On the slice '{topology.name}' the runs end in {count} of its {len(topology.minima)} significant "
            f"basins ({'; '.join(described)})."
        )
    dynamics = next(iter(content.dynamics.values()), None)
    ensemble = getattr(dynamics, "ensemble", None) if dynamics is not None else None
    if ensemble is not None and len(ensemble.runs):
        regions = sorted(code for code in ensemble.groups if code >= 0)
        early = getattr(ensemble, "early_matches_final", float("nan"))
        sentences.append(
            f"Under the gradient flow of the slice, the final checkpoints lie in the regions of {len(regions)} "
            f"attractor(s) ({'; '.join(f'Morse set {c}: {_members(ensemble.groups[c], len(ensemble.runs))}' for c in regions)}); "
            f"the region of an early checkpoint already matches the final one for "
            f"{format_number(100 * early, 3)}% of the runs."
        )
    return sentences


def _group_by(assignment: dict[str, int]) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for name, label in assignment.items():
        groups.setdefault(int(label), []).append(name)
    return groups


def _basin_name(basin: int) -> str:
    return f"m{basin}" if basin >= 0 else "outside every basin"


def _members(runs: Sequence[str], total: int) -> str:
    """Return the names of the runs of a group, or "all N runs" when the group contains every one of `total`."""
    if len(runs) == total and total > 1:
        return f"all {total} runs"
    return _run_list(runs)


def _run_list(runs: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(runs[:limit])
    return shown + (f" and {len(runs) - limit} more" if len(runs) > limit else "")


def finding_sentence(finding: Any) -> str:
    """Write one stored finding as a sentence: what, which runs, which steps, the evidence and the suggestion."""
    steps = list(getattr(finding, "steps", []))
    if finding.kind in SEGMENT_KINDS and len(steps) == 2:
        where = f" between steps {steps[0]} and {steps[1]}"
    elif steps:
        where = " at step" + ("s " if len(steps) > 1 else " ") + ", ".join(str(s) for s in steps)
    else:
        where = ""
    evidence = "; ".join(f"{key.replace('_', ' ')} {_value_text(value)}" for key, value in finding.evidence.items())
    sentence = f"{finding.kind.replace('_', ' ').capitalize()} in {_run_list(finding.runs)}{where}"
    if evidence:
        sentence += f" (evidence: {evidence})"
    sentence += "."
    if finding.suggestion:
        sentence += f" Suggested change: {finding.suggestion}."
    return sentence


def _value_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(_value_text(v) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return format_number(value)


def findings_html(content: RunContent) -> str:
    """Build the findings list of the summary: where the runs ended, then the stored findings by severity."""
    items = [f"<li>{html.escape(sentence)}</li>" for sentence in endpoint_sentences(content)]
    ordered = sorted(content.findings, key=lambda f: SEVERITY_ORDER.get(getattr(f, "severity", ""), 3))
    for finding in ordered[:MAX_FINDINGS]:
        severity = html.escape(getattr(finding, "severity", "info"))
        items.append(f'<li class="{severity}"><b>{severity}</b>: {html.escape(finding_sentence(finding))}</li>')
    if not items:
        return ""
    text = '<h3>Findings</h3>\n<ul class="findings">\n' + "\n".join(items) + "\n</ul>"
    if len(ordered) > MAX_FINDINGS:
        text += (f'<p class="note">Showing {MAX_FINDINGS} of {len(ordered)} findings, errors first; '
                 "the rest are in dynamics.h5 under /findings.</p>")
    return text
