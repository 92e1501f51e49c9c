"""LTA, the Local Transformation Attack (Gong et al., the seed): push away from a locally grey-scaled copy of x.

At every step a fresh reference ``x_hat = LGT(x)`` (a new random rectangle per sample, probability 1, on the *clean*
image) gives ``f_hat = f(x_hat)`` (one extra no-grad forward per step); the loss is ``d(f(x'), f_hat)`` with momentum
1 and mean-abs gradient normalisation. ``lta_star`` draws one reference and reuses it. ``reference_fn(x, generators)``
replaces LGT by any reference transform (e.g. LHT). The seed builds ``x_hat`` from the 8-bit-truncated image, so its
pixels outside the patch are up to 1/255 darker; here they equal ``x`` exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from advreid.attacks.base import Attack, AttackInputs, register_attack
from advreid.ops.lgt import LUMA_MODES, RECT_MODES, check_lgt_params, local_grayscale, luma, sample_lgt_rects

ReferenceFn = Callable[[torch.Tensor, Sequence[torch.Generator]], torch.Tensor]


class LTA(Attack):
    """Local Transformation Attack; ``redraw=False`` is LTA* (one reference for all iterations)."""

    name = "lta"

    def __init__(self, model: nn.Module, eps: float | str = 5 / 255, alpha: float | str = 1 / 255,
                 steps: int | str = 15, *, redraw: bool = True, sl: float = 0.02, sh: float = 0.4, r1: float = 0.3,
                 rect_mode: str = "reference", luma: str = "pil", reference_fn: ReferenceFn | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("momentum", 1.0)  # the seed's LTA: momentum 1 with mean-abs gradient normalisation
        kwargs.setdefault("grad_norm", "mean_abs")
        super().__init__(model, eps, alpha, steps, **kwargs)
        if rect_mode not in RECT_MODES:
            raise ValueError(f"rect_mode={rect_mode!r} is not supported; expected one of {RECT_MODES}")
        check_lgt_params(sl, sh, r1, rect_mode, 1.0, 1)
        if luma not in LUMA_MODES:
            raise ValueError(f"luma={luma!r} is not supported; expected one of {LUMA_MODES}")
        if reference_fn is not None and not callable(reference_fn):
            raise TypeError(f"reference_fn must be callable (images, generators) -> images, got {reference_fn!r}")
        self.redraw = bool(redraw)
        self.sl, self.sh, self.r1 = float(sl), float(sh), float(r1)
        self.rect_mode = rect_mode
        self.luma = luma
        self.reference_fn = reference_fn

    def _extra_params(self) -> dict[str, Any]:
        fn = self.reference_fn
        ref = None if fn is None else f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
        return {"redraw": self.redraw, "sl": self.sl, "sh": self.sh, "r1": self.r1, "rect_mode": self.rect_mode,
                "luma": self.luma, "reference_fn": ref}

    # ------------------------------------------------------------------------------------ references

    def _draws(self) -> int:
        return self.steps if self.redraw else 1

    def rects(self, x0: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """LGT rectangles (T,B,4) for the batch: T = steps (redraw) or 1, drawn from per-sample generators."""
        return sample_lgt_rects(x0.shape[0], x0.shape[2], x0.shape[3], self.generators(index, "lgt"), sl=self.sl,
                                sh=self.sh, r1=self.r1, mode=self.rect_mode, draws=self._draws()).to(x0.device)

    def reference_images(self, images: torch.Tensor, *, index: torch.Tensor | None = None) -> torch.Tensor:
        """The references (T,B,C,H,W) a call on ``images`` would use (T = steps, or 1 for LTA*)."""
        idx = torch.arange(images.shape[0]) if index is None else torch.as_tensor(index).long().cpu()
        state = self._references_state(images.detach(), idx)
        return torch.stack([self._reference(state, t) for t in range(self._draws())])

    def _references_state(self, x0: torch.Tensor, index: torch.Tensor) -> dict[str, Any]:
        if self.reference_fn is not None:
            gens = self.generators(index, "reference")
            return {"x0": x0, "gens": gens}
        return {"x0": x0, "rects": self.rects(x0, index), "gray": luma(x0, self.luma)}

    def _reference(self, state: dict[str, Any], t: int) -> torch.Tensor:
        if self.reference_fn is not None:
            out = self.reference_fn(state["x0"], state["gens"])
            if not isinstance(out, torch.Tensor) or out.shape != state["x0"].shape:
                raise ValueError(f"reference_fn must return a tensor shaped like its input {tuple(state['x0'].shape)}")
            return out.to(state["x0"].dtype)
        return local_grayscale(state["x0"], state["rects"][t], gray=state["gray"])

    # ----------------------------------------------------------------------------------------- attack

    def setup(self, x0: torch.Tensor, inp: AttackInputs) -> dict[str, Any]:
        state = self._references_state(x0, inp.index)
        if not self.redraw:
            state["ref"] = self.features(self._reference(state, 0))
        return state

    def before_step(self, state: dict[str, Any], step: int) -> None:
        if self.redraw:
            with torch.no_grad():
                state["ref"] = self.features(self._reference(state, step))

    def loss(self, feats: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        return self.dist(feats, state["ref"])


register_attack("lta", LTA)
register_attack("lta_star", LTA, redraw=False)
