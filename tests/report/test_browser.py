"""The report in a real browser (headless Chromium through Playwright): every image loads, no
console error, every in-page link has its target, a link into a collapsed section opens it; and
the check itself catches each of those faults. Skipped, with the reason, where Playwright or a
Chromium is not installed."""

from __future__ import annotations

import pytest
from test_report import make_study

from rankscope.errors import RankscopeError
from rankscope.report import build_report
from rankscope.report.browser import VIEWPORT, check_report, find_chromium


def _chromium_or_skip() -> str | None:
    try:
        executable = find_chromium()
    except RankscopeError as exc:
        pytest.skip(str(exc))
    from playwright.sync_api import Error, sync_playwright

    with sync_playwright() as playwright:
        try:
            playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"]).close()
        except Error as exc:
            pytest.skip(f"no Chromium can be started here (install one, or set RANKSCOPE_CHROMIUM): "
                        f"{str(exc).splitlines()[0]}")
    return executable


@pytest.fixture(scope="module")
def report_html(tmp_path_factory):
    _chromium_or_skip()
    study, _ = make_study(tmp_path_factory.mktemp("browser"), seeds=(0, 1, 2))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("rankscope.methods.tuned.tuned_table", lambda: {})
        return build_report(study) / "report.html"


def test_the_report_loads_cleanly_in_chromium(report_html, tmp_path):
    screenshot = tmp_path / "first_screen.png"
    check = check_report(report_html, screenshot=screenshot)
    assert check.ok, check.summary()
    assert check.images == report_html.read_text().count("<img ") >= 10
    assert check.links >= 20  # the table of contents and the findings' references
    from PIL import Image

    with Image.open(screenshot) as image:
        assert image.size == VIEWPORT


def test_a_link_into_a_collapsed_section_opens_it(report_html):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=find_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": VIEWPORT[0], "height": VIEWPORT[1]})
        page.goto(report_html.as_uri())
        appendix = "document.getElementById('appendix-tests').closest('details').open"
        assert page.evaluate(appendix) is False
        page.click("nav#toc a[href='#appendix-tests']")
        page.wait_for_function(appendix)
        # a reference from the findings to the per-test table, inside the same collapsed section
        page.evaluate("document.getElementById('appendix-tests').closest('details').open = false")
        page.click(".findings a[href='#tests']")
        page.wait_for_function(appendix)
        browser.close()


def test_the_check_catches_a_broken_image_a_dangling_link_and_a_script_error(report_html, tmp_path):
    broken = tmp_path / "broken.html"
    text = report_html.read_text()
    text = text.replace("src='data:image/png;base64,", "src='data:image/png;base64,AAAA", 1)
    text = text.replace("</body>", "<a href='#no-such-table'>Table 99</a><script>undefinedCall();</script></body>")
    broken.write_text(text)
    check = check_report(broken)
    assert not check.ok
    assert len(check.broken_images) == 1 and check.dangling_links == ["no-such-table"]
    assert any("undefinedCall" in error for error in check.console_errors)
