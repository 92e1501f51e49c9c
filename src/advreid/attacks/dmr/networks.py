"""DMR networks: the ResNet generator, the multi-stage (or single PatchGAN) discriminator with its mask head, and
the perturbation mapping shared by training and the attack.

Reconstructed from ``GD.py`` of the reference (whj363636/Adversarial-attack-on-Person-ReID-With-Deep-Mis-Ranking):

* Generator: reflect-pad 7x7 conv, two stride-2 3x3 convs, ``n_blocks`` residual blocks, two stride-2 transposed
  convs, reflect-pad 7x7 conv, tanh; BatchNorm; spectral norm on every conv except the last (as the reference).
  Inputs whose sides are not multiples of 4 are replicate-padded and the output cropped back.
* Discriminator: ``num_scales`` PatchGAN stacks (4x4 convs, TF-style "same" padding, LeakyReLU 0.2, BN, spectral norm
  except on the 1-channel output conv), the input average-pooled by 2 between scales; the input is the pair
  ``(x, x')`` concatenated to 6 channels. ``num_scales=1, spectral=False`` is the reference's single PatchGAN.
* Mask head (reference ``Mask``, ``fused=1``): fuses the penultimate maps of the three scales and the second map of
  the finest one through bilinear-upsampling "UpLayers", two 2x transposed convs and a 1x1 conv to one logit per
  pixel. ``temperature`` is the reference's name for the number of kept pixels: ``-1`` = no mask (all ones, the
  default); ``k > 0`` keeps the top-k logits (hard), or with ``use_gumbel`` a straight-through Gumbel top-k in
  training mode. In eval mode the Gumbel variant keeps the noiseless top-k (deterministic, per sample).

Init schemes: ``"normal"`` (conv weights N(0, 0.02), biases 0, BN weights N(1, 0.02)) and ``"reference"`` (conv
weights N(0, 1), biases left at PyTorch's default, BN weights N(1, 0.02)). The weights are drawn before spectral norm
is attached, so its power iteration starts from the initialised weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from advreid.models import IMAGENET_MEAN

INITS = ("normal", "reference")
CENTERS = ("zero", "reference")

__all__ = [
    "CENTERS", "INITS", "DMRNets", "Discriminator", "Generator", "MaskHead", "apply_delta", "bound_delta",
    "init_weights", "topk_mask",
]


# ------------------------------------------------------------------------------------------------ helpers


def init_weights(module: nn.Module, scheme: str = "normal") -> None:
    """Initialise every conv / transposed conv / BatchNorm of ``module`` with ``scheme`` ("normal" | "reference")."""
    if scheme not in INITS:
        raise ValueError(f"init={scheme!r}; expected one of {INITS}")
    std = 0.02 if scheme == "normal" else 1.0
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None and scheme == "normal":
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def _add_spectral_norm(module: nn.Module, skip: tuple[nn.Module, ...] = ()) -> None:
    """Spectral norm on every conv / transposed conv of ``module`` except those in ``skip``."""
    for m in list(module.modules()):
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d) and not any(m is s for s in skip):
            spectral_norm(m)


def _same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Zero padding so that a ``kernel``/``stride`` conv outputs ``ceil(size / stride)`` (TF "SAME")."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


# ---------------------------------------------------------------------------------------------- generator


class _ResBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=False), nn.BatchNorm2d(dim), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=False), nn.BatchNorm2d(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Generator(nn.Module):
    """ResNet encoder/decoder mapping [0,1] images (B,3,H,W) to a raw perturbation in [-1,1] of the same size."""

    def __init__(self, ngf: int = 32, n_blocks: int = 6, *, init: str = "normal", spectral: bool = True) -> None:
        super().__init__()
        if not isinstance(ngf, int) or ngf < 1:
            raise ValueError(f"ngf={ngf!r} must be an int >= 1")
        if not isinstance(n_blocks, int) or n_blocks < 0:
            raise ValueError(f"n_blocks={n_blocks!r} must be an int >= 0")
        self._arch = {"ngf": ngf, "n_blocks": n_blocks, "spectral": bool(spectral), "init": init}
        c1, c2, c4 = ngf, 2 * ngf, 4 * ngf
        self.head = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, c1, 7, bias=False), nn.BatchNorm2d(c1),
                                  nn.ReLU(True))
        self.down = nn.Sequential(
            nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(True),
            nn.Conv2d(c2, c4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c4), nn.ReLU(True),
        )
        self.blocks = nn.Sequential(*[_ResBlock(c4) for _ in range(n_blocks)])
        self.up = nn.Sequential(
            nn.ConvTranspose2d(c4, c2, 3, stride=2, padding=1, output_padding=1, bias=False), nn.BatchNorm2d(c2),
            nn.ReLU(True),
            nn.ConvTranspose2d(c2, c1, 3, stride=2, padding=1, output_padding=1, bias=False), nn.BatchNorm2d(c1),
            nn.ReLU(True),
        )
        self.tail = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(c1, 3, 7), nn.Tanh())
        init_weights(self, init)
        if spectral:
            _add_spectral_norm(self, skip=(self.tail[1],))

    def arch_config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able)."""
        return dict(self._arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % 4, (-w) % 4
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        y = self.tail(self.up(self.blocks(self.down(self.head(x)))))
        return y[..., :h, :w]


# ------------------------------------------------------------------------------------------ discriminator


class _PatchStack(nn.Module):
    """One PatchGAN scale: returns the output of every layer (the last is the 1-channel patch map)."""

    def __init__(self, in_channels: int, ndf: int, n_layers: int) -> None:
        super().__init__()
        chans = [min(ndf * 2**i, 512) for i in range(n_layers + 1)]
        self.strides = [2] * n_layers + [1, 1]
        layers = [nn.Sequential(nn.Conv2d(in_channels, chans[0], 4, stride=2), nn.LeakyReLU(0.2, True))]
        for i in range(1, n_layers + 1):
            layers.append(nn.Sequential(nn.Conv2d(chans[i - 1], chans[i], 4, stride=self.strides[i], bias=False),
                                        nn.BatchNorm2d(chans[i]), nn.LeakyReLU(0.2, True)))
        layers.append(nn.Sequential(nn.Conv2d(chans[-1], 1, 4, stride=1)))
        self.layers = nn.ModuleList(layers)

    @property
    def out_conv(self) -> nn.Module:
        return self.layers[-1][0]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for layer, stride in zip(self.layers, self.strides, strict=True):
            x = layer(_same_pad(x, 4, stride))
            outs.append(x)
        return outs


class _UpLayer(nn.Module):
    """Reference ``UpLayer``: 1x1 conv of the finer map + bilinear upsampling of the coarser one, then a 3x3 conv."""

    def __init__(self, big: int, small: int, out: int) -> None:
        super().__init__()
        self.lateral = nn.Sequential(nn.Conv2d(big, small, 1, bias=False), nn.BatchNorm2d(small),
                                     nn.LeakyReLU(0.2, True))
        self.fuse = nn.Sequential(nn.Conv2d(small, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                                  nn.LeakyReLU(0.2, True))

    def forward(self, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(self.lateral(fine) + up)


class MaskHead(nn.Module):
    """Per-pixel logits (B, H*W) from the three scales' feature maps (``n_layers`` = 3 stacks)."""

    def __init__(self, ndf: int) -> None:
        super().__init__()
        c = [min(ndf * 2**i, 512) for i in range(4)]
        self.up1 = _UpLayer(c[3], c[3], c[3])
        self.up2 = _UpLayer(c[3], c[3], c[2])
        self.up3 = _UpLayer(c[1], c[2], c[1])
        self.deconv = nn.Sequential(nn.ConvTranspose2d(c[1], c[1], 2, stride=2), nn.LeakyReLU(0.2, True),
                                    nn.ConvTranspose2d(c[1], c[1], 2, stride=2), nn.LeakyReLU(0.2, True))
        self.logit = nn.Conv2d(c[1], 1, 1)
        self.tau = nn.Parameter(torch.ones(1))  # Gumbel-softmax temperature (reference ``Mask.T``)

    def forward(self, feats: list[list[torch.Tensor]], size: tuple[int, int]) -> torch.Tensor:
        o = self.up1(feats[2][3], feats[1][3])
        o = self.up2(o, feats[0][3])
        o = self.up3(o, feats[0][1])
        o = self.logit(self.deconv(o))
        if tuple(o.shape[-2:]) != tuple(size):
            o = F.interpolate(o, size=size, mode="bilinear", align_corners=False)
        return o.flatten(1)


def topk_mask(logits: torch.Tensor, k: int, *, gumbel: bool = False, tau: torch.Tensor | float = 1.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,N) mask keeping exactly the top ``k`` of each row (hard), or a straight-through Gumbel top-k.

    The Gumbel form (reference ``gumbel_softmax``): ``y = softmax((logits + g) / tau)``, the hard top-k of ``y`` in the
    forward pass and the gradient of ``y`` in the backward pass.
    """
    if not isinstance(k, int) or not 1 <= k <= logits.shape[1]:
        raise ValueError(f"mask k={k!r} must be an int in 1..{logits.shape[1]} (pixels per image)")
    if not gumbel:
        idx = logits.topk(k, dim=1).indices
        return torch.zeros_like(logits).scatter_(1, idx, 1.0)
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype).to(logits.device)
    g = -torch.log(1e-10 - torch.log(u + 1e-10))
    t = tau.clamp_min(1e-4) if isinstance(tau, torch.Tensor) else max(float(tau), 1e-4)
    soft = torch.softmax((logits + g) / t, dim=1)
    hard = torch.zeros_like(soft).scatter_(1, soft.topk(k, dim=1).indices, 1.0)
    return hard - soft.detach() + soft


class Discriminator(nn.Module):
    """Multi-stage PatchGAN on (x, x') pairs; ``forward`` gives one patch map per scale, ``mask`` the pixel mask."""

    def __init__(self, ndf: int = 64, n_layers: int = 3, num_scales: int = 3, *, spectral: bool = True,
                 temperature: int = -1, use_gumbel: bool = False, init: str = "normal") -> None:
        super().__init__()
        if not isinstance(ndf, int) or ndf < 1 or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"ndf={ndf!r}, n_layers={n_layers!r}: expected ints >= 1")
        if not isinstance(num_scales, int) or num_scales < 1:
            raise ValueError(f"num_scales={num_scales!r} must be an int >= 1")
        if not isinstance(temperature, int) or isinstance(temperature, bool) or not (temperature == -1
                                                                                       or temperature > 0):
            raise ValueError(f"temperature={temperature!r}: expected -1 (no mask) or a pixel count k > 0")
        if temperature > 0 and (num_scales != 3 or n_layers != 3):
            raise ValueError(f"the mask head (temperature={temperature}) needs num_scales=3 and n_layers=3, got "
                             f"num_scales={num_scales}, n_layers={n_layers}")
        self._arch = {"ndf": ndf, "n_layers": n_layers, "num_scales": num_scales, "spectral": bool(spectral),
                      "temperature": temperature, "use_gumbel": bool(use_gumbel), "init": init}
        self.temperature, self.use_gumbel = temperature, bool(use_gumbel)
        self.scales = nn.ModuleList([_PatchStack(6, ndf, n_layers) for _ in range(num_scales)])
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.mask_head = MaskHead(ndf) if temperature > 0 else None
        init_weights(self, init)
        if spectral:
            skip = tuple(s.out_conv for s in self.scales)
            _add_spectral_norm(self, skip=skip + ((self.mask_head.logit,) if self.mask_head is not None else ()))

    def arch_config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able)."""
        return dict(self._arch)

    def features(self, pair: torch.Tensor) -> list[list[torch.Tensor]]:
        """Every layer's output at every scale, finest scale first."""
        out = []
        for i, stack in enumerate(self.scales):
            if i:
                pair = self.pool(pair)
            out.append(stack(pair))
        return out

    def forward(self, pair: torch.Tensor) -> list[torch.Tensor]:
        """One patch map per scale for the (B,6,H,W) pair ``cat(x, x')``."""
        return [f[-1] for f in self.features(pair)]

    def mask(self, x: torch.Tensor, x_pert: torch.Tensor, *,
             generator: torch.Generator | None = None) -> torch.Tensor | None:
        """(B,1,H,W) pixel mask for the candidate ``x_pert``; None when ``temperature == -1`` (every pixel)."""
        if self.mask_head is None:
            return None
        h, w = x.shape[-2:]
        logits = self.mask_head(self.features(torch.cat([x, x_pert], dim=1)), (h, w))
        m = topk_mask(logits, self.temperature, gumbel=self.use_gumbel and self.training, tau=self.mask_head.tau,
                      generator=generator)
        return m.view(-1, 1, h, w)


# ------------------------------------------------------------------------------------- perturbation mapping


def bound_delta(raw: torch.Tensor, eps: float, center: str = "zero") -> torch.Tensor:
    """Generator output in [-1,1] -> perturbation in [0,1] pixel units with ``max|delta| <= eps`` per image and channel.

    ``center="zero"``: ``delta = raw``; ``"reference"``: ``delta = (raw + 1)/2 - mean_c`` (the reference maps to [0,1]
    and subtracts the ImageNet mean; its per-channel bound ``mag/(255 std_c)`` in normalised units is ``mag/255`` in
    pixel units). Each (image, channel) is then scaled by ``min(1, eps / max|delta|)``; the scale is treated as a
    constant in the backward pass (the reference edits ``.data``, so its gradient ignores the scale too).
    """
    if center == "reference":
        mean = torch.tensor(IMAGENET_MEAN, dtype=raw.dtype, device=raw.device).view(1, -1, 1, 1)
        raw = (raw + 1) / 2 - mean
    elif center != "zero":
        raise ValueError(f"center={center!r}; expected one of {CENTERS}")
    peak = raw.detach().abs().amax(dim=(-2, -1), keepdim=True)
    scale = torch.where(peak > eps, eps / peak.clamp_min(torch.finfo(raw.dtype).tiny), torch.ones_like(peak))
    return raw * scale


def apply_delta(x: torch.Tensor, delta: torch.Tensor, eps: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``x' = clip(x + delta * mask)`` to the eps-ball around ``x`` intersected with [0,1] (exact bounds)."""
    d = delta if mask is None else delta * mask
    lo = (x - eps).clamp_min(0.0)
    hi = (x + eps).clamp_max(1.0)
    return torch.clamp(x + d, min=lo, max=hi)


# ------------------------------------------------------------------------------------------------ container


class DMRNets(nn.Module):
    """A DMR attacker's networks: the generator, the discriminator (None: no mask) and how ``delta`` is centred."""

    def __init__(self, generator: nn.Module, discriminator: Discriminator | None = None, center: str = "zero") -> None:
        super().__init__()
        if center not in CENTERS:
            raise ValueError(f"center={center!r}; expected one of {CENTERS}")
        self.generator = generator
        self.discriminator = discriminator
        self.center = center

    @classmethod
    def from_config(cls, arch: dict[str, Any]) -> DMRNets:
        """Rebuild from :meth:`arch_config` (weights still random: load a state dict afterwards)."""
        d = arch.get("discriminator")
        return cls(Generator(**arch["generator"]), Discriminator(**d) if d is not None else None,
                   arch.get("center", "zero"))

    def arch_config(self) -> dict[str, Any]:
        """JSON-able architecture (what ``advreid.models.save_checkpoint`` stores)."""
        if not hasattr(self.generator, "arch_config"):
            raise TypeError(f"cannot describe a {type(self.generator).__name__} generator; use dmr.Generator")
        d = self.discriminator.arch_config() if self.discriminator is not None else None
        return {"generator": self.generator.arch_config(), "discriminator": d, "center": self.center}

    def candidate(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        """The bounded, unmasked perturbation ``delta`` for ``x``."""
        return bound_delta(self.generator(x), eps, self.center)

    def perturb(self, x: torch.Tensor, eps: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Adversarial images: ``delta = G(x)`` bounded, masked by the mask head, applied and clipped."""
        delta = self.candidate(x, eps)
        mask = None
        if self.discriminator is not None:
            mask = self.discriminator.mask(x, apply_delta(x, delta, eps).detach(), generator=generator)
        return apply_delta(x, delta, eps, mask)
