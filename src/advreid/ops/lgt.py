"""Batched local grayscale transformation (LGT, Gong et al.) on [0,1] tensors, with per-sample generators.

A rectangle is ``(top, left, h, w)``: rows ``[top, top+h)`` x columns ``[left, left+w)`` of the *untruncated* patch
(``h = w = 0``: no patch). Writing it clips the patch at the image border, which only happens in ``reference`` mode.

Grey value (``luma="pil"``): the image is rounded to 8 bits and grey-scaled exactly as Pillow's ``convert("L")``
does it (Pillow >= 9 ``Convert.c``: ``L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16`` on 0..255 integers, the
fixed-point form of the documented ITU-R 601-2 ``L = R*299/1000 + G*587/1000 + B*114/1000``), then divided by 255.
``luma="linear"`` is the differentiable ``0.299 R + 0.587 G + 0.114 B`` on the float values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

RECT_MODES = ("reference", "random_erasing")
LUMA_MODES = ("pil", "linear")

Generators = torch.Generator | Sequence[torch.Generator] | None


def pil_luma(x: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [0,1] -> (B,1,H,W) grey exactly as PIL ``convert("L")`` on the 8-bit (rounded) image, / 255."""
    _check_rgb(x)
    v = torch.round(x.detach() * 255).clamp_(0, 255).to(torch.int32)
    lum = (v[:, 0] * 19595 + v[:, 1] * 38470 + v[:, 2] * 7471 + 0x8000) >> 16
    return (lum.to(x.dtype) / 255).unsqueeze(1)


def linear_luma(x: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) -> (B,1,H,W) ITU-R 601-2 luma ``0.299 R + 0.587 G + 0.114 B`` (differentiable, no rounding)."""
    _check_rgb(x)
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def luma(x: torch.Tensor, mode: str = "pil") -> torch.Tensor:
    """Grey image (B,1,H,W) by ``mode`` ("pil" or "linear")."""
    if mode == "pil":
        return pil_luma(x)
    if mode == "linear":
        return linear_luma(x)
    raise ValueError(f"luma={mode!r} is not supported; expected one of {LUMA_MODES}")


def _check_rgb(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        desc = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected float images (B,3,H,W) in [0,1], got {desc}")


def check_lgt_params(sl: float, sh: float, r1: float, mode: str, p: float, attempts: int) -> None:
    """Validate LGT rectangle-sampler settings (one-line ValueError naming the bad one)."""
    if not 0 < sl <= sh <= 1:
        raise ValueError(f"LGT area fractions must satisfy 0 < sl <= sh <= 1, got sl={sl}, sh={sh}")
    if not 0 < r1 <= 1:
        raise ValueError(f"LGT aspect bound r1 must be in (0, 1] (ratio drawn from [r1, 1/r1]), got {r1}")
    if mode not in RECT_MODES:
        raise ValueError(f"LGT mode={mode!r} is not supported; expected one of {RECT_MODES}")
    if not 0 <= p <= 1:
        raise ValueError(f"LGT probability p must be in [0, 1], got {p}")
    if int(attempts) < 1:
        raise ValueError(f"LGT attempts must be >= 1, got {attempts}")


def rects_from_uniform(u: torch.Tensor, height: int, width: int, *, sl: float = 0.02, sh: float = 0.4,
                       r1: float = 0.3, mode: str = "reference", p: float = 1.0) -> torch.Tensor:
    """Rectangles from uniforms ``u`` (..., 1 + 4*attempts) in [0,1): the deterministic half of the sampler.

    ``u[..., 0]`` decides the skip (skip when >= p); attempt ``a`` uses ``u[..., 1+4a : 5+4a]`` for the area, the
    ratio and the two offsets, as the reference's ``uniform``/``uniform``/``randint``/``randint``. The first
    accepted attempt wins; none accepted or skipped -> ``(0, 0, 0, 0)``.
    """
    check_lgt_params(sl, sh, r1, mode, p, 1)
    if (u.shape[-1] - 1) % 4 or u.shape[-1] < 5:
        raise ValueError(f"u must have 1 + 4*attempts entries in its last dim, got {u.shape[-1]}")
    u = u.double()
    skip = u[..., 0] >= p
    a = u[..., 1:].unflatten(-1, (-1, 4))
    area = (sl + (sh - sl) * a[..., 0]) * (height * width)
    ratio = r1 + (1 / r1 - r1) * a[..., 1]
    h = torch.round(torch.sqrt(area * ratio)).long()  # round-half-even, as Python's round()
    w = torch.round(torch.sqrt(area / ratio)).long()
    if mode == "reference":
        # trans_gray.py: img.size == (W, H); accept w < H and h < W; x1 ~ U{0..W-h} (columns), y1 ~ U{0..H-w}
        ok = (w < height) & (h < width) & (h > 0) & (w > 0)
        left = torch.floor(a[..., 2] * (width - h + 1).clamp(min=1)).long()
        top = torch.floor(a[..., 3] * (height - w + 1).clamp(min=1)).long()
    else:
        # Random Erasing: h < H, w < W; top ~ U{0..H-h}, left ~ U{0..W-w}
        ok = (h < height) & (w < width) & (h > 0) & (w > 0)
        top = torch.floor(a[..., 2] * (height - h + 1).clamp(min=1)).long()
        left = torch.floor(a[..., 3] * (width - w + 1).clamp(min=1)).long()
    first = ok.long().argmax(dim=-1, keepdim=True)  # index of the first accepted attempt
    rect = torch.stack([t.gather(-1, first).squeeze(-1) for t in (top, left, h, w)], dim=-1)
    keep = ok.any(dim=-1) & ~skip
    return torch.where(keep.unsqueeze(-1), rect, torch.zeros_like(rect))


def _uniforms(batch: int, generators: Generators, tail: tuple[int, ...]) -> torch.Tensor:
    """(batch, *tail) float64 uniforms: one draw per sample from its own generator, or one draw for all."""
    if generators is None or isinstance(generators, torch.Generator):
        return torch.rand((batch, *tail), generator=generators, dtype=torch.float64)
    gens = list(generators)
    if len(gens) != batch:
        raise ValueError(f"expected one generator per sample ({batch}), got {len(gens)}")
    if batch == 0:
        return torch.empty((0, *tail), dtype=torch.float64)
    return torch.stack([torch.rand(tail, generator=g, dtype=torch.float64) for g in gens])


def sample_lgt_rects(batch: int, height: int, width: int, generators: Generators = None, *, sl: float = 0.02,
                     sh: float = 0.4, r1: float = 0.3, mode: str = "reference", p: float = 1.0,
                     attempts: int = 100, draws: int | None = None) -> torch.Tensor:
    """LGT rectangles (B,4) int64 ``(top, left, h, w)``; with ``draws=T``, (T,B,4) (T independent draws each).

    ``generators``: one ``torch.Generator`` per sample (batch-independent results), a single generator for the whole
    batch, or None (global RNG). ``mode``: "reference" (the seed's mixed axes, patch may be cut at the border) or
    "random_erasing" (the intended axes, the patch always fits).
    """
    check_lgt_params(sl, sh, r1, mode, p, attempts)
    if batch < 0 or height < 1 or width < 1:
        raise ValueError(f"need batch >= 0 and a positive image size, got B={batch}, H={height}, W={width}")
    n = 1 if draws is None else int(draws)
    if n < 0:
        raise ValueError(f"draws must be >= 0, got {draws}")
    u = _uniforms(batch, generators, (n, 1 + 4 * int(attempts)))  # (B, T, 1+4A)
    rects = rects_from_uniform(u, height, width, sl=sl, sh=sh, r1=r1, mode=mode, p=p).transpose(0, 1)
    return rects[0] if draws is None else rects.contiguous()


def rect_masks(rects: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boolean masks (..., 1, H, W) of rectangles (..., 4), clipped at the image border."""
    if rects.shape[-1] != 4:
        raise ValueError(f"rects must have shape (..., 4) = (top, left, h, w), got {tuple(rects.shape)}")
    top, left, h, w = rects.unbind(-1)
    rows = torch.arange(height, device=rects.device)
    cols = torch.arange(width, device=rects.device)
    rin = (rows >= top[..., None]) & (rows < (top + h)[..., None])
    cin = (cols >= left[..., None]) & (cols < (left + w)[..., None])
    return (rin[..., :, None] & cin[..., None, :]).unsqueeze(-3)


def local_grayscale(x: torch.Tensor, rects: torch.Tensor, *, luma_mode: str = "pil",
                    gray: torch.Tensor | None = None) -> torch.Tensor:
    """Copy of ``x`` (B,3,H,W) whose rectangle ``rects[i]`` (B,4) is grey (R = G = B = luma); outside unchanged.

    ``gray`` (B,1,H,W) may be passed to reuse a luma computed once (e.g. of the same clean image every step).
    """
    _check_rgb(x)
    if rects.shape != (x.shape[0], 4):
        raise ValueError(f"rects must have shape ({x.shape[0]}, 4), one per image, got {tuple(rects.shape)}")
    g = luma(x, luma_mode) if gray is None else gray
    mask = rect_masks(rects.to(x.device), x.shape[2], x.shape[3])
    return torch.where(mask, g.to(x.dtype), x)


def lgt(x: torch.Tensor, generators: Generators = None, p: float = 1.0, *, sl: float = 0.02, sh: float = 0.4,
        r1: float = 0.3, mode: str = "reference", attempts: int = 100, luma_mode: str = "pil") -> torch.Tensor:
    """Local grayscale transformation of a batch: each image gets its own rectangle with probability ``p``."""
    _check_rgb(x)
    rects = sample_lgt_rects(x.shape[0], x.shape[2], x.shape[3], generators, sl=sl, sh=sh, r1=r1, mode=mode, p=p,
                             attempts=attempts)
    return local_grayscale(x, rects, luma_mode=luma_mode)
