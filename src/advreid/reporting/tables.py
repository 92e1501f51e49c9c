"""Result tables as text: aligned/Markdown grids, metric rows, point estimates with their bootstrap intervals, and
the one-line protocol of an evaluation (what was measured, how)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["METRIC_COLUMNS", "format_ci", "format_grid", "format_table", "protocol_line", "reranked"]


def format_grid(header: Sequence[str], rows: Sequence[Sequence[str]], *, markdown: bool = False) -> str:
    """Aligned plain-text (right-aligned) or Markdown table of strings."""
    body = [[str(c) for c in r] for r in rows]
    heads = [str(h) for h in header]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(heads)]
    if markdown:
        lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)) + " |",
                 "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) + " |" for b in body]
    else:
        lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True)),
                 "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]], *, markdown: bool = False) -> str:
    """``columns`` = [(key, header)]; floats in [0,1] under metric keys are shown as percentages, with the row's
    ``<key>_ci`` 95% interval when it has one (``format_ci``: ``"38.6 [33.7, 42.9]"``), else to two decimals."""
    def cell(row: dict, key: str) -> str:
        v = row.get(key, "")
        if isinstance(v, float) and key.removeprefix("rr_") in _PCT:
            return format_ci(row, key) if f"{key}_ci" in row else f"{100 * v:.2f}"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    return format_grid([h for _, h in columns], [[cell(r, k) for k, _ in columns] for r in rows], markdown=markdown)


_PCT = {"rank1", "rank5", "rank10", "mAP", "mINP"}

METRIC_COLUMNS: list[tuple[str, str]] = [
    ("rank1", "R1"), ("rank5", "R5"), ("rank10", "R10"), ("mAP", "mAP"), ("mINP", "mINP"),
]


def format_ci(metrics: Mapping[str, Any] | None, key: str, *, decimals: int = 1) -> str:
    """``"37.5 [33.0, 42.1]"``: the metric ``key`` of a Metrics dict as a percentage with its ``<key>_ci`` interval
    (the point alone when no interval is stored, ``"-"`` when the metric is missing)."""
    if not metrics or not isinstance(metrics.get(key), int | float):
        return "-"
    text = f"{100 * float(metrics[key]):.{decimals}f}"
    ci = metrics.get(f"{key}_ci")
    if isinstance(ci, Sequence) and len(ci) == 2 and all(isinstance(v, int | float) for v in ci):
        text += f" [{100 * float(ci[0]):.{decimals}f}, {100 * float(ci[1]):.{decimals}f}]"
    return text


def protocol_line(protocol: Mapping[str, Any] | None) -> str:
    """One line naming an evaluation protocol: distance, normalisation, flip, AP rule, re-ranking, input size,
    query/gallery counts and the attacked-subset size (``max_images``)."""
    if not protocol:
        return "protocol not recorded"
    p = protocol
    parts = [f"distance {p.get('metric', '?')}"]
    if "normalize" in p:
        parts.append("L2-normalised features" if p["normalize"] else "unnormalised features")
    if "flip" in p:
        parts.append("flip-averaged" if p["flip"] else "no flip")
    if "ap" in p:
        parts.append(f"AP {p['ap']}")
    if "rerank" in p:
        parts.append("k-reciprocal re-ranking reported" if p["rerank"] else "no re-ranking")
    if "height" in p and "width" in p:
        parts.append(f"input {p['height']}x{p['width']}")
    if "num_query" in p or "num_gallery" in p:
        parts.append(f"{p.get('num_query', '?')} query / {p.get('num_gallery', '?')} gallery")
    if p.get("max_images") is not None:
        parts.append(f"attacked subset of {p['max_images']} images")
    return ", ".join(parts)


def reranked(metrics: Mapping[str, Any] | None) -> dict:
    """The re-ranked metrics of a result (its ``rr_`` keys, without the prefix: ``rr_mAP`` -> ``mAP``)."""
    return {k[3:]: v for k, v in (metrics or {}).items() if k.startswith("rr_")}
