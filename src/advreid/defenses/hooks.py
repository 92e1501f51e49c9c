"""Training hooks of the defenses: a proactive batch transform (JAD's DL, LGT, ...) and an online adversary (GOAT)
that replace ``trainer.batch.images`` before each step. Their random draws come from the trainer's per-step
generators (seed, epoch, step, rank, stream), so a resumed run is bit-identical to a straight one."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from advreid.attacks import Attack, Guides
from advreid.data import ImageDataset, Record, build_transforms
from advreid.engine import HookBase
from advreid.utils.misc import module_mode


class GuidePool:
    """GOAT's guide dictionary (spec 3.9, the reference's sampling): for every sample of a batch, ``draws`` images
    of its identity drawn *with replacement* from the whole training set, embedded by the current model (no
    gradient); their features are the sample's pushing guides. Images are loaded with the test transform (resize
    only; the reference applied its training augmentation once, at load time)."""

    def __init__(self, records: Sequence[Record], height: int, width: int, draws: int = 4) -> None:
        if draws < 1:
            raise ValueError(f"GuidePool: draws={draws!r} must be >= 1")
        self.dataset = ImageDataset(list(records), build_transforms(height, width, is_train=False))
        self.draws = int(draws)
        self.by_pid: dict[int, list[int]] = {}
        for i, r in enumerate(self.dataset.records):
            self.by_pid.setdefault(int(r.pid), []).append(i)

    def sample(self, pids: torch.Tensor, generator: torch.Generator) -> list[int]:
        """Dataset indices: ``draws`` per sample, same identity, with replacement, from ``generator``."""
        out = []
        for pid in pids.tolist():
            pool = self.by_pid.get(int(pid))
            if not pool:
                raise ValueError(f"GuidePool: identity {pid} has no training image")
            picks = torch.randint(len(pool), (self.draws,), generator=generator).tolist()
            out += [pool[j] for j in picks]
        return out

    def guides(self, attack: Attack, pids: torch.Tensor, generator: torch.Generator) -> Guides:
        """Pushing guides (B, draws, D) from the attack's feature function, in the attack's model mode."""
        idx = self.sample(pids, generator)
        device = next(attack.model.parameters()).device
        images = torch.stack([self.dataset[i][0] for i in idx]).to(device)
        with module_mode(attack.model, getattr(attack, "model_mode", "eval") == "train"), torch.no_grad():
            feats = attack.features(images)
        return Guides(push=feats.view(pids.shape[0], self.draws, -1))


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
    streams are seeded from this step's generator and the samples' dataset indices; with a ``pool`` the pushing
    guides are drawn from it (GOAT's reference sampling), else the attack finds its own (GOAT: in-batch guides)."""

    def __init__(self, attack: Attack, stream: str = "goat", pool: GuidePool | None = None) -> None:
        self.attack, self.stream, self.pool = attack, stream, pool

    def before_step(self) -> None:
        t = self.trainer
        b = t.batch
        self.attack.seed = int(t.step_generator(self.stream).initial_seed() % (2**63))
        guides = None
        if self.pool is not None and self.attack.steps > 0:
            guides = self.pool.guides(self.attack, b.pids.cpu(), t.step_generator(self.stream + "/pool"))
        b.images = self.attack(b.images, b.pids, b.camids, guides, index=b.index)
