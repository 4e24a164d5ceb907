"""The demo app in a real browser: headless Chromium (the system's Debian `chromium` package, driven by Playwright
from PyPI -- never `playwright install`, which downloads browsers) opens the app, uploads an image, runs the
zero-shot tab and reads the rendered prediction; a screenshot is saved under the test's temp dir.

Skipped, with the reason, only when Playwright or a Chromium binary cannot be found (`.ci/run` installs
`chromium` with apt-get when it runs as root). Set `VLM_LAB_CHROMIUM=/path/to/chrome` to use another binary.
"""

from __future__ import annotations

import os
import shutil

import pytest
from PIL import Image

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

from vlm_lab.data.shapes import ShapesDataset  # noqa: E402
from vlm_lab.demos import app as A  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def _browser() -> str | None:
    override = os.environ.get("VLM_LAB_CHROMIUM")
    if override:
        return override if os.path.isfile(override) else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_zero_shot_in_a_real_browser(tmp_path):
    executable = _browser()
    if executable is None:
        pytest.skip("no Chromium binary found (apt-get install chromium, or set VLM_LAB_CHROMIUM)")
    truth = ShapesDataset("heldout", n=1, seed=3, image_size=32)
    expected = truth.class_names[truth[0]["labels"]]
    image = tmp_path / "scene.png"
    Image.fromarray(A._sample_image("shapes")).save(image)

    app, url = A.launch(tabs=("zero_shot",), prevent_thread_lock=True, quiet=True)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, headless=True, args=ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(url, wait_until="networkidle", timeout=60_000)
                page.locator("input[type=file]").first.set_input_files(str(image))
                page.wait_for_selector("img[src*='gradio_api/file'], img[src*='/file=']", timeout=30_000)
                page.get_by_role("button", name="Classify").click()
                label = page.locator("#zs-label")
                label.get_by_text(expected, exact=False).first.wait_for(timeout=60_000)
                text = label.inner_text()
                page.screenshot(path=str(tmp_path / "zero_shot.png"), full_page=True)
            finally:
                browser.close()
    finally:
        app.close()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert lines[0] == "zero-shot prediction" and lines[1] == expected, lines  # the headline is the top class
    assert any(line.endswith("%") for line in lines)  # the rendered confidence bars
    assert (tmp_path / "zero_shot.png").stat().st_size > 10_000
