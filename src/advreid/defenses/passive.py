"""Passive (test-time) defenses: input transforms applied to queries and gallery alike, and the defended model.

Every preprocess maps float (B,3,H,W) images in [0,1] to [0,1] images (normally of the same size) and is usable by
an adaptive attacker: differentiable steps keep their exact gradient, non-differentiable ones (8-bit rounding, JPEG)
use BPDA (``bpda``: exact forward, the surrogate's gradient backward), and randomized ones (``randomized``) need EOT
(``Attack(..., eot_samples=k)``). Random draws come from per-sample generators when an attack sets them
(:meth:`Preprocess.set_streams`: sample i draws from its own stream (seed, index, step, draw), so an adaptive attack
is reproducible and independent of the batch), else from ``self.generator`` when set, else from the global RNG.
Build by name with ``build_passive("cs")``; ``list_passive()`` names them all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advreid.ops import per_sample_rand, reencode
from advreid.ops import quantize as quantize_8bit
from advreid.registry import Preset, Registry

Size = tuple[int, int]
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")

# Seed Table 6 patterns and the reference code's "JAD2" variant: sizes for Market's native 128x64 images (the seed
# hops from the image file: the 110x50 bottleneck is about 0.86 of the native size).
P1: tuple[Size, ...] = ((110, 50),)
P2: tuple[Size, ...] = ((220, 100),)
P1P2: tuple[Size, ...] = ((110, 50), (220, 100))
P1P2P1: tuple[Size, ...] = ((110, 50), (220, 100), (110, 50))
CS_SIZES = P1P2P1
JAD2_SIZES: tuple[Size, ...] = ((90, 40), (200, 90), (90, 40))


def bpda(forward_value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """Value of ``forward_value``, gradient of ``surrogate`` (identity surrogate = straight-through).

    Same as ``surrogate + (forward_value - surrogate).detach()`` but exact in value: ``fv + (s - s.detach())``.
    """
    if not (torch.is_grad_enabled() and surrogate.requires_grad):
        return forward_value.detach()
    return forward_value.detach() + (surrogate - surrogate.detach())


def _check_images(x: torch.Tensor, who: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        desc = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{who} expects float images (B,C,H,W) in [0,1], got {desc}")


def _size(v: Any, name: str) -> Size:
    try:
        h, w = v
        ok = all(not isinstance(t, bool) and int(t) == t and int(t) > 0 for t in (h, w))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name}={v!r} must be a pair (height, width) of positive ints")
    return int(h), int(w)


def _round_half_up(v: float) -> int:
    return max(1, int(math.floor(v + 0.5)))


class Preprocess(nn.Module):
    """A passive defense: (B,3,H,W) [0,1] -> (B,3,H',W') [0,1]; ``params()`` rebuilds it via ``build_passive``."""

    name: str = "preprocess"
    randomized: bool = False  # needs EOT (a fresh random draw on every call)
    differentiable: bool = True  # exact gradient exists (else BPDA)

    def __init__(self) -> None:
        super().__init__()
        self.generator: torch.Generator | None = None
        self.streams: list[torch.Generator] | None = None

    def set_streams(self, streams: list[torch.Generator] | None) -> None:
        """Per-sample generators for the next calls (one per image of the batch), or None to stop using them."""
        self.streams = None if streams is None else list(streams)

    def uniforms(self, n: int, k: int) -> torch.Tensor:
        """(n, k) float64 U[0,1) draws on the CPU: row i from the sample's stream when set, else one draw for the
        batch from ``self.generator`` or the global RNG."""
        if self.streams is not None:
            if len(self.streams) != n:
                raise ValueError(f"{type(self).__name__}: {len(self.streams)} random streams for {n} images")
            return per_sample_rand(self.streams, (k,), dtype=torch.float64)
        return torch.rand((n, k), generator=self.generator, dtype=torch.float64)

    def params(self) -> dict[str, Any]:
        """JSON-able description that rebuilds this preprocess: ``build_passive(p.pop("name"), p)``."""
        return {"name": self.name, **self._kwargs()}

    def _kwargs(self) -> dict[str, Any]:
        return {}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._kwargs().items())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, type(self).__name__)
        return self.transform(x)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """The defense on a checked batch."""
        raise NotImplementedError


_RESIZE_MATRICES: dict[tuple, torch.Tensor] = {}


def resize_matrix(n_in: int, n_out: int, mode: str = "bicubic", antialias: bool = True, *,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n_out, n_in) matrix of the 1-D resize ``F.interpolate`` performs along one axis (it is separable and linear),
    read off by resizing the identity; cached."""
    key = (n_in, n_out, mode, antialias, dtype, str(device))
    m = _RESIZE_MATRICES.get(key)
    if m is None:
        eye = torch.eye(n_in, dtype=torch.float64).view(1, 1, n_in, n_in)
        m = F.interpolate(eye, size=(n_out, n_in), mode=mode, align_corners=False, antialias=antialias)[0, 0]
        m = m.to(dtype=dtype, device=device)
        if len(_RESIZE_MATRICES) > 256:
            _RESIZE_MATRICES.clear()
        _RESIZE_MATRICES[key] = m
    return m


def _resize(x: torch.Tensor, size: Size, mode: str, antialias: bool) -> torch.Tensor:
    """Resize as two matrix products (rows, then columns): the same values as ``F.interpolate``, and a backward pass
    that is a matrix product too (CPU autograd through antialiased ``interpolate`` is ~20x slower)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    mh = resize_matrix(x.shape[-2], size[0], mode, antialias, dtype=x.dtype, device=x.device)
    mw = resize_matrix(x.shape[-1], size[1], mode, antialias, dtype=x.dtype, device=x.device)
    return mh @ x @ mw.T


class CircuitousScaling(Preprocess):
    """CS (seed, Gong et al. 2022): bicubic resize hops through ``sizes`` then back to ``final`` (default: input size).

    The hops are relative to the dataset's *native* image size, as in the seed (which hops from the image file):
    ``sizes`` are stated for a ``reference_size`` image (128x64) and scaled by ``native_size / reference_size``
    (half-up rounding), whatever size the model takes -- so the bottleneck is ~0.86 of the content both for Market
    at 256x128 and for a 128x64 demo. ``native_size=None`` is the older rule, where the sizes scale with the input
    (``reference_size`` is then the input size they are stated for, e.g. (256, 128)); ``reference_size=None`` makes
    them absolute. ``quantize`` rounds every hop (and the input) to 8 bits like the seed's PIL chain, with a
    straight-through gradient. ``jitter > 0`` multiplies each image's hop sizes by its own U(1-jitter, 1+jitter).
    """

    name = "cs"

    def __init__(self, sizes: Sequence[Sequence[int]] = CS_SIZES, final: Sequence[int] | None = None, *,
                 interpolation: str = "bicubic", antialias: bool = True,
                 reference_size: Sequence[int] | None = (128, 64), native_size: Sequence[int] | None = (128, 64),
                 quantize: bool = False, jitter: float = 0.0) -> None:
        super().__init__()
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or len(sizes) == 0:
            raise ValueError(f"sizes={sizes!r} must be a non-empty sequence of (height, width) pairs")
        self.sizes = tuple(_size(s, f"sizes[{i}]") for i, s in enumerate(sizes))
        self.final = None if final is None else _size(final, "final")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={interpolation!r} is not supported; expected one of {INTERPOLATIONS}")
        self.interpolation = interpolation
        self.antialias = bool(antialias)
        self.reference_size = None if reference_size is None else _size(reference_size, "reference_size")
        self.native_size = None if native_size is None else _size(native_size, "native_size")
        self.quantize = bool(quantize)
        if isinstance(jitter, bool) or not isinstance(jitter, (int, float)) or not 0.0 <= float(jitter) < 1.0:
            raise ValueError(f"jitter={jitter!r} must be a float in [0, 1)")
        self.jitter = float(jitter)
        self.differentiable = not self.quantize
        self.randomized = self.jitter > 0

    def _kwargs(self) -> dict[str, Any]:
        return {"sizes": [list(s) for s in self.sizes], "final": None if self.final is None else list(self.final),
                "interpolation": self.interpolation, "antialias": self.antialias,
                "reference_size": None if self.reference_size is None else list(self.reference_size),
                "native_size": None if self.native_size is None else list(self.native_size),
                "quantize": self.quantize, "jitter": self.jitter}

    def hop_sizes(self, height: int, width: int, factor: float = 1.0) -> list[Size]:
        """Intermediate sizes (h, w) for an ``height`` x ``width`` input, times a jitter ``factor``."""
        base = (height, width) if self.native_size is None else self.native_size
        sy, sx = (1.0, 1.0) if self.reference_size is None else (base[0] / self.reference_size[0],
                                                                 base[1] / self.reference_size[1])
        return [(_round_half_up(h * sy * factor), _round_half_up(w * sx * factor)) for h, w in self.sizes]

    def output_size(self, height: int, width: int) -> Size:
        """Output size for an ``height`` x ``width`` input (``final``, or the input's own size)."""
        return self.final if self.final is not None else (height, width)

    def _hop(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        y = _resize(x, size, self.interpolation, self.antialias).clamp(0, 1)
        return bpda(quantize_8bit(y, "round"), y) if self.quantize else y

    def _chain(self, x: torch.Tensor, hops: list[Size], final: Size) -> torch.Tensor:
        for s in hops:
            x = self._hop(x, s)
        return self._hop(x, final)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        final = self.output_size(h, w)
        if self.quantize:
            x = bpda(quantize_8bit(x.clamp(0, 1), "round"), x)
        if not self.randomized:
            return self._chain(x, self.hop_sizes(h, w), final)
        factors = 1.0 + self.jitter * (2.0 * self.uniforms(x.shape[0], 1)[:, 0] - 1.0)
        return torch.cat([self._chain(x[i:i + 1], self.hop_sizes(h, w, float(f)), final)
                          for i, f in enumerate(factors.tolist())])


class RandomResizePad(Preprocess):
    """RRP (Xie et al. 2018) for ReID: shrink each image by its own factor U(scale) and pad it at a random offset.

    The H x W canvas is filled with ``pad_value``; the shrunk size is round(factor * (H, W)) (half-up).
    """

    name = "rrp"
    randomized = True

    def __init__(self, scale: Sequence[float] = (0.875, 1.0), *, pad_value: float = 0.5,
                 interpolation: str = "bilinear", antialias: bool = True) -> None:
        super().__init__()
        try:
            lo, hi = (float(v) for v in scale)
        except (TypeError, ValueError):
            raise ValueError(f"scale={scale!r} must be a pair (low, high) with 0 < low <= high <= 1") from None
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"scale={scale!r} must be a pair (low, high) with 0 < low <= high <= 1")
        self.scale = (lo, hi)
        if isinstance(pad_value, bool) or not isinstance(pad_value, (int, float)) or not 0 <= pad_value <= 1:
            raise ValueError(f"pad_value={pad_value!r} must be a float in [0, 1]")
        self.pad_value = float(pad_value)
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation={interpolation!r} is not supported; expected one of {INTERPOLATIONS}")
        self.interpolation = interpolation
        self.antialias = bool(antialias)

    def _kwargs(self) -> dict[str, Any]:
        return {"scale": list(self.scale), "pad_value": self.pad_value, "interpolation": self.interpolation,
                "antialias": self.antialias}

    def sample(self, n: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """Per-image (h', w', top, left) draws (3 uniforms per image, from the generator or the global RNG)."""
        u = self.uniforms(n, 3).tolist()
        lo, hi = self.scale
        out = []
        for us, ut, ul in u:
            f = lo + (hi - lo) * us
            h2, w2 = min(height, _round_half_up(f * height)), min(width, _round_half_up(f * width))
            top = min(height - h2, int(ut * (height - h2 + 1)))
            left = min(width - w2, int(ul * (width - w2 + 1)))
            out.append((h2, w2, top, left))
        return out

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        out = []
        for i, (h2, w2, top, left) in enumerate(self.sample(x.shape[0], h, w)):
            y = _resize(x[i:i + 1], (h2, w2), self.interpolation, self.antialias).clamp(0, 1)
            out.append(F.pad(y, (left, w - w2 - left, top, h - h2 - top), value=self.pad_value))
        return torch.cat(out) if out else x.clone()


class JPEG(Preprocess):
    """JPEG round-trip at ``quality`` (8-bit rounding first; PIL defaults); straight-through (BPDA) gradient."""

    name = "jpeg"
    differentiable = False

    def __init__(self, quality: int = 75) -> None:
        super().__init__()
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"quality={quality!r} must be an int in 1..100")
        self.quality = quality

    def _kwargs(self) -> dict[str, Any]:
        return {"quality": self.quality}

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.clone()
        return bpda(reencode(x.detach(), f"jpeg:{self.quality}"), x)


class BitDepth(Preprocess):
    """Bit-depth reduction (Xu et al., feature squeezing): round to 2**bits levels; straight-through gradient."""

    name = "bitdepth"
    differentiable = False

    def __init__(self, bits: int = 5) -> None:
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"bits={bits!r} must be an int in 1..8")
        self.bits = bits

    def _kwargs(self) -> dict[str, Any]:
        return {"bits": self.bits}

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        n = 2 ** self.bits - 1
        return bpda(torch.round(x.detach().clamp(0, 1) * n) / n, x)


class Chain(Preprocess):
    """Composition ``modules[-1] ∘ ... ∘ modules[0]``; randomized if any part is, differentiable if all are."""

    name = "chain"

    def __init__(self, *modules: Preprocess) -> None:
        super().__init__()
        if not modules:
            raise ValueError("Chain needs at least one preprocess module")
        for i, m in enumerate(modules):
            if not isinstance(m, nn.Module):
                raise ValueError(f"Chain: modules[{i}] must be a Preprocess (nn.Module), got {type(m).__name__}")
        self.steps = nn.ModuleList(modules)
        self.randomized = any(getattr(m, "randomized", False) for m in modules)
        self.differentiable = all(getattr(m, "differentiable", True) for m in modules)

    def params(self) -> dict[str, Any]:
        return {"name": self.name, "modules": [m.params() for m in self.steps]}

    def set_streams(self, streams: list[torch.Generator] | None) -> None:
        """The same per-sample generators for every randomised part (each draws from them in turn)."""
        for m in self.steps:
            if hasattr(m, "set_streams"):
                m.set_streams(streams)

    def extra_repr(self) -> str:
        return ""

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.steps:
            x = m(x)
        return x


# ------------------------------------------------------------------------------------------------ registry


def _build_chain(modules: Sequence[dict[str, Any] | Preprocess] = ()) -> Chain:
    parts = []
    for i, m in enumerate(modules):
        if isinstance(m, Preprocess):
            parts.append(m)
        elif isinstance(m, dict) and "name" in m:
            p = dict(m)
            parts.append(build_passive(p.pop("name"), p))
        else:
            raise ValueError(f"chain: modules[{i}]={m!r} must be a Preprocess or a dict with a 'name' key")
    return Chain(*parts)


PASSIVE: Registry[Preset] = Registry("passive defense")


def register_passive(name: str, cls: type[Preprocess], *, build: Callable[..., Preprocess] | None = None,
                     overwrite: bool = False, **defaults: Any) -> None:
    """Register ``cls`` under ``name`` with preset ``defaults`` for its constructor."""
    PASSIVE.add_preset(name, build or cls, overwrite=overwrite, **defaults)


def build_passive(name: str | None, params: dict[str, Any] | None = None) -> Preprocess | None:
    """The passive defense ``name`` (``list_passive()``) with ``params`` overriding its preset; None/"none" -> None.

    Unknown names raise KeyError (listing the names), unknown parameters ValueError (listing the valid ones).
    """
    if name is None or (isinstance(name, str) and name.strip().lower() == "none"):
        if params:
            raise ValueError(f"passive defense {name!r} takes no parameters, got {sorted(params)}")
        return None
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"params must be a dict of constructor arguments, got {type(params).__name__}")
    return PASSIVE.get(str(name).strip())(**(params or {}))


def list_passive() -> list[str]:
    """Names of the registered passive defenses and presets."""
    return PASSIVE.names()


register_passive("cs", CircuitousScaling)
register_passive("cs_pil", CircuitousScaling, quantize=True)
register_passive("cs_jad2", CircuitousScaling, sizes=JAD2_SIZES)
register_passive("cs_random", CircuitousScaling, jitter=0.1)
register_passive("p1", CircuitousScaling, sizes=P1)
register_passive("p2", CircuitousScaling, sizes=P2)
register_passive("p1p2", CircuitousScaling, sizes=P1P2)
register_passive("p1p2p1", CircuitousScaling, sizes=P1P2P1)
register_passive("rrp", RandomResizePad)
register_passive("jpeg", JPEG)
register_passive("bitdepth", BitDepth)
register_passive("chain", Chain, build=_build_chain)


# ----------------------------------------------------------------------------------------- defended model


class DefendedModel(nn.Module):
    """``model ∘ preprocess``: forward and ``features`` give the model's embedding of ``preprocess(x)``.

    ``preprocess=None`` is the bare model; the wrapper starts in the model's train/eval mode. Attack it to get an
    adaptive attacker (BPDA built in; EOT via the attack's ``eot_samples`` when ``randomized``).
    """

    def __init__(self, model: nn.Module, preprocess: nn.Module | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module mapping [0,1] images to embeddings, "
                             f"got {type(model).__name__}")
        if preprocess is not None and not isinstance(preprocess, nn.Module):
            raise ValueError(f"preprocess must be a Preprocess (nn.Module) or None, got {type(preprocess).__name__}")
        self.model = model
        self.preprocess = preprocess
        if hasattr(model, "checkpoint_meta"):
            self.checkpoint_meta = model.checkpoint_meta
        self.train(model.training)  # wrapping keeps the model's mode (a fresh nn.Module would be in train mode)

    @property
    def randomized(self) -> bool:
        """True when the preprocess draws randomness (attack it with EOT)."""
        return bool(getattr(self.preprocess, "randomized", False))

    def set_random_streams(self, streams: list[torch.Generator] | None) -> None:
        """Per-sample random streams for a randomised preprocess (attacks call this before each EOT draw)."""
        if self.preprocess is not None and hasattr(self.preprocess, "set_streams"):
            self.preprocess.set_streams(streams)

    @property
    def differentiable(self) -> bool:
        """True when the whole pipeline has an exact gradient (no BPDA step)."""
        return bool(getattr(self.preprocess, "differentiable", True))

    @property
    def embed_dim(self) -> int:
        """The wrapped model's embedding dimension."""
        return self.model.embed_dim

    def describe(self) -> str:
        """Short label for tables: the preprocess name, or "none"."""
        return "none" if self.preprocess is None else str(getattr(self.preprocess, "name", type(self.preprocess)
                                                                 .__name__))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The model's embedding of ``preprocess(x)``."""
        if self.preprocess is not None:
            x = self.preprocess(x)
        fn = getattr(self.model, "features", None)
        return fn(x) if callable(fn) else self.model(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def extra_repr(self) -> str:
        return f"defense={self.describe()!r}"
