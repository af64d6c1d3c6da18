"""Open a page in headless Chromium (Debian's `chromium`, driven by Playwright; no browser download)
and report what a reader would see go wrong: images that did not load, console errors, page errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def chromium_path() -> str:
    """The system Chromium (`DIFFTUNE_CHROMIUM` overrides); the test is skipped only outside CI."""
    path = os.environ.get("DIFFTUNE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium package)")
        pytest.skip("chromium is not installed: apt-get install chromium")
    return path


def check_page(html_file: Path, screenshot: Path) -> dict:
    """Load `html_file`, wait for it, save a full-page screenshot; return the images and problems."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            pg = browser.new_page(viewport={"width": 1280, "height": 900})
            pg.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            pg.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            pg.on("requestfailed", lambda r: errors.append(f"request failed: {r.url[:80]}"))
            pg.goto(html_file.resolve().as_uri(), wait_until="load")
            images = pg.eval_on_selector_all(
                "img", "els => els.map(e => ({alt: e.alt, complete: e.complete, width: e.naturalWidth, "
                "height: e.naturalHeight}))")
            text = pg.inner_text("body")
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            pg.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    broken = [i["alt"] for i in images if not i["complete"] or i["width"] == 0 or i["height"] == 0]
    return {"images": images, "broken": broken, "errors": errors, "text": text}
