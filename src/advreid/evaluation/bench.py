"""The robustness benchmark: a grid of models x datasets x passive defenses x attacks x threat models.

``advreid bench CONFIG.yaml`` trains (or reuses) the models, then scores every cell of the grid and writes one JSON per
cell under ``OUT/cells/`` (atomically, as soon as it is done), ``OUT/results.json`` (all cells) and the tables in the
seed paper's shapes under ``OUT/tables/`` (Markdown and CSV). With ``--resume`` finished cells are read back, not
recomputed; trained runs are reused and interrupted ones resumed. Clean features and guide banks are cached per
(model, dataset) while the grid runs. Every cell names its protocol (dataset, model, defense, attack and its
parameters, side, threat model, re-ranking).

Threat models: ``non_adaptive`` (the seed's setting: the attack sees the bare model, the defense is applied at test
time) and ``adaptive`` (the attack differentiates through the defense; BPDA for non-differentiable steps, EOT for
randomised ones). Without a passive defense both are the same white-box attack, computed once.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from advreid.config import ConfigError, deep_update, parse_overrides
from advreid.utils.io import atomic_write_json, atomic_write_text

__all__ = ["BENCH_THREATS", "bench_dir", "build_tables", "cell_key", "list_bench_presets", "load_bench_config",
           "run_bench"]

BENCH_THREATS = ("non_adaptive", "adaptive")
_TOP = {"name", "seed", "device", "datasets", "models", "defenses", "attacks", "settings", "grid", "tables",
        "ranklist", "description"}
_SETTINGS: dict[str, Any] = {
    "rerank": True, "max_images": None, "batch_size": 32, "eot_samples": 10, "side": "query", "quantize": None,
    "reencode": None, "num_workers": 2, "progress": True,
}
_ATTACK_KEYS = {"name", "eps", "alpha", "steps", "params"}
_MODEL_KEYS = {"run", "config", "train_on", "overrides", "source"}
_DATASET_KEYS = {"name", "root", "synthetic"}
_TABLE_KEYS = {"name", "title", "kind", "dataset", "datasets", "rows", "columns", "threats", "rerank"}


# ------------------------------------------------------------------------------------------------- config
def bench_dir() -> Path:
    """Folder of the shipped benchmark presets (``configs/bench``)."""
    from advreid.config import preset_dir

    return preset_dir() / "bench"


def list_bench_presets() -> list[str]:
    return sorted(p.stem for p in bench_dir().glob("*.yaml"))


def _err(where: str, msg: str) -> ConfigError:
    return ConfigError(f"bench config {where}: {msg}")


def load_bench_config(source: str | Path | dict, overrides: Sequence[str] | None = None) -> dict:
    """A bench config (file, preset name in ``configs/bench`` or dict) with ``KEY=VALUE`` overrides, validated."""
    import yaml

    if isinstance(source, dict):
        cfg, where = copy.deepcopy(source), "<dict>"
    else:
        p = Path(source)
        if not p.is_file():
            cand = bench_dir() / (p.name if p.suffix == ".yaml" else f"{p.name}.yaml")
            if p.parent != Path(".") or not cand.is_file():
                raise ConfigError(f"bench config {str(source)!r}: no such file, and not a preset name "
                                  f"(presets: {', '.join(list_bench_presets())})")
            p = cand
        where = str(p)
        try:
            cfg = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"bench config {p}: not valid YAML: {e}") from e
    if overrides:
        cfg = deep_update(cfg, parse_overrides(list(overrides)))
    _validate(cfg, where)
    return cfg


def _validate(cfg: dict, where: str) -> None:
    import difflib

    def unknown(keys: set, allowed: set, at: str) -> None:
        for k in sorted(keys - allowed):
            close = difflib.get_close_matches(k, sorted(allowed), n=1)
            raise _err(where, f"unknown key {at}{k!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                       + f"; valid: {', '.join(sorted(allowed))}")

    if not isinstance(cfg, dict):
        raise _err(where, "expected a mapping at top level")
    unknown(set(cfg), _TOP, "")
    for sec in ("datasets", "models", "attacks", "grid"):
        if not cfg.get(sec):
            raise _err(where, f"{sec!r} is missing or empty")
    cfg.setdefault("defenses", {"none": None})
    cfg.setdefault("name", Path(where).stem if where != "<dict>" else "bench")
    cfg.setdefault("seed", 0)
    cfg.setdefault("device", "auto")
    settings = {**_SETTINGS, **(cfg.get("settings") or {})}
    unknown(set(settings), set(_SETTINGS), "settings.")
    cfg["settings"] = settings
    if settings["side"] not in ("query", "gallery"):
        raise _err(where, f"settings.side={settings['side']!r}; expected query or gallery")
    for key, d in cfg["datasets"].items():
        if not isinstance(d, dict):
            raise _err(where, f"datasets.{key} must be a mapping like {{name: market1501, root: /data/Market}}")
        unknown(set(d), _DATASET_KEYS, f"datasets.{key}.")
        if d.get("root") is None and d.get("synthetic") is None:
            raise _err(where, f"datasets.{key}: give root: PATH (or synthetic: {{...}} for generated data); "
                              f"override with datasets.{key}.root=PATH")
    for key, m in cfg["models"].items():
        if not isinstance(m, dict):
            raise _err(where, f"models.{key} must be a mapping ({{run: DIR}} or {{config: PRESET, train_on: DATA}})")
        unknown(set(m), _MODEL_KEYS, f"models.{key}.")
        if m.get("run") is None and m.get("config") is None:
            raise _err(where, f"models.{key}: give run: DIR (a trained run) or config: PRESET (trained here)")
        if m.get("config") is not None and m.get("train_on") not in cfg["datasets"]:
            raise _err(where, f"models.{key}.train_on={m.get('train_on')!r}; expected one of the datasets: "
                              f"{', '.join(cfg['datasets'])}")
        if m.get("source") is not None and m["source"] not in cfg["models"]:
            raise _err(where, f"models.{key}.source={m['source']!r} is not a model of this bench")
    for key, a in cfg["attacks"].items():
        if a is None:
            continue
        if not isinstance(a, dict) or "name" not in a:
            raise _err(where, f"attacks.{key} must be null (no attack) or a mapping with a name, e.g. {{name: lta}}")
        unknown(set(a), _ATTACK_KEYS, f"attacks.{key}.")
    for key, d in cfg["defenses"].items():
        if d is not None and (not isinstance(d, dict) or "name" not in d or set(d) - {"name", "params"}):
            raise _err(where, f"defenses.{key} must be null (no defense) or {{name: cs, params: {{...}}}}")
    grid = cfg["grid"]
    if not isinstance(grid, list):
        raise _err(where, "grid must be a list of blocks {models, datasets, defenses, attacks, threats}")
    for i, b in enumerate(grid):
        unknown(set(b), {"models", "datasets", "defenses", "attacks", "threats"}, f"grid[{i}].")
        for sec in ("models", "datasets", "defenses", "attacks"):
            names = b.get(sec, list(cfg[sec]) if sec != "datasets" else None)
            if names is None:
                names = [cfg["models"][m].get("train_on") for m in b.get("models", [])]
            for n in names:
                if n not in cfg[sec]:
                    raise _err(where, f"grid[{i}].{sec}: {n!r} is not defined under {sec} "
                                      f"({', '.join(map(str, cfg[sec]))})")
        for t in b.get("threats", ["non_adaptive"]):
            if t not in BENCH_THREATS:
                raise _err(where, f"grid[{i}].threats: {t!r}; expected {', '.join(BENCH_THREATS)}")
    for i, t in enumerate(cfg.get("tables") or []):
        unknown(set(t), _TABLE_KEYS, f"tables[{i}].")
        if t.get("kind", "attack") not in ("attack", "clean", "cross_domain"):
            raise _err(where, f"tables[{i}].kind={t.get('kind')!r}; expected attack, clean or cross_domain")


def _attack_label(key: str, spec: dict | None) -> str:
    return "no attack" if spec is None else key


def _row_parts(row: str) -> tuple[str, str]:
    """``"jad+cs"`` -> ("jad", "cs"); ``"baseline"`` -> ("baseline", "none")."""
    model, _, defense = str(row).partition("+")
    return model, defense or "none"


def cell_key(model: str, dataset: str, defense: str, attack: str, threat: str) -> str:
    """File-system-safe name of one grid cell."""
    raw = f"{model}__{dataset}__{defense}__{attack}__{threat}"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", raw)


def _canon_threat(defense_spec: dict | None, attack_spec: dict | None, threat: str) -> str:
    if attack_spec is None:
        return "clean"
    if defense_spec is None:
        return "white_box"
    return threat


def _cells(cfg: dict) -> list[tuple[str, str, str, str, str]]:
    """All distinct (model, dataset, defense, attack, threat) cells of the grid, in grid order."""
    out, seen = [], set()
    for b in cfg["grid"]:
        for m in b.get("models", list(cfg["models"])):
            dsets = b.get("datasets") or [cfg["models"][m].get("train_on")]
            for d in dsets:
                for df in b.get("defenses", list(cfg["defenses"])):
                    for a in b.get("attacks", list(cfg["attacks"])):
                        for t in b.get("threats", ["non_adaptive"]):
                            c = (m, d, df, a, _canon_threat(cfg["defenses"][df], cfg["attacks"][a], t))
                            if c not in seen:
                                seen.add(c)
                                out.append(c)
    return out


# --------------------------------------------------------------------------------------------- the runner
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
        import hashlib

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

            from advreid.utils.io import atomic_write_with

            path.parent.mkdir(parents=True, exist_ok=True)
            f, p, c = value
            tensors = {"features": f.contiguous(), "pids": p.contiguous(), "camids": c.contiguous()}
            atomic_write_with(path, lambda name: save_file(tensors, name))


class _Bench:
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
            import hashlib

            ckpt = Path(self.model(model)[1]["checkpoint"])
            weights = Path(f"{ckpt}.safetensors")
            mtime = weights.stat().st_mtime_ns if weights.is_file() else 0
            stamp = f"{ckpt.resolve()}|{mtime}|{self.dataset_root(dataset)}"
            tag = hashlib.sha1(stamp.encode()).hexdigest()[:10]  # another checkpoint -> another folder
            self.caches[key] = FeatureCache(self.out / "cache" / f"{model}__{dataset}__{tag}")
        return self.caches[key]

    # datasets and models ---------------------------------------------------------------------------
    def dataset_root(self, key: str) -> str:
        if key not in self.roots:
            d = self.cfg["datasets"][key]
            if d.get("root") is not None:
                root = Path(d["root"]).expanduser()
                if not root.exists():
                    raise FileNotFoundError(f"bench dataset {key!r}: root {root} does not exist "
                                            f"(override with datasets.{key}.root=PATH)")
            else:
                from advreid.data import generate_synthetic

                syn = dict(d["synthetic"] or {})
                names = {"ids": "num_train_ids", "test_ids": "num_test_ids", "cams": "num_cams", "height": "height",
                         "width": "width", "seed": "seed", "distractors": "num_distractors", "junk": "num_junk"}
                bad = sorted(set(syn) - set(names))
                if bad:
                    raise ConfigError(f"bench config datasets.{key}.synthetic: unknown key(s) {bad}; "
                                      f"valid: {', '.join(names)}")
                kw = {names[k]: v for k, v in syn.items()}
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
        if m.get("run") is not None:
            run = Path(m["run"]).expanduser()
            if not run.is_dir():
                raise FileNotFoundError(f"bench model {key!r}: run directory {run} does not exist")
            self.runs[key] = run
            return run
        from advreid.experiments import train

        run = self.out / "models" / key
        data_key = m["train_on"]
        ov = [f"data.root={self.dataset_root(data_key)}",
              f"data.name={self.cfg['datasets'][data_key].get('name', 'market1501')}",
              f"seed={self.cfg['seed']}", *(m.get("overrides") or [])]
        if self.cfg["device"] != "auto":
            ov.append(f"device={self.cfg['device']}")
        if m.get("source") is not None:
            ov.append(f"adv.source_run={self.run_dir(m['source'])}")
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

    def model(self, key: str) -> Any:
        if key not in self.models:
            from advreid.evaluation.robustness import _load_run

            model, info = _load_run(self.run_dir(key))
            self.models[key] = (model.to(self.device).eval(), info)
        return self.models[key]

    def defense(self, key: str) -> Any:
        spec = self.cfg["defenses"][key]
        if spec is None:
            return None
        from advreid.defenses.passive import build_passive

        d = build_passive(spec["name"], spec.get("params"))
        d.name = spec["name"]
        return d

    # cells ----------------------------------------------------------------------------------------
    def compute(self, cell: tuple[str, str, str, str, str]) -> dict:
        from advreid.evaluation.robustness import eval_protocol, evaluate_attack, evaluate_clean

        mkey, dkey, fkey, akey, threat = cell
        model, info = self.model(mkey)
        proto = eval_protocol(model)
        ds = self.dataset(dkey)
        cache = self.cache(mkey, dkey)
        s = self.s
        common = dict(defense=self.defense(fkey), metric=proto["metric"], normalize=proto["normalize"],
                      flip=proto["flip"], ap=proto["ap"], rerank=bool(s["rerank"]),
                      eval_batch_size=proto["batch_size"], height=proto["height"], width=proto["width"],
                      device=self.device, max_images=s["max_images"], num_workers=s["num_workers"],
                      progress=bool(s["progress"]) and self.progress, cache=cache)
        aspec = self.cfg["attacks"][akey]
        torch.manual_seed(int(self.cfg["seed"]))  # randomised defenses draw from the global RNG: same cell, same draws
        t0 = time.perf_counter()
        if aspec is None:
            res = evaluate_clean(model, ds.query, ds.gallery, side=s["side"], **common)
        else:
            budget = _budget(akey, aspec)
            res = evaluate_attack(
                model, ds.query, ds.gallery, aspec["name"], eps_list=[budget["eps"]], alpha=budget.get("alpha"),
                steps=budget.get("steps"), seed=int(self.cfg["seed"]), attack_params=aspec.get("params"),
                side=s["side"], quantize=s["quantize"], reencode=s["reencode"], batch_size=s["batch_size"],
                adaptive=threat == "adaptive", eot_samples=s["eot_samples"], **common)
        trained_on = (model.checkpoint_meta.get("meta", {}).get("config", {}).get("data", {}).get("root"))
        return {"cell": {"model": mkey, "dataset": dkey, "defense": fkey, "attack": akey, "threat": threat},
                "model": info, "dataset": {"name": self.cfg["datasets"][dkey].get("name", "market1501"),
                                           "root": self.dataset_root(dkey)},
                "cross_domain": trained_on is not None
                and Path(trained_on).resolve() != Path(self.dataset_root(dkey)).resolve(),
                "attack_spec": aspec, "defense_spec": self.cfg["defenses"][fkey],
                "seconds": round(time.perf_counter() - t0, 3), **res}


def _budget(key: str, aspec: dict) -> dict:
    """``eps`` (default 5px) and, when the attack spec sets them, ``alpha`` / ``steps``, parsed to [0,1] units."""
    from advreid.attacks import parse_eps

    out: dict[str, Any] = {"eps": parse_eps(aspec.get("eps", "5px"), f"attacks.{key}.eps")}
    if aspec.get("alpha") is not None:
        out["alpha"] = parse_eps(aspec["alpha"], f"attacks.{key}.alpha")
    if aspec.get("steps") is not None:
        out["steps"] = aspec["steps"]
    return out


def _spec_of(cfg: dict, cell: tuple[str, str, str, str, str]) -> dict:
    """What a cell's result depends on (compared on resume: a changed spec is recomputed)."""
    m, d, f, a, _t = cell
    return {"model": cfg["models"][m], "dataset": cfg["datasets"][d], "defense": cfg["defenses"][f],
            "attack": cfg["attacks"][a], "settings": {k: v for k, v in cfg["settings"].items()
                                                     if k not in ("progress", "num_workers")},
            "seed": cfg["seed"]}


def run_bench(
    source: str | Path | dict,
    out: str | Path | None = None,
    *,
    overrides: Sequence[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    tables_only: bool = False,
) -> tuple[dict, Path]:
    """Run (or resume) the benchmark grid of ``source``; write cells, ``results.json`` and tables into ``out``."""
    from advreid.utils.io import prepare_run_dir

    cfg = load_bench_config(source, overrides)
    for key, d in cfg["datasets"].items():  # fail before the output folder is created
        if d.get("root") is not None and not Path(d["root"]).expanduser().exists():
            raise FileNotFoundError(f"bench dataset {key!r}: root {d['root']} does not exist "
                                    f"(override with datasets.{key}.root=PATH)")
    for key, m in cfg["models"].items():
        if m.get("run") is not None and not Path(m["run"]).expanduser().is_dir():
            raise FileNotFoundError(f"bench model {key!r}: run directory {m['run']} does not exist")
    out = Path(out) if out is not None else Path("runs") / "bench" / cfg["name"]
    if tables_only:
        if not (out / "cells").is_dir():
            raise FileNotFoundError(f"--tables-only: {out / 'cells'} does not exist; run the bench first")
    else:
        try:
            prepare_run_dir(out, resume=resume, overwrite=overwrite)
        except FileExistsError:
            raise FileExistsError(f"bench folder {out} already exists; pass --resume to continue it (finished "
                                  f"cells are kept) or --overwrite (the old one is kept as {out}.old-N)") from None
        atomic_write_text(out / "bench.yaml", _dump(cfg))
    bench = _Bench(cfg, out, progress)
    cells = _cells(cfg)
    results: dict[str, dict] = {}
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    todo = []
    for c in cells:
        path = out / "cells" / f"{cell_key(*c)}.json"
        if path.is_file():
            doc = json.loads(path.read_text())
            if doc.get("spec") == json.loads(json.dumps(_spec_of(cfg, c))):
                results[cell_key(*c)] = doc
                continue
        todo.append(c)
    if tables_only:
        todo = []
    bench.log(f"bench {cfg['name']!r}: {len(cells)} cells, {len(cells) - len(todo)} already done, "
              f"{len(todo)} to run; output {out}")
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="bench cells", dynamic_ncols=True, disable=None, leave=False)

    def write_results(complete: bool) -> dict:
        doc = {"bench": cfg["name"], "started": started, "complete": complete, "config": cfg,
               "cells": [results[cell_key(*c)] for c in cells if cell_key(*c) in results]}
        atomic_write_json(out / "results.json", doc)
        return doc

    for c in todo:
        res = bench.compute(c)
        res["spec"] = _spec_of(cfg, c)
        atomic_write_json(out / "cells" / f"{cell_key(*c)}.json", res)
        results[cell_key(*c)] = json.loads(json.dumps(res))
        if bar is not None:
            bar.update(1)
        bench.log(_cell_line(res))
        write_results(False)
    if bar is not None:
        bar.close()
    doc = write_results(len(results) == len(cells))
    tables = build_tables(doc)
    write_tables(tables, out / "tables")
    doc["tables"] = [{k: v for k, v in t.items() if k != "rows"} for t in tables]
    if cfg.get("ranklist") and not tables_only:
        doc["ranklist"] = str(_ranklist(bench, cfg["ranklist"]))
    atomic_write_json(out / "results.json", doc)
    doc["_tables"] = tables
    return doc, out


def _dump(cfg: dict) -> str:
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)


def _cell_line(res: dict) -> str:
    c = res["cell"]
    m = res.get("runs", [{}])[0].get("attacked") if res.get("runs") else res["clean"]
    txt = f"R1 {100 * m['rank1']:.1f} mAP {100 * m['mAP']:.1f}"
    if "rr_rank1" in m:
        txt += f" (RK: R1 {100 * m['rr_rank1']:.1f} mAP {100 * m['rr_mAP']:.1f})"
    return (f"  {c['model']:>10} | {c['dataset']} | defense {c['defense']} | {c['attack']} | {c['threat']}: {txt} "
            f"[{res['seconds']:.1f}s]")


# ---------------------------------------------------------------------------------------------- tables
def _metrics(cell: dict) -> dict:
    return cell["runs"][0]["attacked"] if cell.get("runs") else cell["clean"]


def _fmt(m: dict | None, rr: bool) -> str:
    if m is None:
        return "-"
    p = "rr_" if rr else ""
    if f"{p}rank1" not in m:
        return "-"
    return f"{100 * m[p + 'rank1']:.1f} / {100 * m[p + 'mAP']:.1f}"


def _auto_tables(cfg: dict) -> list[dict]:
    tables = []
    for i, b in enumerate(cfg["grid"]):
        models = b.get("models", list(cfg["models"]))
        defenses = b.get("defenses", list(cfg["defenses"]))
        attacks = b.get("attacks", list(cfg["attacks"]))
        dsets = b.get("datasets") or sorted({cfg["models"][m].get("train_on") for m in models})
        for d in dsets:
            tables.append({"name": f"grid{i}_{d}", "kind": "attack", "dataset": d,
                           "rows": [m if f == "none" else f"{m}+{f}" for m in models for f in defenses],
                           "columns": attacks, "threats": b.get("threats", ["non_adaptive"]), "rerank": "both"})
    return tables


def build_tables(doc: dict) -> list[dict]:
    """Tables (seed shapes) from a results document: ``[{name, title, header, rows: [[cell text]]}]``."""
    cfg = doc["config"]
    index = {(c["cell"]["model"], c["cell"]["dataset"], c["cell"]["defense"], c["cell"]["attack"],
              c["cell"]["threat"]): c for c in doc["cells"]}
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
        s = cfg["settings"]
        proto = (f"{s['side']} attack, eps/alpha/steps as in attacks; cells R1 / mAP (%); "
                 f"RK = k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3)"
                 + (f"; subset of {s['max_images']} {s['side']} images" if s["max_images"] else ""))
        out.append({"name": t.get("name", kind), "title": t.get("title", t.get("name", kind)), "kind": kind,
                    "protocol": proto, "attacks": {a: cfg["attacks"][a] for a in t.get("columns", [])
                                                   if a in cfg["attacks"]},
                    "header": header, "rows": rows})
    return out


def _lookup(index: dict, cfg: dict, model: str, dataset: str, defense: str, attack: str, threat: str) -> dict | None:
    ct = _canon_threat(cfg["defenses"].get(defense), cfg["attacks"].get(attack), threat)
    return index.get((model, dataset, defense, attack, ct))


def _attack_table(t: dict, cfg: dict, index: dict, rr_modes: list[bool]) -> tuple[list[str], list[list[str]]]:
    cols = t.get("columns") or list(cfg["attacks"])
    dataset = t.get("dataset") or next(iter(cfg["datasets"]))
    threats = t.get("threats") or ["non_adaptive"]
    header = ["model", "threat model"] + [_attack_label(a, cfg["attacks"].get(a)) for a in cols]
    rows = []
    for rr in rr_modes:
        for row in t.get("rows") or list(cfg["models"]):
            m, f = _row_parts(row)
            row_threats = threats if cfg["defenses"].get(f) is not None else ["white_box"]
            for th in row_threats:
                label = (row if f != "none" else m) + (" + RK" if rr else "")
                rows.append([label, th.replace("_", "-")]
                            + [_fmt(_metrics(c) if (c := _lookup(index, cfg, m, dataset, f, a, th)) else None, rr)
                               for a in cols])
    return header, rows


def _clean_table(t: dict, cfg: dict, index: dict, rr_modes: list[bool]) -> tuple[list[str], list[list[str]]]:
    dsets = t.get("datasets") or list(cfg["datasets"])
    clean = next((a for a, v in cfg["attacks"].items() if v is None), None)
    header = ["model"] + dsets
    rows = []
    for rr in rr_modes:
        for row in t.get("rows") or list(cfg["models"]):
            m, f = _row_parts(row)
            cells = []
            for d in dsets:
                c = _lookup(index, cfg, m, d, f, clean, "clean") if clean else None
                cells.append(_fmt(_metrics(c) if c else None, rr))
            rows.append([(row if f != "none" else m) + (" + RK" if rr else "")] + cells)
    return header, rows


def _cross_table(t: dict, cfg: dict, index: dict) -> tuple[list[str], list[list[str]]]:
    dsets = t.get("datasets") or list(cfg["datasets"])
    clean = next((a for a, v in cfg["attacks"].items() if v is None), None)
    pairs = [(a, b) for a in dsets for b in dsets if a != b]
    header = ["model"] + [f"{a}->{b}" for a, b in pairs]
    rows = []
    for row in t.get("rows") or list(cfg["models"]):
        m, f = _row_parts(row)
        trained = cfg["models"][m].get("train_on")
        cells = []
        for a, b in pairs:
            c = _lookup(index, cfg, m, b, f, clean, "clean") if clean and trained == a else None
            cells.append(_fmt(_metrics(c) if c else None, False))
        rows.append([row] + cells)
    return header, rows


def format_bench_table(table: dict, *, markdown: bool = True) -> str:
    """One table as Markdown (or aligned text), its title and protocol line above it."""
    from advreid.reporting import format_grid

    body = format_grid(table["header"], table["rows"], markdown=markdown)
    return f"### {table['title']}\n\n{table['protocol']}\n\n{body}\n"


def write_tables(tables: list[dict], folder: Path) -> None:
    """``<name>.md`` and ``<name>.csv`` per table, and ``tables.md`` with all of them."""
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


# -------------------------------------------------------------------------------------------- rank list
def _ranklist(bench: _Bench, spec: dict) -> Path:
    """A query's top-10 for each configured row (clean / attacked / attacked-but-defended), as JSON and PNG."""
    from advreid.attacks import save_images
    from advreid.data import ImageDataset, build_transforms
    from advreid.defenses.passive import DefendedModel
    from advreid.evaluation.distance import compute_distance_matrix
    from advreid.evaluation.robustness import (
        _build,
        _clean,
        _defense_info,
        attack_dataset,
        build_guide_bank,
        eval_protocol,
        guide_set,
    )
    from advreid.reporting import draw_ranklist

    qi = int(spec.get("query", 0))
    topk = int(spec.get("topk", 10))
    folder = bench.out / "ranklist"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in spec["rows"]:
        m, d, f, a = r["model"], r.get("dataset"), r.get("defense", "none"), r.get("attack")
        d = d or bench.cfg["models"][m].get("train_on") or next(iter(bench.cfg["datasets"]))
        threat = r.get("threat", "non_adaptive")
        model, _ = bench.model(m)
        proto = eval_protocol(model)
        ds = bench.dataset(d)
        if not 0 <= qi < len(ds.query):
            raise ValueError(f"ranklist.query={qi}: the {d} query set has {len(ds.query)} images")
        defense = bench.defense(f)
        info = _defense_info(defense)
        eval_model = model if defense is None else DefendedModel(model, defense.to(bench.device))
        tf = build_transforms(proto["height"], proto["width"], is_train=False)
        ekw = dict(batch_size=proto["batch_size"], flip=proto["flip"], normalize=proto["normalize"],
                   device=bench.device, num_workers=0, progress=False)
        cache = bench.cache(m, d)
        sets = {"query": list(ds.query), "gallery": list(ds.gallery)}
        clean, _ = _clean(eval_model, info["key"] if info else "none", sets, tf, ekw, cache, side="query",
                          max_images=None, metric=proto["metric"], ap=proto["ap"], rerank=False)
        qf = clean["query"][0][qi:qi + 1]
        q_img = ImageDataset([ds.query[qi]], tf)[0][0].unsqueeze(0)
        if a is not None and bench.cfg["attacks"][a] is not None:
            aspec = bench.cfg["attacks"][a]
            attacker = model if (defense is None or threat != "adaptive") else DefendedModel(model, defense)
            params = dict(aspec.get("params") or {})
            if threat == "adaptive" and getattr(defense, "randomized", False):
                params.setdefault("eot_samples", int(bench.s["eot_samples"]))
            atk = _build(aspec["name"], attacker, seed=int(bench.cfg["seed"]), **_budget(a, aspec), **params)
            guides = None
            if getattr(atk, "needs_guides", False):
                gsrc = guide_set(getattr(atk, "guide_source_default", None), "query")
                guides = build_guide_bank(attacker, sets[gsrc], gsrc, height=proto["height"], width=proto["width"],
                                          batch_size=proto["batch_size"])
            # attacks are per-sample independent: attacking the query alone gives its result in the full run
            res = attack_dataset(attacker, atk, [ds.query[qi]], guides=guides, indices=[qi], eval_model=eval_model,
                                 flip=proto["flip"], normalize=proto["normalize"], height=proto["height"],
                                 width=proto["width"], device=bench.device, keep_images=True,
                                 finalize_kw={"quantize": bench.s["quantize"], "reencode": bench.s["reencode"]})
            qf, q_img = res.features, res.images
        label = re.sub(r"[^A-Za-z0-9_.-]", "-", r.get("label", f"{m}-{f}-{a}"))
        q_path = save_images(q_img, [f"{label}.png"], folder, fmt="png", quantize="round")[0]
        gf, gp, gc = clean["gallery"]
        dist = compute_distance_matrix(qf, gf, metric=proto["metric"])[0]
        qrec = ds.query[qi]
        junk = ((gp == qrec.pid) & (gc == qrec.camid)) | (gp == -1)
        dist = torch.as_tensor(dist).masked_fill(junk, float("inf"))
        order = torch.argsort(dist)[:topk].tolist()
        rows.append({"label": r.get("label", f"{m} {f} {a}"), "query": str(q_path),
                     "gallery": [{"path": ds.gallery[j].path, "pid": int(gp[j]), "match": bool(gp[j] == qrec.pid)}
                                 for j in order]})
    doc = {"query_index": qi, "query": ds.query[qi].path, "pid": ds.query[qi].pid, "rows": rows}
    atomic_write_json(folder / "ranklist.json", doc)
    png = bench.out / "ranklist.png"
    draw_ranklist(doc, png)
    return png
