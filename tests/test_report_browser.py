"""The report as a browser sees it: headless Chromium loads the page of a small bench folder (built as in
test_report.py), every image decodes (naturalWidth > 0), the page logs no error, every section is there, and a
screenshot of the whole page is written. Skipped, saying why, where no Chromium binary is installed."""

import pytest
from tests.test_report import make_fake_bench

from advreid.reporting import SECTIONS
from advreid.reporting.browser import check_report_in_browser, find_chromium

pytestmark = pytest.mark.skipif(
    find_chromium() is None,
    reason="no Chromium binary (/usr/bin/chromium, chromium or chromium-browser on PATH): the browser check needs "
           "Debian's chromium package (apt-get install -y chromium; .ci/run installs it when it can)")


def test_report_loads_in_chromium(tmp_path, synth_root):
    from advreid.experiments.report import build_report

    out = tmp_path / "bench"
    out.mkdir()
    make_fake_bench(out, synth_root)
    html = build_report(out)
    shot = tmp_path / "report.png"
    res = check_report_in_browser(html, shot, timeout=60)
    assert res["errors"] == []
    assert res["broken"] == []
    assert res["images"] == len(list((out / "figures").glob("*.png"))) >= 12
    assert res["sections"] == [s for s, _ in SECTIONS] == res["expected_sections"]
    assert res["missing_sections"] == []
    assert shot.stat().st_size > 20_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["height"] > 2000  # the screenshot window is as tall as the page


def test_browser_check_reports_broken_images_and_errors(tmp_path):
    page = tmp_path / "bad.html"
    from advreid.reporting import FigureSpec, ReportData, write_report

    rep = ReportData(title="t", source="s", kind="bench",
                     figures=[FigureSpec("curves", "c", "cmc", [{"label": "l", "cmc": [0.2, 0.6]}], "cap")])
    good = write_report(tmp_path, rep, filename="bad.html").read_text()
    # a broken image, an external (blocked) image and a script error, injected into a real report page
    bad = good.replace("</body>", '<img id="broken" alt="broken" src="data:image/png;base64,AAAA">'
                                  '<img id="remote" alt="remote" src="http://example.invalid/x.png">'
                                  "<script>undefinedFunction()</script></body>")
    page.write_text(bad)
    res = check_report_in_browser(page, tmp_path / "bad.png", timeout=60)
    assert set(res["broken"]) == {"broken", "remote"}
    assert any("undefinedFunction" in e for e in res["errors"])
    assert any("x.png" in e or "img-src" in e for e in res["errors"])
    assert res["images"] == 3 and res["missing_sections"] == []
