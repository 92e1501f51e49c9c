"""The DDDefense CPU demo: its bench config, the Phase I step the bench runs for a ``resampled:`` dataset, and the
summary table (clean, each attack, per-identity accuracy variance, cross-dataset) printed at the end.

``run_bench(dddefense_demo_config(quick, seed, device), out)`` runs the grid of ``configs/bench/dddefense_demo.yaml``;
:func:`run_dddefense_demo` does that and writes/prints :func:`dddefense_summary`. A bench dataset
``{name, resampled: {from: KEY, generator: {config, overrides} | generator_dir: DIR, resample: {...}}}`` is made by
:func:`resampled_dataset`: train the identity+camera-conditioned diffusion model on the ``from`` dataset's training
split (resumable), then write its rebalanced copy (resumable); both are reused when finished.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

__all__ = [
    "DEMO_ROWS",
    "RESAMPLED_KEYS",
    "check_resampled_spec",
    "dddefense_demo_config",
    "dddefense_summary",
    "per_identity_of_cell",
    "resampled_dataset",
    "run_dddefense_demo",
]

RESAMPLED_KEYS = ("from", "generator", "generator_dir", "resample")
_GENERATOR_KEYS = ("config", "overrides")
# the demo's rows (bench model keys) in table order, and the attack columns of its summary
DEMO_ROWS = ("baseline", "metric-AT", "GOAT", "FNES", "resampled-FNES", "self-meta", "DDDefense")
_SUMMARY_ATTACKS = ("pgd", "mifgsm", "sma", "fna", "lta", "pgd_l2", "transfer")


# --------------------------------------------------------------------------------------------------- Phase I
def check_resampled_spec(key: str, spec: Any, datasets: Mapping[str, Any]) -> None:
    """Validate ``datasets.<key>.resampled`` of a bench config; ValueError naming the key that is wrong."""
    from advreid.defenses.dddefense import ResampleConfig
    from advreid.registry import did_you_mean

    where = f"datasets.{key}.resampled"
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where} must be a mapping {{from: DATASET, generator: {{config: diffusion_tiny}}, "
                         f"resample: {{...}}}}, got {spec!r}")
    for k in spec:
        if k not in RESAMPLED_KEYS:
            raise ValueError(f"unknown key {where}.{k}{did_you_mean(k, RESAMPLED_KEYS)}; valid: "
                             f"{', '.join(RESAMPLED_KEYS)}")
    src = spec.get("from")
    if src not in datasets or src == key:
        raise ValueError(f"{where}.from={src!r}; expected another dataset of this bench: "
                         f"{', '.join(k for k in datasets if k != key)}")
    if (datasets[src] or {}).get("resampled") is not None:
        raise ValueError(f"{where}.from={src!r} is itself resampled; resample an original dataset")
    gen = spec.get("generator") or {}
    if not isinstance(gen, Mapping) or set(gen) - set(_GENERATOR_KEYS):
        raise ValueError(f"{where}.generator must be {{config: PRESET, overrides: [KEY=VALUE, ...]}}, got {gen!r}")
    if spec.get("generator_dir") is None:
        from advreid.defenses.dddefense import load_diffusion_config

        load_diffusion_config(gen.get("config", "diffusion_tiny"), list(gen.get("overrides") or []))
    names = [f.name for f in fields(ResampleConfig) if f.name not in ("seed", "device")]
    params = spec.get("resample") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"{where}.resample must be a mapping of {', '.join(names)}; got {params!r}")
    for k in params:
        if k not in names and k != "seed":
            raise ValueError(f"unknown key {where}.resample.{k}{did_you_mean(k, names)}; valid: {', '.join(names)}")
    ResampleConfig(**params).validate()


def _finished(path: Path, marker: str) -> bool:
    return (path / marker).is_file()


def resampled_dataset(spec: Mapping[str, Any], source_root: str | Path, out: str | Path, *,
                      dataset: str = "market1501", device: Any = "cpu", seed: int = 0,
                      log: Callable[[str], None] = print) -> Path:
    """DDDefense Phase I for a bench dataset: the rebalanced copy of ``source_root`` under ``out/data``.

    Trains the diffusion model of ``spec["generator"]`` into ``out/generator`` (unless ``spec["generator_dir"]``
    names a trained one), then :func:`~advreid.defenses.dddefense.resample_dataset` with ``spec["resample"]``.
    Finished steps are reused and interrupted ones resumed, so a resumed bench redoes nothing.
    """
    from advreid.defenses.dddefense import MANIFEST_NAME, ResampleConfig, resample_dataset, train_diffusion

    out, dev = Path(out), str(device)
    gen_dir = Path(spec["generator_dir"]).expanduser() if spec.get("generator_dir") else out / "generator"
    if spec.get("generator_dir") is None and not _finished(gen_dir, "checkpoints/final.json"):
        gen = spec.get("generator") or {}
        resume = _finished(gen_dir, "diffusion_run.json")
        log(f"Phase I: {'resuming' if resume else 'training'} the diffusion generator in {gen_dir}")
        t0 = time.perf_counter()
        train_diffusion(source_root, gen_dir, gen.get("config", "diffusion_tiny"),
                        [*(gen.get("overrides") or []), f"seed={int(seed)}", f"device={dev}"] if not resume
                        else [f"device={dev}"], resume=resume, dataset=dataset)
        log(f"Phase I: generator trained in {time.perf_counter() - t0:.0f}s")
    data = out / "data"
    manifest = data / MANIFEST_NAME
    if manifest.is_file() and json.loads(manifest.read_text(encoding="utf-8")).get("complete"):
        return data
    params = {"seed": int(seed), **dict(spec.get("resample") or {}), "device": dev}
    t0 = time.perf_counter()
    log(f"Phase I: resampling {source_root} into {data}")
    resample_dataset(source_root, gen_dir, data, ResampleConfig(**params), resume=manifest.is_file(),
                     dataset=dataset)
    summary = json.loads(manifest.read_text(encoding="utf-8"))["summary"]
    log(f"Phase I: {summary['generated']} images generated for {summary['train_ids']} identities "
        f"({summary['generated_rule1_count']} by rule 1, {summary['generated_rule2_camera']} by rule 2) on top of "
        f"{summary['train_images']} in {time.perf_counter() - t0:.0f}s")
    return data


# ------------------------------------------------------------------------------------------------ the config
def dddefense_demo_config(quick: bool = False, seed: int = 0, device: str | None = None) -> dict:
    """The demo's bench config (``configs/bench/dddefense_demo.yaml``); ``quick``: a CI smoke run (fewer
    identities, epochs and attacked queries, no PGD sweep, a 15-epoch generator)."""
    from advreid.config import read_yaml
    from advreid.experiments.grid import bench_dir

    cfg = read_yaml(bench_dir() / "dddefense_demo.yaml")
    cfg["seed"] = int(seed)
    if device:
        cfg["device"] = device
    if quick:
        cfg = _quick(cfg)
    return cfg


def _quick(cfg: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["datasets"]["synth"]["synthetic"].update(ids=40, test_ids=40)
    cfg["datasets"]["other"]["synthetic"].update(ids=20, test_ids=30)
    gen = cfg["datasets"]["balanced"]["resampled"]["generator"]
    gen["overrides"] = [o for o in gen["overrides"] if not o.startswith("train.epochs")] + ["train.epochs=15"]
    for m in cfg["models"].values():  # the baseline 20 epochs, the rows fine-tuned from it 5
        short = ["train.epochs=5", "sched.milestones=[4]"] if m.get("init") else \
            ["train.epochs=20", "sched.milestones=[15,18]"]
        m["overrides"] = [*(m.get("overrides") or []), *short, "sched.warmup_epochs=1"]
    cfg["settings"]["max_images"] = 60
    keep = ("clean", "pgd", "fna", "lta", "pgd_l2", "transfer")
    cfg["attacks"] = {k: v for k, v in cfg["attacks"].items() if k in keep}
    cfg["grid"][0]["attacks"] = list(keep)
    cfg["tables"] = [t for t in cfg["tables"] if t["name"] != "pgd_sweep"]
    for t in cfg["tables"]:
        t["columns"] = [c for c in t["columns"] if c in keep]
    return cfg


# ------------------------------------------------------------------------------------------------ the summary
def per_identity_of_cell(cell: Mapping[str, Any], out: str | Path, query: Sequence[Any]) -> dict:
    """Per-identity rank-1 (mean, variance, std in %) of one bench cell from its stored per-query first-match
    ranks and the pids of the queries it scored (``query``: the dataset's query records; the cell's
    ``max_images`` subset is taken as the evaluation took it). A cell that already carries it is read as is."""
    from advreid.evaluation.robustness import subset_indices
    from advreid.experiments.analysis import per_identity_scores

    if cell.get("per_identity") is not None:
        return dict(cell["per_identity"])
    doc = json.loads((Path(out) / "cells" / f"{cell['key']}.per_query.json").read_text(encoding="utf-8"))
    pq = doc["attacked"][0]["per_query"] if doc.get("attacked") else doc["clean"]["per_query"]
    side = cell.get("side", "query")
    sub = subset_indices(len(query), cell["protocol"].get("max_images")) if side == "query" else range(len(query))
    pids = [query[i].pid for i in sub]
    if len(pids) != len(pq["first_match"]):
        raise ValueError(f"cell {cell['key']}: {len(pq['first_match'])} per-query scores for {len(pids)} queries")
    return per_identity_scores({"per_query": pq}, pids)


def _cell_metrics(cell: Mapping[str, Any] | None) -> dict | None:
    if cell is None:
        return None
    return cell["runs"][0]["attacked"] if cell.get("runs") else cell["clean"]


def dddefense_summary(doc: Mapping[str, Any], out: str | Path, *, rows: Sequence[str] = DEMO_ROWS,
                      dataset: str = "synth", cross: str | None = "other") -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the demo's table: R1 / mAP (%) clean and under each attack on ``dataset``, the variance
    (%^2, std in brackets) across test identities of per-identity rank-1, clean and under PGD, and the clean
    R1 / mAP on ``cross`` (another dataset, never trained on)."""
    from advreid.data import build_dataset
    from advreid.reporting.bench_tables import format_metric

    cfg = doc["config"]
    index = {tuple(c["cell"][k] for k in ("model", "dataset", "defense", "attack")): c for c in doc["cells"]}
    attacks = [a for a in _SUMMARY_ATTACKS if a in cfg["attacks"]]
    clean_key = next(k for k, v in cfg["attacks"].items() if v is None)
    queries: dict[str, Any] = {}

    def var(cell: Mapping[str, Any] | None) -> str:
        if cell is None:
            return "-"
        d = cell["dataset"]
        if cell.get("per_identity") is not None:  # stored by the bench: no dataset needed
            s = cell["per_identity"]
        else:
            if d["root"] not in queries:
                queries[d["root"]] = build_dataset(d["name"], d["root"]).query
            s = per_identity_of_cell(cell, out, queries[d["root"]])
        return f"{s['variance']:.0f} ({s['std']:.1f})"

    has_cross = cross is not None and cross in cfg["datasets"]
    header = ["model", "clean", *attacks, "per-ID var, clean", "per-ID var, pgd" if "pgd" in attacks else None,
              f"clean on {cross}" if has_cross else None]
    table = []
    for m in rows:
        if m not in cfg["models"]:
            continue
        clean = index.get((m, dataset, "none", clean_key))
        row = [m, format_metric(_cell_metrics(clean), intervals=False)]
        row += [format_metric(_cell_metrics(index.get((m, dataset, "none", a))), intervals=False) for a in attacks]
        row.append(var(clean))
        if "pgd" in attacks:
            row.append(var(index.get((m, dataset, "none", "pgd"))))
        if has_cross:
            row.append(format_metric(_cell_metrics(index.get((m, cross, "none", clean_key))), intervals=False))
        table.append(row)
    return [h for h in header if h is not None], table


def run_dddefense_demo(out: str | Path = "runs/dddefense_demo", *, quick: bool = False, seed: int = 0,
                       device: str | None = None, resume: bool = False, overwrite: bool = False,
                       progress: bool = True, threads: int | None = 1) -> tuple[dict, Path, str]:
    """Run the demo grid end to end (:func:`dddefense_demo_config` through the bench), write the summary to
    ``OUT/tables/dddefense_summary.md`` and return ``(results document, out, summary text)``.

    ``threads``: torch's intra-op CPU threads during the run (restored after; None = leave as is). The default 1 is
    measured: on a 2-core machine with any other load, two OpenMP threads made these small steps 20-30x slower.
    """
    import torch

    from advreid.experiments.bench import run_bench
    from advreid.reporting.tables import format_grid
    from advreid.utils.io import atomic_write_text

    t0 = time.perf_counter()
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        doc, out = run_bench(dddefense_demo_config(quick, seed, device), out, resume=resume, overwrite=overwrite,
                             progress=progress)
    finally:
        torch.set_num_threads(before)
    header, rows = dddefense_summary(doc, out)
    s = doc["config"]["settings"]
    text = ("### DDDefense demo" + (" (quick)" if quick else "") + "\n\n"
            f"query attacks on the synthetic test set ({s['max_images'] or 'all'} attacked queries); cells R1 / mAP "
            "(%), 95% intervals in tables/; per-ID var = variance (%^2) across test identities of per-identity "
            "rank-1, std in brackets\n\n" + format_grid(header, rows, markdown=True) + "\n")
    atomic_write_text(Path(out) / "tables" / "dddefense_summary.md", text)
    return doc, Path(out), text + f"\ndemo finished in {time.perf_counter() - t0:.0f}s; output folder: {out}\n"
