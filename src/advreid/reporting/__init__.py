"""Tables and figures of evaluation results, and the self-contained HTML report (reads result dicts, arrays and image
files, never models).

Submodules: :mod:`.tables` (text tables, intervals, protocol lines), :mod:`.selection` (which queries a report shows,
their rank lists from stored distances), :mod:`.figures` (matplotlib figures), :mod:`.html` (the page) and
:mod:`.browser` (headless-Chromium check of a written page). The table helpers are imported eagerly (the CLI prints
with them); the rest loads on first use, so ``import advreid.reporting`` does not import matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

from advreid.reporting.tables import METRIC_COLUMNS, format_ci, format_grid, format_table, protocol_line, reranked

_LAZY = {
    "draw_ranklist": "figures", "ranklist_figure": "figures", "perturbation_figure": "figures",
    "map_vs_eps_figure": "figures", "cmc_figure": "figures", "tsne_figure": "figures", "tsne_embedding": "figures",
    "gradcam_figure": "figures", "training_curves_figure": "figures", "amplification": "figures",
    "load_image_array": "figures",
    "ReportData": "html", "FigureSpec": "html", "SECTIONS": "html", "write_report": "html",
    "check_report_in_browser": "browser", "find_chromium": "browser",
    "default_queries": "selection", "valid_query_mask": "selection", "worst_queries": "selection",
    "ranked_gallery": "selection",
}

__all__ = ["METRIC_COLUMNS", "format_ci", "format_grid", "format_table", "protocol_line", "reranked", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'advreid.reporting' has no attribute {name!r}")
    return getattr(importlib.import_module(f"advreid.reporting.{module}"), name)
