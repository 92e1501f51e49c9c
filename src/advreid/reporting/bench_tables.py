"""Tables of a benchmark's results document (``results.json``), in the seed paper's shapes: attack tables (rows =
model [+ defense] per threat model, columns = attacks), clean accuracy, cross-domain. Every cell shows R1 / mAP (%)
with its 95% bootstrap interval when the results carry one; every table states its protocol (each column's attack
as its registry name and parameters, side, quantisation, threat models, re-ranking). Reads result dicts only.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from advreid.reporting.tables import format_grid
from advreid.utils.io import atomic_write_text

__all__ = ["build_tables", "format_bench_table", "format_metric", "write_tables"]


def _metrics(cell: dict) -> dict:
    return cell["runs"][0]["attacked"] if cell.get("runs") else cell["clean"]


def format_metric(m: dict | None, rr: bool = False, *, intervals: bool = True) -> str:
    """``R1 / mAP`` in percent, each with its interval when present: ``37.5 [33.0, 42.1] / 30.9 [27.5, 34.6]``."""
    if m is None:
        return "-"
    p = "rr_" if rr else ""
    if f"{p}rank1" not in m:
        return "-"

    def one(name: str) -> str:
        v = f"{100 * m[p + name]:.1f}"
        ci, sd = m.get(f"{p}{name}_ci"), m.get(f"{p}{name}_std")
        if sd is not None:  # repeated seeds: mean +- sample std
            return f"{v} ± {100 * sd:.1f}"
        return f"{v} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if intervals and ci else v

    return f"{one('rank1')} / {one('mAP')}"


def _row_parts(row: str) -> tuple[str, str]:
    """``"jad+cs"`` -> ("jad", "cs"); ``"baseline"`` -> ("baseline", "none")."""
    model, _, defense = str(row).partition("+")
    return model, defense or "none"


_THREAT_ORDER = {"white_box": ("white_box", "transfer", "clean"),
                 "non_adaptive": ("non_adaptive", "transfer", "white_box", "clean"),
                 "adaptive": ("adaptive", "transfer_adaptive", "clean")}


def _find(cells: dict, model: str, dataset: str, defense: str, attack: str, threat: str) -> dict | None:
    """The cell a table position shows: the row's threat model, or the one cell there is (clean, white-box,
    transfer: the bench decided which, and the cell says so)."""
    by_threat = cells.get((model, dataset, defense, attack), {})
    for t in _THREAT_ORDER.get(threat, (threat,)):
        if t in by_threat:
            return by_threat[t]
    return None


def _auto_tables(cfg: dict) -> list[dict]:
    tables = []
    for i, b in enumerate(cfg["grid"]):
        models = b.get("models", list(cfg["models"]))
        defenses = b.get("defenses", list(cfg["defenses"]))
        dsets = b.get("datasets") or sorted({cfg["models"][m].get("train_on") for m in models})
        for d in dsets:
            tables.append({"name": f"grid{i}_{d}", "kind": "attack", "dataset": d,
                           "rows": [m if f == "none" else f"{m}+{f}" for m in models for f in defenses],
                           "columns": b.get("attacks", list(cfg["attacks"])),
                           "threats": b.get("threats", ["non_adaptive"]), "rerank": "both"})
    return tables


def _protocol_line(cfg: dict, columns: list[str], cells: list[dict]) -> str:
    """The table's protocol, derived from the cells that fill it (their attack labels) and the settings."""
    s = cfg["settings"]
    labels = {}
    for c in cells:
        a = c["cell"]["attack"]
        if a in columns and c.get("label"):
            labels.setdefault(a, c["label"].split(";")[0])
    cols = "; ".join(f"{_column_label(cfg, a)} = {labels.get(a, 'not run')}" for a in columns
                     if cfg["attacks"].get(a) is not None)
    quant = f"quantize {s['quantize'] or 'none'}, re-encode {s['reencode'] or 'none'}"
    parts = [f"{s['side']} attack", cols, quant, "cells R1 / mAP (%) [95% bootstrap interval over queries]",
             "threat models: white-box (no defense), non-adaptive (attack on the bare model, defense at test time), "
             "adaptive (attack through the defense; BPDA, EOT when random)",
             "RK = k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3)",
             "(T) = transfer: the attack was crafted on another model (a source model or a DMR generator's victim)"]
    if s["max_images"]:
        parts.append(f"subset of {s['max_images']} {s['side']} images")
    return "; ".join(p for p in parts if p)


def build_tables(doc: dict) -> list[dict]:
    """Tables from a results document: ``[{name, title, kind, protocol, attacks, header, rows: [[cell text]]}]``."""
    cfg = doc["config"]
    index: dict[tuple, dict[str, dict]] = {}
    for c in doc["cells"]:
        k = tuple(c["cell"][x] for x in ("model", "dataset", "defense", "attack"))
        index.setdefault(k, {})[c["cell"]["threat"]] = c
    rerank_on = bool(cfg["settings"]["rerank"])
    out = []
    for t in cfg.get("tables") or _auto_tables(cfg):
        kind = t.get("kind", "attack")
        rr_modes = {"both": [False, True], True: [True], False: [False]}[t.get("rerank", "both")]
        if not rerank_on:
            rr_modes = [False]
        if kind == "attack":
            header, rows = _attack_table(t, cfg, index, rr_modes)
        elif kind == "clean":
            header, rows = _clean_table(t, cfg, index, rr_modes)
        else:
            header, rows = _cross_table(t, cfg, index)
        columns = list(t.get("columns") or cfg["attacks"])
        proto = _protocol_line(cfg, columns, doc["cells"])
        if t.get("per_identity"):
            proto += "; per-ID R1 std = standard deviation (variance) across query identities of per-identity rank-1, %"
        if t.get("note"):
            proto += f"; {t['note']}"
        out.append({"name": t.get("name", kind), "title": t.get("title", t.get("name", kind)), "kind": kind,
                    "protocol": proto,
                    "attacks": {a: cfg["attacks"][a] for a in columns if a in cfg["attacks"]},
                    "header": header, "rows": rows})
    return out


def _attack_table(t: dict, cfg: dict, index: dict, rr_modes: list[bool]) -> tuple[list[str], list[list[str]]]:
    cols = t.get("columns") or list(cfg["attacks"])
    dataset = t.get("dataset") or next(iter(cfg["datasets"]))
    threats = t.get("threats") or ["non_adaptive"]
    per_id = list(t.get("per_identity") or [])
    header = (["model", "threat model"] + [_column_label(cfg, a) for a in cols]
              + [f"per-ID R1 std ({_column_label(cfg, a)})" for a in per_id])
    rows = []
    for rr in rr_modes:
        for row in t.get("rows") or list(cfg["models"]):
            m, f = _row_parts(row)
            for th in (threats if cfg["defenses"].get(f) is not None else ["white_box"]):
                label = (row if f != "none" else m) + (" + RK" if rr else "")
                cells = [_find(index, m, dataset, f, a, th) for a in cols]
                extra = [_find(index, m, dataset, f, a, th) for a in per_id]
                rows.append([label, th.replace("_", "-")] + [_cell_text(c, rr, th) for c in cells]
                            + [_per_id_text(c) if not rr else "-" for c in extra])
    return header, rows


def _cell_text(cell: dict | None, rr: bool, row_threat: str) -> str:
    """A cell's R1 / mAP with intervals, marked `(T)` when it is a transfer attack in a row of another threat."""
    text = format_metric(_metrics(cell) if cell else None, rr)
    transfer = cell is not None and str(cell["cell"]["threat"]).startswith("transfer")
    if transfer and not row_threat.startswith("transfer"):
        text += " (T)"
    return text


def _column_label(cfg: dict, key: str) -> str:
    a = cfg["attacks"].get(key)
    if a is None:
        return "no attack"
    return str(a.get("label") or key)


def _per_id_text(cell: dict | None) -> str:
    """The per-identity rank-1 spread of a cell: std (variance) in percentage points."""
    p = (cell or {}).get("per_identity")
    return "-" if not p else f"{p['std']:.1f} ({p['variance']:.0f})"


def _clean_table(t: dict, cfg: dict, index: dict, rr_modes: list[bool]) -> tuple[list[str], list[list[str]]]:
    dsets = t.get("datasets") or list(cfg["datasets"])
    clean = next((a for a, v in cfg["attacks"].items() if v is None), None)
    rows = []
    for rr in rr_modes:
        for row in t.get("rows") or list(cfg["models"]):
            m, f = _row_parts(row)
            cells = [_find(index, m, d, f, clean, "clean") if clean else None for d in dsets]
            rows.append([(row if f != "none" else m) + (" + RK" if rr else "")]
                        + [format_metric(_metrics(c) if c else None, rr) for c in cells])
    return ["model"] + dsets, rows


def _cross_table(t: dict, cfg: dict, index: dict) -> tuple[list[str], list[list[str]]]:
    dsets = t.get("datasets") or list(cfg["datasets"])
    clean = next((a for a, v in cfg["attacks"].items() if v is None), None)
    pairs = [(a, b) for a in dsets for b in dsets if a != b]
    rows = []
    for row in t.get("rows") or list(cfg["models"]):
        m, f = _row_parts(row)
        trained = cfg["models"][m].get("train_on")
        cells = [_find(index, m, b, f, clean, "clean") if clean and trained == a else None for a, b in pairs]
        rows.append([row] + [format_metric(_metrics(c) if c else None) for c in cells])
    return ["model"] + [f"{a}->{b}" for a, b in pairs], rows


def format_bench_table(table: dict, *, markdown: bool = True) -> str:
    """One table as Markdown (or aligned text), its title and protocol line above it."""
    body = format_grid(table["header"], table["rows"], markdown=markdown)
    return f"### {table['title']}\n\n{table['protocol']}\n\n{body}\n"


def write_tables(tables: list[dict], folder: Path) -> None:
    """``<name>.md`` and ``<name>.csv`` per table, and ``tables.md`` with all of them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for t in tables:
        md = format_bench_table(t)
        parts.append(md)
        atomic_write_text(folder / f"{t['name']}.md", md)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(t["header"])
        w.writerows(t["rows"])
        atomic_write_text(folder / f"{t['name']}.csv", buf.getvalue())
    atomic_write_text(folder / "tables.md", "\n".join(parts))
