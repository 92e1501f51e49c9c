"""Training recipes: a config turned into a :class:`~advreid.engine.Trainer` with its hooks, and run.

:func:`train` is the one entry point (``advreid train`` calls it). It resolves and validates everything first --
config, dataset, model, defenses, adversarial training, the checkpoint a resume starts from -- and only then touches
the run folder, so a bad request leaves no folder behind (or the folder exactly as it was). The recipe is composed
from config sections: ``defense.proactive`` -> :class:`~advreid.defenses.hooks.ProactiveHook`; ``adv.method=goat``
-> :class:`~advreid.defenses.hooks.AdversarialBatchHook` with GOAT; ``adv.method=offline`` -> the adversarial
training images joined to the data; ``train.eval_every`` -> :class:`~advreid.engine.PeriodicEval` with
:func:`advreid.evaluation.evaluate_model`; ``train.step`` -> a registered training step (:data:`TRAIN_STEPS`).
Extra hooks and a custom step can be passed from Python without editing advreid.

Run folders: a folder with a checkpoint is never reused silently (``resume`` or ``overwrite``, not both); a folder
that holds a config but no checkpoint (a start that failed or was killed before its first epoch) is started over by
the same command, with or without ``resume``; on resume, metrics rows after the checkpoint's epoch are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advreid.config import ConfigError, dump_config, load_config
from advreid.data import DistributedPKSampler, ImageDataset, PKSampler, build_dataset, build_transforms, check_images
from advreid.engine import (
    Checkpointer,
    ConsoleLogger,
    DistInfo,
    HookBase,
    PeriodicEval,
    ProgressBar,
    TrainData,
    Trainer,
    TrainerOptions,
    build_optimizer,
    build_scheduler,
    dist_info,
)
from advreid.engine.distributed import barrier, setup_device, teardown, wrap_ddp
from advreid.losses import ReIDLoss
from advreid.models import CheckpointMismatchError, ReIDNet, build_model, find_checkpoint, read_checkpoint
from advreid.registry import Preset, Registry, RegistryError, did_you_mean
from advreid.utils.io import atomic_write_text, prepare_run_dir
from advreid.utils.misc import seed_everything

__all__ = ["TRAIN_STEPS", "TrainResult", "TrainingRun", "build_trainer", "check_train_config", "register_train_step",
           "train"]

# Training steps selectable by ``train.step`` (``train.step_params`` override the preset). A step is a callable
# ``step(trainer) -> loss parts``; the builder receives the resolved config and the model.
TRAIN_STEPS: Registry[Preset] = Registry("training step")


def register_train_step(name: str, builder: Callable[..., Callable], *, overwrite: bool = False,
                        allowed: Sequence[str] | None = None, **defaults: Any) -> None:
    """Register ``builder(cfg, **params) -> step`` under ``name`` (selected by ``train.step=name``); the step is a
    callable ``step(trainer) -> loss parts`` that replaces :func:`advreid.engine.standard_step`. ``allowed``: the
    ``train.step_params`` keys it accepts, when the builder takes ``**params`` (default: its signature's)."""
    TRAIN_STEPS.add_preset(name, builder, skip=1, overwrite=overwrite, allowed=allowed, **defaults)


@dataclass
class TrainResult:
    """What :func:`train` returns: the run folder, its final checkpoint stem, the epochs and this call's rows."""

    run_dir: Path
    checkpoint: Path
    epochs: int
    history: list[dict] = field(default_factory=list)


def _log(msg: str, info: DistInfo) -> None:
    if info.rank == 0:
        print(msg, flush=True)


# ---------------------------------------------------------------------------------------------- the request
def _resolve_config(cfg: dict | str | Path | None, run_dir: Path, resume: bool,
                    overrides: list[str] | None) -> dict:
    """The resolved, validated config of the request (nothing is written)."""
    if resume:
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"--resume: {saved} not found; is {run_dir} a run directory?")
        cfg = load_config(saved, overrides)
    else:
        cfg = load_config(cfg, overrides) if not isinstance(cfg, dict) or overrides else load_config(cfg)
    if cfg["data"]["root"] is None:
        raise ValueError("data.root is not set: pass data.root=PATH (a dataset folder) or --data PATH")
    root = Path(cfg["data"]["root"]).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data.root {str(root)!r} does not exist")
    cfg["data"]["root"] = str(root.resolve())  # so a resume from elsewhere finds it
    epochs = cfg["train"]["epochs"]
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"config key 'train.epochs' = {epochs!r}; expected an integer >= 1")
    return cfg


def _folder_state(run_dir: Path) -> tuple[bool, Path | None]:
    """(non-empty folder, latest checkpoint stem or None)."""
    if not run_dir.is_dir():
        return False, None
    try:
        stem = find_checkpoint(run_dir, "latest")
    except FileNotFoundError:
        stem = None
    return any(run_dir.iterdir()), stem


def _check_folder(run_dir: Path, resume: bool, overwrite: bool) -> Path | None:
    """Refuse what would lose work; return the checkpoint a resume continues from (None: start from scratch)."""
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: resume continues the run in place, overwrite "
                         "starts over (keeping the old folder as .old-N); pass one of them")
    nonempty, stem = _folder_state(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"run directory {run_dir} exists and is not a directory")
    if resume or not nonempty or overwrite:
        return stem if resume else None
    if stem is None and (run_dir / "config.yaml").is_file():
        return None  # a start that failed before its first checkpoint: the same command starts it over
    raise FileExistsError(f"run directory {run_dir} already exists and is not empty; pass --resume to continue it or "
                          "--overwrite to start over (the old one is kept as .old-N)")


def check_train_config(source: dict | str | Path | None, overrides: list[str] | None = None) -> dict:
    """Resolve a training config and check every name in it against its registry (model, proactive defense,
    adversarial training and its attack, training step) without touching data; the resolved config."""
    from advreid.defenses import resolve_adv
    from advreid.models import BACKBONES, MODELS

    cfg = load_config(source, overrides)
    name = cfg["model"]["name"]
    if name not in MODELS and name not in BACKBONES:
        raise RegistryError(f"config key 'model.name' = {name!r}: unknown model"
                            f"{did_you_mean(name, MODELS.names() + BACKBONES.names())}")
    (MODELS.get(name) if name in MODELS else Preset("model", name, ReIDNet, exclude=("num_classes",))).check(
        _model_kwargs(cfg["model"]))
    _proactive(cfg["defense"])
    resolve_adv(cfg, check_source=False)
    _configured_step(cfg)
    epochs = cfg["train"]["epochs"]
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"config key 'train.epochs' = {epochs!r}; expected an integer >= 1")
    return cfg


# ------------------------------------------------------------------------------------------------- pieces
def _proactive(dcfg: dict) -> nn.Module | None:
    """The proactive defense of ``defense.proactive`` / ``defense.proactive_params`` (None when unset/"none")."""
    from advreid.defenses import build_proactive

    name, params = dcfg.get("proactive"), dcfg.get("proactive_params")
    if name is None or (isinstance(name, str) and name.lower() == "none"):
        return None
    if not isinstance(name, str):
        raise ConfigError(f"config key 'defense.proactive' = {name!r}; expected a preset name such as 'reference'")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"config key 'defense.proactive_params' = {params!r}; expected a mapping of parameters")
    try:
        return build_proactive(name, params)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"config key 'defense.proactive' = {name!r}: {e}") from None


def _model_kwargs(mcfg: dict) -> dict:
    return {k: v for k, v in mcfg.items() if k != "name" and v is not None}


def _sampler(cfg: dict, pids: list[int], info: DistInfo, dataset: ImageDataset) -> tuple[Any, int, bool]:
    """(sampler or None, batch size, drop_last) of the ``sampler`` section."""
    s, seed = cfg["sampler"], int(cfg["seed"])
    if s["type"] == "pk":
        if info.distributed:
            return DistributedPKSampler(pids, p=s["p"], k=s["k"], seed=seed, num_replicas=info.world,
                                        rank=info.rank), s["p"] * s["k"], True
        return PKSampler(pids, p=s["p"], k=s["k"], seed=seed), s["p"] * s["k"], True
    sampler = None
    if info.distributed:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=info.world, rank=info.rank, seed=seed)
    return sampler, s["batch_size"], s["drop_last"]


@dataclass
class TrainingRun:
    """Everything a run needs, built and validated before the run folder is touched (see :func:`build_trainer`)."""

    cfg: dict
    info: DistInfo
    device: torch.device
    dataset: Any
    records: list
    model: nn.Module
    trainer: Trainer
    adv: dict | None
    proactive: nn.Module | None
    resume_from: Path | None


def build_trainer(cfg: dict, *, resume_from: Path | None = None, step: Callable | None = None,
                  info: DistInfo | None = None) -> TrainingRun:
    """Seed, read the dataset, build the model, loss, optimizer, schedule and the :class:`Trainer` of a resolved
    config, and load the checkpoint ``resume_from`` into them (a mismatch is an error here, before any write).
    The trainer has no data and no hooks yet (:func:`train` adds them)."""
    from advreid.defenses import resolve_adv

    info = info or dist_info()
    adv = resolve_adv(cfg)  # a bad adv.* setting fails here
    if adv is not None and adv["method"] == "offline":
        cfg["adv"]["source_run"] = adv["source_run"]
    proactive = _proactive(cfg["defense"])
    step = step or _configured_step(cfg)
    device = setup_device(info, cfg["device"])
    seed = int(cfg["seed"])
    seed_everything(seed)
    dcfg = cfg["data"]
    ds = build_dataset(dcfg["name"], dcfg["root"], train_all=dcfg["train_all"])
    records, bad = check_images(ds.train, skip_bad=dcfg["skip_bad_images"])
    if bad:
        _log(f"skipped {len(bad)} unreadable training image(s) (data.skip_bad_images=true)", info)
    model = build_model(cfg["model"]["name"], ds.num_train_pids, **_model_kwargs(cfg["model"])).to(device)
    tcfg = cfg["train"]
    if bool(tcfg["channels_last"]) and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda" and tcfg["cudnn_benchmark"]:
        torch.backends.cudnn.benchmark = True
    lcfg = cfg["loss"]
    criterion = ReIDLoss(ds.num_train_pids, ce_weight=lcfg["ce_weight"], triplet_weight=lcfg["triplet_weight"],
                         label_smooth=lcfg["label_smooth"], margin=lcfg["margin"])
    optimizer = build_optimizer(model, cfg["optim"])
    scheduler = build_scheduler(optimizer, cfg["sched"], int(tcfg["epochs"]))
    options = TrainerOptions(epochs=int(tcfg["epochs"]), seed=seed, amp=bool(tcfg["amp"]),
                             channels_last=bool(tcfg["channels_last"]), max_iters_per_epoch=tcfg["max_iters_per_epoch"],
                             rank=info.rank, world=info.world)
    trainer = Trainer(model, optimizer, scheduler, None, criterion, options, device=device,  # type: ignore[arg-type]
                      net=wrap_ddp(model, info, device), step=step)
    if resume_from is not None:
        state, doc, ts = read_checkpoint(resume_from)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            first = " ".join(str(e).split())[:300]
            raise CheckpointMismatchError(f"cannot resume from {resume_from}: the model built from the config "
                                          f"(model.name={cfg['model']['name']}) does not match the checkpoint: "
                                          f"{first}") from None
        trainer.load_train_state(ts, int(doc["meta"]["epoch"]))
    return TrainingRun(cfg, info, device, ds, records, model, trainer, adv, proactive, resume_from)


def _configured_step(cfg: dict) -> Callable | None:
    name = cfg["train"].get("step") or "standard"
    if name == "standard":
        return None
    params = cfg["train"].get("step_params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config key 'train.step_params' = {params!r}; expected a mapping")
    try:
        return TRAIN_STEPS.get(name)(cfg, **params)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"config key 'train.step' = {name!r}: {e}") from None


# ------------------------------------------------------------------------------------------------ the data
def _train_data(p: TrainingRun, run_dir: Path) -> tuple[TrainData, dict | None]:
    """The training data (with offline adversarial images when configured) and the adversarial-training info."""
    cfg, info = p.cfg, p.info
    dcfg, tcfg = cfg["data"], cfg["transforms"]
    records, adv_info = list(p.records), None
    batch = cfg["sampler"]["p"] * cfg["sampler"]["k"] if cfg["sampler"]["type"] == "pk" else \
        cfg["sampler"]["batch_size"]
    if p.adv is not None and p.adv["method"] == "offline":
        from advreid.defenses import prepare_offline_adv

        with torch.random.fork_rng(devices=[]):  # the attacks' loaders must not shift the training RNG stream
            adv_records, adv_info = prepare_offline_adv(
                p.adv, run_dir, records, height=dcfg["height"], width=dcfg["width"], device=p.device,
                batch_size=batch, seed=int(cfg["seed"]), num_workers=dcfg["num_workers"], rank=info.rank,
                world=info.world, log=lambda m: _log(m, info))
        clean = records
        records = clean + adv_records if p.adv["mix"] == "union" else adv_records
        adv_info["train_images"] = {"clean": len(clean) if p.adv["mix"] == "union" else 0,
                                    "adversarial": len(adv_records)}
        _log(f"offline AT ({p.adv['mix']}): training on {len(records)} images", info)
    transform = build_transforms(dcfg["height"], dcfg["width"], is_train=True, flip_p=tcfg["flip_p"],
                                 pad=tcfg["pad"], random_erasing_p=tcfg["random_erasing_p"])
    dataset = ImageDataset(records, transform)
    sampler, batch_size, drop_last = _sampler(cfg, [r.pid for r in records], info, dataset)
    data = TrainData(dataset, batch_size, sampler, num_workers=dcfg["num_workers"], drop_last=drop_last,
                     seed=int(cfg["seed"]))
    return data, adv_info


def _hooks(p: TrainingRun, run_dir: Path, adv_info: dict | None, extra: Sequence[HookBase],
           previous_last: Path | None) -> list[HookBase]:
    """The recipe's hooks in order: defenses, the caller's hooks, evaluation, checkpoints, progress and log."""
    from advreid.defenses import AdversarialBatchHook, GuidePool, ProactiveHook, build_goat

    cfg = p.cfg
    hooks: list[HookBase] = [ProgressBar()] if cfg["train"]["progress"] else []
    if p.proactive is not None:
        hooks.append(ProactiveHook(p.proactive))
    if p.adv is not None and p.adv["method"] == "goat":
        goat = build_goat(p.model, p.adv, amp=p.trainer.use_amp)
        pool = None
        if p.adv["guides"] == "pool" and p.adv["push"] > 0:
            pool = GuidePool(p.trainer.data.dataset.records, cfg["data"]["height"], cfg["data"]["width"],
                             draws=p.adv["push"])
        guides = (f"pool: {p.adv['push']} draws per sample with replacement from the training images of its identity"
                  if pool is not None else "batch: same-identity batch-mates")
        adv_info = goat.params() | {"method": "goat", "attack_mode": p.adv["attack_mode"], "guides": guides}
        hooks.append(AdversarialBatchHook(goat, pool=pool))
    hooks.extend(extra)
    every = int(cfg["train"]["eval_every"] or 0)
    if every:
        hooks.append(PeriodicEval(_evaluator(p), every))
    meta = {"model_name": cfg["model"]["name"], "dataset": cfg["data"]["name"],
            "num_classes": p.dataset.num_train_pids, "input_size": [cfg["data"]["height"], cfg["data"]["width"]],
            "num_train_images": len(p.trainer.data.dataset), "adv_training": adv_info,
            "defense": {"proactive": cfg["defense"]["proactive"],
                        "proactive_params": cfg["defense"]["proactive_params"]}, "config": cfg}
    hooks.append(Checkpointer(run_dir, meta, keep_every=int(cfg["train"]["keep_every"] or 0), last=previous_last))
    hooks.append(ConsoleLogger(lambda m: _log(m, p.info)))
    return hooks


def _evaluator(p: TrainingRun) -> Callable[[nn.Module], dict]:
    """The evaluation of ``train.eval_every``. Its test images are decoded once here, before the first epoch: an
    unreadable one stops the run now, naming the file, or (``data.skip_bad_images``) is left out with a count. A
    failure later on is a warning from :class:`PeriodicEval`, never a lost epoch."""
    from advreid.evaluation import EvalProtocol, evaluate_model

    e, d = p.cfg["eval"], p.cfg["data"]
    proto = EvalProtocol(metric=e["metric"], normalize=e["normalize"], flip=e["flip"], rerank=e["rerank"],
                         ap=e["ap"], batch_size=e["batch_size"], height=d["height"], width=d["width"])
    query, gallery = p.dataset.query, p.dataset.gallery
    if p.info.rank == 0:  # the only rank that evaluates
        query, bad_q = check_images(query, skip_bad=d["skip_bad_images"])
        gallery, bad_g = check_images(gallery, skip_bad=d["skip_bad_images"])
        if bad_q or bad_g:
            _log(f"skipped {len(bad_q) + len(bad_g)} unreadable test image(s) in the periodic evaluation "
                 f"({len(bad_q)} query, {len(bad_g)} gallery; data.skip_bad_images=true)", p.info)

    def evaluate(model: nn.Module) -> dict:
        res = evaluate_model(model, query, gallery, proto, device=p.device, num_workers=d["num_workers"])
        res.pop("per_query", None)  # a metrics row (and its checkpoint's meta) keeps metrics, not every query
        return res

    return evaluate


# --------------------------------------------------------------------------------------------- the command
def train(cfg: dict | str | Path | None, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          overrides: list[str] | None = None, hooks: Sequence[HookBase] = (),
          step: Callable[[Trainer], dict] | None = None) -> TrainResult:
    """Train a ReID model as configured into ``run_dir`` (config.yaml, metrics.jsonl, checkpoints/).

    ``hooks`` are added to the recipe's (after the defenses, before evaluation and checkpointing); ``step``
    replaces the training step. Under ``torchrun`` (WORLD_SIZE > 1) trains with DDP; only rank 0 writes.
    """
    run_dir = Path(run_dir)
    resume_from = _check_folder(run_dir, resume, overwrite)
    cfg = _resolve_config(cfg, run_dir, resume, overrides)
    p = build_trainer(cfg, resume_from=resume_from, step=step)
    start = p.trainer.start_epoch
    if p.info.rank == 0:
        if resume:
            if resume_from is None:
                _log(f"{run_dir} has no checkpoint yet: starting its training from the beginning", p.info)
            if overrides:  # validated above: the checkpoint loaded into the model the new config builds
                atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
            Checkpointer.truncate_metrics(run_dir / "metrics.jsonl", start)
        else:
            if run_dir.is_dir() and not overwrite and any(run_dir.iterdir()):
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a failed start, started over
            else:
                prepare_run_dir(run_dir, overwrite=overwrite)
            atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    barrier()
    if resume_from is not None:
        _log(f"resuming {run_dir} after epoch {start}/{p.trainer.options.epochs} ({resume_from.name})", p.info)
        if start >= p.trainer.options.epochs:
            _log("nothing to do: training already finished", p.info)
    p.trainer.data, adv_info = _train_data(p, run_dir)
    p.trainer.register_hooks(_hooks(p, run_dir, adv_info, hooks, resume_from))
    history = p.trainer.train()
    teardown(p.info)
    return TrainResult(run_dir, run_dir / "checkpoints" / "final", p.trainer.options.epochs, history)
