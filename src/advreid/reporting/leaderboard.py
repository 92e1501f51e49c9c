"""``advreid leaderboard``: rank ``advreid robust`` results by worst-case mAP (a view of the result files only).

Entries are grouped by everything that makes two numbers comparable -- dataset name and data fingerprint, the
attacked queries, the threat model (kind, defense and its parameters, adaptive, EOT, norm, budget) and the
ensemble (version, norm, revision) -- and ranked only within a group, by worst-case mAP (ties: worst-case rank-1).
The HTML page is self-contained (inline CSS and script, a Content-Security-Policy that forbids every request) with
sortable columns; the Markdown and CSV files hold the same rows. :func:`robust_text` is the terminal table of one
results file.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from advreid.reporting.tables import METRIC_COLUMNS, format_ci, format_grid, format_table
from advreid.utils.io import atomic_write_text

__all__ = ["FORMAT", "GENERATOR", "group_entries", "load_results", "robust_text", "write_leaderboard"]

FORMAT = "advreid.robust.v1"
GENERATOR = "advreid leaderboard"
FILES = ("leaderboard.html", "leaderboard.md", "leaderboard.csv")
_METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")


# ------------------------------------------------------------------------------------------------ reading
def load_results(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """The results documents of ``paths`` (a results.json, or a folder holding one), each with ``_path``."""
    docs = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            path = path / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{p}: no results.json of `advreid robust` there")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON ({' '.join(str(e).split())})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(f"{path} is not an `advreid robust` results file (format {got!r}, expected {FORMAT!r})")
        if not doc.get("complete"):
            raise ValueError(f"{path} is an unfinished run (complete is false); finish it with --resume")
        docs.append({**doc, "_path": str(path)})
    if not docs:
        raise ValueError("no results given")
    return docs


def model_label(doc: dict) -> str:
    """What was evaluated, in one line: the spec, else the run folder, else the architecture."""
    m = doc.get("model") or {}
    for key in ("spec", "run_dir", "name", "arch"):
        if m.get(key):
            return str(m[key])
    return "model"


def threat_label(doc: dict) -> str:
    """``linf 8px, adaptive through rrp (EOT 8)``: the threat model in words."""
    t = doc["threat"]
    d = t.get("defense")
    words = f"{t['norm']} {t['eps_label']}"
    if d is None:
        return words + ", no defense"
    how = "adaptive through" if t.get("adaptive") else "non-adaptive, defense"
    eot = f" (EOT {t['eot_samples']})" if t.get("eot_samples") else ""
    return f"{words}, {how} {d['name']}{eot}"


def _group_key(doc: dict) -> str:
    t, d = doc["threat"], doc["data"]
    defense = t.get("defense")
    key = {"dataset": d["name"], "fingerprint": d["fingerprint"], "num_attacked": d["num_attacked"],
           "max_images": d.get("max_images"), "kind": t["kind"], "norm": t["norm"], "eps": round(float(t["eps"]), 9),
           "adaptive": t["adaptive"], "eot": t.get("eot_samples"),
           "defense": None if defense is None else [defense["name"], defense.get("params")],
           "ensemble": doc["ensemble"]["label"], "protocol": doc.get("protocol", {}).get("ap")}
    return json.dumps(key, sort_keys=True)


def group_entries(docs: list[dict]) -> list[list[dict]]:
    """Entries grouped by comparability, each group sorted by worst-case mAP then rank-1, best first; groups in
    order of first appearance."""
    groups: dict[str, list[dict]] = {}
    for doc in docs:
        groups.setdefault(_group_key(doc), []).append(doc)
    return [sorted(g, key=lambda d: (-d["worst_case"]["mAP"], -d["worst_case"]["rank1"])) for g in groups.values()]


# ----------------------------------------------------------------------------------------------- the rows
COLUMNS: list[tuple[str, str, str]] = [
    ("rank", "#", "num"), ("model", "model", "text"), ("mAP", "worst-case mAP", "num"),
    ("rank1", "worst-case R1", "num"), ("mINP", "worst-case mINP", "num"), ("clean_mAP", "clean mAP", "num"),
    ("strongest", "strongest member (wins)", "text"), ("masking", "masking", "text"),
    ("threat", "threat model", "text"), ("version", "ensemble", "text"), ("file", "results", "text"),
]


def _pct(m: dict, key: str) -> dict[str, Any]:
    ci = m.get(f"{key}_ci")
    return {"text": f"{100 * m[key]:.1f}", "sort": round(float(m[key]), 8),
            "ci": f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "", "flag": "",
            "lo": float(ci[0]) if ci else None, "hi": float(ci[1]) if ci else None}


def _row(rank: int, doc: dict) -> dict[str, dict[str, Any]]:
    w = doc["worst_case"]
    wins = {n: m.get("wins", 0) for n, m in doc["members"].items()}
    top = max(wins, key=lambda n: wins[n]) if wins else "-"
    flagged = doc.get("masking", {}).get("flagged", False)
    text = lambda s, flag="": {"text": s, "sort": None, "ci": "", "flag": flag}  # noqa: E731
    return {"rank": {"text": str(rank), "sort": rank, "ci": "", "flag": ""}, "model": text(model_label(doc)),
            "mAP": _pct(w, "mAP"), "rank1": _pct(w, "rank1"), "mINP": _pct(w, "mINP"),
            "clean_mAP": _pct(doc["clean"], "mAP"), "strongest": text(f"{top} ({wins.get(top, 0)})"),
            "masking": text("flagged" if flagged else "no", "!" if flagged else ""),
            "threat": text(threat_label(doc)), "version": text(doc["ensemble"]["label"]),
            "file": text(doc["_path"])}


def _group_meta(i: int, group: list[dict]) -> dict[str, Any]:
    d = group[0]
    data = d["data"]
    sub = f", {data['num_attacked']} of {data['num_query']} queries" if data.get("max_images") else ""
    return {"id": f"group-{i + 1}", "title": f"{data['name']}: {threat_label(d)} — ensemble {d['ensemble']['label']}",
            "subtitle": f"{data['num_query']} query / {data['num_gallery']} gallery images{sub}; data fingerprint "
                        f"{data['fingerprint'][:12]}; {len(group)} entr{'y' if len(group) == 1 else 'ies'}",
            "rows": [_row(r + 1, doc) for r, doc in enumerate(group)]}


# ----------------------------------------------------------------------------------------------- writers
def _markdown(groups: list[dict]) -> str:
    out = ["# advreid robust leaderboard", "",
           "Ranked by worst-case mAP (95% bootstrap intervals over queries); entries are ranked only within a group "
           "(same dataset, data, threat model, budget, ensemble version and queries).", ""]
    for g in groups:
        out += [f"## {g['title']}", "", g["subtitle"], ""]
        rows = [[r[k]["text"] + (f" {r[k]['ci']}" if r[k].get("ci") else "") for k, _, _ in COLUMNS]
                for r in g["rows"]]
        out += [format_grid([h for _, h, _ in COLUMNS], rows, markdown=True), ""]
    return "\n".join(out)


def _csv(groups: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["group", "rank", "model", *[f"worst_{k}" for k in ("mAP", "rank1", "mINP")],
                *[f"worst_{k}_lo" for k in ("mAP", "rank1", "mINP")], *[f"worst_{k}_hi" for k in ("mAP", "rank1",
                                                                                                  "mINP")],
                "clean_mAP", "strongest_member", "masking_flagged", "threat", "ensemble", "results"])
    for g in groups:
        for r in g["rows"]:
            keys = ("mAP", "rank1", "mINP")
            w.writerow([g["id"], r["rank"]["text"], r["model"]["text"], *[r[k]["sort"] for k in keys],
                        *[r[k]["lo"] for k in keys], *[r[k]["hi"] for k in keys],
                        r["clean_mAP"]["sort"], r["strongest"]["text"], r["masking"]["text"] == "flagged",
                        r["threat"]["text"], r["version"]["text"], r["file"]["text"]])
    return buf.getvalue()


def _html(groups: list[dict], n: int) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    created = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return env.get_template("leaderboard.html.j2").render(
        generator=GENERATOR, created=created, groups=groups, columns=COLUMNS, entries=n,
        section_ids=" ".join(g["id"] for g in groups))


def write_leaderboard(results: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                      overwrite: bool = False) -> tuple[list[Path], str]:
    """Write ``leaderboard.html``, ``.md`` and ``.csv`` into ``out_dir``; returns the paths and the Markdown text.
    Existing leaderboard files are replaced only with ``overwrite`` (nothing else in the folder is touched)."""
    docs = load_results(results)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    existing = [out / f for f in FILES if (out / f).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace the leaderboard files in {out}")
    groups = [_group_meta(i, g) for i, g in enumerate(group_entries(docs))]
    md = _markdown(groups)
    paths = [atomic_write_text(out / "leaderboard.html", _html(groups, len(docs))),
             atomic_write_text(out / "leaderboard.md", md + "\n"),
             atomic_write_text(out / "leaderboard.csv", _csv(groups))]
    return paths, md


# ---------------------------------------------------------------------------------------- the terminal view
def robust_text(doc: dict) -> str:
    """One results file as text: what ran, the clean / worst-case / per-member table with intervals, the masking
    verdict."""
    d, e = doc["data"], doc["ensemble"]
    lines = [f"{model_label(doc)} on {d['name']} ({d['num_attacked']} of {d['num_query']} queries / "
             f"{d['num_gallery']} gallery); {threat_label(doc)}; ensemble {e['label']}"
             + (f", metrics averaged over {e['draws']} defense draws" if e.get("draws", 1) > 1 else "")]
    rows = [{"setting": "clean", **doc["clean"], "wins": "", "s": ""},
            {"setting": "worst case (per query)", **doc["worst_case"], "wins": "", "s": ""}]
    for name, m in doc["members"].items():
        rows.append({"setting": f"  {name}" + (" (gradient-free)" if m.get("gradient_free") else ""), **m,
                     "wins": str(m.get("wins", "")), "s": f"{m.get('seconds', 0):.1f}"})
    lines.append(format_table(rows, [("setting", "")] + METRIC_COLUMNS + [("wins", "wins"), ("s", "seconds")]))
    mk = doc.get("masking", {})
    if mk.get("flagged"):
        lines += ["advreid: warning: likely gradient masking:"] + [f"  - {r}" for r in mk["reasons"]]
    else:
        lines.append("gradient masking: not flagged (the gradient-free member beats every gradient member on "
                     f"{100 * mk.get('gradient_free_beats_share', 0):.1f}% of the queries, without an mAP one point "
                     "lower; APGD's loss rose)")
    lines.append(f"worst-case mAP {format_ci(doc['worst_case'], 'mAP')} (clean {format_ci(doc['clean'], 'mAP')})")
    return "\n".join(lines)
