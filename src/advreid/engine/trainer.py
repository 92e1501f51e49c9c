"""The training loop: a :class:`Trainer` whose behaviour is extended by hooks and whose one iteration is
:meth:`Trainer.run_step` (fast-reid's ``run_step``, torchreid's ``forward_backward``).

The trainer owns the loop, AMP, the per-epoch loaders and the training state (optimizer, scheduler, scaler and every
RNG) that makes a resume bit-exact. Everything else is composed from outside: a proactive defense or an online
adversary is a hook that replaces ``trainer.batch.images`` in ``before_step``; periodic evaluation, checkpoints,
metrics rows and logging are hooks; a recipe that needs another step (a meta-learning step with an inner and an
outer update) subclasses the trainer or passes a ``step`` callable. The trainer never imports evaluation or
defenses. Random draws of hooks come from :meth:`Trainer.step_generator`, seeded from (seed, epoch, step, rank,
stream) only, so a resumed run draws exactly what a straight one does.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from advreid.engine.hooks import HookBase
from advreid.ops import batch_generator

__all__ = ["Batch", "Trainer", "TrainData", "TrainerOptions", "rng_state", "set_rng_state", "standard_step"]


@dataclass
class Batch:
    """One training batch on the device: images (B,3,H,W) in [0,1], pids, camids and dataset indices (B,)."""

    images: torch.Tensor
    pids: torch.Tensor
    camids: torch.Tensor
    index: torch.Tensor


@dataclass
class TrainData:
    """The training set and how it is batched: a fresh loader per epoch, seeded from (seed, epoch)."""

    dataset: Dataset
    batch_size: int
    sampler: Sampler | None = None  # None: shuffled by a RandomSampler
    num_workers: int = 0
    drop_last: bool = True
    seed: int = 0

    def loader(self, epoch: int, pin_memory: bool = False) -> DataLoader:
        """The loader of ``epoch`` (0-based); the sampler's own epoch is set first."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        gen = torch.Generator()
        gen.manual_seed(self.seed * 100_003 + epoch)
        sampler = self.sampler if self.sampler is not None else RandomSampler(self.dataset, generator=gen)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          drop_last=self.drop_last, pin_memory=pin_memory, generator=gen, persistent_workers=False)


@dataclass
class TrainerOptions:
    """Loop settings: epochs, seed, AMP and channels-last (CUDA only), an iteration cap, distributed rank/world."""

    epochs: int
    seed: int = 0
    amp: bool = False
    channels_last: bool = False
    max_iters_per_epoch: int | None = None
    rank: int = 0
    world: int = 1


# -------------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    """Every global RNG (torch, numpy, python, CUDA) as a tensor tree the checkpoint format can store."""
    st = {"torch": torch.get_rng_state(), "numpy": _np_state_to_tree(np.random.get_state()),
          "python": _py_state_to_tree(random.getstate())}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    """Restore what :func:`rng_state` captured."""
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


# ------------------------------------------------------------------------------------------------ the step
def standard_step(trainer: Trainer) -> dict[str, float]:
    """One supervised step on ``trainer.batch``: forward (AMP on CUDA), ``criterion(outputs, pids)``, backward,
    optimizer and scaler step. Returns the loss parts (``total``, ``ce``, ``triplet``, ``acc``...)."""
    t = trainer
    with torch.autocast(device_type=t.device.type, dtype=torch.float16, enabled=t.use_amp):
        out = t.net(t.batch.images)
    loss, parts = t.criterion({k: (v.float() if v is not None else None) for k, v in out.items()}, t.batch.pids)
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(loss).backward()
    t.scaler.step(t.optimizer)
    t.scaler.update()
    return parts


# --------------------------------------------------------------------------------------------- the trainer
class Trainer:
    """The training loop with hooks. ``train()`` runs epochs ``start_epoch .. epochs-1``; each epoch iterates the
    loader of :class:`TrainData`, loads ``self.batch``, calls ``before_step`` hooks, :meth:`run_step`, then
    ``after_step`` hooks; after the epoch the scheduler steps and ``self.record`` (the metrics row) is built before
    the ``after_epoch`` hooks see it. ``net`` is the module the step calls (a DDP wrapper under ``torchrun``);
    ``model`` the bare one that hooks attack, evaluate and save."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, data: TrainData,
                 criterion: Callable[..., Any], options: TrainerOptions, *, device: torch.device | str = "cpu",
                 net: nn.Module | None = None, hooks: Iterable[HookBase] = (),
                 step: Callable[[Trainer], dict[str, float]] | None = None) -> None:
        if options.epochs < 0:
            raise ValueError(f"epochs={options.epochs!r} must be >= 0")
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.data, self.criterion, self.options = data, criterion, options
        self.device = torch.device(device)
        self.net = model if net is None else net
        self.use_amp = bool(options.amp) and self.device.type == "cuda"
        self.channels_last = bool(options.channels_last) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.step_fn = step
        self.hooks: list[HookBase] = []
        self.register_hooks(hooks)
        self.start_epoch = 0
        self.epoch = self.step = 0
        self.batch: Batch | None = None
        self.step_parts: dict[str, float] = {}
        self.record: dict[str, Any] = {}
        self.history: list[dict] = []
        self.sums: dict[str, float] = {}
        self.images_seen = 0
        self.steps_per_epoch = 0
        self.epoch_start = 0.0

    @property
    def rank(self) -> int:
        return self.options.rank

    @property
    def world(self) -> int:
        return self.options.world

    def register_hooks(self, hooks: Iterable[HookBase]) -> None:
        """Append hooks (called in registration order); each gets ``hook.trainer = self``."""
        for h in hooks:
            if not isinstance(h, HookBase):
                raise TypeError(f"hooks must be HookBase instances, got {type(h).__name__}")
            h.trainer = self
            self.hooks.append(h)

    def _call(self, event: str) -> None:
        for h in self.hooks:
            getattr(h, event)()

    def step_generator(self, stream: str) -> torch.Generator:
        """A CPU generator for this step's draws of ``stream`` (e.g. "proactive", "goat"), resume-exact."""
        return batch_generator(self.options.seed, self.epoch, self.step, self.rank, stream)

    # ------------------------------------------------------------------------------------------- state
    def train_state(self) -> dict[str, Any]:
        """What a checkpoint needs to continue exactly: optimizer, scheduler, scaler and RNG states."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.use_amp else {}, "rng": rng_state()}

    def load_train_state(self, state: dict[str, Any], epoch: int) -> None:
        """Restore :meth:`train_state` of the checkpoint written after ``epoch`` epochs; training continues there."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.start_epoch = int(epoch)

    # -------------------------------------------------------------------------------------------- loop
    def train(self) -> list[dict]:
        """Run the remaining epochs; return the metrics rows of the epochs run now."""
        self._call("before_train")
        for epoch in range(self.start_epoch, self.options.epochs):
            self.epoch = epoch
            self._call("before_epoch")
            self.run_epoch()
            self._call("after_epoch")
            self.history.append(self.record)
        self._call("after_train")
        return self.history

    def run_epoch(self) -> None:
        """One pass over the epoch's loader (capped by ``max_iters_per_epoch``), then the scheduler step."""
        loader = self.data.loader(self.epoch, pin_memory=self.device.type == "cuda")
        cap = self.options.max_iters_per_epoch
        n = len(loader) if cap is None else min(len(loader), int(cap))
        if n == 0:
            raise ValueError(f"no training batch: {len(self.data.dataset)} images, batch size "
                             f"{self.data.batch_size}; lower sampler.p/k/batch_size")
        self.steps_per_epoch = n
        self.model.train()
        self.epoch_start = time.perf_counter()
        self.sums = {"loss": 0.0, "ce": 0.0, "triplet": 0.0, "acc": 0.0}
        self.images_seen = 0
        it = iter(loader)
        for step in range(n):
            self.step = step
            imgs, pids, camids, idx = next(it)
            self.batch = Batch(imgs.to(self.device, non_blocking=True), pids.to(self.device, non_blocking=True),
                               camids.to(self.device, non_blocking=True), torch.as_tensor(idx))
            self._call("before_step")
            if self.channels_last:
                self.batch.images = self.batch.images.contiguous(memory_format=torch.channels_last)
            self.step_parts = self.run_step()
            bs = self.batch.images.shape[0]
            self.images_seen += bs
            self.sums["loss"] += self.step_parts["total"] * bs
            for k in ("ce", "triplet", "acc"):
                self.sums[k] += self.step_parts.get(k, 0.0) * bs
            self._call("after_step")
        self.scheduler.step()
        elapsed = time.perf_counter() - self.epoch_start
        self.record = {"epoch": self.epoch + 1, **{k: v / max(self.images_seen, 1) for k, v in self.sums.items()},
                       "lr": [g["lr"] for g in self.optimizer.param_groups], "time_s": round(elapsed, 3),
                       "images_per_s": round(self.images_seen * self.world / elapsed, 2)}

    def run_step(self) -> dict[str, float]:
        """One iteration on ``self.batch``; returns its loss parts (at least ``total``). Override it, or pass
        ``step=`` to the constructor, to change what a step does."""
        return (self.step_fn or standard_step)(self)
