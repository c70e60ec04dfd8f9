"""Open a report in headless Chromium and check what only a browser can: every image decodes, no
console or page error occurs, every in-page link (table of contents, references to tables and
figures) has its target; measure the page and save a screenshot of the first screen.

Driven by Playwright (the `browser` extra, also in `dev`) with the Chromium that Playwright
installed (`playwright install chromium`) or the system's (chromium, chromium-browser,
google-chrome; or RANKSCOPE_CHROMIUM=/path). Nothing is downloaded here.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from rankscope.errors import RankscopeError

SYSTEM_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
VIEWPORT = (1400, 1000)  # a laptop screen: what "the first screen" means in the docs and the tests

_AUDIT = """() => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt || i.src.slice(0, 40));
  const links = Array.from(document.querySelectorAll('a[href^="#"]')).map(a => a.getAttribute('href').slice(1));
  const dangling = [...new Set(links.filter(id => !document.getElementById(id)))];
  return {images: images.length, broken, links: links.length, dangling,
          height: document.documentElement.scrollHeight, width: document.documentElement.scrollWidth};
}"""


@dataclass
class BrowserCheck:
    images: int
    broken_images: list[str]
    links: int
    dangling_links: list[str]
    console_errors: list[str] = field(default_factory=list)
    page_height: int = 0
    page_width: int = 0

    @property
    def ok(self) -> bool:
        return not (self.broken_images or self.dangling_links or self.console_errors)

    def summary(self) -> str:
        problems = [f"broken images: {', '.join(self.broken_images)}" if self.broken_images else "",
                    f"links without a target: {', '.join(self.dangling_links)}" if self.dangling_links else "",
                    f"console errors: {' | '.join(self.console_errors)}" if self.console_errors else ""]
        head = (f"{self.images} images, {self.links} in-page links, page {self.page_width} x {self.page_height} px "
                f"at {VIEWPORT[0]} px wide")
        return head + ("; OK" if self.ok else "; " + "; ".join(p for p in problems if p))


def find_chromium() -> str | None:
    """The Chromium to drive: RANKSCOPE_CHROMIUM, else Playwright's own (None: let Playwright find
    it), else a system browser on PATH. Raises when Playwright is not installed."""
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError as exc:
        raise RankscopeError("the browser check needs Playwright: pip install 'rankscope[browser]'") from exc
    if os.environ.get("RANKSCOPE_CHROMIUM"):
        return os.environ["RANKSCOPE_CHROMIUM"]
    for name in SYSTEM_BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def check_report(html_path: str | Path, screenshot: str | Path | None = None) -> BrowserCheck:
    """Load ``html_path`` in headless Chromium and audit it; optionally save the first screen."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise RankscopeError(f"no report at {html_path}: build it with `rankscope report STUDY_DIR`")
    executable = find_chromium()
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        except PlaywrightError as exc:
            raise RankscopeError("no Chromium to run the browser check: install one (`playwright install chromium` or "
                                 "your system's chromium package) or set RANKSCOPE_CHROMIUM=/path/to/chromium; "
                                 f"{str(exc).splitlines()[0]}") from exc
        try:
            page = browser.new_page(viewport={"width": VIEWPORT[0], "height": VIEWPORT[1]})
            errors: list[str] = []
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(html_path.as_uri(), wait_until="load")
            audit = page.evaluate(_AUDIT)
            if screenshot is not None:
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot))
        finally:
            browser.close()
    return BrowserCheck(audit["images"], audit["broken"], audit["links"], audit["dangling"], errors,
                        int(audit["height"]), int(audit["width"]))


__all__ = ["VIEWPORT", "BrowserCheck", "check_report", "find_chromium"]
