"""Training hooks of the defenses: a proactive batch transform (JAD's DL, LGT, ...) and an online adversary (GOAT)
that replace ``trainer.batch.images`` before each step. Their random draws come from the trainer's per-step
generators (seed, epoch, step, rank, stream), so a resumed run is bit-identical to a straight one."""

from __future__ import annotations

import torch
from torch import nn

from advreid.attacks import Attack
from advreid.engine import HookBase


class ProactiveHook(HookBase):
    """Applies a proactive defense ``transform(images, generators=...)`` to every training batch (no gradient)."""

    def __init__(self, transform: nn.Module, stream: str = "proactive") -> None:
        self.transform, self.stream = transform, stream

    def before_train(self) -> None:
        if isinstance(self.transform, nn.Module):
            self.transform.to(self.trainer.device)

    def before_step(self) -> None:
        t = self.trainer
        with torch.no_grad():
            t.batch.images = self.transform(t.batch.images, generators=t.step_generator(self.stream))


class AdversarialBatchHook(HookBase):
    """Replaces every training batch by its adversarial version made by ``attack`` on the current model (online
    adversarial training; GOAT when ``attack`` is :class:`advreid.attacks.GOAT`). The attack's per-sample random
    streams are seeded from this step's generator and the samples' dataset indices."""

    def __init__(self, attack: Attack, stream: str = "goat") -> None:
        self.attack, self.stream = attack, stream

    def before_step(self) -> None:
        t = self.trainer
        b = t.batch
        self.attack.seed = int(t.step_generator(self.stream).initial_seed() % (2**63))
        b.images = self.attack(b.images, b.pids, b.camids, index=b.index)
