"""Evaluating stored runs: ``advreid eval`` (:func:`run_eval`) and ``advreid attack`` (:func:`run_attack`) load a
run's checkpoint and its evaluation protocol, build the dataset, evaluate and write results atomically.

Everything that can be wrong with a request fails before an output folder is created.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from advreid.evaluation import AttackSpec, EvalProtocol, RunOptions, ThreatModel, evaluate_attack, evaluate_model
from advreid.evaluation.protocol import AUTO
from advreid.models import find_checkpoint, load_checkpoint
from advreid.ops import SEED_COMPAT
from advreid.utils.io import atomic_write_json, atomic_write_text, paths_overlap, prepare_run_dir
from advreid.utils.misc import get_device

__all__ = ["AttackJob", "EvalJob", "default_out_dir", "load_run", "run_attack", "run_eval"]


def load_run(run_dir: str | os.PathLike, checkpoint: str | None = None) -> tuple[nn.Module, dict]:
    """(model, info) of a run folder's final (else latest) checkpoint, or of ``checkpoint``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    stem = Path(checkpoint) if checkpoint else find_checkpoint(run_dir)
    model = load_checkpoint(stem)
    doc = model.checkpoint_meta
    info = {"run_dir": str(run_dir), "checkpoint": str(stem), "arch": doc.get("arch"),
            "model_name": doc.get("meta", {}).get("model_name"), "trained_on": doc.get("meta", {}).get("dataset")}
    return model, info


def _trained_config(model: nn.Module) -> dict:
    return getattr(model, "checkpoint_meta", {}).get("meta", {}).get("config", {})


def _readable(query: list, gallery: list, skip_bad: bool) -> tuple[list, list, dict | None]:
    """(query, gallery, skipped) with ``skip_bad``: every image decoded once, unreadable ones left out and listed
    (``{"count", "query", "gallery"}``, each a list of ``{"path", "reason"}``); without it the records unchanged
    (a bad image then fails, naming its file, when it is read)."""
    if not skip_bad:
        return list(query), list(gallery), None
    from advreid.data import check_images

    kept, listed = {}, {}
    for split, records in (("query", query), ("gallery", gallery)):
        kept[split], bad = check_images(records, skip_bad=True)
        if records and not kept[split]:
            raise ValueError(f"skip_bad_images: none of the {len(records)} {split} images is readable (first: "
                             f"{bad[0][0]}: {bad[0][1]})")
        listed[split] = [{"path": path, "reason": reason} for path, reason in bad]
    return kept["query"], kept["gallery"], {"count": len(listed["query"]) + len(listed["gallery"]), **listed}


def _save_result(path: Path, res: dict) -> None:
    """Append ``res`` to the ``evaluations`` of ``path``; a damaged file is left as it is and ``res`` is saved
    beside it (``results.<time>[-N].json``, never over an existing file), then a one-line error names both."""
    why = None
    existing: Any = {"evaluations": []}
    if path.is_file():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:  # also UnicodeDecodeError
            why = f"is not valid JSON ({' '.join(str(e).split())})"
        except OSError as e:
            why = f"cannot be read ({e.strerror or e})"
        else:
            if not isinstance(existing, dict) or not isinstance(existing.setdefault("evaluations", []), list):
                why = 'does not hold {"evaluations": [...]}'
    if why is not None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside, n = path.with_name(f"results.{stamp}.json"), 0
        while aside.exists():
            n += 1
            aside = path.with_name(f"results.{stamp}-{n}.json")
        atomic_write_json(aside, {"evaluations": [res]})
        raise ValueError(f"results file {path} {why}; it is left as it is and this evaluation was saved to {aside}")
    existing["evaluations"].append(res)
    atomic_write_json(path, existing)


# -------------------------------------------------------------------------------------------------- eval
@dataclass
class EvalJob:
    """``advreid eval``: a run evaluated on a dataset (cross-domain when another one), with optional overrides of
    the run's protocol, a passive defense ("auto": the run's own) and a checkpoint other than the final one."""

    run_dir: Path
    data: str
    dataset: str | None = None
    rerank: bool = False
    flip: bool | None = None
    metric: str | None = None
    ap: str | None = None
    checkpoint: str | None = None
    defense: str | None = AUTO
    device: str | None = None
    num_workers: int = 2
    skip_bad_images: bool = False


def run_eval(job: EvalJob) -> dict:
    """Evaluate; append the result to ``run_dir/results.json`` (a damaged file is left as it is and the result saved
    beside it). ``skip_bad_images`` leaves unreadable query/gallery images out, listed under ``skipped_images``."""
    from advreid.data import build_dataset

    model, info = load_run(job.run_dir, job.checkpoint)
    meta = model.checkpoint_meta.get("meta", {})
    cfg = _trained_config(model)
    ds_name = job.dataset or cfg.get("data", {}).get("name", "market1501")
    ds = build_dataset(ds_name, job.data)
    dev = get_device(job.device)
    model.to(dev)
    proto = EvalProtocol.of_model(model, metric=job.metric, ap=job.ap, flip=job.flip, rerank=job.rerank)
    threat = ThreatModel(defense=job.defense).resolve(model)
    net, _, _ = threat.models(model)
    query, gallery, skipped = _readable(ds.query, ds.gallery, job.skip_bad_images)
    res = evaluate_model(net, query, gallery, proto, device=dev, num_workers=job.num_workers, progress=True)
    d = threat.defense
    if skipped is not None:
        res["skipped_images"] = skipped
    res.update({"dataset": ds_name, "data_root": str(job.data), "checkpoint": info["checkpoint"],
                "defense": None if d is None else {"name": d.name, "params": d.params()},
                "trained_on": meta.get("dataset"),
                "cross_domain": _is_cross_domain(ds_name, job.data, meta.get("dataset"),
                                                 cfg.get("data", {}).get("root"))})
    _save_result(Path(job.run_dir) / "results.json", res)
    return res


def _is_cross_domain(name: str, root: str, trained_name: str | None, trained_root: str | None) -> bool:
    """Evaluated on another dataset than the one trained on (another parser or another folder)."""
    if trained_name is not None and name != trained_name:
        return True
    if trained_root is None:
        return False
    return Path(root).resolve() != Path(trained_root).resolve()


# ------------------------------------------------------------------------------------------------ attack
@dataclass
class AttackJob:
    """``advreid attack``: attack a run's query (or gallery) set and write ``results.json``.

    ``threat.defense`` "auto" uses the run's own passive defense; ``source_run`` crafts the images on another run
    (black-box transfer); ``sweep`` lists budgets ([0,1] units) evaluated one after the other; ``seed_compat``
    means the seed paper's output (floor quantisation + JPEG q75) and conflicts with other settings of the spec;
    ``skip_bad_images`` leaves unreadable query/gallery images out (listed under ``skipped_images``; the records'
    positions, hence the per-sample random streams, are those of the remaining images).
    """

    run_dir: Path
    data: str
    attack: AttackSpec
    threat: ThreatModel = field(default_factory=lambda: ThreatModel(defense=AUTO))
    sweep: list[float] | None = None
    dataset: str | None = None
    source_run: str | None = None
    rerank: bool = False
    max_images: int | None = None
    seed_compat: bool = False
    save_adv: str | None = None
    out: str | None = None
    overwrite: bool = False
    options: RunOptions = field(default_factory=lambda: RunOptions(progress=True))
    skip_bad_images: bool = False


def default_out_dir(run_dir: str | os.PathLike, attack: str, side: str, *, sweep: bool,
                    source_run: str | os.PathLike | None = None, defense: str | None = None) -> Path:
    """``RUN_DIR/attacks/<attack>-<side>[-sweep][-<defense>[-adaptive]][-from-<source run name>]``."""
    name = f"{attack}-{side}" + ("-sweep" if sweep else "") + (f"-{defense}" if defense else "")
    if source_run is not None:
        name += f"-from-{Path(source_run).resolve().name}"
    return Path(run_dir) / "attacks" / name


def _seed_compat(spec: AttackSpec) -> AttackSpec:
    want = SEED_COMPAT
    for key in ("quantize", "reencode"):
        given = getattr(spec, key)
        if given is not None and given != want[key]:
            raise ValueError(f"seed_compat means {key}={want[key]}; it conflicts with {key}={given}")
    return spec.replace(quantize=want["quantize"], reencode=want["reencode"])


def _check_output_dirs(dirs: list[Path], overwrite: bool, dataset_root: Path) -> None:
    for d in dirs:
        if paths_overlap(d, dataset_root):
            raise ValueError(f"output folder {d} is inside (or contains) the dataset folder {dataset_root}: "
                             "choose a folder outside the dataset")
        if d.is_dir() and any(d.iterdir()) and not overwrite:
            raise FileExistsError(f"output folder {d} already exists and is not empty; pass --overwrite (the old "
                                  f"one is kept as {d}.old-N) or choose another --out / --save-adv")


def run_attack(job: AttackJob) -> tuple[dict, Path]:
    """Load the run(s), attack, write ``<out>/results.json`` (atomically, after each eps); return (results, out)."""
    from advreid.data import build_dataset

    spec = _seed_compat(job.attack) if job.seed_compat else job.attack
    model, target = load_run(job.run_dir)
    proto = EvalProtocol.of_model(model, rerank=job.rerank, max_images=job.max_images)
    threat = job.threat.resolve(model)
    src_info = None
    if job.source_run is not None:
        source, src_info = load_run(job.source_run)
        sp = EvalProtocol.of_model(source)
        if (sp.height, sp.width) != (proto.height, proto.width):
            raise ValueError(f"source_run {job.source_run} takes {sp.height}x{sp.width} images but {job.run_dir} "
                             f"takes {proto.height}x{proto.width}; transfer needs one input size")
        threat = ThreatModel(threat.defense, None, threat.adaptive, threat.eot_samples, source, src_info)
    side = spec.side or getattr(spec.build(model), "side", "query")  # the preset's own side (ifgsm_bai: gallery)
    spec = spec.replace(side=side)
    ds_name = job.dataset or _trained_config(model).get("data", {}).get("name", "market1501")
    ds = build_dataset(ds_name, job.data)
    sweep = job.sweep if job.sweep is not None and len(job.sweep) > 1 else None
    d = threat.defense
    dlabel = None if d is None else d.name + ("-adaptive" if threat.adaptive else "")
    out = Path(job.out) if job.out is not None else default_out_dir(job.run_dir, spec.name, side,
                                                                    sweep=sweep is not None,
                                                                    source_run=job.source_run, defense=dlabel)
    dirs = [out] + ([Path(job.save_adv)] if job.save_adv is not None else [])
    _check_output_dirs(dirs, job.overwrite, Path(job.data))
    query, gallery, skipped = _readable(ds.query, ds.gallery, job.skip_bad_images)
    for folder in dirs:
        prepare_run_dir(folder, overwrite=job.overwrite)
    import advreid

    header = {"advreid_version": advreid.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "dataset": {"name": ds_name, "root": str(Path(job.data).resolve())}, "model": target,
              "source_model": src_info, "side": side, "seed_compat": job.seed_compat, "seed": spec.seed,
              "device": str(get_device(job.options.device)),
              "save_adv": str(job.save_adv) if job.save_adv is not None else None}
    if skipped is not None:
        header["skipped_images"] = skipped
    path = out / "results.json"

    def document(res: dict, complete: bool) -> dict:
        runs = res.get("runs") or []
        doc = {**header, "complete": complete, **{k: v for k, v in res.items() if k not in ("images", "attack")}}
        doc["attack"] = {"name": spec.name, "params": runs[0]["params"] if runs else None,
                         "extra_params": dict(spec.params), "label": spec.label()}
        doc["protocol"] = {**res["protocol"], "eval_batch_size": proto.batch_size}
        if complete:
            doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return _split_per_query(doc, out)

    opts = job.options
    opts.device = get_device(opts.device)
    opts.save_dir = job.save_adv
    opts.on_eps = lambda r: atomic_write_json(path, document(r, complete=False))
    res = evaluate_attack(model, query, gallery, spec, threat=threat, protocol=proto, options=opts,
                          sweep=sweep)
    doc = document(dict(res), complete=True)
    atomic_write_json(path, doc)
    return doc, out


PER_QUERY_KEYS = ("per_query", "rr_per_query")


def pop_per_query(doc: dict) -> dict[str, Any]:
    """Move the per-query arrays out of a result's metrics (an attack result's ``runs``, or a clean cell's
    ``clean``) into ``{"clean": ..., "attacked": [one per eps]}``, the ``per_query.json`` side file's form."""
    side: dict[str, Any] = {"clean": None, "attacked": []}
    if isinstance(doc.get("clean"), dict):
        side["clean"] = {k: doc["clean"].pop(k) for k in PER_QUERY_KEYS if k in doc["clean"]}
    for r in doc.get("runs") or []:
        side["clean"] = {k: r["clean"].pop(k) for k in PER_QUERY_KEYS if k in r["clean"]}
        side["attacked"].append({k: r["attacked"].pop(k) for k in PER_QUERY_KEYS if k in r["attacked"]})
    return side


def _split_per_query(doc: dict, out: Path) -> dict:
    """The per-query arrays go to ``per_query.json`` beside ``results.json`` (the document keeps the scores)."""
    import copy

    doc = copy.deepcopy(doc)
    atomic_write_text(out / "per_query.json", json.dumps(pop_per_query(doc), separators=(",", ":")))
    return doc
