"""Plain-text and Markdown tables of evaluation results (reads result dicts, never models)."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]], *, markdown: bool = False) -> str:
    """``columns`` = [(key, header)]; floats in [0,1] under metric keys are shown as percentages."""
    def cell(row: dict, key: str) -> str:
        v = row.get(key, "")
        if isinstance(v, float):
            return f"{100 * v:.2f}" if key.removeprefix("rr_") in _PCT else f"{v:.3g}"
        return str(v)

    body = [[cell(r, k) for k, _ in columns] for r in rows]
    heads = [h for _, h in columns]
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


_PCT = {"rank1", "rank5", "rank10", "mAP", "mINP"}

METRIC_COLUMNS: list[tuple[str, str]] = [
    ("rank1", "R1"), ("rank5", "R5"), ("rank10", "R10"), ("mAP", "mAP"), ("mINP", "mINP"),
]
