"""The report page: a self-contained HTML file (jinja2 template, figures embedded as base64 PNG data URIs, inline CSS
and one inline script, a Content-Security-Policy that forbids every network request) plus the figures as PNG files.

:class:`ReportData` is plain data: tables (dicts), figure specifications (which figure function, its data, the caption
naming exactly what ran) and the reasons sections are unavailable. :func:`write_report` draws the figures into
``out_dir/figures/`` and renders the page. The inline script records page errors, every image's ``naturalWidth`` and
the section ids into a hidden ``<pre id="advreid-check">`` after load, which :mod:`.browser` reads back.
"""

from __future__ import annotations

import base64
import datetime as _dt
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advreid.reporting import figures as F

__all__ = ["FIGURE_KINDS", "GENERATOR", "SECTIONS", "FigureSpec", "ReportData", "render_html", "write_report"]

GENERATOR = "advreid report"
MANIFEST = ".advreid-figures.json"  # the PNGs the last report in this folder wrote (so reruns drop stale ones)
SECTIONS: tuple[tuple[str, str], ...] = (
    ("tables", "Result tables"),
    ("ranklists", "Rank lists"),
    ("perturbations", "Perturbation maps"),
    ("curves", "mAP vs ε and CMC curves"),
    ("tsne", "t-SNE of query features"),
    ("gradcam", "Grad-CAM"),
    ("training", "Training curves"),
    ("unavailable", "Unavailable sections"),
)
FIGURE_KINDS: dict[str, Callable[..., Path]] = {
    "ranklist": F.ranklist_figure, "perturbation": F.perturbation_figure, "map_vs_eps": F.map_vs_eps_figure,
    "cmc": F.cmc_figure, "tsne": F.tsne_figure, "gradcam": F.gradcam_figure, "training": F.training_curves_figure,
}
_SECTION_IDS = {s for s, _ in SECTIONS}
_SAFE = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass
class FigureSpec:
    """One figure: drawn by ``FIGURE_KINDS[kind](data, png_path, **options)`` into ``figures/<name>.png``; the
    caption says what it shows, ``details`` (one line each, e.g. the exact cell label of every row) what ran."""

    section: str
    name: str
    kind: str
    data: Any
    caption: str
    title: str = ""
    details: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.section not in _SECTION_IDS or self.section == "unavailable":
            raise ValueError(f"figure {self.name!r}: section {self.section!r} is not one of "
                             f"{sorted(_SECTION_IDS - {'unavailable'})}")
        if self.kind not in FIGURE_KINDS:
            raise ValueError(f"figure {self.name!r}: kind {self.kind!r} is not one of {sorted(FIGURE_KINDS)}")
        if not _SAFE.match(self.name):
            raise ValueError(f"figure name {self.name!r} must be file-safe (letters, digits, '.', '_', '-')")


@dataclass
class ReportData:
    """Everything the page shows. ``tables``: ``{"name", "title", "protocol", "header", "rows"}`` (cells are text,
    e.g. ``"37.5 [33.0, 42.1]"``; ``"kind": "text"`` sets a table of prose left-aligned and wrapped);
    ``unavailable``: section id -> why it has nothing; ``notes``: lines under the title; ``section_notes``: section
    id -> extra lines (rows left out, assumptions)."""

    title: str
    source: str
    kind: str
    tables: list[dict[str, Any]] = field(default_factory=list)
    figures: list[FigureSpec] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    section_notes: dict[str, list[str]] = field(default_factory=dict)

    def add_unavailable(self, section: str, reason: str) -> None:
        """Record (or extend) why ``section`` has no or only part of its content."""
        if section not in _SECTION_IDS:
            raise ValueError(f"unknown section {section!r}; expected one of {sorted(_SECTION_IDS)}")
        old = self.unavailable.get(section)
        self.unavailable[section] = reason if not old else f"{old}; {reason}"


def _env() -> Any:
    import jinja2
    from markupsafe import Markup, escape

    def ci(text: Any) -> Markup:
        """Escape a table cell and set its ``[lo, hi]`` intervals in a smaller style."""
        return Markup(re.sub(r"\[([^\]]*)\]", r'<span class="ci">[\1]</span>', str(escape(str(text)))))

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["ci"] = ci
    return env


def render_html(report: ReportData, figures: list[dict[str, Any]], failures: list[str]) -> str:
    """The page's HTML: ``figures`` are ``{"spec": FigureSpec, "uri": data URI, "file": name}`` in order."""
    tables = [{"name": t.get("name") or f"table{i}", "title": t.get("title", ""), "protocol": t.get("protocol", ""),
               "kind": t.get("kind", ""), "header": list(t["header"]), "rows": [list(r) for r in t["rows"]]}
              for i, t in enumerate(report.tables)]
    sections = []
    for sid, heading in SECTIONS:
        figs = [f for f in figures if f["spec"].section == sid]
        sections.append({"id": sid, "heading": heading, "figures": figs, "notes": report.section_notes.get(sid, []),
                         "reason": report.unavailable.get(sid), "tables": tables if sid == "tables" else []})
    empty = [(s["heading"], s["reason"] or "nothing to show") for s in sections
             if s["id"] not in ("unavailable",) and not s["figures"] and not s["tables"]]
    partial = [(s["heading"], s["reason"]) for s in sections if s["reason"] and (s["figures"] or s["tables"])]
    return _env().get_template("report.html.j2").render(
        report=report, sections=sections, empty=empty, partial=partial, failures=failures, generator=GENERATOR,
        created=_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        section_ids=" ".join(s for s, _ in SECTIONS))


def _check_target(path: Path) -> None:
    """Refuse to replace a file this tool did not write (nothing a user wrote is overwritten)."""
    if path.exists():
        head = path.read_bytes()[:4096] if path.is_file() else b""
        if f'<meta name="generator" content="{GENERATOR}"'.encode() not in head:
            raise FileExistsError(f"{path} exists and is not a report written by advreid; choose another output "
                                  "file or move it away")


def write_report(out_dir: str | os.PathLike, report: ReportData, *, filename: str = "report.html") -> Path:
    """Draw the figures into ``out_dir/figures/<name>.png`` and write the self-contained ``out_dir/filename``.

    A figure that fails to draw is listed on the page with its error (and warned about) instead of losing the
    report. Returns the HTML path.
    """
    out_dir = Path(out_dir)
    html_path = out_dir / filename
    _check_target(html_path)
    names = [f.name for f in report.figures]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"figure names must be unique, repeated: {dup}")
    figdir = out_dir / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    _drop_stale(figdir, {f"{n}.png" for n in names})
    drawn, failures = [], []
    for spec in report.figures:
        png = figdir / f"{spec.name}.png"
        try:
            FIGURE_KINDS[spec.kind](spec.data, png, **spec.options)
        except Exception as e:  # noqa: BLE001 -- one broken figure must not lose the whole report
            msg = f"figure {spec.name} ({spec.kind}) failed: {type(e).__name__}: {e}"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            failures.append(msg)
            continue
        uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
        drawn.append({"spec": spec, "uri": uri, "file": f"figures/{png.name}"})
    from advreid.utils.io import atomic_write_json, atomic_write_text

    atomic_write_json(figdir / MANIFEST, sorted(d["file"].split("/")[-1] for d in drawn))
    return atomic_write_text(html_path, render_html(report, drawn, failures))


def _drop_stale(figdir: Path, keep: set[str]) -> None:
    """Remove the PNGs a previous report listed in its manifest that this one does not draw (never other files)."""
    import json

    try:
        old = json.loads((figdir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    for name in old if isinstance(old, list) else []:
        if isinstance(name, str) and _SAFE.match(name) and name.endswith(".png") and name not in keep:
            (figdir / name).unlink(missing_ok=True)
