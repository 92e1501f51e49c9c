"""DMR as an attack: one forward pass of a trained generator (no gradient steps, no access to the attacked model).

``build("dmr", model, generator=PATH_OR_MODULE, eps="16px")``. ``generator`` is a folder written by
:func:`~advreid.attacks.dmr.training.train_dmr` (its ``checkpoints/best``), a checkpoint path, or a module (a loaded
:class:`~advreid.attacks.dmr.networks.DMRNets`, or any generator mapping [0,1] images to [-1,1], used without a
mask). The networks run in eval mode (BatchNorm running statistics, no spectral-norm power iteration, the mask
head's noiseless top-k), so each sample's result is independent of its batch-mates; outputs lie within ``eps`` of the
input and in [0,1]. The attacked ``model`` is not queried (the attack is a function of the image only): a generator
trained on one victim and applied to another model is the transfer setting. ``seed`` is accepted for the common
attack API and recorded, but nothing is random at attack time.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advreid.attacks.base import Attack, AttackInputs, register_attack
from advreid.attacks.dmr.networks import DMRNets
from advreid.attacks.dmr.training import load_generator

__all__ = ["DMRAttack"]


def _state_sha256(module: nn.Module) -> str:
    """sha256 of a module's state dict (sorted keys, dtype, shape, bytes): a content id for in-memory generators."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{k}|{t.dtype}|{tuple(v.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class DMRAttack(Attack):
    """Deep Mis-Ranking (Wang et al., CVPR 2020): ``x' = clip(x + mask * bound_eps(G(x)))`` in a single shot.

    ``steps`` exists for the common attack API only: ``0`` returns the input unchanged (spec section 7), any other
    value is one generator pass (recorded as 1); ``eot_samples`` is accepted and recorded but has no effect (there is
    no gradient to average). ``generator_sha256`` (optional) must match the loaded weights (``params()`` records it,
    so a rebuilt attack refuses different weights); ``victim`` is provenance only (the model the generator was trained
    against).
    """

    name = "dmr"

    def __init__(self, model: nn.Module, generator: str | Path | nn.Module, eps: float | str = "16px",
                 steps: int = 1, *, side: str = "query", seed: int = 0, eot_samples: int = 1,
                 generator_sha256: str | None = None, victim: str | None = None) -> None:
        super().__init__(model, eps=eps, alpha=eps, steps=steps, seed=seed, side=side, eot_samples=eot_samples)
        self.steps = min(self.steps, 1)  # single shot: 0 = no attack (the common API), any other value = one pass
        if isinstance(generator, str | Path):
            nets = load_generator(generator)
            self.generator_path: str | None = nets.source
            sha = nets.sha256
        elif isinstance(generator, nn.Module):
            nets = generator if isinstance(generator, DMRNets) else DMRNets(generator)
            self.generator_path = getattr(nets, "source", None)
            sha = getattr(nets, "sha256", None) or _state_sha256(nets)
        else:
            raise TypeError(f"generator must be a path (a folder written by train_dmr, or a checkpoint) or an "
                            f"nn.Module, got {type(generator).__name__}")
        if generator_sha256 is not None and generator_sha256 != sha:
            raise ValueError(f"generator_sha256={generator_sha256!r} does not match the generator's weights ({sha})")
        self.nets = nets.eval()
        self._copies: dict[tuple[torch.dtype, torch.device], DMRNets] = {}
        self.generator_sha256 = sha
        trained = getattr(nets, "victim", None)
        self.victim = trained.get("run") if isinstance(trained, dict) else victim

    def params(self) -> dict[str, Any]:
        """JSON-able description; ``build(p.pop("name"), model, **p)`` rebuilds it (and checks the sha256)."""
        return {"name": self.name, "eps": self.eps, "steps": self.steps, "side": self.side, "seed": self.seed,
                "eot_samples": self.eot_samples, "generator": self.generator_path,
                "generator_sha256": self.generator_sha256, "victim": self.victim}

    def __repr__(self) -> str:
        return (f"DMRAttack[{self.name}](eps={self.eps * 255:.4g}px, generator={self.generator_path!r}, "
                f"sha256={self.generator_sha256[:12]}..., victim={self.victim!r})")

    def setup(self, x0: torch.Tensor, inp: AttackInputs) -> dict[str, Any]:
        return {}

    def _nets_like(self, x: torch.Tensor) -> DMRNets:
        """The networks in ``x``'s dtype and on its device (a cached copy when they differ; the original is kept)."""
        ref = next(iter(self.nets.parameters()), None)
        if ref is None or (ref.dtype == x.dtype and ref.device == x.device):
            return self.nets
        key = (x.dtype, x.device)
        if key not in self._copies:
            self._copies = {key: copy.deepcopy(self.nets).to(device=x.device, dtype=x.dtype).eval()}
        return self._copies[key]

    def run(self, x0: torch.Tensor, state: dict[str, Any], index: torch.Tensor) -> torch.Tensor:
        """One eval-mode forward pass of the generator (and mask head) on ``x0``, in ``x0``'s dtype."""
        with torch.no_grad():
            return self._nets_like(x0).eval().perturb(x0, self.eps)


register_attack("dmr", DMRAttack)
