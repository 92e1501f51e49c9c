"""``advreid report DIR``: the visual report of a bench folder, an ``advreid attack`` result or a training run, rebuilt
from what they stored (results, per-query scores, evaluation features, saved adversarial images, checkpoints). It
never recomputes an attack: a figure row whose adversarial image was not saved says so.

What a bench report shows (cells are those of ``results.json``; the *focus* is the first cell's model and dataset):

- tables: the bench's tables, every cell with its 95% intervals, and the protocol of each cell;
- rank lists (seed Fig. 1) of a few chosen queries (``config.report.queries``, default the first 3 valid ones of the
  white-box cell's evaluated subset) and the ``report.worst`` (default 3) with the largest AP drop in that cell: one
  row per query-side cell of the focus model (clean, each attack, each defense and threat model), ranked from the
  stored features with the protocol's distance and the evaluation's junk rule (:func:`~advreid.reporting.selection.
  ranked_gallery`); the rows are also written as ``figures/ranklists.json``;
- perturbation maps (seed Figs. 2, 6): |x_adv - x| per attacked cell (every model and defense) and, for a defended
  cell, what is left of it after the passive defense;
- mAP/rank-1 vs eps per attack and CMC curves per attack and threat model;
- t-SNE (seed Fig. 7) of clean and adversarial query features with the gallery of ``report.tsne_ids`` identities;
- Grad-CAM (seed Fig. 8) of clean vs adversarial queries per model, the target being the query's clean feature
  (:func:`~advreid.evaluation.explain.similarity_gradcam`);
- the training curves of each model's run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from advreid.reporting.html import FigureSpec, ReportData, write_report
from advreid.reporting.selection import default_queries, ranked_gallery, valid_query_mask, worst_queries
from advreid.reporting.tables import METRIC_COLUMNS, format_ci, protocol_line, reranked
from advreid.utils.io import atomic_write_json

__all__ = ["REPORT_DEFAULTS", "build_report", "detect_kind"]

REPORT_DEFAULTS: dict[str, Any] = {"queries": None, "worst": 3, "tsne_ids": 6, "topk": 10}
MAX_ROWS = 12  # rows of one rank-list / perturbation figure (the rest is named in the caption)
MAX_TSNE = 3  # t-SNE figures (white-box cells of the focus model)
NO_STORE = ("{what} stores no per-query features or adversarial images; run `advreid bench` (it stores them) to get "
            "rank lists, perturbation maps, t-SNE and Grad-CAM")


# ---------------------------------------------------------------------------------------------- the API
def detect_kind(folder: str | os.PathLike) -> str:
    """``"bench"``, ``"attack"`` or ``"run"``: what ``folder`` holds, from its ``results.json`` / ``metrics.jsonl``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"report folder {folder} does not exist")
    doc = _read_json(folder / "results.json")
    if isinstance(doc, dict) and isinstance(doc.get("cells"), list):
        return "bench"
    if isinstance(doc, dict) and isinstance(doc.get("runs"), list):
        return "attack"
    if (isinstance(doc, dict) and "evaluations" in doc) or (folder / "metrics.jsonl").is_file():
        return "run"
    raise ValueError(f"{folder}: not a bench folder (results.json with cells), an attack result (results.json with "
                     "runs) or a training run (metrics.jsonl / results.json with evaluations)")


def build_report(folder: str | os.PathLike, out: str | os.PathLike | None = None, *, gradcam: bool = True,
                 device: str = "cpu") -> Path:
    """Write the report of ``folder`` (bench, attack result or training run) to ``out`` (default
    ``folder/report.html``; figures in ``figures/`` beside it) and return its path.

    ``gradcam=False`` skips the Grad-CAM section (the only part that loads models); ``device`` runs it ("auto":
    CUDA when available). A bench's tables are those stored in ``results.json`` with their rows, else
    :func:`advreid.reporting.bench_tables.build_tables` of its cells.
    """
    folder = Path(folder)
    kind = detect_kind(folder)
    out = Path(out) if out is not None else folder / "report.html"
    if out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"out={str(out)!r}: expected an .html file")
    if kind == "bench":
        from advreid.utils.misc import get_device

        dev = str(get_device(device)) if gradcam else "cpu"
        report = _Bench(folder, out.parent / "figures", gradcam=gradcam, device=dev).report()
    elif kind == "attack":
        report = _attack_report(folder)
    else:
        report = _run_report(folder)
    return write_report(out.parent, report, filename=out.name)


# -------------------------------------------------------------------------------------------- file input
def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn last line of a killed run
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _per_query(x: Any) -> Any:
    """A stored per-query record (``per_query_to_json``, bare or under ``"per_query"``) as PerQueryScores."""
    from advreid.evaluation.bootstrap import per_query_from_json

    if isinstance(x, dict) and "format" not in x and isinstance(x.get("per_query"), dict):
        x = x["per_query"]
    return per_query_from_json(x) if isinstance(x, dict) else None


# the sections drawn from a bench's stored images and features (an attack result or a run has neither)
STORED_SECTIONS = ("ranklists", "perturbations", "tsne", "gradcam")


def _finish(rep: ReportData, training: FigureSpec | None, no_training: str, no_store: str) -> ReportData:
    """The tail of a non-bench report: the training figure (or why not) and the sections it cannot have."""
    if training:
        rep.figures.append(training)
    else:
        rep.add_unavailable("training", no_training)
    for sec in STORED_SECTIONS:
        rep.add_unavailable(sec, no_store)
    return rep


def _training_figure(run_dir: Any, name: str, who: str) -> FigureSpec | None:
    rows = _read_jsonl(Path(run_dir) / "metrics.jsonl") if run_dir else []
    if not any(isinstance(r.get("epoch"), int | float) for r in rows):
        return None
    return FigureSpec("training", name, "training", rows, title=f"Training curves: {who}",
                      caption=f"Per-epoch training losses, accuracy, learning rate and in-training evaluation from "
                              f"{Path(run_dir) / 'metrics.jsonl'} ({len(rows)} epochs).")


def _metrics_row(label: str, eps: str, clean: dict | None, attacked: dict | None, extra: str = "") -> list[str]:
    return [label, eps, format_ci(clean, "rank1"), format_ci(clean, "mAP"), format_ci(attacked, "rank1"),
            format_ci(attacked, "mAP"), format_ci(attacked, "mINP"), extra]


_RUN_HEADER = ["setting", "ε (px)", "clean R1", "clean mAP", "R1", "mAP", "mINP", "max L∞ (px)"]


def _attack_rows(label: str, runs: list[dict], rerank: bool) -> list[list[str]]:
    rows = []
    for r in runs:
        lin = r.get("linf_max_px")
        rows.append(_metrics_row(label, f"{r.get('eps_px', 0):.3g}", r.get("clean"), r.get("attacked"),
                                 f"{lin:.2f}" if isinstance(lin, int | float) else "-"))
        if rerank and "rr_rank1" in (r.get("attacked") or {}):
            rows.append(_metrics_row(f"{label}, re-ranked", f"{r.get('eps_px', 0):.3g}", reranked(r.get("clean")),
                                     reranked(r.get("attacked"))))
    return rows


def _sweep_series(label: str, runs: list[dict]) -> dict:
    return {"label": label, "eps_px": [0.0] + [float(r.get("eps_px", 0)) for r in runs],
            "metrics": [runs[0].get("clean") or {}] + [r.get("attacked") or {} for r in runs]}


# --------------------------------------------------------------------------------- attack result / run
def _attack_report(folder: Path) -> ReportData:
    doc = _read_json(folder / "results.json")
    atk = doc.get("attack")
    name = atk.get("name") if isinstance(atk, dict) else str(atk)
    ds = doc.get("dataset") or {}
    label = (f"{name} on the {doc.get('side', 'query')} set of {ds.get('name', '?') if isinstance(ds, dict) else ds}"
             f", threat {doc.get('threat', '?')}")
    proto = protocol_line(doc.get("protocol"))
    rep = ReportData(title=f"Attack report: {label}", source=str(folder), kind="attack result",
                     notes=[f"Protocol: {proto}."])
    runs = [r for r in doc.get("runs") or [] if isinstance(r, dict)]
    rep.tables.append({"name": "attack", "title": f"{label}: clean vs attacked (point [95% CI], %)",
                       "protocol": proto, "header": _RUN_HEADER,
                       "rows": _attack_rows(name, runs, bool((doc.get("protocol") or {}).get("rerank")))})
    if runs:
        rep.figures.append(FigureSpec("curves", "map_vs_eps", "map_vs_eps", [_sweep_series(label, runs)],
                                      title=f"Rank-1 and mAP vs ε: {name}",
                                      caption=f"{label}; ε = 0 is the clean score; bands: 95% bootstrap intervals "
                                              "over queries. " + ("" if len(runs) > 1 else "One budget only.")))
        cmc = [{"label": "clean", "cmc": runs[0]["clean"]["cmc"], "linestyle": "--"}] if "cmc" in (
            runs[0].get("clean") or {}) else []
        cmc += [{"label": f"{name} ε={r.get('eps_px', 0):.3g}px", "cmc": r["attacked"]["cmc"]} for r in runs
                if "cmc" in (r.get("attacked") or {})]
        if cmc:
            rep.figures.append(FigureSpec("curves", "cmc", "cmc", cmc, title=f"CMC: {name}",
                                          caption=f"CMC (plain distances) of {label}."))
    model = doc.get("model") or {}
    run_dir = model.get("run_dir") if isinstance(model, dict) else None
    return _finish(rep, _training_figure(run_dir, "training", "attacked model"),
                   "the attacked model's run folder has no metrics.jsonl",
                   NO_STORE.format(what="an `advreid attack` result folder"))


def _run_report(folder: Path) -> ReportData:
    doc = _read_json(folder / "results.json") or {}
    rep = ReportData(title=f"Training run report: {folder.name}", source=str(folder), kind="training run")
    evals = [e for e in doc.get("evaluations") or [] if isinstance(e, dict)]
    header = ["evaluation"] + [h for _, h in METRIC_COLUMNS]
    rows, cmc = [], []
    for i, e in enumerate(evals):
        d = e.get("defense")
        name = f"{i + 1}. {e.get('dataset', '?')}" + (f", defense {d['name']}" if isinstance(d, dict) else "")
        rows.append([f"{name} ({protocol_line(e.get('protocol'))})"] + [format_ci(e, k) for k, _ in METRIC_COLUMNS])
        if "rr_rank1" in e:
            rows.append([f"{name}, re-ranked"] + [format_ci(reranked(e), k) for k, _ in METRIC_COLUMNS])
        if "cmc" in e:
            cmc.append({"label": name, "cmc": e["cmc"]})
    if rows:
        rep.tables.append({"name": "evaluations", "title": "Evaluations of this run (point [95% CI], %)",
                           "protocol": "each row names its protocol", "header": header, "rows": rows})
    else:
        rep.add_unavailable("tables", "results.json has no evaluations (run `advreid eval` on this run)")
    if cmc:
        rep.figures.append(FigureSpec("curves", "cmc", "cmc", cmc, title="CMC of each evaluation",
                                      caption="CMC curves (plain distances) of the evaluations in results.json."))
    rep.add_unavailable("curves", "a training run has no attack: no mAP-vs-ε curve" + ("" if cmc else
                                                                                     ", and no stored CMC"))
    return _finish(rep, _training_figure(folder, "training", folder.name), "metrics.jsonl has no epoch rows yet",
                   NO_STORE.format(what="a training run"))


# ----------------------------------------------------------------------------------------------- bench
class _Bench:
    """A bench folder read per the storage contract of :mod:`advreid.experiments.bench`."""

    def __init__(self, folder: Path, figdir: Path, *, gradcam: bool, device: str) -> None:
        self.folder, self.figdir, self.gradcam, self.device = folder, figdir, gradcam, device
        self.doc = _read_json(folder / "results.json")
        self.cells = [c for c in self.doc["cells"] if isinstance(c, dict) and isinstance(c.get("cell"), dict)
                      and "key" in c]
        cfg = self.doc.get("config") or {}
        self.opts = {**REPORT_DEFAULTS, **(cfg.get("report") or {})}
        self.rep = ReportData(title=f"Robustness benchmark report: {self.doc.get('bench') or folder.name}",
                              source=str(folder), kind="bench")
        self._ds: dict[tuple, Any] = {}
        self._cache: dict[tuple, Any] = {}

    # ------------------------------------------------------------------------------------ cell helpers
    @staticmethod
    def attacked(c: dict) -> bool:
        return bool(c.get("runs"))

    @staticmethod
    def threat(c: dict) -> str:
        return str(c.get("threat") or c["cell"].get("threat") or ("white_box" if c.get("runs") else "clean"))

    @staticmethod
    def side(c: dict) -> str:
        return str(c.get("side") or "query")

    def models(self) -> list[str]:
        return list(dict.fromkeys(c["cell"]["model"] for c in self.cells))

    def short(self, c: dict, *, model: bool = False, run: int | None = 0, clean: bool = False) -> str:
        """A row label: ``[model: ]attack eps (threat)[, defense d]`` (``run``: which eps, None: none; ``clean``:
        the clean setting of the cell)."""
        k = c["cell"]
        s = f"{k['model']}: " if model else ""
        if self.attacked(c) and not clean:
            eps = "" if run is None else f" ε={c['runs'][run].get('eps_px', 0):.3g}px"
            s += f"{k['attack']}{eps} ({self.threat(c).replace('_', '-')})"
        else:
            s += "clean"
        return s + (f", defense {k['defense']}" if c.get("defense_spec") else "")

    def dataset(self, c: dict) -> Any:
        from advreid.data import build_dataset

        d = c["dataset"]
        key = (d["name"], str(d["root"]))
        if key not in self._ds:
            self._ds[key] = build_dataset(d["name"], d["root"])
        return self._ds[key]

    def features(self, c: dict) -> dict[str, np.ndarray] | None:
        key = ("feat", c["key"])
        if key not in self._cache:
            path = self.folder / "cells" / f"{c['key']}.features.safetensors"
            arrays = None
            if path.is_file():
                from safetensors.numpy import load_file

                arrays = {k: (v.astype(np.int64) if k.endswith(("_pids", "_camids", "_index")) else v)
                          for k, v in load_file(str(path)).items()}
            self._cache[key] = arrays
        return self._cache[key]

    def per_query(self, c: dict) -> dict | None:
        key = ("pq", c["key"])
        if key not in self._cache:
            doc = _read_json(self.folder / "cells" / f"{c['key']}.per_query.json")
            self._cache[key] = None if not isinstance(doc, dict) else {
                "clean": _per_query(doc.get("clean")), "attacked": [_per_query(a) for a in doc.get("attacked") or []]}
        return self._cache[key]

    def clean_of(self, c: dict) -> dict | None:
        """The clean cell with the same model, dataset and defense (whose gallery the attacked queries rank)."""
        k = c["cell"]
        for o in self.cells:
            ko = o["cell"]
            if not self.attacked(o) and (ko["model"], ko["dataset"], ko["defense"]) == (k["model"], k["dataset"],
                                                                                         k["defense"]):
                return o
        return None

    def adv_path(self, c: dict, q: int) -> Path:
        return self.folder / "cells" / c["key"] / "adv" / f"{q:06d}.png"

    def clean_image(self, c: dict, q: int) -> Any:
        """The dataset's query ``q`` resized to the cell's protocol size, as a (3,H,W) float tensor."""
        from advreid.data import ImageDataset, build_transforms

        p = c.get("protocol") or {}
        h, w = int(p.get("height", 256)), int(p.get("width", 128))
        key = ("img", id(self.dataset(c)), q, h, w)
        if key not in self._cache:
            self._cache[key] = ImageDataset([self.dataset(c).query[q]], build_transforms(h, w, is_train=False))[0][0]
        return self._cache[key]

    def adv_image(self, c: dict, q: int) -> Any:
        """The saved adversarial query ``q`` of cell ``c`` as a (3,H,W) float tensor, or None."""
        path = self.adv_path(c, q)
        if not path.is_file():
            return None
        import torch
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    @staticmethod
    def hwc(x: Any) -> np.ndarray | None:
        return None if x is None else x.permute(1, 2, 0).numpy()

    # ------------------------------------------------------------------------------------------ report
    def report(self) -> ReportData:
        rep = self.rep
        o = self.opts
        rep.notes.append(f"{len(self.cells)} cells" + ("" if self.doc.get("complete", True) else
                                                       " (the bench is not complete: missing cells are absent)") +
                         f"; report options: queries {o['queries'] or 'the first 3 valid'}, {o['worst']} worst, "
                         f"{o['tsne_ids']} t-SNE identities, top-{o['topk']} rank lists.")
        self.add_tables()
        self.add_curves()
        self.add_training()
        if not self.cells:
            for sec in STORED_SECTIONS:
                rep.add_unavailable(sec, "results.json has no cells yet")
            return rep
        self.focus = self.cells[0]["cell"]["model"], self.cells[0]["cell"]["dataset"]
        chosen, worst = self.select()
        self.add_ranklists(chosen, worst)
        shown = list(dict.fromkeys(chosen[:1] + worst[:1]))
        self.add_perturbations(shown)
        self.add_tsne(chosen)
        if self.gradcam:
            self.add_gradcam(shown)
        else:
            rep.add_unavailable("gradcam", "disabled (gradcam=False / --no-gradcam)")
        return rep

    def add_tables(self) -> None:
        stored = self.doc.get("tables")
        tables = stored if isinstance(stored, list) and all(
            isinstance(t, dict) and {"header", "rows"} <= set(t) for t in stored) else None
        if tables is None:
            from advreid.reporting.bench_tables import build_tables

            tables = build_tables(self.doc)
        self.rep.tables.extend({"name": t.get("name", f"t{i}"), "title": t.get("title", ""), "kind": t.get("kind", ""),
                                "protocol": t.get("protocol", ""), "header": t["header"], "rows": t["rows"]}
                               for i, t in enumerate(tables))
        rows, protos = [], []
        for c in self.cells:
            rr = bool((c.get("protocol") or {}).get("rerank"))
            if self.attacked(c):
                rows += _attack_rows(c["label"], c["runs"], rr)
            else:
                rows.append(_metrics_row(c["label"], "-", c.get("clean"), None))
                if rr and "rr_rank1" in (c.get("clean") or {}):
                    rows.append(_metrics_row(f"{c['label']}, re-ranked", "-", reranked(c.get("clean")), None))
            protos.append([c["key"], c["label"], self.side(c), self.threat(c), protocol_line(c.get("protocol"))])
        self.rep.tables.append({"name": "cells", "title": "Every cell: clean vs attacked (point [95% CI], %)",
                                "protocol": "R1/mAP/mINP in %, 95% percentile-bootstrap intervals over queries; "
                                            "each cell's protocol is in the next table", "header": _RUN_HEADER,
                                "rows": rows})
        self.rep.tables.append({"name": "protocols", "title": "Protocol of each cell", "protocol": "", "kind": "text",
                                "header": ["cell", "what ran", "attacked side", "threat model", "protocol"],
                                "rows": protos})

    def add_curves(self) -> None:
        attacked = [c for c in self.cells if self.attacked(c)]
        if not attacked:
            self.rep.add_unavailable("curves", "no attacked cell in results.json")
            return
        multi = len(self.models()) > 1
        for n, name in enumerate(dict.fromkeys(c["cell"]["attack"] for c in attacked)):
            group = [c for c in attacked if c["cell"]["attack"] == name]
            self.rep.figures.append(FigureSpec(
                "curves", f"map_vs_eps_{n}", "map_vs_eps",
                [_sweep_series(self.short(c, model=multi, run=None), c["runs"]) for c in group],
                title=f"Rank-1 and mAP vs ε: {name}",
                details=[f"{self.short(c, model=multi, run=None)}: {c['label']}" for c in group],
                caption=f"Attack {name}: ε = 0 is each cell's clean score; bands are 95% bootstrap intervals over "
                        "queries; plain distances (no re-ranking). Lines:"))
            for m, threat in enumerate(dict.fromkeys(self.threat(c) for c in group)):
                sub = [c for c in group if self.threat(c) == threat]
                series, seen = [], set()
                for c in sub:
                    base = (c["cell"]["model"], c["cell"]["dataset"], c["cell"]["defense"])
                    if base not in seen and "cmc" in (c["runs"][0].get("clean") or {}):
                        seen.add(base)
                        series.append({"label": self.short(c, model=multi, clean=True),
                                       "cmc": c["runs"][0]["clean"]["cmc"], "linestyle": "--"})
                    series += [{"label": self.short(c, model=multi, run=i), "cmc": r["attacked"]["cmc"]}
                               for i, r in enumerate(c["runs"]) if "cmc" in (r.get("attacked") or {})]
                if series:
                    self.rep.figures.append(FigureSpec(
                        "curves", f"cmc_{n}_{m}", "cmc", series, title=f"CMC: {name}, {threat.replace('_', '-')}",
                        details=[c["label"] for c in sub],
                        caption=f"CMC curves of attack {name} under the {threat.replace('_', '-')} threat model "
                                "(dashed: clean; solid: attacked, per ε); plain distances. Cells:"))

    def add_training(self) -> None:
        done = 0
        for n, m in enumerate(self.models()):
            info = next(c["model"] for c in self.cells if c["cell"]["model"] == m)
            fig = _training_figure(info.get("run_dir") if isinstance(info, dict) else None, f"training_{n}",
                                   f"model {m} ({info.get('model_name', '') if isinstance(info, dict) else ''})")
            if fig:
                self.rep.figures.append(fig)
                done += 1
            else:
                self.rep.add_unavailable("training", f"model {m}: its run folder has no metrics.jsonl")
        if not done and not self.models():
            self.rep.add_unavailable("training", "no models in results.json")

    # ---------------------------------------------------------------------------------------- queries
    def white_box(self, model: str) -> list[dict]:
        d = self.focus[1]
        return [c for c in self.cells if self.attacked(c) and not c.get("defense_spec") and self.side(c) == "query"
                and c["cell"]["model"] == model and c["cell"]["dataset"] == d]

    def select(self) -> tuple[list[int], list[int]]:
        """(chosen, worst) dataset query indices, per the module docstring."""
        wb = self.white_box(self.focus[0])
        first = self.cells[0]
        ds = self.dataset(first)
        feats = self.features(wb[0]) if wb else None
        if feats is None:
            clean = self.clean_of(first) or first
            feats = self.features(clean)
        index = feats["query_index"] if feats is not None and "query_index" in feats else np.arange(len(ds.query))
        q = self.opts.get("queries")
        if q:
            bad = [i for i in q if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(ds.query)]
            if bad:
                raise ValueError(f"config report.queries: {bad} are not query indices of {ds.name} "
                                 f"(0..{len(ds.query) - 1})")
            chosen = [int(i) for i in q]
        else:
            valid = valid_query_mask([r.pid for r in ds.query], [r.camid for r in ds.query],
                                     [r.pid for r in ds.gallery], [r.camid for r in ds.gallery])
            chosen = default_queries(valid[index], index, 3)
        worst: list[int] = []
        pq = self.per_query(wb[0]) if wb else None
        n_worst = int(self.opts.get("worst") or 0)
        if not wb:
            self.rep.add_unavailable("ranklists", "no white-box query attack of the first model: no worst queries")
        elif pq is None or pq["clean"] is None or not pq["attacked"] or pq["attacked"][0] is None:
            self.rep.add_unavailable("ranklists", f"{wb[0]['key']}.per_query.json missing: no worst queries")
        elif n_worst > 0:
            a, b = pq["clean"].ap, pq["attacked"][0].ap
            if not len(a) == len(b) == len(index):
                self.rep.add_unavailable("ranklists", f"{wb[0]['key']}: per-query scores ({len(a)}) and stored "
                                                      f"features ({len(index)}) differ in length: no worst queries")
            else:
                worst = worst_queries(a, b, index, n_worst, exclude=chosen)
        self.rep.notes.append(f"Queries shown: chosen {chosen}" + (f", worst (largest AP drop in "
                                                                   f"{wb[0]['label']}) {worst}" if wb else "") +
                              f"; dataset {ds.name} of the first model {self.focus[0]!r}.")
        return chosen, worst

    # -------------------------------------------------------------------------------------- rank lists
    def distances(self, c: dict, qf: np.ndarray, clean: dict) -> np.ndarray:
        """Distances (float64) of one query feature of cell ``c`` to the gallery of its clean cell ``clean``."""
        import torch

        from advreid.evaluation.distance import compute_distance_matrix

        key = ("gallery64", clean["key"])  # converted once per gallery, not once per rank-list row
        if key not in self._cache:
            self._cache[key] = torch.from_numpy(np.asarray(self.features(clean)["gallery_features"], np.float64))
        metric = (c.get("protocol") or {}).get("metric", "cosine")
        return compute_distance_matrix(torch.from_numpy(np.asarray(qf, np.float64)[None]), self._cache[key], metric,
                                       dtype=torch.float64)[0].numpy()

    def rank_row(self, c: dict, q: int) -> dict:
        """One rank-list row (figure data and JSON record) of query ``q`` in cell ``c``."""
        topk = int(self.opts.get("topk") or 10)
        clean = c if not self.attacked(c) else self.clean_of(c)
        rec = {"cell": c["key"], "label": c["label"], "short": self.short(c), "query": q, "gallery": [],
               "eps_px": c["runs"][0].get("eps_px") if self.attacked(c) else None}
        cf, af = (self.features(clean) if clean else None), self.features(c)
        if cf is None or af is None or "gallery_features" not in cf or "query_features" not in af:
            rec["note"] = "features not stored for this cell or its clean gallery"
            return rec
        pos = np.flatnonzero(af["query_index"] == q)
        if not len(pos):
            rec["note"] = f"query {q} is not in this cell's evaluated subset"
            return rec
        p = int(pos[0])
        d = self.distances(c, af["query_features"][p], clean)
        top = ranked_gallery(d, int(af["query_pids"][p]), int(af["query_camids"][p]), cf["gallery_pids"],
                             cf["gallery_camids"], topk=topk)
        rec["gallery"] = [{"index": int(cf["gallery_index"][t["position"]]), "rank": t["rank"], "match": t["match"],
                           "distance": t["distance"]} for t in top]
        pq = self.per_query(c)
        s = (pq or {}).get("attacked" if self.attacked(c) else "clean")
        s = (s[0] if s else None) if isinstance(s, list) else s
        if s is not None and len(s.ap) == len(af["query_index"]) and s.first_match[p] >= 0:
            rec["ap"] = float(s.ap[p])
        if self.attacked(c) and not self.adv_path(c, q).is_file():
            rec["query_note"] = f"adversarial image not saved ({self.adv_path(c, q).relative_to(self.folder)})"
        return rec

    def add_ranklists(self, chosen: list[int], worst: list[int]) -> None:
        m, d = self.focus
        rows = [c for c in self.cells if c["cell"]["model"] == m and c["cell"]["dataset"] == d
                and self.side(c) == "query"]
        order = list(dict.fromkeys(c["cell"]["defense"] for c in rows))
        rows.sort(key=lambda c: (order.index(c["cell"]["defense"]), self.attacked(c)))
        if any(self.side(c) == "gallery" for c in self.cells):
            self.rep.section_notes.setdefault("ranklists", []).append(
                "Gallery-side attacks are not drawn as rank lists (their adversarial gallery images are not stored).")
        records, skipped, notes = [], [], set()
        for kind, queries in (("chosen", chosen), ("worst", worst)):
            for q in queries:
                recs = [self.rank_row(c, q) for c in rows[:MAX_ROWS]]
                if all(not r["gallery"] for r in recs):  # nothing ranked: no figure, one reason
                    skipped.append(q)
                    notes |= {r.get("note", "no ranking") for r in recs}
                    continue
                records.append({"kind": kind, "query": q, "rows": recs})
                self.rep.figures.append(self.ranklist_spec(kind, q, recs, rows))
        if skipped:
            self.rep.add_unavailable("ranklists", f"queries {skipped}: {'; '.join(sorted(notes))}")
        if records:
            atomic_write_json(self.figdir / "ranklists.json", {"focus": {"model": m, "dataset": d},
                                                               "figures": records})
        elif not chosen + worst:
            self.rep.add_unavailable("ranklists", "no query selected")

    def ranklist_spec(self, kind: str, q: int, recs: list[dict], cells: list[dict]) -> FigureSpec:
        ds = self.dataset(cells[0])
        rec_q = ds.query[q]
        rows = []
        for r in recs:
            c = next(c for c in cells if c["key"] == r["cell"])
            img = self.hwc(self.clean_image(c, q) if not self.attacked(c) else self.adv_image(c, q))
            ap = f", AP {100 * r['ap']:.1f}%" if "ap" in r else ""
            rows.append({"label": f"{r['short']}{ap}", "query": img, "query_note": r.get("query_note"),
                         "note": r.get("note"),
                         "gallery": [{"image": ds.gallery[g["index"]].path, "rank": g["rank"], "match": g["match"]}
                                     for g in r["gallery"]]})
        left = len(cells) - len(recs)
        what = "chosen" if kind == "chosen" else "among the worst (largest AP drop under the white-box attack)"
        return FigureSpec(
            "ranklists", f"ranklist_{kind}_{q:06d}", "ranklist", rows,
            title=f"Rank list of query {q} ({Path(rec_q.path).name}, pid {rec_q.pid}), {what}",
            details=[f"{r['short']}: {r['label']}" + "".join(f" [{r[k]}]" for k in ("note", "query_note") if r.get(k))
                     for r in recs],
            caption=f"Top-{int(self.opts.get('topk') or 10)} gallery images by the protocol's distance from the stored "
                    "features (no re-ranking; junk = same identity and camera removed), green ✓ = same identity, "
                    "red ✗ = another; the query tile is the image that was ranked (the adversarial one for attacks)."
                    + (f" {left} more cells not drawn." if left > 0 else "") + " Rows:")

    # -------------------------------------------------------------------------------- perturbation maps
    def defended(self, c: dict, x: Any, xa: Any) -> dict | None:
        spec = c.get("defense_spec")
        if not spec or xa is None:
            return None
        import torch

        from advreid.defenses import build_passive

        name, params = (spec, None) if isinstance(spec, str) else (spec["name"], spec.get("params"))
        params = {k: v for k, v in (params or {}).items() if k != "name"} or None
        d = build_passive(name, params)
        out = []
        for img in (x, xa):  # one seeded draw for both: a randomized defense transforms them alike
            d.generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                out.append(self.hwc(d(img[None])[0].clamp(0, 1)))
        return {"name": c["cell"]["defense"], "clean": out[0], "adversarial": out[1]}

    def add_perturbations(self, queries: list[int]) -> None:
        d = self.focus[1]
        cells = [c for c in self.cells if self.attacked(c) and self.side(c) == "query" and c["cell"]["dataset"] == d]
        if not cells or not queries:
            self.rep.add_unavailable("perturbations", "no query-side attacked cell" if queries else "no query")
            return
        multi = len(self.models()) > 1
        for q in queries:
            items, missing = [], 0
            for c in cells[:MAX_ROWS]:
                x, xa = self.clean_image(c, q), self.adv_image(c, q)
                missing += xa is None
                items.append({"label": self.short(c, model=multi), "clean": self.hwc(x), "adversarial": self.hwc(xa),
                              "defended": self.defended(c, x, xa),
                              "note": None if xa is not None else "adversarial image not saved"})
            from advreid.reporting.figures import amplification

            f = amplification(items)
            self.rep.figures.append(FigureSpec(
                "perturbations", f"perturbation_{q:06d}", "perturbation", items,
                title=f"Perturbations of query {q}", details=[f"{self.short(c, model=multi)}: {c['label']}"
                                                             for c in cells[:MAX_ROWS]],
                caption=f"Clean query, saved adversarial image and |δ| = |x_adv - x| per channel, amplified ×{f:.3g} "
                        "(one factor for the whole figure: the largest |δ| is white); for a defended cell also the "
                        "defended adversarial image and |D(x_adv) - D(x)| (what survives the passive defense, seed "
                        f"Fig. 6) at the same factor. {missing} rows lack a saved adversarial image."
                        + (f" {len(cells) - MAX_ROWS} more cells not drawn." if len(cells) > MAX_ROWS else "")
                        + " Rows:"))

    # ------------------------------------------------------------------------------------------- t-SNE
    def tsne_points(self, c: dict, chosen: list[int]) -> dict | None:
        clean = self.clean_of(c)
        cf, af = (self.features(clean) if clean else None), self.features(c)
        if cf is None or af is None or "query_features" not in cf or "gallery_features" not in cf:
            return None
        pos = {int(i): n for n, i in enumerate(cf["query_index"])}
        both = [(pos[int(i)], n) for n, i in enumerate(af["query_index"]) if int(i) in pos]
        pids = [int(af["query_pids"][n]) for _, n in both]
        first = [int(af["query_pids"][n]) for q in chosen for _, n in both if int(af["query_index"][n]) == q]
        ids = list(dict.fromkeys(first + sorted(set(pids))))[:int(self.opts.get("tsne_ids") or 6)]
        feats, pid, kind, links = [], [], [], []
        for p in ids:
            g = np.flatnonzero(cf["gallery_pids"] == p)[:20]
            feats += list(cf["gallery_features"][g])
            pid += [p] * len(g)
            kind += ["gallery"] * len(g)
            for i, n in [(i, n) for i, n in both if int(af["query_pids"][n]) == p][:10]:
                links.append((len(feats), len(feats) + 1))
                feats += [cf["query_features"][i], af["query_features"][n]]
                pid += [p, p]
                kind += ["clean", "adversarial"]
        if len(feats) < 4:
            return None
        from advreid.reporting.figures import tsne_embedding

        xy = tsne_embedding(np.stack(feats), seed=0)
        return {"xy": xy, "pid": np.array(pid), "kind": np.array(kind), "links": links, "ids": ids, "n": len(feats)}

    def add_tsne(self, chosen: list[int]) -> None:
        cells = self.white_box(self.focus[0])[:MAX_TSNE]
        for n, c in enumerate(cells):
            pts = self.tsne_points(c, chosen)
            if pts is None:
                self.rep.add_unavailable("tsne", f"{c['key']}: features not stored (or too few points)")
                continue
            self.rep.figures.append(FigureSpec(
                "tsne", f"tsne_{n}", "tsne", pts, title=f"t-SNE: {self.short(c)}", details=[c["label"]],
                caption=f"scikit-learn t-SNE (seed 0, PCA init, perplexity min(30, (N-1)/3)) of {pts['n']} stored "
                        f"evaluation features of identities {pts['ids']}: their gallery images, clean queries and the "
                        "same queries attacked (dashed: clean → adversarial), embedded jointly. Cell:"))
        if not cells:
            self.rep.add_unavailable("tsne", "no white-box query attack of the first model")

    # ---------------------------------------------------------------------------------------- Grad-CAM
    def gradcam_target(self, model: Any, c: dict, q: int, cf: dict | None) -> tuple[np.ndarray, bool]:
        """(the query's clean feature, stored?): the clean cell's stored feature, else the model's embedding of the
        clean image per the cell's protocol (flip, normalisation)."""
        if cf is not None and "query_index" in cf:
            pos = np.flatnonzero(cf["query_index"] == q)
            if len(pos):
                return cf["query_features"][int(pos[0])], True
        from advreid.evaluation import embed

        p = c.get("protocol") or {}
        f = embed(model, self.clean_image(c, q)[None].to(self.device), flip=bool(p.get("flip", False)),
                  normalize=bool(p.get("normalize", True)))
        return f[0].cpu().numpy(), False

    def gradcam_rows(self, model: Any, cells: list[dict], queries: list[int]) -> tuple[list[dict], bool]:
        """Grad-CAM rows (query x white-box cell) of one model, and whether every target was a stored feature."""
        import torch

        from advreid.evaluation.explain import similarity_gradcam

        clean = self.clean_of(cells[0])
        cf = self.features(clean) if clean else None
        rows, targets, xs, stored = [], [], [], True
        for q in queries:
            t, was_stored = self.gradcam_target(model, cells[0], q, cf)
            stored &= was_stored
            for c in cells:
                x, xa = self.clean_image(c, q), self.adv_image(c, q)
                rows.append({"label": f"query {q}: {self.short(c)}", "clean": self.hwc(x), "adversarial": self.hwc(xa),
                             "note": None if xa is not None else
                             f"adversarial image not saved ({self.adv_path(c, q).relative_to(self.folder)})"})
                xs += [x] + ([xa] if xa is not None else [])
                targets += [t] * (1 + (xa is not None))
        cams = iter(similarity_gradcam(model, torch.stack(xs), np.stack(targets)))
        for r in rows:
            r["clean_cam"] = next(cams)
            r["adversarial_cam"] = next(cams) if r["adversarial"] is not None else None
        return rows, stored

    def add_gradcam(self, queries: list[int]) -> None:
        from advreid.evaluation.explain import gradcam_layer
        from advreid.experiments.runs import reload_model

        for n, m in enumerate(self.models()):
            cells = self.white_box(m)
            if not cells or not queries:
                self.rep.add_unavailable("gradcam", f"model {m}: no white-box query attack on {self.focus[1]}")
                continue
            info = cells[0]["model"]
            try:  # a run's checkpoint or a model spec, the same resolver as eval/attack
                model = reload_model(info).to(self.device)
                gradcam_layer(model)
            except (OSError, ValueError, KeyError, TypeError) as e:
                self.rep.add_unavailable("gradcam", f"model {m}: not loadable for Grad-CAM ({e})")
                continue
            rows, stored = self.gradcam_rows(model, cells, queries)
            target = ("the query's stored clean feature" if stored else
                      "the query's clean feature (recomputed with the model: the clean features were not stored)")
            self.rep.figures.append(FigureSpec(
                "gradcam", f"gradcam_{n}", "gradcam", rows, title=f"Grad-CAM: model {m}",
                details=[c["label"] for c in cells] + [f"checkpoint {info.get('checkpoint') or info.get('spec')}"],
                caption=f"Grad-CAM (pytorch-grad-cam, layer: the backbone's last block) of model {m}, target: the "
                        f"projection of the embedding on {target}, for the clean query and its saved adversarial "
                        "version (maps min-max scaled per image). Attacks:"))
