"""HTML building blocks of the report page: layout, tables, notes and embedded figures.

Every figure is a ``<div class="figure">`` with its data inline. plotly.js is either
embedded once in the head (``inline``, the default: one self-contained file) or
written once as `PLOTLY_FILE` next to the page and loaded by a relative path
(``beside``: a smaller page for folders with many reports). Either way the page
opens offline and never requests a resource from the network.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Sequence

import plotly
import plotly.io as pio
import plotly.offline
from plotly.graph_objects import Figure

from doodl3_cli.errors import Doodl3Error

PLOTLY_JS_MODES = ("inline", "beside")
PLOTLY_FILE = "plotly.min.js"

PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}

PAGE_CSS = """
:root { --ink: #1f2933; --muted: #5f6b7a; --rule: #d9dee5; --accent: #1f77b4; --warn: #8a5a00; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; }
header h1 { margin: 0 0 4px; font-size: 26px; }
header p { margin: 2px 0; color: var(--muted); }
nav { margin: 16px 0 8px; padding: 8px 0; border-top: 1px solid var(--rule); border-bottom: 1px solid var(--rule); }
nav a { margin-right: 18px; color: var(--accent); text-decoration: none; }
section { margin-top: 36px; }
h2 { font-size: 20px; margin: 0 0 6px; padding-bottom: 4px; border-bottom: 2px solid var(--rule); }
h3 { font-size: 16px; margin: 22px 0 6px; }
p.intro { margin: 6px 0 12px; color: var(--muted); max-width: 860px; }
p.note { margin: 8px 0; padding: 8px 12px; background: #f6f8fa; border-left: 3px solid var(--rule); }
p.warning { margin: 8px 0; padding: 8px 12px; background: #fff8e6; border-left: 3px solid #e0a100; color: var(--warn); }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #f1f3f5; padding: 1px 4px; border-radius: 3px; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; margin: 8px 0; font-size: 14px; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--rule); text-align: left; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td:first-child { white-space: nowrap; }
span.lines { font: 12.5px/1.5 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; word-break: break-all; }
span.swatch { display: inline-block; width: 10px; height: 10px; margin-right: 6px; border-radius: 2px; }
#summary td { white-space: nowrap; }
ul.findings { margin: 8px 0 12px; padding-left: 22px; max-width: 980px; }
ul.findings li { margin: 4px 0; }
ul.findings li.error b { color: #b42318; }
ul.findings li.warning b { color: var(--warn); }
div.figure { margin: 12px 0 20px; border: 1px solid var(--rule); border-radius: 4px; padding: 4px; }
"""


@dataclass
class Cell:
    """One table cell: escaped text, or trusted HTML, right-aligned when numeric."""

    text: str
    numeric: bool = False
    trusted_html: bool = False

    def render(self, tag: str = "td") -> str:
        body = self.text if self.trusted_html else html.escape(self.text)
        css = ' class="num"' if self.numeric and tag == "td" else ""
        return f"<{tag}{css}>{body}</{tag}>"


@dataclass
class Section:
    """One section of the page: heading, a line on how to read it, and its body HTML."""

    anchor: str
    title: str
    intro: str
    parts: list[str] = field(default_factory=list)

    def add(self, fragment: str) -> None:
        self.parts.append(fragment)

    def render(self) -> str:
        body = "\n".join(self.parts)
        return (
            f'<section id="{html.escape(self.anchor)}">\n<h2>{html.escape(self.title)}</h2>\n'
            f'<p class="intro">{html.escape(self.intro)}</p>\n{body}\n</section>'
        )


def figure_div(fig: Figure, div_id: str) -> str:
    """Render a figure as a ``div.figure`` that relies on the page's single plotly.js.

    The top margin grows with the number of lines in the title, so notes under
    the title never overlap the plot.
    """
    title = fig.layout.title.text or ""
    lines = title.count("<br>") + 1 if title else 0
    wanted = 60 + 22 * lines
    if (fig.layout.margin.t or 0) < wanted:
        fig.update_layout(margin={"t": wanted})
        if fig.layout.height:
            fig.update_layout(height=fig.layout.height + max(0, wanted - 100))
    height = fig.layout.height or 500
    inner = pio.to_html(
        fig,
        include_plotlyjs=False,
        include_mathjax=False,
        full_html=False,
        div_id=div_id,
        default_width="100%",
        default_height=f"{int(height)}px",
        config=PLOTLY_CONFIG,
        validate=True,
    )
    return f'<div class="figure" id="{html.escape(div_id)}-box">{inner}</div>'


def note(text: str, *, command: str | None = None, warning: bool = False) -> str:
    """Build a note paragraph, with `command` (e.g. the command that fills a gap) appended as inline code."""
    body = html.escape(text)
    if command:
        body += f" Run <code>{html.escape(command)}</code>."
    css = "warning" if warning else "note"
    return f'<p class="{css}">{body}</p>'


def table(headers: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    """Build an HTML table with a header row, escaping cell text unless it is marked trusted."""
    head = "".join(Cell(h).render("th") for h in headers)
    body = "\n".join("<tr>" + "".join(cell.render() for cell in row) + "</tr>" for row in rows)
    return f'<div class="table-wrap"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table></div>'


def swatch(color: str, label: str) -> Cell:
    """Build a table cell with a colour swatch that matches a trajectory's line colour."""
    return Cell(
        f'<span class="swatch" style="background:{html.escape(color)}"></span>{html.escape(label)}',
        trusted_html=True,
    )


def plotly_script(mode: str = "inline") -> str:
    """Return the script tag that loads plotly.js: the bundle inline, or a relative link to `PLOTLY_FILE`.

    Raises
    ------
    Doodl3Error
        When `mode` is not one of `PLOTLY_JS_MODES`.
    """
    if mode == "inline":
        source = plotly.offline.get_plotlyjs()
        # The bundle contains no "</script" today; guard so a future bundle cannot end the tag early.
        source = source.replace("</script", "<\\/script")
        return (
            f"<script type=\"text/javascript\">/* plotly.js bundled with plotly.py {plotly.__version__}, "
            f"embedded so the page works offline */\n{source}\n</script>"
        )
    if mode == "beside":
        return (
            f"<!-- plotly.js bundled with plotly.py {plotly.__version__}, written next to this page -->\n"
            f'<script type="text/javascript" src="{PLOTLY_FILE}"></script>'
        )
    raise Doodl3Error(f"plotly.js mode: expected one of {', '.join(PLOTLY_JS_MODES)}, got {mode!r}")


def render_page(
    *,
    title: str,
    subtitle_lines: Sequence[str],
    notes: Sequence[str],
    sections: Sequence[Section],
    plotly_js: str = "inline",
) -> str:
    """Assemble the whole page: head with CSS and plotly.js (see `plotly_script`), header, navigation, sections."""
    nav = " ".join(f'<a href="#{html.escape(s.anchor)}">{html.escape(s.title)}</a>' for s in sections)
    subtitle = "\n".join(f"<p>{html.escape(line)}</p>" for line in subtitle_lines)
    body = "\n\n".join(section.render() for section in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{PAGE_CSS}</style>\n{plotly_script(plotly_js)}\n</head>\n"
        f"<body>\n<main>\n<header>\n<h1>{html.escape(title)}</h1>\n{subtitle}\n</header>\n"
        f"{''.join(notes)}\n<nav>{nav}</nav>\n{body}\n</main>\n</body>\n</html>\n"
    )
