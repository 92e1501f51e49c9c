"""The robustness benchmark runner: trains or reuses the models of a grid, scores every cell and stores what the
tables and the report read.

``advreid bench CONFIG`` writes, under ``OUT``: ``bench.yaml`` (the resolved config), one JSON per cell under
``cells/`` (atomically, as soon as it is done) with its per-query scores (``<key>.per_query.json``), its evaluation
features (``<key>.features.safetensors``) and the adversarial images of the report's selected queries
(``<key>/adv/NNNNNN.png``), ``results.json`` (all cells) and the tables (``tables/``). ``--resume`` reads finished
cells back instead of recomputing them; models are reused or their training resumed (also when it was killed before
its first checkpoint); clean features are cached on disk per checkpoint (``cache/``).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from advreid.config import ConfigError, dump_config
from advreid.experiments.grid import (
    SYNTH_KEYS,
    Cell,
    attack_spec,
    cell_key,
    cells,
    load_bench_config,
    spec_of,
)
from advreid.experiments.runs import pop_per_query
from advreid.utils.io import atomic_write_json, atomic_write_text, atomic_write_with, prepare_run_dir

if TYPE_CHECKING:
    from advreid.experiments.executors import Executor

__all__ = ["Bench", "FeatureCache", "finished_cell", "run_bench", "run_cell"]


class FeatureCache(dict):
    """A dict whose ``("clean", ...)`` entries (feature, pid, camid tensors) are also kept as safetensors files, so
    that a resumed bench does not re-extract them. Files are named by a hash of the key and written atomically; the
    folder is named by the checkpoint (path and modification time), so a retrained model never reads stale ones."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = Path(folder)

    def _path(self, key: Any) -> Path | None:
        if not (isinstance(key, tuple) and key and key[0] == "clean"):
            return None
        return self.folder / f"{hashlib.sha1(repr(key).encode()).hexdigest()[:16]}.safetensors"

    def __contains__(self, key: object) -> bool:
        if super().__contains__(key):
            return True
        path = self._path(key)
        if path is None or not path.is_file():
            return False
        from safetensors.torch import load_file

        t = load_file(str(path))
        super().__setitem__(key, (t["features"], t["pids"], t["camids"]))
        return True

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        path = self._path(key)
        if path is not None:
            from safetensors.torch import save_file

            f, p, c = value
            tensors = {"features": f.contiguous(), "pids": p.contiguous(), "camids": c.contiguous()}
            atomic_write_with(path, lambda name: save_file(tensors, name))


class Bench:
    """Datasets, models, defenses and caches of one bench run; :meth:`compute` scores one cell."""

    def __init__(self, cfg: dict, out: Path, progress: bool) -> None:
        from advreid.utils.misc import get_device

        self.cfg, self.out, self.progress = cfg, out, progress
        self.s = cfg["settings"]
        self.device = get_device(cfg["device"])
        self.roots: dict[str, str] = {}
        self.runs: dict[str, Path] = {}
        self.models: dict[str, Any] = {}
        self.data: dict[str, Any] = {}
        self.caches: dict[tuple[str, str], dict] = {}

    def log(self, msg: str) -> None:
        if self.progress:
            print(msg, flush=True)

    def cache(self, model: str, dataset: str) -> dict:
        """Feature cache of (model, dataset): in memory, clean features also on disk (``OUT/cache``) for resumes."""
        key = (model, dataset)
        if key not in self.caches:
            info = self.model(model)[1]
            if info.get("checkpoint") is None:  # a model spec: what decides its features (weights, card)
                stamp = "|".join(str(info.get(k)) for k in ("spec", "weights_sha256", "input_size", "normalization",
                                                            "feature_layer")) + f"|{self.dataset_root(dataset)}"
            else:
                ckpt = Path(info["checkpoint"])
                weights = Path(f"{ckpt}.safetensors")
                mtime = weights.stat().st_mtime_ns if weights.is_file() else 0
                stamp = f"{ckpt.resolve()}|{mtime}|{self.dataset_root(dataset)}"
            tag = hashlib.sha1(stamp.encode()).hexdigest()[:10]  # another checkpoint -> another folder
            self.caches[key] = FeatureCache(self.out / "cache" / f"{model}__{dataset}__{tag}")
        return self.caches[key]

    # --------------------------------------------------------------------------------- datasets and models
    def dataset_root(self, key: str) -> str:
        if key not in self.roots:
            d = self.cfg["datasets"][key]
            if d.get("root") is not None:
                root = Path(d["root"]).expanduser()
                if not root.exists():
                    raise FileNotFoundError(f"bench dataset {key!r}: root {root} does not exist "
                                            f"(override with datasets.{key}.root=PATH)")
            elif d.get("resampled") is not None:  # DDDefense Phase I: a rebalanced copy of another dataset
                from advreid.experiments.demos import resampled_dataset

                spec = d["resampled"]
                root = resampled_dataset(spec, self.dataset_root(spec["from"]), self.out / "data" / key,
                                         dataset=d.get("name", "market1501"), device=self.device,
                                         seed=int(self.cfg["seed"]), log=self.log)
            else:
                from advreid.data import generate_synthetic

                kw = {SYNTH_KEYS[k]: v for k, v in (d["synthetic"] or {}).items()}
                kw.setdefault("num_test_ids", kw.get("num_train_ids", 100))
                root = self.out / "data" / key
                if not (root / "synth_meta.json").is_file():
                    self.log(f"generating synthetic dataset {key!r} in {root}")
                    generate_synthetic(root, progress=self.progress, overwrite=root.exists(), **kw)
            self.roots[key] = str(root)
        return self.roots[key]

    def dataset(self, key: str) -> Any:
        if key not in self.data:
            from advreid.data import build_dataset

            self.data[key] = build_dataset(self.cfg["datasets"][key].get("name", "market1501"),
                                           self.dataset_root(key))
        return self.data[key]

    def run_dir(self, key: str) -> Path:
        """The trained run of model ``key``: given, or trained (resumed, reused) under ``OUT/models/<key>``."""
        if key in self.runs:
            return self.runs[key]
        m = self.cfg["models"][key]
        if m.get("spec") is not None:
            raise ValueError(f"bench model {key!r} is a model spec ({m['spec']}), it has no run folder")
        if m.get("run") is not None:
            run = Path(m["run"]).expanduser()
            if not run.is_dir():
                raise FileNotFoundError(f"bench model {key!r}: run directory {run} does not exist")
            self.runs[key] = run
            return run
        from advreid.experiments.training import train

        run = self.out / "models" / key
        data_key = m["train_on"]
        ov = [f"data.root={self.dataset_root(data_key)}",
              f"data.name={self.cfg['datasets'][data_key].get('name', 'market1501')}",
              f"seed={self.cfg['seed']}", *(m.get("overrides") or [])]
        if self.cfg["device"] != "auto":
            ov.append(f"device={self.cfg['device']}")
        if m.get("source") is not None:
            ov.append(f"adv.source_run={self.run_dir(m['source'])}")
        if m.get("init") is not None:  # start from another bench model's trained weights (model.pretrained)
            from advreid.models import find_checkpoint

            ov.append(f"model.pretrained={find_checkpoint(self.run_dir(m['init']))}.safetensors")
        if not self.s["progress"]:
            ov.append("train.progress=false")
        if (run / "checkpoints" / "final.json").is_file():
            self.log(f"model {key!r}: reusing {run}")
        elif (run / "config.yaml").is_file():
            self.log(f"model {key!r}: resuming the interrupted training in {run}")
            train(m["config"], run, resume=True)
        else:
            self.log(f"model {key!r}: training ({m['config']}, on {data_key}) into {run}")
            train(m["config"], run, overrides=ov)
        self.runs[key] = run
        return run

    def family(self, key: str) -> str:
        """The dataset a (resampled) dataset comes from: its test split is that one's, byte for byte."""
        seen = set()
        while (self.cfg["datasets"][key].get("resampled") or {}).get("from") and key not in seen:
            seen.add(key)
            key = self.cfg["datasets"][key]["resampled"]["from"]
        return key

    def family_root(self, mkey: str, model: Any) -> str | None:
        """The root of the dataset family model ``mkey`` was trained on (None: unknown)."""
        train_on = self.cfg["models"][mkey].get("train_on")
        if train_on is not None:
            return self.dataset_root(self.family(train_on))
        return model.checkpoint_meta.get("meta", {}).get("config", {}).get("data", {}).get("root")

    def model(self, key: str) -> Any:
        if key not in self.models:
            from advreid.experiments.grid import spec_model_card
            from advreid.experiments.runs import load_run

            m = self.cfg["models"][key]
            model, info = load_run(m["spec"], card=spec_model_card(m)) if m.get("spec") is not None \
                else load_run(self.run_dir(key))
            self.models[key] = (model.to(self.device).eval(), info)
        return self.models[key]

    def defense(self, key: str) -> Any:
        spec = self.cfg["defenses"][key]
        if spec is None:
            return None
        from advreid.defenses import build_passive

        d = build_passive(spec["name"], spec.get("params"))
        d.name = spec["name"]
        return d

    # ------------------------------------------------------------------------------------------------ cells
    def per_identity(self, res: dict, ds: Any) -> dict | None:
        """Per-identity rank-1 (mean, variance, std in %) of the cell's evaluated queries (attacked if attacked)."""
        from advreid.evaluation.robustness import subset_indices
        from advreid.experiments.analysis import per_identity_scores

        m = res["runs"][0]["attacked"] if res.get("runs") else res["clean"]
        sub = subset_indices(len(ds.query), self.s["max_images"]) if res["side"] == "query" else \
            range(len(ds.query))
        try:
            return per_identity_scores(m, [ds.query[i].pid for i in sub])
        except ValueError:
            return None

    def attack(self, key: str) -> Any:
        """The attack spec of column ``key``; a DMR column's generator is trained (or reused) first."""
        spec = attack_spec(self.cfg, key)
        a = self.cfg["attacks"][key]
        if spec is not None and a.get("generator") is not None:
            spec = spec.replace(params={**spec.params, "generator": str(self.generator(key))})
        return spec

    def generator(self, key: str) -> Path:
        """The DMR generator of attack ``key``, trained against ``generator.model`` under ``OUT/generators``."""
        from advreid.attacks.dmr import train_dmr

        g = self.cfg["attacks"][key]["generator"]
        out = self.out / "generators" / key
        if (out / "results.json").is_file():
            return out
        victim = self.run_dir(g["model"])
        data = self.dataset_root(self.cfg["models"][g["model"]].get("train_on") or next(iter(self.cfg["datasets"])))
        ov = [*(g.get("overrides") or []), f"seed={self.cfg['seed']}"]
        if not self.s["progress"]:
            ov.append("train.progress=false")
        self.log(f"attack {key!r}: training its DMR generator against model {g['model']!r} into {out}")
        resume = out.is_dir() and any(out.iterdir())
        return train_dmr(victim, data, out, g.get("config", "dmr_tiny"), ov, resume=resume)

    def selected_queries(self, dataset: str) -> list[int]:
        """The queries whose adversarial images are kept for the report: ``report.queries``, by default the ones the
        report chooses (the first 3 valid queries of the attacked subset, :func:`default_queries`)."""
        from advreid.evaluation.robustness import subset_indices
        from advreid.reporting.selection import default_queries, valid_query_mask

        rep = self.cfg.get("report") or {}
        ds = self.dataset(dataset)
        n = len(ds.query)
        picked = rep.get("queries")
        if not picked:
            sub = subset_indices(n, self.s["max_images"])
            valid = valid_query_mask([r.pid for r in ds.query], [r.camid for r in ds.query],
                                     [r.pid for r in ds.gallery], [r.camid for r in ds.gallery])
            picked = default_queries(valid[sub], sub, 3)
        rl = self.cfg.get("ranklist") or {}
        if "query" in rl:
            picked = [int(rl["query"]), *picked]
        return sorted({int(i) for i in picked if 0 <= int(i) < n})

    def compute(self, cell: Cell) -> tuple[dict, dict]:
        """(cell result, stored arrays: per-query scores, features, images) of one cell."""
        from advreid.evaluation import EvalProtocol, RunOptions, ThreatModel, evaluate_attack, evaluate_clean

        mkey, dkey, fkey, akey, threat = cell
        model, info = self.model(mkey)
        ds = self.dataset(dkey)
        s = self.s
        protocol = EvalProtocol.of_model(model, rerank=bool(s["rerank"]), max_images=s["max_images"])
        threat_model = ThreatModel(defense=self.defense(fkey), adaptive=threat == "adaptive",
                                   eot_samples=s["eot_samples"])
        options = RunOptions(batch_size=s["batch_size"], device=self.device, num_workers=s["num_workers"],
                             progress=bool(s["progress"]) and self.progress, cache=self.cache(mkey, dkey),
                             keep_features=bool(s["save_features"]),
                             keep_images=self.selected_queries(dkey) if s["side"] == "query" else False)
        spec = self.attack(akey)
        a = self.cfg["attacks"][akey] or {}
        if a.get("source") is not None and a["source"] != mkey:  # black-box transfer: crafted on another model
            src, src_info = self.model(a["source"])
            threat_model = ThreatModel(threat_model.defense, None, threat_model.adaptive, threat_model.eot_samples,
                                       src, {**src_info, "bench_model": a["source"]})
        elif a.get("generator") is not None and a["generator"]["model"] != mkey:  # DMR trained against another
            threat_model = ThreatModel(threat_model.defense, None, threat_model.adaptive, threat_model.eot_samples,
                                       None, {"bench_model": a["generator"]["model"],
                                              "generator": spec.params.get("generator")})
        torch.manual_seed(int(self.cfg["seed"]))  # randomised defenses draw from the global RNG: same cell, same draws
        t0 = time.perf_counter()
        if spec is None:
            res = dict(evaluate_clean(model, ds.query, ds.gallery, threat=threat_model, protocol=protocol,
                                      side=s["side"], options=options))
        else:
            res = dict(evaluate_attack(model, ds.query, ds.gallery, spec, threat=threat_model, protocol=protocol,
                                       options=options))
        trained_on = self.family_root(mkey, model)
        arrays = {k: res.pop(k) for k in ("features", "images", "image_index", "feature_index") if k in res}
        res["per_identity"] = self.per_identity(res, ds)
        doc = {"cell": {"model": mkey, "dataset": dkey, "defense": fkey, "attack": akey, "threat": threat},
               "key": cell_key(*cell), "label": _label(spec, res, fkey),
               "model": info, "dataset": {"name": self.cfg["datasets"][dkey].get("name", "market1501"),
                                          "root": self.dataset_root(dkey)},
               "cross_domain": trained_on is not None
               and Path(trained_on).resolve() != Path(self.dataset_root(self.family(dkey))).resolve(),
               "attack_spec": self.cfg["attacks"][akey], "defense_spec": self.cfg["defenses"][fkey],
               "seconds": round(time.perf_counter() - t0, 3), **res}
        return doc, arrays


def _label(spec: Any, res: dict, defense_key: str) -> str:
    """What ran, derivable from the protocol: attack registry name and parameters, threat model, defense."""
    what = "no attack" if spec is None else spec.label()
    d = res.get("defense")
    return f"{what}; threat {res.get('threat')}; defense {d['name'] if d else 'none'} ({defense_key})"


# ------------------------------------------------------------------------------------------------- storage
def _store(out: Path, doc: dict, arrays: dict) -> dict:
    """Write a cell: per-query scores and arrays first, the JSON last (a cell is complete iff its JSON exists)."""
    import copy

    doc = copy.deepcopy(doc)  # the clean rows are shared (cached) between cells: never pop from them
    key = doc["key"]
    per_query = pop_per_query(doc)
    atomic_write_text(out / "cells" / f"{key}.per_query.json", json.dumps(per_query, separators=(",", ":")))
    if "features" in arrays:
        from safetensors.torch import save_file

        tensors = _feature_tensors(doc, arrays)
        atomic_write_with(out / "cells" / f"{key}.features.safetensors", lambda f: save_file(tensors, f))
    if arrays.get("images") is not None and arrays.get("image_index") is not None:
        from advreid.ops import save_images

        images, index = arrays["images"], arrays["image_index"]
        if images and images[0] is not None and len(index[0]):
            save_images(images[0], [f"{int(i):06d}.png" for i in index[0]], out / "cells" / key / "adv",
                        fmt="png", quantize="round")
    atomic_write_json(out / "cells" / f"{key}.json", doc)
    return doc


def run_cell(bench: Bench, cell: Cell) -> dict:
    """Compute ``cell`` and store it under ``bench.out`` (what every executor runs); its document as stored."""
    doc, arrays = bench.compute(cell)
    doc["spec"] = spec_of(bench.cfg, cell)
    return json.loads(json.dumps(_store(bench.out, doc, arrays)))


def _feature_tensors(doc: dict, arrays: dict) -> dict[str, torch.Tensor]:
    feats = arrays["features"]
    index = arrays.get("feature_index") or {}
    if isinstance(feats, dict):  # a clean cell: both sides
        sides = feats.items()
    else:  # an attacked cell: its side, first eps
        sides = [(doc["side"], feats[0])]
    tensors = {}
    for side, (f, p, c) in sides:
        tensors[f"{side}_features"] = f.float().contiguous()
        tensors[f"{side}_pids"] = p.long().contiguous()
        tensors[f"{side}_camids"] = c.long().contiguous()
        tensors[f"{side}_index"] = torch.as_tensor(index.get(side, range(f.shape[0])), dtype=torch.long)
    return tensors


# ---------------------------------------------------------------------------------------------- run_bench
def _prepare_out(cfg: dict, out: Path, resume: bool, overwrite: bool, tables_only: bool) -> None:
    for key, d in cfg["datasets"].items():  # fail before the output folder is created
        if d.get("root") is not None and not Path(d["root"]).expanduser().exists():
            raise FileNotFoundError(f"bench dataset {key!r}: root {d['root']} does not exist "
                                    f"(override with datasets.{key}.root=PATH)")
    for key, m in cfg["models"].items():
        if m.get("run") is not None and not Path(m["run"]).expanduser().is_dir():
            raise FileNotFoundError(f"bench model {key!r}: run directory {m['run']} does not exist")
    if tables_only:
        if not (out / "cells").is_dir():
            raise FileNotFoundError(f"--tables-only: {out / 'cells'} does not exist; run the bench first")
        return
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: pass one of them")
    try:
        prepare_run_dir(out, resume=resume, overwrite=overwrite)
    except FileExistsError:
        raise FileExistsError(f"bench folder {out} already exists; pass --resume to continue it (finished "
                              f"cells are kept) or --overwrite (the old one is kept as {out}.old-N)") from None
    atomic_write_text(out / "bench.yaml", dump_config(cfg))


def finished_cell(cfg: dict, out: Path, cell: Cell) -> dict | None:
    """The stored result of ``cell`` under ``out`` if it is finished for this config (None: to be computed)."""
    path = out / "cells" / f"{cell_key(*cell)}.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict):
            raise ValueError(f"expected a JSON object, got {type(doc).__name__}")
    except (OSError, ValueError) as e:
        print(f"advreid: warning: cell file {path} is damaged ({' '.join(str(e).split())}); recomputing the cell",
              file=sys.stderr, flush=True)
        return None
    return doc if doc.get("spec") == json.loads(json.dumps(spec_of(cfg, cell))) else None


def run_bench(source: str | Path | dict, out: str | Path | None = None, *, overrides: Sequence[str] | None = None,
              resume: bool = False, overwrite: bool = False, progress: bool = True,
              tables_only: bool = False, seeds: Sequence[int] | None = None,
              executor: Executor | None = None) -> tuple[dict, Path]:
    """Run (or resume) the benchmark grid of ``source``; write cells, ``results.json`` and tables into ``out``.

    ``seeds``: repeat the whole grid once per seed (training and attack randomness) under ``out/seed_<s>`` and
    report mean +- std across seeds (``out/results.json``, tables); each repetition keeps its own intervals.
    ``executor``: where the cells and trainings run (:mod:`advreid.experiments.executors`; default in this
    process); the tables are built here from the stored cells either way."""
    from advreid.experiments.executors import LocalExecutor, warn_failures
    from advreid.reporting.bench_tables import build_tables, write_tables

    cfg = load_bench_config(source, overrides)
    out = Path(out) if out is not None else Path("runs") / "bench" / cfg["name"]
    if seeds:
        return _run_seeds(cfg, out, list(seeds), resume=resume, overwrite=overwrite, progress=progress,
                          tables_only=tables_only, executor=executor)
    _prepare_out(cfg, out, resume, overwrite, tables_only)
    bench = Bench(cfg, out, progress)
    grid = cells(cfg)
    results: dict[str, dict] = {}
    todo = []
    for c in grid:
        doc = finished_cell(cfg, out, c)
        if doc is not None:
            results[cell_key(*c)] = doc
        elif not tables_only:
            todo.append(c)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    bench.log(f"bench {cfg['name']!r}: {len(grid)} cells, {len(grid) - len(todo)} already done, "
              f"{len(todo)} to run; output {out}")

    def write_results(complete: bool) -> dict:
        doc = {"bench": cfg["name"], "started": started, "complete": complete, "config": cfg,
               "cells": [results[cell_key(*c)] for c in grid if cell_key(*c) in results]}
        atomic_write_json(out / "results.json", doc)
        return doc

    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="bench cells", dynamic_ncols=True, disable=None, leave=False)

    def on_cell(c: Cell, doc: dict) -> None:
        results[cell_key(*c)] = doc
        if bar is not None:
            bar.update(1)
        bench.log(_cell_line(doc))
        write_results(False)

    failed = (executor or LocalExecutor()).run(bench, todo, on_cell)
    if bar is not None:
        bar.close()
    warn_failures(failed)
    doc = write_results(len(results) == len(grid))
    if failed:
        doc["failed"] = failed
    doc["comparisons"] = _comparisons(doc, out)
    tables = build_tables(doc)
    write_tables(tables, out / "tables")
    _write_comparisons(doc["comparisons"], out / "tables" / "comparisons.md")
    doc["tables"] = [{k: v for k, v in t.items() if k != "rows"} for t in tables]
    if cfg.get("ranklist"):
        doc["ranklist"] = str(_ranklist(doc, out, cfg["ranklist"]))
    atomic_write_json(out / "results.json", doc)
    if cfg["settings"]["report"] and not tables_only:
        doc["report"] = str(_write_report(out, bench))
    doc["_tables"] = tables
    return doc, out


def _write_report(out: Path, bench: Bench) -> Path | None:
    """The HTML report of the finished bench (``OUT/report.html``); a failure is a warning, not a lost bench."""
    import sys

    from advreid.experiments.report import build_report

    try:
        return build_report(out, device=str(bench.device))
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        print(f"advreid: warning: the report could not be written ({e}); rebuild it with `advreid report {out}`",
              file=sys.stderr)
        return None


# ------------------------------------------------------------------------------------------- comparisons
def _per_query(out: Path, key: str) -> dict | None:
    path = out / "cells" / f"{key}.per_query.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _comparisons(doc: dict, out: Path) -> list[dict]:
    """Paired bootstrap differences on the same queries: clean - attacked for every attacked cell, and
    non-adaptive - adaptive for every defended cell attacked both ways (what an adaptive attacker takes back)."""
    from advreid.evaluation import paired_difference, per_query_from_json

    def scores(pq: dict | None, which: str) -> Any:
        if pq is None:
            return None
        part = pq.get("clean") if which == "clean" else (pq.get("attacked") or [None])[0]
        return per_query_from_json(part["per_query"]) if part and part.get("per_query") else None

    cells = {tuple(c["cell"].values()): c for c in doc["cells"]}
    out_list = []
    read: dict[str, dict | None] = {}

    def per_query(key: str) -> dict | None:  # each cell's file read once (an adaptive cell is also an "other")
        if key not in read:
            read[key] = _per_query(out, key)
        return read[key]

    for (m, d, f, a, t), c in cells.items():
        if not c.get("runs"):
            continue
        pq = per_query(c["key"])
        clean, attacked = scores(pq, "clean"), scores(pq, "attacked")
        if clean is not None and attacked is not None:
            out_list.append({"a": "clean", "b": c["key"], "what": f"clean - attacked: {m}+{f} on {d}, {c['label']}",
                             "diff": paired_difference(clean, attacked)})
        other = cells.get((m, d, f, a, "adaptive")) if t == "non_adaptive" else None
        if other is not None and attacked is not None:
            adaptive = scores(per_query(other["key"]), "attacked")
            if adaptive is not None:
                out_list.append({"a": c["key"], "b": other["key"],
                                 "what": f"non-adaptive - adaptive: {m}+{f}, {a} on {d}",
                                 "diff": paired_difference(attacked, adaptive)})
    return out_list


def _write_comparisons(comparisons: list[dict], path: Path) -> None:
    from advreid.reporting.tables import format_grid

    rows = []
    for c in comparisons:
        r1, mp = c["diff"]["rank1"], c["diff"]["mAP"]
        rows.append([c["what"]] + [f"{100 * x['diff']:+.1f} [{100 * x['ci'][0]:+.1f}, {100 * x['ci'][1]:+.1f}]"
                                   + (" *" if x["significant"] else "") for x in (r1, mp)])
    body = format_grid(["comparison (same queries)", "R1 difference", "mAP difference"], rows, markdown=True)
    atomic_write_text(path, "### Paired comparisons\n\nPaired percentile bootstrap over the same queries (1,000 "
                            "resamples), percentage points; * = the 95% interval excludes zero (only those "
                            "differences are claims).\n\n" + body + "\n")


# ------------------------------------------------------------------------------------------------- seeds
def _run_seeds(cfg: dict, out: Path, seeds: list[int], **kw: Any) -> tuple[dict, Path]:
    """The grid once per seed under ``out/seed_<s>``; mean +- std across seeds in ``out/results.json``."""
    from advreid.evaluation import mean_std_across_seeds
    from advreid.reporting.bench_tables import build_tables, write_tables

    if kw["overwrite"] and out.exists():
        prepare_run_dir(out, overwrite=True)
    out.mkdir(parents=True, exist_ok=True)
    docs = []
    for s in seeds:
        one = dict(cfg, seed=int(s))
        sub = out / f"seed_{s}"
        resume = kw["resume"] and sub.exists()
        doc, _ = run_bench(one, sub, resume=resume, overwrite=False, progress=kw["progress"],
                           tables_only=kw["tables_only"], executor=kw["executor"])
        docs.append(doc)
    keys = ("rank1", "rank5", "rank10", "mAP", "mINP")
    cells = []
    for c in docs[0]["cells"]:
        same = [next((x for x in d["cells"] if x["key"] == c["key"]), None) for d in docs]
        if any(x is None for x in same):
            continue
        ms = [x["runs"][0]["attacked"] if x.get("runs") else x["clean"] for x in same]
        agg = mean_std_across_seeds([{k: m[k] for k in keys if k in m} for m in ms])
        metrics = {k: v["mean"] for k, v in agg.items()} | {f"{k}_std": v["std"] for k, v in agg.items()}
        metrics["n_seeds"] = len(seeds)
        cell = {k: v for k, v in c.items() if k not in ("runs", "clean")}
        cell["clean" if not c.get("runs") else "runs"] = metrics if not c.get("runs") else [{"attacked": metrics}]
        cell["seeds"] = {"values": ms, "seeds": seeds}
        cells.append(cell)
    doc = {"bench": cfg["name"], "seeds": seeds, "complete": all(d["complete"] for d in docs),
           "config": {**cfg, "seed": seeds}, "cells": cells}
    tables = build_tables({**doc, "config": cfg})
    for t in tables:
        t["protocol"] += f"; mean +- sample std over seeds {seeds} (each seed: its own training and attacks)"
    write_tables(tables, out / "tables")
    doc["tables"] = [{k: v for k, v in t.items() if k != "rows"} for t in tables]
    atomic_write_json(out / "results.json", doc)
    doc["_tables"] = tables
    return doc, out


def _cell_line(res: dict) -> str:
    c = res["cell"]
    m = res.get("runs", [{}])[0].get("attacked") if res.get("runs") else res["clean"]
    txt = f"R1 {100 * m['rank1']:.1f} mAP {100 * m['mAP']:.1f}"
    if "rr_rank1" in m:
        txt += f" (RK: R1 {100 * m['rr_rank1']:.1f} mAP {100 * m['rr_mAP']:.1f})"
    return (f"  {c['model']:>10} | {c['dataset']} | defense {c['defense']} | {c['attack']} | {c['threat']}: {txt} "
            f"[{res['seconds']:.1f}s]")


# ---------------------------------------------------------------------------------------------- rank list
def _ranklist(doc: dict, out: Path, spec: dict) -> Path:
    """A query's top-k for each configured row (clean / attacked / attacked-but-defended), read from the stored
    cell features and adversarial images (nothing is recomputed), as JSON and PNG."""
    from safetensors.torch import load_file

    from advreid.data import build_dataset
    from advreid.evaluation import compute_distance_matrix
    from advreid.reporting import draw_ranklist

    qi, topk = int(spec.get("query", 0)), int(spec.get("topk", 10))
    cfg = doc["config"]
    index = {tuple(c["cell"].values()): c for c in doc["cells"]}
    rows: list[dict] = []
    features: dict[str, dict] = {}  # per cell key: rows sharing a clean cell read its features once
    datasets: dict[tuple[str, str], Any] = {}

    def cell_features(key: str) -> dict:
        if key not in features:
            features[key] = load_file(str(out / "cells" / f"{key}.features.safetensors"))
        return features[key]

    for r in spec["rows"]:
        m, f, a = r["model"], r.get("defense", "none"), r.get("attack")
        d = r.get("dataset") or cfg["models"][m].get("train_on") or next(iter(cfg["datasets"]))
        clean_key = next((k for k, v in cfg["attacks"].items() if v is None), None)
        clean = index.get((m, d, f, clean_key, "clean"))
        if clean is None:
            raise ConfigError(f"ranklist row {r}: the grid has no clean cell ({m}, {d}, {f}) to rank against")
        cf = cell_features(clean["key"])
        dkey = (clean["dataset"]["name"], clean["dataset"]["root"])
        ds = datasets[dkey] = datasets.get(dkey) or build_dataset(*dkey)
        if not 0 <= qi < len(ds.query):
            raise ValueError(f"ranklist.query={qi}: the {d} query set has {len(ds.query)} images")
        qpos = (cf["query_index"] == qi).nonzero().flatten()
        qf, q_img = cf["query_features"][qpos], ds.query[qi].path
        if a is not None and cfg["attacks"].get(a) is not None:
            threat = "white_box" if cfg["defenses"].get(f) is None else r.get("threat", "non_adaptive")
            cell = index.get((m, d, f, a, threat))
            if cell is None:
                raise ConfigError(f"ranklist row {r}: cell ({m}, {d}, {f}, {a}, {threat}) is not in the grid")
            af = cell_features(cell["key"])
            qf = af["query_features"][(af["query_index"] == qi).nonzero().flatten()]
            q_img = str(out / "cells" / cell["key"] / "adv" / f"{qi:06d}.png")
        proto = clean["protocol"]
        dist = torch.as_tensor(compute_distance_matrix(qf, cf["gallery_features"], metric=proto["metric"]))[0]
        gp, gc, gi = cf["gallery_pids"], cf["gallery_camids"], cf["gallery_index"]
        junk = ((gp == ds.query[qi].pid) & (gc == ds.query[qi].camid)) | (gp == -1)
        order = torch.argsort(dist.masked_fill(junk, float("inf")))[:topk].tolist()
        rows.append({"label": r.get("label", f"{m} {f} {a}"), "query": q_img,
                     "gallery": [{"path": ds.gallery[int(gi[j])].path, "pid": int(gp[j]),
                                  "match": bool(gp[j] == ds.query[qi].pid)} for j in order]})
    folder = out / "ranklist"
    rl = {"query_index": qi, "query": ds.query[qi].path, "pid": ds.query[qi].pid, "rows": rows}
    atomic_write_json(folder / "ranklist.json", rl)
    return draw_ranklist(rl, out / "ranklist.png")
