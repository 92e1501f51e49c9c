"""The attack base class (projection, sign step, random start, momentum, per-sample losses) and the registry.

A subclass defines only ``setup`` (its reference/guide features, computed once per batch under no_grad) and ``loss``
(per-sample values to *maximise*); optionally ``before_step`` (e.g. LTA's fresh reference). Every random choice for
sample ``i`` comes from a ``torch.Generator`` seeded from ``(seed, index[i], stream)``, so a sample's result does not
depend on its batch-mates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from advreid.ops.budget import parse_eps, resolve_steps
from advreid.ops.random import per_sample_rand, sample_generators
from advreid.registry import Preset, Registry
from advreid.utils.misc import module_mode

DISTANCES = ("mse", "sqeuclidean", "cosine")
GRAD_NORMS = (None, "mean_abs", "l1")


# --------------------------------------------------------------------------------------------- the class


@dataclass
class AttackInputs:
    """What a call passes besides the images: labels, guides and sample identities."""

    pids: torch.Tensor | None
    camids: torch.Tensor | None
    guides: Any
    index: torch.Tensor
    bank_index: torch.Tensor | None


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a float tensor (B,C,H,W) in [0,1], got {type(images).__name__}")
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor (B,C,H,W) in [0,1], got shape {tuple(images.shape)} "
                         f"dtype {images.dtype} (convert uint8 with x.float() / 255)")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(f"images must lie in [0,1], got values in [{images.min().item():.4g}, "
                         f"{images.max().item():.4g}]; normalisation belongs inside the model")
    return images


def _as_long(t: Any, n: int, name: str, device: torch.device | None = None) -> torch.Tensor:
    t = torch.as_tensor(t, device=device)
    if t.dim() != 1 or t.shape[0] != n or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of shape ({n},), got {tuple(t.shape)} {t.dtype}")
    return t.long()


class Attack:
    """L-inf metric attack on [0,1] images: ``x <- clip_{x0,eps}(x + alpha * sign(G))`` for ``steps`` iterations.

    ``G`` is the gradient of the summed per-sample losses w.r.t. the input, optionally normalised per sample
    (``grad_norm``) and accumulated with ``momentum``. Features are ``model.features(x)`` (or ``model(x)``),
    L2-normalised when ``normalize``; ``distance`` is "mse" (mean of squares), "sqeuclidean" (sum) or "cosine".
    ``eot_samples > 1`` averages ``G`` over that many forward/backward passes (EOT through a randomized defense).
    """

    name: str = "attack"
    needs_guides: bool = False
    guide_source_default: str | None = None
    model_mode: str = "eval"  # the model's mode during the attack ("train": BatchNorm on batch statistics, GOAT)

    def __init__(self, model: nn.Module, eps: float | str = 5 / 255, alpha: float | str = 1 / 255,
                 steps: int | str = 15, *, random_start: bool = False, momentum: float = 0.0,
                 grad_norm: str | None = None, normalize: bool = True, distance: str = "mse", seed: int = 0,
                 side: str = "query", eot_samples: int = 1) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module mapping [0,1] images to embeddings, "
                            f"got {type(model).__name__}")
        self.model = model
        self.eps = self._parse_budget(eps, "eps")
        self.alpha = self._parse_budget(alpha, "alpha")
        self.steps = resolve_steps(steps, self.eps)
        self.random_start = bool(random_start)
        self.momentum = float(momentum)
        if not math.isfinite(self.momentum) or self.momentum < 0:
            raise ValueError(f"momentum={momentum!r} must be a finite float >= 0")
        if grad_norm not in GRAD_NORMS:
            raise ValueError(f"grad_norm={grad_norm!r} is not supported; expected one of {GRAD_NORMS}")
        self.grad_norm = grad_norm
        self.normalize = bool(normalize)
        if distance not in DISTANCES:
            raise ValueError(f"distance={distance!r} is not supported; expected one of {DISTANCES}")
        self.distance = distance
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r} must be an int >= 0")
        self.seed = int(seed)
        if side not in ("query", "gallery"):
            raise ValueError(f"side={side!r} must be 'query' or 'gallery'")
        self.side = side
        if isinstance(eot_samples, bool) or not isinstance(eot_samples, (int, np.integer)) or eot_samples < 1:
            raise ValueError(f"eot_samples={eot_samples!r} must be an int >= 1 (gradient passes averaged per step)")
        self.eot_samples = int(eot_samples)

    # ---------------------------------------------------------------------------------- configuration

    def _parse_budget(self, value: float | str, name: str) -> float:
        return parse_eps(value, name)

    def params(self) -> dict[str, Any]:
        """JSON-able description that rebuilds this attack: ``build(p.pop("name"), model, **p)``."""
        p: dict[str, Any] = {
            "name": self.name, "eps": self.eps, "alpha": self.alpha, "steps": self.steps,
            "momentum": self.momentum, "grad_norm": self.grad_norm, "random_start": self.random_start,
            "normalize": self.normalize, "distance": self.distance, "seed": self.seed, "side": self.side,
            "eot_samples": self.eot_samples,
        }
        p.update(self._extra_params())
        return p

    def _extra_params(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        p = self.params()
        name = p.pop("name")
        eps_px = f"{p['eps'] * 255:.4g}px"
        rest = ", ".join(f"{k}={v!r}" for k, v in p.items() if k != "eps")
        return f"{type(self).__name__}[{name}](eps={eps_px}, {rest})"

    # ---------------------------------------------------------------------------------------- helpers

    def generators(self, index: torch.Tensor, stream: str) -> list[torch.Generator]:
        """Per-sample generators for one random stream of this attack."""
        return sample_generators(self.seed, index, stream)

    def _model_dtype(self) -> torch.dtype | None:
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return None

    def features(self, x: torch.Tensor, *, normalize: bool | None = None) -> torch.Tensor:
        """Embeddings (B,D) of [0,1] images, L2-normalised when ``normalize`` (default: the attack's setting)."""
        fn: Callable[[torch.Tensor], Any] = getattr(self.model, "features", self.model)
        md = self._model_dtype()
        f = fn(x if md is None or md == x.dtype else x.to(md))
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"the feature function returned {type(f).__name__}, expected a (B,D) tensor; "
                            "pass a model with .features() or whose forward returns embeddings")
        f = f.flatten(1)
        return F.normalize(f, dim=1) if (self.normalize if normalize is None else normalize) else f

    def prep(self, feats: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Guide features from a bank (raw) -> the attack's space: device/dtype of ``like``, normalised if set."""
        feats = feats.to(device=like.device, dtype=like.dtype)
        if feats.is_inference():  # e.g. a bank extracted under inference_mode: make it usable in autograd
            feats = feats.clone()
        return F.normalize(feats, dim=-1) if self.normalize else feats

    def dist(self, f: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Per-sample distance: f (B,D) vs ref (B,D) -> (B,), or vs ref (B,K,D) -> (B,K)."""
        if f.shape[-1] != ref.shape[-1]:
            raise ValueError(f"attack {self.name!r}: the model's features have D={f.shape[-1]} but the reference/guide "
                             f"features have D={ref.shape[-1]}; build the GuideBank with the attacked model")
        if ref.dim() == 3:
            f = f.unsqueeze(1)
        if self.distance == "cosine":
            return 1 - F.cosine_similarity(f, ref, dim=-1)
        sq = (f - ref).pow(2)
        return sq.mean(-1) if self.distance == "mse" else sq.sum(-1)

    def require_guides(self, inp: AttackInputs, *, need_pids: bool = True) -> None:
        """Clear error when guides (or the pids to look them up) are missing."""
        from advreid.attacks.guides import Guides

        src = self.guide_source_default or "gallery"
        if inp.guides is None:
            raise ValueError(f"attack {self.name!r} needs guides: call it with guides=GuideBank(features, pids, "
                             f"camids) (normally built from the {src} set) and pids=..., or guides=Guides(...)")
        if need_pids and not isinstance(inp.guides, Guides) and inp.pids is None:
            raise ValueError(f"attack {self.name!r} looks up same-identity guides in the GuideBank: "
                             "pass the images' pids=... (B,) as well")

    # ------------------------------------------------------------------------------ subclass interface

    def setup(self, x0: torch.Tensor, inp: AttackInputs) -> dict[str, Any]:
        """Reference/guide features for this batch (runs under no_grad, model in eval mode)."""
        return {}

    def before_step(self, state: dict[str, Any], step: int) -> None:
        """Per-iteration hook (e.g. a fresh reference); default nothing."""

    def loss(self, feats: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """Per-sample losses (B,) to maximise, from the adversarial features (B,D)."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- the run

    def __call__(self, images: torch.Tensor, pids: torch.Tensor | None = None, camids: torch.Tensor | None = None,
                 guides: Any = None, *, index: torch.Tensor | None = None,
                 bank_index: torch.Tensor | None = None) -> torch.Tensor:
        """Adversarial copy of ``images`` (B,C,H,W) in [0,1]; same shape, dtype and device; the input is untouched.

        ``index`` (B,) names the samples for their random streams (default ``arange(B)``); ``bank_index`` (B,) is
        each sample's position in the guide bank, for ``exclude_self`` (default: ``index`` when given).
        """
        _check_images(images)
        b = images.shape[0]
        idx = torch.arange(b) if index is None else _as_long(index, b, "index").cpu()
        if idx.numel() and idx.min() < 0:
            raise ValueError("index must hold non-negative sample ids")
        if bank_index is None and index is not None:
            bank_index = idx
        elif bank_index is not None:
            bank_index = _as_long(bank_index, b, "bank_index")
        pids = None if pids is None else _as_long(pids, b, "pids")
        camids = None if camids is None else _as_long(camids, b, "camids")
        inp = AttackInputs(pids, camids, guides, idx, bank_index)
        if self.needs_guides:
            self.require_guides(inp)
        with torch.inference_mode(False):  # callers inside inference_mode still get a differentiable attack
            x0 = images.detach().clone()
            if self.steps == 0 or b == 0:
                return x0
            try:
                with module_mode(self.model, self.model_mode == "train"):
                    self._set_defense_streams(idx, "defense/setup")
                    with torch.no_grad():
                        state = self.setup(x0, inp)
                    state["index"] = idx
                    with torch.enable_grad():
                        out = self.run(x0, state, idx)
            finally:
                self._set_defense_streams(None, "")
        return out.detach()

    attack = __call__

    def bounds(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel box of the eps-ball intersected with [0,1]."""
        return (x0 - self.eps).clamp_(min=0), (x0 + self.eps).clamp_(max=1)

    def init_point(self, x0: torch.Tensor, index: torch.Tensor, stream: str = "start") -> torch.Tensor:
        """Start point: ``x0``, or ``clip(x0 + U(-eps, eps))`` with ``random_start``."""
        if not self.random_start:
            return x0.clone()
        u = per_sample_rand(self.generators(index, stream), x0.shape[1:], dtype=x0.dtype, device=x0.device)
        return (x0 + (2 * u - 1) * self.eps).clamp_(0, 1)

    def _set_defense_streams(self, index: torch.Tensor | None, stream: str) -> None:
        """Give a randomised defense each sample's generator of ``stream`` (``index`` None: back to its default);
        a model without random parts gets nothing, so no generator is made in the step loop."""
        setter = getattr(self.model, "set_random_streams", None)
        if callable(setter) and getattr(self.model, "randomized", False):
            setter(None if index is None else self.generators(index, stream))

    def input_grad(self, x: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """Gradient of the summed per-sample losses w.r.t. the input, averaged over ``eot_samples`` passes (EOT).

        Through a randomised defense (a model with ``set_random_streams``, e.g. ``DefendedModel``), draw ``d`` of
        step ``t`` uses each sample's own stream (seed, index, t, d): the result does not depend on the batch."""
        g = None
        for d in range(self.eot_samples):
            if "index" in state:
                self._set_defense_streams(state["index"], f"defense/{state.get('step', 0)}/{d}")
            gd = self.single_grad(x, state)
            g = gd if g is None else g.add_(gd)
        assert g is not None
        return g if self.eot_samples == 1 else g.div_(self.eot_samples)

    def single_grad(self, x: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """One forward/backward pass: gradient w.r.t. the input only (no grads into the model)."""
        x = x.detach().requires_grad_(True)
        loss = self.loss(self.features(x), state)
        if not loss.requires_grad:
            return torch.zeros_like(x)
        (grad,) = torch.autograd.grad(loss.sum(), x, allow_unused=True)
        return torch.zeros_like(x) if grad is None else grad

    def process_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """Per-sample gradient normalisation ("mean_abs" or "l1")."""
        if self.grad_norm is None:
            return grad
        dims = tuple(range(1, grad.dim()))
        scale = grad.abs().mean(dim=dims, keepdim=True) if self.grad_norm == "mean_abs" else \
            grad.abs().sum(dim=dims, keepdim=True)
        return grad / scale.clamp_min(1e-12)

    def step(self, x: torch.Tensor, direction: torch.Tensor, x0: torch.Tensor,
             box: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Ascent step along ``direction`` then projection (L-inf: sign step, clip to the box)."""
        return x.add_(direction.sign(), alpha=self.alpha).clamp_(box[0], box[1])

    def iterate(self, x: torch.Tensor, x0: torch.Tensor, state: dict[str, Any],
                box: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``steps`` iterations from ``x``: gradient, normalisation, momentum, step, projection."""
        acc: torch.Tensor | None = None
        for t in range(self.steps):
            state["step"] = t
            if "index" in state:  # reference forwards of the step (LTA) through a random defense: own streams too
                self._set_defense_streams(state["index"], f"defense/{t}/ref")
            self.before_step(state, t)
            g = self.input_grad(x, state)
            if self.momentum > 0:
                # without momentum a positive per-sample scale cannot change the (sign or unit-norm) step: skip it
                g = self.process_grad(g)
                acc = g if acc is None else acc.mul_(self.momentum).add_(g)
                g = acc
            x = self.step(x.detach(), g, x0, box)
        return x

    def run(self, x0: torch.Tensor, state: dict[str, Any], index: torch.Tensor) -> torch.Tensor:
        """One attack run from the start point (subclasses may add restarts)."""
        box = self.bounds(x0)
        return self.iterate(self.init_point(x0, index), x0, state, box)


# ------------------------------------------------------------------------------------------------ registry


ATTACKS: Registry[Preset] = Registry("attack")


def register_attack(name: str, cls: type[Attack] | None = None, *, overwrite: bool = False,
                    **defaults: Any) -> Any:
    """Register ``cls`` (or decorate a class) under ``name``, with preset ``defaults`` for its constructor."""
    if cls is None:
        def deco(c: type[Attack]) -> type[Attack]:
            register_attack(name, c, overwrite=overwrite, **defaults)
            return c

        return deco
    ATTACKS.add_preset(name, cls, skip=1, overwrite=overwrite, **defaults)
    return cls


def build(name: str, model: nn.Module, **params: Any) -> Attack:
    """Build a registered attack (``list_attacks()``) on ``model``; an unknown name or parameter raises
    :class:`~advreid.registry.RegistryError` (a KeyError / ValueError / TypeError) with "did you mean"."""
    return ATTACKS.get(name)(model, **params)


def list_attacks() -> list[str]:
    """Names of the registered attacks and presets."""
    return ATTACKS.names()
