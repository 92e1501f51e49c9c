"""Open a report in headless Chromium and read back what the page saw: how many images loaded (``naturalWidth > 0``),
which did not, the errors it logged and the sections present; and take a screenshot of the whole page.

Debian's ``/usr/bin/chromium`` (or ``chromium`` / ``chromium-browser`` on PATH) runs with a fresh profile, no sandbox,
no GPU, and every host name resolving nowhere, so a page that needed the network would show broken images. Two runs:
``--dump-dom`` (the page's inline script has written its findings into ``<pre id="advreid-check">`` on load) and
``--screenshot`` with the window as tall as the page (at most ``max_height`` pixels).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from advreid.utils.io import atomic_write_bytes

__all__ = ["find_chromium", "check_report_in_browser"]

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND")
_CHECK = re.compile(r'<pre id="advreid-check"[^>]*>(.*?)</pre>', re.S)


def find_chromium() -> str | None:
    """Path of a Chromium binary: Debian's ``/usr/bin/chromium``, else ``chromium``/``chromium-browser`` on PATH."""
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(args: list[str], timeout: float) -> str:
    """Run Chromium in its own process group (all its helpers die with it on a timeout); return stdout."""
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise TimeoutError(f"chromium did not finish within {timeout:g} s: {' '.join(args[-2:])}") from None
    if proc.returncode != 0:
        tail = "\n".join(err.strip().splitlines()[-5:])
        raise RuntimeError(f"chromium exited with status {proc.returncode}: {tail}")
    return out


def check_report_in_browser(html_path: str | os.PathLike, screenshot_path: str | os.PathLike, timeout: float = 60,
                            *, width: int = 1300, max_height: int = 16000) -> dict[str, Any]:
    """Load ``html_path`` headless; returns ``{"images": n, "broken": [ids], "errors": [...], "sections": [...],
    "expected_sections": [...], "missing_sections": [...], "height": px, "screenshot": path, "chromium": binary,
    "page": everything the page's self-check wrote}``.

    Raises FileNotFoundError when no Chromium binary exists (install Debian's ``chromium``) or the page is missing,
    TimeoutError when a run exceeds ``timeout`` seconds, ValueError when the page has no self-check element.
    """
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(f"report {html_path} not found")
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("no Chromium binary found (/usr/bin/chromium, chromium or chromium-browser on PATH); "
                                "install it with: apt-get install -y chromium")
    shot = Path(screenshot_path).resolve()
    shot.parent.mkdir(parents=True, exist_ok=True)
    url = html_path.as_uri()
    with tempfile.TemporaryDirectory(prefix="advreid-chromium-") as profile:
        base = [binary, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000"]
        dom = _run([*base, f"--window-size={width},1000", "--dump-dom", url], timeout)
        m = _CHECK.search(dom)
        if not m or not m.group(1).strip():
            raise ValueError(f"{html_path}: no self-check results after load (is it an advreid report, and did its "
                             "inline script run?)")
        found = json.loads(html.unescape(m.group(1)))
        height = max(600, min(int(found.get("height") or 0) + 20, int(max_height)))
        raw = Path(profile) / "screenshot.png"  # chromium picks the format from the suffix: no temp names
        _run([*base, f"--window-size={width},{height}", f"--screenshot={raw}", url], timeout)
        if not raw.is_file() or raw.stat().st_size == 0:
            raise RuntimeError(f"chromium wrote no screenshot of {html_path}")
        atomic_write_bytes(shot, raw.read_bytes())
    images = found["images"]
    sections = found["sections"]
    expected = found.get("expected_sections") or []
    return {"images": len(images), "broken": [i["id"] for i in images if not i["naturalWidth"]],
            "errors": list(found["errors"]), "sections": sections, "expected_sections": expected,
            "missing_sections": [s for s in expected if s not in sections], "height": height,
            "screenshot": str(shot), "chromium": binary, "page": found}
