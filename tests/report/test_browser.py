"""Open reports in headless Chromium with the network blocked and check that every figure renders."""

from pathlib import Path

import pytest

from tests.report.test_page import ALL_FIGURES

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} not found (apt-get install chromium)"),
]

# Per figure div: the number of plotly SVG roots and WebGL canvases it contains once drawn.
RENDERED = """() => Array.from(document.querySelectorAll('div.figure')).map(div => ({
    id: div.id,
    svg: div.querySelectorAll('.main-svg').length,
    webgl: div.querySelectorAll('.gl-container canvas').length,
}))"""


def render_offline(report: Path, screenshot: Path) -> dict:
    """Open `report` from a file URL with every other request aborted; wait until each figure has drawn.

    Returns the console errors, page errors, blocked URLs and the `RENDERED` record
    of every figure, and saves a full-page screenshot to `screenshot`.
    """
    result = {"console_errors": [], "page_errors": [], "blocked": []}

    def only_files(route):
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            result["blocked"].append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900}, offline=True)
            context.route("**/*", only_files)
            page = context.new_page()
            page.on("console", lambda message: message.type == "error" and result["console_errors"].append(message.text))
            page.on("pageerror", lambda error: result["page_errors"].append(str(error)))

            page.goto(report.resolve().as_uri(), wait_until="load")
            page.wait_for_function(
                "() => Array.from(document.querySelectorAll('div.figure'))"
                ".every(div => div.querySelector('.main-svg'))",
                timeout=60_000,
            )
            result["figures"] = page.evaluate(RENDERED)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return result


def test_report_renders_offline(analysed_report, tmp_path):
    screenshot = tmp_path / "report.png"

    result = render_offline(analysed_report, screenshot)

    assert result["console_errors"] == []
    assert result["page_errors"] == []
    assert result["blocked"] == []
    assert [f["id"] for f in result["figures"]] == [f"{name}-box" for name in ALL_FIGURES]
    for figure in result["figures"]:
        assert figure["svg"] > 0 or figure["webgl"] > 0, figure["id"]
    surface = next(f for f in result["figures"] if f["id"] == "landscape-surface-pca-box")
    assert surface["webgl"] > 0
    assert screenshot.stat().st_size > 10_000


def test_report_beside_renders_offline(run_copy, tmp_path):
    from doodl3_cli.report.page import write_report

    report = write_report(run_copy, plotly_js="beside")

    result = render_offline(report, tmp_path / "beside.png")

    assert result["console_errors"] == []
    assert result["page_errors"] == []
    assert result["blocked"] == []
    assert len(result["figures"]) == len(ALL_FIGURES)
