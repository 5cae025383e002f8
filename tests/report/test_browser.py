"""Open the report in headless Chromium with the network blocked and check that every figure renders."""

from pathlib import Path

import pytest

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


def test_report_renders_offline(analysed_report, tmp_path):
    console_errors = []
    page_errors = []
    blocked = []

    def only_files(route):
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900}, offline=True)
            context.route("**/*", only_files)
            page = context.new_page()
            page.on("console", lambda message: message.type == "error" and console_errors.append(message.text))
            page.on("pageerror", lambda error: page_errors.append(str(error)))

            page.goto(analysed_report.resolve().as_uri(), wait_until="load")
            page.wait_for_function(
                "() => Array.from(document.querySelectorAll('div.figure'))"
                ".every(div => div.querySelector('.main-svg'))",
                timeout=20_000,
            )
            figures = page.evaluate(RENDERED)
            screenshot = tmp_path / "report.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()

    assert console_errors == []
    assert page_errors == []
    assert blocked == []
    assert len(figures) == 6
    for figure in figures:
        assert figure["svg"] > 0 or figure["webgl"] > 0, figure["id"]
    surface = next(f for f in figures if f["id"] == "landscape-surface-pca-box")
    assert surface["webgl"] > 0
    assert screenshot.stat().st_size > 10_000
