"""The training loop: PK-sampled batches, CE + triplet, AMP, per-epoch atomic checkpoints, exact resume, DDP.

Defense hooks: a proactive defense (``defense.proactive``, a batch transform applied on the device before the
forward), online adversarial training (``adv.method=goat``: each batch replaced by GOAT adversarial examples) and
offline adversarial training (``adv.method=offline``: a frozen source run attacks the training set once). Every
per-step random draw of these hooks comes from a CPU generator seeded from (seed, epoch, step, rank), so resume
stays bit-exact.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, RandomSampler

from advreid.config import ConfigError, dump_config, load_config
from advreid.data import (
    DistributedPKSampler,
    ImageDataset,
    PKSampler,
    build_dataset,
    build_transforms,
    check_images,
)
from advreid.defenses.adv_training import build_goat, prepare_offline_adv, resolve_adv
from advreid.engine.optim import build_optimizer, build_scheduler
from advreid.losses import ReIDLoss
from advreid.models import build_model, find_checkpoint, read_checkpoint, save_checkpoint
from advreid.ops import batch_generator
from advreid.utils.io import append_jsonl, atomic_write_text, prepare_run_dir
from advreid.utils.misc import get_device


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    epochs: int
    history: list[dict] = field(default_factory=list)


def _dist_info() -> tuple[int, int, int]:
    """(world_size, rank, local_rank) from torchrun's environment (1, 0, 0 when not distributed)."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    return ws, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def _rng_state() -> dict:
    st = {
        "torch": torch.get_rng_state(),
        "numpy": _np_state_to_tree(np.random.get_state()),
        "python": _py_state_to_tree(random.getstate()),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(_np_state_from_tree(st["numpy"]))
    random.setstate(_py_state_from_tree(st["python"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _np_state_to_tree(s: tuple) -> dict:
    return {"name": s[0], "keys": torch.from_numpy(s[1].astype(np.int64)), "pos": int(s[2]),
            "has_gauss": int(s[3]), "gauss": float(s[4])}


def _np_state_from_tree(t: dict) -> tuple:
    return (t["name"], t["keys"].numpy().astype(np.uint32), t["pos"], t["has_gauss"], t["gauss"])


def _py_state_to_tree(s: tuple) -> dict:
    return {"version": s[0], "state": torch.tensor(s[1], dtype=torch.int64), "gauss": s[2]}


def _py_state_from_tree(t: dict) -> tuple:
    return (t["version"], tuple(int(v) for v in t["state"].tolist()), t["gauss"])


def _model_kwargs(mcfg: dict) -> dict:
    return {k: v for k, v in mcfg.items() if k != "name" and v is not None}


def _log(msg: str, rank: int) -> None:
    if rank == 0:
        print(msg, flush=True)


def _build_proactive(dcfg: dict) -> torch.nn.Module | None:
    """The proactive defense of ``defense.proactive`` / ``defense.proactive_params`` (None when unset/"none")."""
    name = dcfg.get("proactive")
    params = dcfg.get("proactive_params")
    if name is None or (isinstance(name, str) and name.lower() == "none"):
        return None
    if not isinstance(name, str):
        raise ConfigError(f"config key 'defense.proactive' = {name!r}; expected a preset name such as 'reference'")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"config key 'defense.proactive_params' = {params!r}; expected a mapping of parameters")
    from advreid.defenses.proactive import build_proactive

    try:
        return build_proactive(name, params)
    except (KeyError, TypeError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise ConfigError(f"config key 'defense.proactive' = {name!r}: {msg}") from None


def train(
    cfg: dict | str | Path,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    overrides: list[str] | None = None,
) -> TrainResult:
    """Train a ReID model as configured; writes config.yaml, metrics.jsonl and checkpoints into ``run_dir``.

    Under ``torchrun`` (WORLD_SIZE > 1) trains with DistributedDataParallel; only rank 0 writes.
    """
    world, rank, local_rank = _dist_info()
    run_dir = Path(run_dir)
    if resume:
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {saved} not found; is {run_dir} a run directory?")
        cfg = load_config(saved, overrides)
    elif not isinstance(cfg, dict) or overrides:
        cfg = load_config(cfg, overrides)
    else:
        cfg = load_config(cfg)

    if cfg["data"]["root"] is None:
        raise ValueError("data.root is not set: pass data.root=PATH (a dataset folder) or --data PATH")
    cfg["data"]["root"] = str(Path(cfg["data"]["root"]).resolve())  # so a resume from elsewhere finds it
    adv = resolve_adv(cfg)  # a bad adv.* setting fails here, before the run directory is touched
    if adv is not None and adv["method"] == "offline":
        cfg["adv"]["source_run"] = adv["source_run"]
    proactive = _build_proactive(cfg["defense"])

    distributed = world > 1
    if distributed and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and cfg["device"] != "cpu" else "gloo"
        dist.init_process_group(backend)
    if distributed and torch.cuda.is_available() and cfg["device"] != "cpu":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = get_device(cfg["device"])

    if rank == 0:
        prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
        if not resume or overrides:
            atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    if distributed:
        dist.barrier()

    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)

    dcfg = cfg["data"]
    ds = build_dataset(dcfg["name"], dcfg["root"], train_all=dcfg["train_all"])
    train_records, bad = check_images(ds.train, skip_bad=dcfg["skip_bad_images"])
    if bad:
        _log(f"skipped {len(bad)} unreadable training image(s) (data.skip_bad_images=true)", rank)
    num_classes = ds.num_train_pids
    tcfg = cfg["transforms"]
    transform = build_transforms(
        dcfg["height"], dcfg["width"], is_train=True, flip_p=tcfg["flip_p"], pad=tcfg["pad"],
        random_erasing_p=tcfg["random_erasing_p"],
    )
    scfg = cfg["sampler"]
    batch_size = scfg["p"] * scfg["k"] if scfg["type"] == "pk" else scfg["batch_size"]
    adv_info: dict | None = None
    if adv is not None and adv["method"] == "offline":
        adv_records, adv_info = prepare_offline_adv(
            adv, run_dir, train_records, height=dcfg["height"], width=dcfg["width"], device=device,
            batch_size=batch_size, seed=seed, num_workers=dcfg["num_workers"], rank=rank, world=world,
            log=lambda m: _log(m, rank))
        clean = list(train_records)
        train_records = clean + adv_records if adv["mix"] == "union" else adv_records
        adv_info["train_images"] = {"clean": len(clean) if adv["mix"] == "union" else 0,
                                    "adversarial": len(adv_records)}
        _log(f"offline AT ({adv['mix']}): training on {len(train_records)} images", rank)
    train_set = ImageDataset(train_records, transform)

    pids = [r.pid for r in train_records]
    if scfg["type"] == "pk":
        if distributed:
            sampler = DistributedPKSampler(pids, p=scfg["p"], k=scfg["k"], seed=seed, num_replicas=world, rank=rank)
        else:
            sampler = PKSampler(pids, p=scfg["p"], k=scfg["k"], seed=seed)
        batch_size = scfg["p"] * scfg["k"]
    else:
        if distributed:
            sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, seed=seed)
        else:
            sampler = None
        batch_size = scfg["batch_size"]

    mcfg = cfg["model"]
    model = build_model(mcfg["name"], num_classes, **_model_kwargs(mcfg)).to(device)
    channels_last = bool(cfg["train"]["channels_last"]) and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda" and cfg["train"]["cudnn_benchmark"]:
        torch.backends.cudnn.benchmark = True

    adversary = None
    if adv is not None and adv["method"] == "goat":
        adversary = build_goat(model, adv, amp=bool(cfg["train"]["amp"]) and device.type == "cuda")
        adv_info = adversary.params()
    if isinstance(proactive, torch.nn.Module):
        proactive = proactive.to(device)

    lcfg = cfg["loss"]
    criterion = ReIDLoss(
        num_classes, ce_weight=lcfg["ce_weight"], triplet_weight=lcfg["triplet_weight"],
        label_smooth=lcfg["label_smooth"], margin=lcfg["margin"],
    )
    optimizer = build_optimizer(model, cfg["optim"])
    epochs = int(cfg["train"]["epochs"])
    scheduler = build_scheduler(optimizer, cfg["sched"], epochs)
    use_amp = bool(cfg["train"]["amp"]) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch = 0
    history: list[dict] = []
    if resume:
        stem = find_checkpoint(run_dir, which="latest")
        state, doc, ts = read_checkpoint(stem)
        model.load_state_dict(state)
        model.train()
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        if ts.get("scaler"):
            scaler.load_state_dict(ts["scaler"])
        _set_rng_state(ts["rng"])
        start_epoch = int(doc["meta"]["epoch"])
        _log(f"resuming {run_dir} after epoch {start_epoch}/{epochs} ({stem.name})", rank)
        if start_epoch >= epochs:
            _log("nothing to do: training already finished", rank)

    net = model
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None
        )

    metrics_path = run_dir / "metrics.jsonl"
    ckpt_dir = run_dir / "checkpoints"
    last_stem = find_checkpoint(run_dir, "latest") if resume else None
    meta_base = {
        "model_name": mcfg["name"],
        "dataset": dcfg["name"],
        "num_classes": num_classes,
        "input_size": [dcfg["height"], dcfg["width"]],
        "num_train_images": len(train_records),
        "adv_training": adv_info,
        "defense": {"proactive": cfg["defense"]["proactive"], "proactive_params": cfg["defense"]["proactive_params"]},
    }
    max_iters = cfg["train"]["max_iters_per_epoch"]
    for epoch in range(start_epoch, epochs):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        loader_gen = torch.Generator()
        loader_gen.manual_seed(seed * 100_003 + epoch)
        loader = DataLoader(
            train_set, batch_size=batch_size, sampler=sampler if sampler is not None else RandomSampler(
                train_set, generator=loader_gen), num_workers=dcfg["num_workers"],
            drop_last=scfg["drop_last"] if scfg["type"] != "pk" else True, pin_memory=device.type == "cuda",
            generator=loader_gen, persistent_workers=False,
        )
        n_batches = len(loader) if max_iters is None else min(len(loader), int(max_iters))
        if n_batches == 0:
            raise ValueError(
                f"no training batch: {len(train_records)} images, batch size {batch_size} "
                f"(sampler {scfg['type']}); lower sampler.p/k/batch_size"
            )
        model.train()
        t0 = time.perf_counter()
        sums = {"loss": 0.0, "ce": 0.0, "triplet": 0.0, "acc": 0.0}
        n_img = 0
        bar = None
        it = iter(loader)
        if rank == 0 and cfg["train"]["progress"]:
            from tqdm import tqdm

            bar = tqdm(total=n_batches, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True,
                       disable=None)
        for step in range(n_batches):
            imgs, labels, _camids, _idx = next(it)
            imgs = imgs.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if proactive is not None:
                with torch.no_grad():
                    imgs = proactive(imgs, generators=batch_generator(seed, epoch, step, rank, "proactive"))
            if channels_last:
                imgs = imgs.contiguous(memory_format=torch.channels_last)
            if adversary is not None:  # GOAT: the batch is replaced by its adversarial version (no clean term)
                imgs = adversary(imgs, labels, generator=batch_generator(seed, epoch, step, rank, "goat"))
                if channels_last:
                    imgs = imgs.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                out = net(imgs)
            loss, parts = criterion({k: (v.float() if v is not None else None) for k, v in out.items()}, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            bs = imgs.shape[0]
            n_img += bs
            sums["loss"] += parts["total"] * bs
            sums["ce"] += parts.get("ce", 0.0) * bs
            sums["triplet"] += parts.get("triplet", 0.0) * bs
            sums["acc"] += parts.get("acc", 0.0) * bs
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{sums['loss'] / n_img:.3f}",
                                img_s=f"{n_img * world / (time.perf_counter() - t0):.0f}")
            del step
        if bar is not None:
            bar.close()
        scheduler.step()
        elapsed = time.perf_counter() - t0
        rec = {
            "epoch": epoch + 1,
            **{k: v / max(n_img, 1) for k, v in sums.items()},
            "lr": [g["lr"] for g in optimizer.param_groups],
            "time_s": round(elapsed, 3),
            "images_per_s": round(n_img * world / elapsed, 2),
        }
        eval_every = int(cfg["train"]["eval_every"] or 0)
        if rank == 0 and eval_every and (epoch + 1) % eval_every == 0 and epoch + 1 < epochs:
            from advreid.evaluation import evaluate_model

            res = evaluate_model(model, ds.query, ds.gallery, **_eval_kwargs(cfg, device))
            rec["eval"] = res
            model.train()
        history.append(rec)
        if rank == 0:
            append_jsonl(metrics_path, rec)
            train_state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if use_amp else {},
                "rng": _rng_state(),
            }
            stem = ckpt_dir / f"epoch_{epoch + 1:03d}"
            save_checkpoint(stem, model, meta={**meta_base, "epoch": epoch + 1, "config": cfg,
                                               "metrics": rec}, train_state=train_state)
            keep = int(cfg["train"]["keep_every"] or 0)
            if last_stem is not None and last_stem != stem:
                prev_epoch = int(last_stem.name.split("_")[1])
                if not (keep and prev_epoch % keep == 0):
                    for suf in (".json", ".safetensors"):  # json first: a stem without json is ignored
                        Path(f"{last_stem}{suf}").unlink(missing_ok=True)
            last_stem = stem
            msg = (f"epoch {epoch + 1}/{epochs}  loss {rec['loss']:.4f}  ce {rec['ce']:.4f}  "
                   f"tri {rec['triplet']:.4f}  acc {rec['acc']:.3f}  {rec['images_per_s']:.0f} img/s")
            if "eval" in rec:
                msg += f"  R1 {rec['eval']['rank1']:.3f} mAP {rec['eval']['mAP']:.3f}"
            _log(msg, rank)
    final = ckpt_dir / "final"
    if rank == 0 and epochs > 0:
        save_checkpoint(final, model, meta={**meta_base, "epoch": epochs, "config": cfg,
                                            "metrics": history[-1] if history else {}})
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(run_dir=run_dir, checkpoint=final, epochs=epochs, history=history)


def _eval_kwargs(cfg: dict, device: torch.device) -> dict:
    e = cfg["eval"]
    d = cfg["data"]
    return {
        "metric": e["metric"], "normalize": e["normalize"], "flip": e["flip"], "rerank": e["rerank"],
        "ap": e["ap"], "batch_size": e["batch_size"], "height": d["height"], "width": d["width"],
        "device": device, "num_workers": d["num_workers"],
    }
