"""Tables and figures of evaluation results (reads result dicts and image files, never models)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


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
    """``columns`` = [(key, header)]; floats in [0,1] under metric keys are shown as percentages."""
    def cell(row: dict, key: str) -> str:
        v = row.get(key, "")
        if isinstance(v, float):
            return f"{100 * v:.2f}" if key.removeprefix("rr_") in _PCT else f"{v:.3g}"
        return str(v)

    return format_grid([h for _, h in columns], [[cell(r, k) for k, _ in columns] for r in rows], markdown=markdown)


_PCT = {"rank1", "rank5", "rank10", "mAP", "mINP"}

METRIC_COLUMNS: list[tuple[str, str]] = [
    ("rank1", "R1"), ("rank5", "R5"), ("rank10", "R10"), ("mAP", "mAP"), ("mINP", "mINP"),
]


def draw_ranklist(doc: dict, out: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Rank-list figure: one row per setting (query, then its top-k gallery images framed green = same identity,
    red = another one); ``doc`` is the ``ranklist.json`` the benchmark writes. Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from advreid.utils.io import atomic_write_with

    rows = doc["rows"]
    k = max(len(r["gallery"]) for r in rows)
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(1.1 * (k + 1) + 1.6, 2.3 * len(rows)), squeeze=False)
    for i, r in enumerate(rows):
        items = [(r["query"], None)] + [(g["path"], g["match"]) for g in r["gallery"]]
        for j in range(k + 1):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(items):
                ax.axis("off")
                continue
            path, match = items[j]
            with Image.open(path) as im:
                ax.imshow(im.convert("RGB"))
            color = "black" if match is None else ("#1a9850" if match else "#d73027")
            for sp in ax.spines.values():
                sp.set_edgecolor(color)
                sp.set_linewidth(1.5 if match is None else 4)
            if j == 0:
                ax.set_ylabel(r["label"], rotation=0, ha="right", va="center", fontsize=9)
                if i == 0:
                    ax.set_title("query", fontsize=9)
            elif i == 0:
                ax.set_title(f"{j}", fontsize=9)
    fig.suptitle(f"query {Path(doc['query']).name} (pid {doc['pid']}): top-{k}, green = same identity, "
                 "red = wrong", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    atomic_write_with(out, lambda f: fig.savefig(f, format="png", dpi=dpi))
    plt.close(fig)
    return out
