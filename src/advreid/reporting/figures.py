"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot state) from arrays, image
files and result dicts, and written atomically as PNG: rank lists (seed Fig. 1), perturbation maps (seed Figs. 2, 6),
mAP-vs-eps and CMC curves, t-SNE of query features (seed Fig. 7), Grad-CAM overlays (seed Fig. 8) and training curves.

Images may be given as a file path, an (H,W,3) or (3,H,W) array (uint8, or float in [0,1]) or None (a missing image:
its tile says why, from the row's ``*_note``). Every function returns the PNG's path.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "GREEN", "RED", "amplification", "cmc_figure", "draw_ranklist", "gradcam_figure", "load_image_array",
    "map_vs_eps_figure", "perturbation_figure", "ranklist_figure", "training_curves_figure", "tsne_embedding",
    "tsne_figure",
]

GREEN, RED = "#1a9850", "#d73027"
_MARKERS = {"gallery": ("o", 22, "gallery image"), "clean": ("^", 70, "clean query"),
            "adversarial": ("X", 80, "adversarial query")}


# ---------------------------------------------------------------------------------------------- helpers
def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _save(fig: Any, out: str | os.PathLike, dpi: int) -> Path:
    from advreid.utils.io import atomic_write_with

    out = Path(out)
    atomic_write_with(out, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.08))
    return out


def load_image_array(image: Any) -> np.ndarray | None:
    """``image`` (path, array, tensor-like or None) as a float (H,W,3) array in [0,1] (None stays None)."""
    if image is None:
        return None
    if isinstance(image, str | os.PathLike):
        from PIL import Image

        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"image must be (H,W,3) or (3,H,W), got shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    a = a.astype(np.float64) / 255.0 if np.issubdtype(a.dtype, np.integer) else a.astype(np.float64)
    return np.clip(a, 0.0, 1.0)


def _bare(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _frame(ax: Any, color: str, width: float) -> None:
    for sp in ax.spines.values():
        sp.set_edgecolor(color)
        sp.set_linewidth(width)


def _tile(ax: Any, image: Any, note: str | None = None) -> np.ndarray | None:
    """Show ``image`` on ``ax`` or, when it is None, a grey tile with ``note`` wrapped inside."""
    _bare(ax)
    arr = load_image_array(image)
    if arr is None:
        ax.set_facecolor("#eeeeee")
        ax.text(0.5, 0.5, textwrap.fill(note or "image missing", 14), ha="center", va="center", fontsize=6,
                transform=ax.transAxes, color="#444444")
        return None
    ax.imshow(arr, interpolation="nearest")
    return arr


def _row_label(ax: Any, text: str) -> None:
    ax.annotate(text, xy=(0.0, 1.03), xycoords="axes fraction", ha="left", va="bottom", fontsize=8,
                annotation_clip=False)


# -------------------------------------------------------------------------------------------- rank list
def ranklist_figure(rows: Sequence[Mapping[str, Any]], out: str | os.PathLike, *, title: str | None = None,
                    dpi: int = 110) -> Path:
    """Rank lists (seed Fig. 1), one row per setting: the query (black frame) and its top-k gallery images with
    their rank number and a mark, framed green ✓ (same identity) or red ✗ (another one).

    Row: ``{"label", "query": image, "query_note": why the query image is missing, "gallery": [{"image", "rank",
    "match"}], "note": why there is no ranking}``.
    """
    if not rows:
        raise ValueError("rows must hold at least one rank-list row")
    k = max(1, *(len(r.get("gallery") or []) for r in rows))
    fig = _figure(0.95 * (k + 1) + 0.3, 2.25 * len(rows) + (0.4 if title else 0.1))
    axes = fig.subplots(len(rows), k + 1, squeeze=False, gridspec_kw={"hspace": 0.3, "wspace": 0.06})
    for i, r in enumerate(rows):
        ax = axes[i][0]
        _tile(ax, r.get("query"), r.get("query_note"))
        _frame(ax, "black", 1.5)
        _row_label(ax, str(r.get("label", "")))
        gallery = list(r.get("gallery") or [])
        for j in range(1, k + 1):
            ax = axes[i][j]
            if j > len(gallery):
                ax.axis("off")
                if j == 1 and r.get("note"):
                    ax.text(0.0, 0.5, textwrap.fill(str(r["note"]), 40), fontsize=7, va="center",
                            transform=ax.transAxes)
                continue
            g = gallery[j - 1]
            _tile(ax, g.get("image"), g.get("note"))
            color = GREEN if g["match"] else RED
            _frame(ax, color, 3.5)
            ax.text(0.04, 0.97, f"{g['rank']} {'✓' if g['match'] else '✗'}", transform=ax.transAxes, ha="left",
                    va="top", fontsize=8, color="white", fontweight="bold",
                    bbox={"boxstyle": "square,pad=0.15", "facecolor": color, "edgecolor": "none"})
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, out, dpi)


def draw_ranklist(doc: Mapping[str, Any], out: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Rank-list figure of the benchmark's ``ranklist.json`` (``{"query", "pid", "rows": [{"label", "query",
    "gallery": [{"path", "match"}]}]}``), drawn by :func:`ranklist_figure`."""
    rows = [{"label": r["label"], "query": r["query"],
             "gallery": [{"image": g["path"], "rank": n + 1, "match": bool(g["match"])}
                         for n, g in enumerate(r["gallery"])]} for r in doc["rows"]]
    k = max(len(r["gallery"]) for r in rows)
    title = (f"query {Path(doc['query']).name} (pid {doc['pid']}): top-{k}, green ✓ = same identity, "
             "red ✗ = wrong")
    return ranklist_figure(rows, out, title=title, dpi=dpi)


# ------------------------------------------------------------------------------------ perturbation maps
def _deltas(item: Mapping[str, Any]) -> list[np.ndarray]:
    out = []
    pairs = [(item.get("clean"), item.get("adversarial"))]
    d = item.get("defended")
    if d:
        pairs.append((d.get("clean"), d.get("adversarial")))
    for a, b in pairs:
        xa, xb = load_image_array(a), load_image_array(b)
        if xa is not None and xb is not None:
            if xa.shape != xb.shape:
                raise ValueError(f"clean {xa.shape} and adversarial {xb.shape} images differ in size "
                                 f"({item.get('label', '')!r})")
            out.append(np.abs(xb - xa))
    return out


def amplification(items: Sequence[Mapping[str, Any]], amplify: float | str = "auto") -> float:
    """The factor :func:`perturbation_figure` multiplies |δ| by: ``amplify`` itself, or for ``"auto"`` one common
    factor mapping the largest |δ| over all items to 1 (1.0 when every δ is zero)."""
    if amplify != "auto":
        if isinstance(amplify, bool) or not isinstance(amplify, int | float) or not amplify > 0:
            raise ValueError(f"amplify must be a positive number or 'auto', got {amplify!r}")
        return float(amplify)
    peak = max((float(d.max()) for it in items for d in _deltas(it)), default=0.0)
    return 1.0 / peak if peak > 0 else 1.0


def perturbation_figure(items: Sequence[Mapping[str, Any]], out: str | os.PathLike, *, amplify: float | str = "auto",
                        dpi: int = 110) -> Path:
    """Perturbation maps (seed Figs. 2, 6), one row per attack and model or defense: clean, adversarial, amplified
    |δ| = |x_adv - x| per channel (clipped to 1), and where a passive defense is given, the defended adversarial
    image and |D(x_adv) - D(x)| (the noise that survives the defense, seed Fig. 6) at the same factor.

    Item: ``{"label", "clean", "adversarial", "note", "defended": {"name", "clean", "adversarial"} or None}``.
    """
    if not items:
        raise ValueError("items must hold at least one perturbation row")
    f = amplification(items, amplify)
    ncol = 5 if any(it.get("defended") for it in items) else 3
    fig = _figure(1.05 * ncol + 0.3, 2.3 * len(items) + 0.3)
    axes = fig.subplots(len(items), ncol, squeeze=False, gridspec_kw={"hspace": 0.35, "wspace": 0.08})
    for i, it in enumerate(items):
        clean = _tile(axes[i][0], it.get("clean"), "clean image missing")
        adv = _tile(axes[i][1], it.get("adversarial"), it.get("note") or "adversarial image missing")
        delta = None if clean is None or adv is None else np.clip(np.abs(adv - clean) * f, 0, 1)
        _tile(axes[i][2], delta, it.get("note") or "no perturbation")
        _row_label(axes[i][0], str(it.get("label", "")))
        heads = ["clean", "adversarial", f"|δ| × {f:.3g}"]
        d = it.get("defended")
        if ncol == 5:
            if d:
                dc = load_image_array(d.get("clean"))
                da = _tile(axes[i][3], d.get("adversarial"), "defended image missing")
                dd = None if dc is None or da is None else np.clip(np.abs(da - dc) * f, 0, 1)
                _tile(axes[i][4], dd, "defended clean image missing")
                heads += [f"{d.get('name', 'defense')}(adv)", f"|δ| after {d.get('name', 'defense')} × {f:.3g}"]
            else:
                axes[i][3].axis("off")
                axes[i][4].axis("off")
        for j, h in enumerate(heads):
            axes[i][j].set_xlabel(h, fontsize=7)
    return _save(fig, out, dpi)


# ----------------------------------------------------------------------------------------------- curves
def _pct_ci(m: Mapping[str, Any], key: str) -> tuple[float, float, float] | None:
    v = m.get(key)
    if not isinstance(v, int | float):
        return None
    ci = m.get(f"{key}_ci")
    lo, hi = (ci if isinstance(ci, Sequence) and len(ci) == 2 else (v, v))
    return 100 * float(v), 100 * float(lo), 100 * float(hi)


def map_vs_eps_figure(series: Sequence[Mapping[str, Any]], out: str | os.PathLike, *,
                      metrics: Sequence[str] = ("rank1", "mAP"), title: str | None = None, dpi: int = 110) -> Path:
    """Score vs budget, one panel per metric, one line per series with its 95% bootstrap band.

    Series: ``{"label", "eps_px": [budgets in pixel units, 0 for clean], "metrics": [Metrics dict per budget]}``.
    """
    if not series:
        raise ValueError("series must hold at least one line")
    fig = _figure(4.2 * len(metrics) + 0.6, 3.4 + 0.22 * len(series))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, key in zip(axes, metrics, strict=True):
        for s in series:
            pts = [(float(e), _pct_ci(m, key)) for e, m in zip(s["eps_px"], s["metrics"], strict=True)]
            pts = sorted((e, v) for e, v in pts if v is not None)
            if not pts:
                continue
            x = [e for e, _ in pts]
            line, = ax.plot(x, [v[0] for _, v in pts], marker="o", ms=3.5, label=str(s["label"]))
            ax.fill_between(x, [v[1] for _, v in pts], [v[2] for _, v in pts], color=line.get_color(), alpha=0.18,
                            linewidth=0)
        ax.set_xlabel("ε (pixels of 255)")
        ax.set_ylabel(f"{key} (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", fontsize=7, ncol=1, frameon=False)
    fig.subplots_adjust(bottom=0.15 + 0.055 * len(series), top=0.9 if title else 0.95, wspace=0.25)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, out, dpi)


def _integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def cmc_figure(series: Sequence[Mapping[str, Any]], out: str | os.PathLike, *, max_rank: int = 20,
               title: str | None = None, dpi: int = 110) -> Path:
    """CMC curves (rank-k accuracy for k = 1..``max_rank``), one line per series ``{"label", "cmc": fractions,
    "linestyle": "-" or "--"}``."""
    if not series:
        raise ValueError("series must hold at least one CMC curve")
    fig = _figure(6.0, 3.6 + 0.2 * len(series))
    ax = fig.subplots()
    for s in series:
        c = np.asarray(s["cmc"], dtype=np.float64)[:max_rank]
        ax.plot(np.arange(1, len(c) + 1), 100 * c, linestyle=s.get("linestyle", "-"), marker=".", ms=3,
                label=str(s["label"]))
    ax.set_xlabel("rank k")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_ylabel("matching rate within top-k (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", fontsize=7, frameon=False)
    fig.subplots_adjust(bottom=0.15 + 0.05 * len(series), top=0.9 if title else 0.95)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, out, dpi)


def training_curves_figure(rows: Sequence[Mapping[str, Any]], out: str | os.PathLike, *, title: str | None = None,
                           dpi: int = 110) -> Path:
    """Training curves from ``metrics.jsonl`` rows: loss terms, accuracies, learning rate and in-training
    evaluation scores (``row["eval"]``), one panel each where the rows have them, against the epoch."""
    rows = [r for r in rows if isinstance(r.get("epoch"), int | float)]
    if not rows:
        raise ValueError("rows must hold at least one metrics row with an epoch")
    skip = {"epoch", "lr", "time_s", "images_per_s", "eval"}
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {"loss terms": {}, "accuracy": {},
                                                                "learning rate": {}, "evaluation (%)": {}}
    for r in rows:
        e = float(r["epoch"])
        for k, v in r.items():
            if k not in skip and isinstance(v, int | float) and not isinstance(v, bool):
                panels["accuracy" if k.startswith("acc") else "loss terms"].setdefault(k, []).append((e, float(v)))
        lr = r.get("lr")
        for n, v in enumerate(lr if isinstance(lr, list) else [lr] if isinstance(lr, int | float) else []):
            panels["learning rate"].setdefault(f"lr group {n}", []).append((e, float(v)))
        ev = r.get("eval")
        if isinstance(ev, Mapping):
            for k in ("rank1", "mAP"):
                if isinstance(ev.get(k), int | float):
                    panels["evaluation (%)"].setdefault(k, []).append((e, 100 * float(ev[k])))
    used = [(name, lines) for name, lines in panels.items() if lines]
    fig = _figure(3.6 * len(used) + 0.4, 3.2)
    axes = fig.subplots(1, len(used), squeeze=False)[0]
    for ax, (name, lines) in zip(axes, used, strict=True):
        for k, pts in lines.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=k)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(_integer_ticks())
        if name == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.subplots_adjust(bottom=0.16, top=0.82 if title else 0.88, wspace=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, out, dpi)


# ------------------------------------------------------------------------------------------------ t-SNE
def tsne_embedding(features: np.ndarray, *, seed: int = 0, perplexity: float | None = None) -> np.ndarray:
    """2-D scikit-learn t-SNE of ``features`` (N, D), seeded (PCA init); perplexity defaults to min(30, (N-1)/3).
    Exact gradients up to 1000 points (Barnes-Hut's tree costs more than it saves there), Barnes-Hut beyond."""
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 4:
        raise ValueError(f"features must be (N, D) with N >= 4 points for t-SNE, got shape {x.shape}")
    p = float(perplexity) if perplexity is not None else min(30.0, max(1.0, (x.shape[0] - 1) / 3))
    method = "exact" if x.shape[0] <= 1000 else "barnes_hut"
    return TSNE(n_components=2, perplexity=p, init="pca", learning_rate="auto", random_state=seed,
                method=method).fit_transform(x)


def tsne_figure(points: Mapping[str, Any], out: str | os.PathLike, *, title: str | None = None,
                dpi: int = 110) -> Path:
    """t-SNE scatter (seed Fig. 7): colour = identity, marker = gallery image (dot), clean query (triangle) or
    adversarial query (cross), a dashed line from each clean query to its adversarial version.

    ``points``: ``{"xy": (N,2), "pid": (N,), "kind": N strings in gallery/clean/adversarial, "links": [(i, j)]}``.
    """
    xy = np.asarray(points["xy"], dtype=np.float64)
    pid = np.asarray(points["pid"])
    kind = np.asarray(points["kind"])
    if xy.ndim != 2 or xy.shape[1] != 2 or not xy.shape[0] == pid.shape[0] == kind.shape[0]:
        raise ValueError("points: xy must be (N, 2) with one pid and one kind per point")
    bad = sorted(set(kind.tolist()) - set(_MARKERS))
    if bad:
        raise ValueError(f"points: unknown kind(s) {bad}; expected {sorted(_MARKERS)}")
    from matplotlib import colormaps
    from matplotlib.lines import Line2D

    ids = sorted(set(pid.tolist()))
    cmap = colormaps["tab10" if len(ids) <= 10 else "tab20"]
    colors = {p: cmap(n % cmap.N) for n, p in enumerate(ids)}
    fig = _figure(6.4, 5.2)
    ax = fig.subplots()
    for i, j in points.get("links") or []:
        ax.plot(xy[[i, j], 0], xy[[i, j], 1], color="#777777", linestyle="--", linewidth=0.8, zorder=1)
    for k, (marker, size, _) in _MARKERS.items():
        sel = kind == k
        if sel.any():
            ax.scatter(xy[sel, 0], xy[sel, 1], c=[colors[p] for p in pid[sel].tolist()], marker=marker, s=size,
                       edgecolors="black" if k != "gallery" else "none", linewidths=0.6, zorder=2)
    handles = [Line2D([], [], marker=m, linestyle="", color="#555555", label=lab) for m, _, lab in _MARKERS.values()]
    handles += [Line2D([], [], marker="s", linestyle="", color=colors[p], label=f"id {p}") for p in ids]
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    _bare(ax)
    fig.subplots_adjust(left=0.03, right=0.72, top=0.92 if title else 0.97, bottom=0.03)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, out, dpi)


# --------------------------------------------------------------------------------------------- Grad-CAM
def _overlay(ax: Any, image: Any, cam: Any, note: str) -> None:
    arr = _tile(ax, image, note)
    if arr is None or cam is None:
        return
    c = np.asarray(cam, dtype=np.float64)
    if c.shape != arr.shape[:2]:
        raise ValueError(f"Grad-CAM map {c.shape} does not match its image {arr.shape[:2]}")
    ax.imshow(c, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0, interpolation="bilinear")


def gradcam_figure(items: Sequence[Mapping[str, Any]], out: str | os.PathLike, *, title: str | None = None,
                   dpi: int = 110) -> Path:
    """Grad-CAM (seed Fig. 8), one row per query and setting: clean image, its map, adversarial image, its map
    (maps in [0,1], jet, half transparent).

    Item: ``{"label", "clean", "clean_cam", "adversarial", "adversarial_cam", "note"}``.
    """
    if not items:
        raise ValueError("items must hold at least one Grad-CAM row")
    fig = _figure(4 * 1.25 + 0.3, 2.3 * len(items) + (0.4 if title else 0.1))
    axes = fig.subplots(len(items), 4, squeeze=False, gridspec_kw={"hspace": 0.35, "wspace": 0.08})
    for i, it in enumerate(items):
        note = it.get("note") or "adversarial image missing"
        _tile(axes[i][0], it.get("clean"), "clean image missing")
        _overlay(axes[i][1], it.get("clean"), it.get("clean_cam"), "clean image missing")
        _tile(axes[i][2], it.get("adversarial"), note)
        _overlay(axes[i][3], it.get("adversarial"), it.get("adversarial_cam"), note)
        _row_label(axes[i][0], str(it.get("label", "")))
        for j, h in enumerate(("clean", "its Grad-CAM", "adversarial", "its Grad-CAM")):
            axes[i][j].set_xlabel(h, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, out, dpi)
