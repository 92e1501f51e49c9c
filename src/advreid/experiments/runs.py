"""Evaluating stored runs: ``advreid eval`` (:func:`run_eval`) and ``advreid attack`` (:func:`run_attack`) load a
run's checkpoint and its evaluation protocol, build the dataset, evaluate and write results atomically.

Everything that can be wrong with a request fails before an output folder is created.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from advreid.engine.distributed import barrier
from advreid.evaluation import AttackSpec, EvalProtocol, RunOptions, ThreatModel, evaluate_attack, evaluate_model
from advreid.evaluation.protocol import AUTO
from advreid.evaluation.sharding import BatchStore, ShardPlan, distributed_session, is_main, on_main
from advreid.models import checkpoint_paths, find_checkpoint, load_checkpoint
from advreid.models.external import ModelCard, is_model_spec, load_model_spec
from advreid.ops import SEED_COMPAT
from advreid.utils.io import (
    atomic_write_json,
    atomic_write_text,
    paths_overlap,
    prepare_run_dir,
    sha256_file,
)
from advreid.utils.misc import get_device, jsonable

__all__ = ["AttackJob", "EvalJob", "default_out_dir", "load_run", "reload_model", "run_attack", "run_eval"]


def load_run(source: str | os.PathLike, checkpoint: str | None = None,
             card: ModelCard | None = None) -> tuple[nn.Module, dict]:
    """(model, info) of a run folder's final (else latest) checkpoint (or ``checkpoint``), or of a model spec
    ``KIND:NAME[@WEIGHTS]`` (:mod:`advreid.models.external`): the one resolver, so nothing after it asks where a model
    came from. ``card`` states input size and scoring (and, for a spec, normalisation and feature layer); ``info``
    describes the model (kind, name, weights file and sha256, input size, normalisation) for results."""
    if is_model_spec(source):
        if checkpoint:
            raise ValueError(f"checkpoint={checkpoint!r} applies to run folders; the spec {source} names its weights "
                             "after '@'")
        model = load_model_spec(str(source), card)
        return model, dict(model.description)
    run_dir = Path(source)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    stem = Path(checkpoint) if checkpoint else find_checkpoint(run_dir)
    model = load_checkpoint(stem)
    if card is not None:
        _apply_card(model, card, run_dir)
    doc = model.checkpoint_meta
    meta = doc.get("meta", {})
    weights = checkpoint_paths(stem)[0]
    arch = doc.get("arch") if isinstance(doc.get("arch"), dict) else {}
    info = {"run_dir": str(run_dir), "checkpoint": str(stem), "arch": doc.get("arch"),
            "model_name": meta.get("model_name"), "trained_on": meta.get("dataset"),
            "source": "run", "kind": "advreid", "name": meta.get("model_name") or arch.get("backbone"),
            "weights": str(weights.resolve()), "weights_sha256": sha256_file(weights),
            "input_size": list(meta.get("input_size", [256, 128])),
            "normalization": {"mean": arch.get("mean"), "std": arch.get("std")}}
    return model, info


def _apply_card(model: nn.Module, card: ModelCard, run_dir: Path) -> None:
    """A run's own settings overridden by a card: input size and scoring only (its model owns the rest)."""
    fixed = sorted({"mean", "std", "feature_layer"} & card.stated())
    if fixed:
        raise ValueError(f"{', '.join(fixed)}: apply to model specs; the run {run_dir} has its own model")
    meta = model.checkpoint_meta.setdefault("meta", {})
    if card.input_size is not None:
        meta["input_size"] = list(card.input_size)
    ecfg = meta.setdefault("config", {}).setdefault("eval", {})
    for key in ("metric", "flip", "normalize"):
        if getattr(card, key) is not None:
            ecfg[key] = getattr(card, key)


def reload_model(info: dict) -> nn.Module:
    """The model a results file describes (its ``model`` entry), loaded again; a spec's weights must still have the
    recorded sha256."""
    if info.get("source") != "spec":
        return load_checkpoint(info["checkpoint"])
    norm = info.get("normalization") or {}
    own = {k: info.get(k) for k in ("input_size", "feature_layer", "metric", "flip")}
    own["normalize"] = info.get("normalize_features")
    if "inside_model" not in norm:
        own.update(mean=norm.get("mean"), std=norm.get("std"))
    model = load_model_spec(info["spec"], ModelCard.from_dict({k: v for k, v in own.items() if v is not None}))
    if model.description["weights_sha256"] != info.get("weights_sha256"):
        raise ValueError(f"the weights of {info['spec']} changed since the result was written (sha256 "
                         f"{str(info.get('weights_sha256'))[:12]}... recorded, "
                         f"{str(model.description['weights_sha256'])[:12]}... now)")
    return model


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

    run_dir: Path | str  # a run folder or a model spec KIND:NAME[@WEIGHTS]
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
    card: ModelCard | None = None  # input size / normalisation / feature / scoring of a spec (load_run)
    out: str | None = None  # where results.json goes (default: the run folder; required for a spec)


def run_eval(job: EvalJob) -> dict:
    """Evaluate; append the result to ``run_dir/results.json`` (a damaged file is left as it is and the result saved
    beside it). ``skip_bad_images`` leaves unreadable query/gallery images out, listed under ``skipped_images``.
    Under ``torchrun`` the feature extraction is split over the ranks; rank 0 scores and writes (the other ranks
    return an empty dict)."""
    with distributed_session(job.device) as device:
        return _run_eval(job, device)


def eval_results_path(job: EvalJob) -> Path:
    """``OUT/results.json`` (``job.out``), else the run folder's; a model spec has no run folder: out is needed."""
    if job.out is not None:
        return Path(job.out) / "results.json"
    if is_model_spec(str(job.run_dir)):
        raise ValueError(f"{job.run_dir} is a model spec, not a run folder: give --out DIR for results.json")
    return Path(job.run_dir) / "results.json"


def _run_eval(job: EvalJob, device: Any) -> dict:
    from advreid.data import build_dataset

    path = eval_results_path(job)
    model, info = load_run(job.run_dir, job.checkpoint, job.card)
    meta = model.checkpoint_meta.get("meta", {})
    cfg = _trained_config(model)
    ds_name = job.dataset or cfg.get("data", {}).get("name", "market1501")
    ds = build_dataset(ds_name, job.data)
    dev = device
    model.to(dev)
    proto = EvalProtocol.of_model(model, metric=job.metric, ap=job.ap, flip=job.flip, rerank=job.rerank)
    threat = ThreatModel(defense=job.defense).resolve(model)
    net, _, _ = threat.models(model)
    query, gallery, skipped = _readable(ds.query, ds.gallery, job.skip_bad_images)
    res = evaluate_model(net, query, gallery, proto, device=dev, num_workers=job.num_workers, progress=True)
    if not is_main():
        return {}
    res["shards"] = [{**q, "gallery": g["queries"]} for q, g in  # how the extraction was split over the ranks
                     zip(ShardPlan.current(len(query), proto.batch_size).counts(),
                         ShardPlan.current(len(gallery), proto.batch_size).counts(), strict=True)]
    d = threat.defense
    if skipped is not None:
        res["skipped_images"] = skipped
    res.update({"dataset": ds_name, "data_root": str(job.data), "checkpoint": info["checkpoint"],
                "defense": None if d is None else {"name": d.name, "params": d.params()},
                "trained_on": meta.get("dataset"),
                "cross_domain": _is_cross_domain(ds_name, job.data, meta.get("dataset"),
                                                 cfg.get("data", {}).get("root"))})
    res["model"] = info
    _save_result(path, res)
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
    resume: bool = False
    card: ModelCard | None = None  # of a model spec given as run_dir (input size, normalisation, scoring)


def default_out_dir(run_dir: str | os.PathLike, attack: str, side: str, *, sweep: bool,
                    source_run: str | os.PathLike | None = None, defense: str | None = None) -> Path:
    """``RUN_DIR/attacks/<attack>-<side>[-sweep][-<defense>[-adaptive]][-from-<source run name>]``."""
    if is_model_spec(str(run_dir)):
        raise ValueError(f"{run_dir} is a model spec, not a run folder: give --out DIR for the attack's results")
    name = f"{attack}-{side}" + ("-sweep" if sweep else "") + (f"-{defense}" if defense else "")
    if source_run is not None:
        spec = is_model_spec(str(source_run))  # a spec: its KIND-NAME, file-system safe
        name += "-from-" + (re.sub(r"[^\w.-]+", "-", str(source_run).split("@")[0]) if spec
                            else Path(source_run).resolve().name)
    return Path(run_dir) / "attacks" / name


def _seed_compat(spec: AttackSpec) -> AttackSpec:
    want = SEED_COMPAT
    for key in ("quantize", "reencode"):
        given = getattr(spec, key)
        if given is not None and given != want[key]:
            raise ValueError(f"seed_compat means {key}={want[key]}; it conflicts with {key}={given}")
    return spec.replace(quantize=want["quantize"], reencode=want["reencode"])


def _check_output_dirs(dirs: list[Path], overwrite: bool, dataset_root: Path, resume: bool = False) -> None:
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the result folder or start over")
    for d in dirs:
        if paths_overlap(d, dataset_root):
            raise ValueError(f"output folder {d} is inside (or contains) the dataset folder {dataset_root}: "
                             "choose a folder outside the dataset")
        if d.is_dir() and any(d.iterdir()) and not overwrite and not resume:
            raise FileExistsError(f"output folder {d} already exists and is not empty; pass --resume to continue "
                                  f"it, --overwrite (the old one is kept as {d}.old-N) or choose another --out / "
                                  "--save-adv")


def _attack_request(job: AttackJob, spec: AttackSpec, sweep: list[float] | None, threat: ThreatModel,
                    model_info: dict, ds_name: str) -> dict:
    """Everything that decides the attacked images and features (not how the run is executed, nor re-ranking):
    a run resumes only with the same request."""
    return jsonable({"attack": spec.to_dict(), "sweep": sweep, "seed_compat": job.seed_compat,
                     "dataset": {"name": ds_name, "root": str(Path(job.data).resolve())}, "model": model_info,
                     "threat": threat.to_dict(), "max_images": job.max_images,
                     "batch_size": job.options.batch_size, "skip_bad_images": job.skip_bad_images,
                     "save_adv": None if job.save_adv is None else str(Path(job.save_adv).resolve())})


def _is_complete(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("complete") is True
    except (OSError, ValueError, AttributeError):
        return False


def _prepare_attack_dirs(dirs: list[Path], job: AttackJob, request: dict) -> None:
    """Create (or, resuming, reuse) the output folders; record the request under ``OUT/shards/request.json`` and
    refuse to resume a folder started by another one (rank 0 only: :func:`advreid.evaluation.sharding.on_main`)."""
    for folder in dirs:
        if job.resume:
            folder.mkdir(parents=True, exist_ok=True)
        else:
            prepare_run_dir(folder, overwrite=job.overwrite)
    path = dirs[0] / "shards" / "request.json"
    if job.resume and _is_complete(dirs[0] / "results.json"):
        raise FileExistsError(f"{dirs[0]} holds a complete result, there is nothing to resume; pass --overwrite to "
                              "compute it again (the old one is kept as .old-N)")
    if job.resume and path.is_file():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            before = None
        if before != request:
            keys = sorted(k for k in {*request, *(before or {})} if (before or {}).get(k) != request.get(k))
            raise ValueError(f"cannot resume {dirs[0]}: it was started with another request (differs in: "
                             f"{', '.join(keys)}); resume with the same arguments, or pass --overwrite")
    atomic_write_json(path, request)


def run_attack(job: AttackJob) -> tuple[dict, Path]:
    """Load the run(s), attack, write ``<out>/results.json`` (atomically, after each eps); return (results, out).

    Under ``torchrun`` the attacked batches and the feature extraction are split over the ranks and rank 0 writes
    the one result (the others return ``({}, out)``); finished batches are kept under ``<out>/shards`` until the
    run completes, so ``job.resume`` continues a killed run, with any number of ranks (docs/sharding.md)."""
    with distributed_session(job.options.device) as device:
        return _run_attack(job, device)


def _run_attack(job: AttackJob, device: Any) -> tuple[dict, Path]:
    from advreid.data import build_dataset

    spec = _seed_compat(job.attack) if job.seed_compat else job.attack
    model, target = load_run(job.run_dir, card=job.card)
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
    _check_output_dirs(dirs, job.overwrite, Path(job.data), job.resume)
    query, gallery, skipped = _readable(ds.query, ds.gallery, job.skip_bad_images)
    request = _attack_request(job, spec, sweep, threat, {"target": target, "source": src_info}, ds_name)
    barrier()  # every rank has checked the folders before rank 0 creates them
    on_main(_prepare_attack_dirs, dirs, job, request)
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
    opts.device = device
    opts.save_dir = job.save_adv
    opts.batch_store = BatchStore(out / "shards", key=json.dumps(request, sort_keys=True))
    opts.on_eps = lambda r: atomic_write_json(path, document(r, complete=False))  # called on rank 0 only
    res = evaluate_attack(model, query, gallery, spec, threat=threat, protocol=proto, options=opts,
                          sweep=sweep)
    if not is_main():
        return {}, out
    doc = document(dict(res), complete=True)
    atomic_write_json(path, doc)
    shutil.rmtree(out / "shards", ignore_errors=True)  # complete: the result holds everything
    return doc, out


PER_QUERY_KEYS = ("per_query", "rr_per_query")


def pop_per_query(doc: dict) -> dict[str, Any]:
    """Move the per-query arrays out of a result's metrics (an attack result's ``runs``, or a clean cell's
    ``clean``) into ``{"clean": ..., "attacked": [one per eps]}``, the ``per_query.json`` side file's form."""
    side: dict[str, Any] = {"clean": None, "attacked": []}
    if isinstance(doc.get("clean"), dict):
        side["clean"] = {k: doc["clean"].pop(k) for k in PER_QUERY_KEYS if k in doc["clean"]}
    for r in doc.get("runs") or []:  # the eps of a sweep share one clean dict: popped once, kept
        side["clean"] = {k: r["clean"].pop(k) for k in PER_QUERY_KEYS if k in r["clean"]} or side["clean"]
        side["attacked"].append({k: r["attacked"].pop(k) for k in PER_QUERY_KEYS if k in r["attacked"]})
    return side


def _split_per_query(doc: dict, out: Path) -> dict:
    """The per-query arrays go to ``per_query.json`` beside ``results.json`` (the document keeps the scores)."""
    import copy

    doc = copy.deepcopy(doc)
    atomic_write_text(out / "per_query.json", json.dumps(pop_per_query(doc), separators=(",", ":")))
    return doc
