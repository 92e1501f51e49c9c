"""Proactive (training-time) defence of Gong et al. CVPR 2022 "JAD": grey, sketch, channel fusion, AutoAug, LHT, DL.

Batched versions of the reference ``multimodal.py`` / ``defendAugment.py`` transforms (spec sections 3.1-3.5) on
float images (B,3,H,W) in [0,1] (or one image (3,H,W)), on the input's device. Every random choice is drawn on the
CPU in float64 from ``generators``: None (global RNG), one ``torch.Generator`` for the batch, or a list with one CPU
generator per image (then an image's result does not depend on its batch-mates).

Decisions (spec section 4):

* Sketch blur: OpenCV's 27x27 Gaussian (sigma 4.4) with BORDER_REFLECT_101, applied as two dense (H,H) and (W,W)
  matrices that fold the taps back into the image by *repeated* reflection, as OpenCV's ``borderInterpolate``
  does. This equals ``F.pad(mode="reflect")`` + convolution whenever the pad (13) is smaller than the side and
  also works on smaller images, where padding would fail. The blurred image is rounded to 8 bits (OpenCV's
  output is uint8; its fixed-point kernel can differ by one level from the exact float rounding used here).
* Channel fusion ``mode="reference"`` is the seed's ``random_choose`` (shuffle ``[R,G,B,X,X]``, take the first
  three: 1/2/3 RGB channels kept with probability 0.3/0.6/0.1). ``mode="paper"`` reads "1 or 2 channels are
  randomly selected from R, G, B": k in {1,2} uniformly, k distinct RGB channels in random order, put in random
  output slots, X in the others (27 layouts per X, 54 with grey and sketch; the paper's "60 variations" would
  be 5*4*3 ordered triples, which mixes grey with sketch, something neither reading nor the code does).
* AutoAug: on the 8-bit image, matching Pillow (what the seed ran) level for level in our tests: torchvision's
  uint8 ``posterize``, ``solarize``, ``equalize``, ``invert``, ``adjust_brightness``; own code where torchvision
  differs from Pillow: rotate / shear / translate (Pillow's affine coordinates, its fixed-point nearest and a = -1
  bicubic, grey-128 fill; torchvision's tensor ``affine`` has no bicubic), color / contrast / sharpness (Pillow's
  ``ImageEnhance`` degenerate images and float32 truncating blend), autocontrast (Pillow's truncating LUT).
  Solarize thresholds >= 256 are the identity.
* Cost: a transform runs only on the images that drew it (index_select / index_copy), once per batch for the
  whole-image branch and the LHT patches together; random draws are made on the CPU, so on CUDA only the image
  ops (and small index copies) run on the device.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from torch import nn

from advreid.ops import RECT_MODES, lgt, per_sample_rand, pil_luma, rect_masks, sample_lgt_rects
from advreid.registry import Preset, Registry

Generators = torch.Generator | Sequence[torch.Generator] | None

FUSION_MODES = ("reference", "paper")
BRANCHES = ("gray", "gray_rgb", "sketch_rgb", "aug", "lht", "none")
LHT_TRANSFORMS = ("gray", "gray_rgb", "sketch_rgb", "aug")
SKETCH_KSIZE = 27
SKETCH_SIGMA = 0.3 * ((SKETCH_KSIZE - 1) / 2 - 1) + 0.8  # OpenCV's rule for sigma <= 0: 4.4
FILL = 128

# ------------------------------------------------------------------------------------------ input helpers


def _as_batch(x: torch.Tensor, name: str = "x") -> tuple[torch.Tensor, bool]:
    """(B,3,H,W) float view of ``x`` and whether it was a single image (3,H,W)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a float tensor (B,3,H,W) or (3,H,W) in [0,1], got {type(x).__name__}")
    if not x.is_floating_point() or x.dim() not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"{name} must be a float tensor (B,3,H,W) or (3,H,W) in [0,1], got shape "
                         f"{tuple(x.shape)} dtype {x.dtype}")
    return (x.unsqueeze(0), True) if x.dim() == 3 else (x, False)


def _check_generators(generators: Generators, batch: int) -> None:
    if generators is None or isinstance(generators, torch.Generator):
        return
    gens = list(generators)
    if len(gens) != batch or not all(isinstance(g, torch.Generator) for g in gens):
        raise ValueError(f"generators must be None, one torch.Generator, or a list of one CPU torch.Generator per "
                         f"image ({batch}), got {len(gens)} item(s)")


def _draw(batch: int, generators: Generators, k: int) -> torch.Tensor:
    """(batch, k) float64 CPU uniforms: per image from its own generator, or one draw for all."""
    if generators is None or isinstance(generators, torch.Generator):
        return torch.rand((batch, k), generator=generators, dtype=torch.float64)
    gens = list(generators)
    if len(gens) != batch:
        raise ValueError(f"expected one generator per image ({batch}), got {len(gens)}")
    return per_sample_rand(gens, (k,), dtype=torch.float64)


def _subset(generators: Generators, idx: torch.Tensor) -> Generators:
    if generators is None or isinstance(generators, torch.Generator):
        return generators
    gens = list(generators)
    return [gens[i] for i in idx.tolist()]


def _dev(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor (indices, weights) on ``device`` without a stream sync (the copy is staged by CUDA)."""
    return t.to(device, non_blocking=True)


def _to_u8(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 255).clamp_(0, 255).to(torch.uint8)


def _from_u8(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) / 255


def _unbatch(y: torch.Tensor, single: bool) -> torch.Tensor:
    return y[0] if single else y


# ----------------------------------------------------------------------------------------- grey and sketch


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Full greyscale (B,3,H,W): PIL ``convert("L")`` luma of the 8-bit image replicated on R, G, B."""
    x4, single = _as_batch(x)
    return _unbatch(pil_luma(x4).expand(-1, 3, -1, -1).contiguous(), single)


def _reflect101(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Fold indices into [0, n) by repeated reflect-101 (OpenCV ``borderInterpolate``, BORDER_REFLECT_101)."""
    if n == 1:
        return torch.zeros_like(idx)
    while bool(((idx < 0) | (idx >= n)).any()):
        idx = torch.where(idx < 0, -idx, idx)
        idx = torch.where(idx >= n, 2 * (n - 1) - idx, idx)
    return idx


@functools.lru_cache(maxsize=32)
def blur_matrix(n: int, ksize: int = SKETCH_KSIZE, sigma: float = SKETCH_SIGMA,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """(n,n) float64 matrix M with ``M @ v`` = OpenCV's 1-D Gaussian blur of v (normalised kernel, reflect-101)."""
    if ksize < 1 or ksize % 2 == 0 or sigma <= 0:
        raise ValueError(f"blur needs an odd ksize >= 1 and sigma > 0, got ksize={ksize}, sigma={sigma}")
    half = ksize // 2
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    w = torch.exp(-t * t / (2 * sigma * sigma))
    w = w / w.sum()
    idx = _reflect101(torch.arange(n)[:, None] + torch.arange(-half, half + 1)[None, :], n)
    m = torch.zeros(n, n, dtype=torch.float64)
    m.scatter_add_(1, idx, w.expand(n, -1).contiguous())
    return m.to(device)


def sketch(x: torch.Tensor) -> torch.Tensor:
    """Colour-dodge sketch (B,1,H,W) of the PIL grey image, as the seed's ``toSketch`` (OpenCV blur + divide)."""
    x4, single = _as_batch(x)
    h, w = x4.shape[-2:]
    g = torch.round(pil_luma(x4.float()).double() * 255)  # 0..255 integers
    kh = blur_matrix(h, device=x4.device)
    kw = blur_matrix(w, device=x4.device)
    blur = torch.round(kh @ (255 - g) @ kw.T).clamp_(0, 255)  # GaussianBlur(255 - Gray), uint8
    den = 255 - blur
    s = torch.where(den > 0, torch.round(256 * g / den.clamp(min=1)).clamp_(0, 255), torch.zeros_like(g))
    return _unbatch((s / 255).to(x4.dtype), single)


# ------------------------------------------------------------------------------------------ channel fusion


def channel_fusion(x: torch.Tensor, extra: torch.Tensor, generators: Generators = None, *,
                   mode: str = "reference") -> torch.Tensor:
    """Per image, new R,G,B drawn from {R,G,B,X} (X = ``extra`` (B,1,H,W), grey or sketch): the seed's CF."""
    x4, single = _as_batch(x)
    if mode not in FUSION_MODES:
        raise ValueError(f"channel fusion mode={mode!r} is not supported; expected one of {FUSION_MODES}")
    e4 = extra.unsqueeze(0) if single and extra.dim() == 3 else extra
    if e4.dim() != 4 or e4.shape[1] != 1 or e4.shape[0] != x4.shape[0] or e4.shape[2:] != x4.shape[2:]:
        raise ValueError(f"extra must be one channel (B,1,H,W) matching x {tuple(x4.shape)}, got {tuple(extra.shape)}")
    b = x4.shape[0]
    _check_generators(generators, b)
    if mode == "reference":
        # random_choose: shuffle the slots [R, G, B, X, X] and keep the first three, in order
        perm = _draw(b, generators, 5).argsort(dim=1)[:, :3]
        src = torch.tensor([0, 1, 2, 3, 3])[perm]
    else:
        u = _draw(b, generators, 7)
        keep = torch.where(u[:, 0] < 0.5, 1, 2)  # 1 or 2 RGB channels, uniformly
        rgb = u[:, 1:4].argsort(dim=1)  # which channels, in random order
        slots = u[:, 4:7].argsort(dim=1)  # which output slot gets the j-th source
        ordered = torch.where(torch.arange(3)[None, :] < keep[:, None], rgb, torch.full_like(rgb, 3))
        src = torch.empty_like(ordered).scatter_(1, slots, ordered)
    pool = torch.cat([x4, e4.to(x4.dtype)], dim=1)  # (B,4,H,W)
    src = _dev(src, x4.device)
    out = pool.gather(1, src[:, :, None, None].expand(-1, -1, *x4.shape[2:]))
    return _unbatch(out, single)


# --------------------------------------------------------------------------------------------- AutoAugment

AUTO_AUG_POLICIES: tuple[tuple[float, str, int, float, str, int], ...] = (
    (0.4, "posterize", 8, 0.6, "rotate", 9), (0.6, "solarize", 5, 0.6, "autocontrast", 5),
    (0.8, "equalize", 8, 0.6, "equalize", 3), (0.6, "posterize", 7, 0.6, "posterize", 6),
    (0.4, "equalize", 7, 0.2, "solarize", 4), (0.4, "equalize", 4, 0.8, "rotate", 8),
    (0.6, "solarize", 3, 0.6, "equalize", 7), (0.8, "posterize", 5, 1.0, "equalize", 2),
    (0.2, "rotate", 3, 0.6, "solarize", 8), (0.6, "equalize", 8, 0.4, "posterize", 6),
    (0.8, "rotate", 8, 0.4, "color", 0), (0.4, "rotate", 9, 0.6, "equalize", 2),
    (0.0, "equalize", 7, 0.8, "equalize", 8), (0.6, "invert", 4, 1.0, "equalize", 8),
    (0.6, "color", 4, 1.0, "contrast", 8), (0.8, "rotate", 8, 1.0, "color", 2),
    (0.8, "color", 8, 0.8, "solarize", 7), (0.4, "sharpness", 7, 0.6, "invert", 8),
    (0.6, "shearX", 5, 1.0, "equalize", 9), (0.4, "color", 0, 0.6, "equalize", 3),
    (0.4, "equalize", 7, 0.2, "solarize", 4), (0.6, "solarize", 5, 0.6, "autocontrast", 5),
    (0.6, "invert", 4, 1.0, "equalize", 8), (0.6, "color", 4, 1.0, "contrast", 8),
    (0.8, "equalize", 8, 0.6, "equalize", 3),
)


def _grid(n: int, lo: float, hi: float) -> tuple[float, ...]:
    return tuple(lo + (hi - lo) * i / (n - 1) for i in range(n))


AUTO_AUG_MAGNITUDES: dict[str, tuple[float, ...]] = {
    "shearX": _grid(10, 0, 0.3), "shearY": _grid(10, 0, 0.3),
    "translateX": _grid(10, 0, 150 / 331), "translateY": _grid(10, 0, 150 / 331),
    "rotate": _grid(10, 0, 30), "color": _grid(10, 0, 0.9), "contrast": _grid(10, 0, 0.9),
    "sharpness": _grid(10, 0, 0.9), "brightness": _grid(10, 0, 0.9),
    "posterize": tuple(float(round(v)) for v in _grid(10, 8, 4)),  # np.round: 8 8 7 7 6 6 5 5 4 4
    "solarize": _grid(10, 256, 0),
    "autocontrast": (0.0,) * 10, "equalize": (0.0,) * 10, "invert": (0.0,) * 10,
}
SIGNED_OPS = frozenset({"shearX", "shearY", "translateX", "translateY", "color", "contrast", "sharpness",
                        "brightness"})


def _pil_cubic(v1: torch.Tensor, v2: torch.Tensor, v3: torch.Tensor, v4: torch.Tensor,
               d: torch.Tensor) -> torch.Tensor:
    """Pillow ``Geometry.c`` BICUBIC macro (a = -1 cubic, Horner form, same operation order) at fraction ``d``."""
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def _pil_affine(img: torch.Tensor, coeffs: Sequence[float], resample: str) -> torch.Tensor:
    """PIL ``Image.transform(size, AFFINE, coeffs, resample, fillcolor=128)`` on uint8 images (B,C,H,W).

    Output pixel (x, y) reads the input at ``(a X + b Y + c, d X + e Y + f)`` with ``X = x + 0.5, Y = y + 0.5``;
    sources outside the image get the fill. "nearest" takes the pixel under the point (with Pillow's fixed-point
    arithmetic for rotations); "bicubic" is Pillow's a = -1 cubic on the 4x4 edge-clamped neighbours, clipped and
    truncated to uint8. Both match Pillow exactly in our tests (bicubic could differ by one level where the
    float result lands within rounding error of an integer).
    """
    _, _, h, w = img.shape
    a, b, c, d, e, f = (float(v) for v in coeffs)
    dev = img.device
    # coordinates, taps and weights on the CPU (cheap, no device sync); only the gathers run on the device
    ys = torch.arange(h, dtype=torch.float64)[:, None] + 0.5
    xs = torch.arange(w, dtype=torch.float64)[None, :] + 0.5
    xin, yin = a * xs + b * ys + c, d * xs + e * ys + f
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    src = img.double()
    if resample == "nearest":
        if b == 0 and d == 0:  # Pillow's ImagingScaleAffine: floor of the float point
            xi, yi = xin.floor().long(), yin.floor().long()
        else:  # Pillow's affine_fixed: 16.16 fixed-point coordinates, floored by >> 16
            fa0, fa1, fa3, fa4 = (math.floor(v * 65536.0 + 0.5) for v in (a, b, d, e))
            fa2 = math.floor((c + a * 0.5 + b * 0.5) * 65536.0 + 0.5)
            fa5 = math.floor((f + d * 0.5 + e * 0.5) * 65536.0 + 0.5)
            yy_, xx_ = torch.arange(h)[:, None], torch.arange(w)[None, :]
            xi = (fa2 + xx_ * fa0 + yy_ * fa1) >> 16
            yi = (fa5 + xx_ * fa3 + yy_ * fa4) >> 16
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        out = src[:, :, _dev(yi.clamp(0, h - 1), dev), _dev(xi.clamp(0, w - 1), dev)]
    else:
        x0, y0 = torch.floor(xin - 0.5), torch.floor(yin - 0.5)
        dx, dy = xin - 0.5 - x0, yin - 0.5 - y0
        # a zero fraction gives exactly the centre tap (v2 + 0 * ...): shears only interpolate along one axis
        taps_x = [1] if bool((dx == 0).all()) else range(4)
        taps_y = [1] if bool((dy == 0).all()) else range(4)
        xs4 = [_dev((x0.long() + (i - 1)).clamp(0, w - 1), dev) for i in taps_x]
        dx, dy = _dev(dx, dev), _dev(dy, dev)
        rows = []
        for j in taps_y:
            yj = _dev((y0.long() + (j - 1)).clamp(0, h - 1), dev)
            vals = [src[:, :, yj, xi] for xi in xs4]
            rows.append(vals[0] if len(vals) == 1 else _pil_cubic(*vals, dx))
        out = (rows[0] if len(rows) == 1 else _pil_cubic(*rows, dy)).clamp_(0, 255).floor_()
    out = torch.where(_dev(inside, dev), out, torch.full_like(out, FILL))
    return out.to(torch.uint8)


def _pil_rotate_coeffs(angle: float, h: int, w: int) -> list[float]:
    """The affine coefficients of PIL ``Image.rotate(angle)`` (counter-clockwise about (w/2, h/2), no expand)."""
    r = -math.radians(angle)
    m = [round(math.cos(r), 15), round(math.sin(r), 15), 0.0, round(-math.sin(r), 15), round(math.cos(r), 15), 0.0]
    cx, cy = w / 2.0, h / 2.0
    m[2] = m[0] * -cx + m[1] * -cy + cx
    m[5] = m[3] * -cx + m[4] * -cy + cy
    return m


def _pil_luma_u8(img: torch.Tensor) -> torch.Tensor:
    """PIL ``convert("L")`` of uint8 RGB images (B,3,H,W) -> (B,1,H,W) uint8."""
    return torch.round(pil_luma(img.float() / 255) * 255).to(torch.uint8)


def _pil_blend(degenerate: torch.Tensor, img: torch.Tensor, factor: float) -> torch.Tensor:
    """Pillow ``Image.blend(degenerate, img, factor)`` (what ImageEnhance does): float32, clipped, truncated."""
    d = degenerate.float()
    out = d + torch.tensor(factor, dtype=torch.float32) * (img.float() - d)
    return out.clamp_(0, 255).to(torch.uint8)


def _pil_smooth(img: torch.Tensor) -> torch.Tensor:
    """Pillow ``ImageFilter.SMOOTH`` ([[1,1,1],[1,5,1],[1,1,1]] / 13, rounded) on uint8 (B,C,H,W); border kept."""
    h, w = img.shape[-2:]
    if h < 3 or w < 3:
        return img.clone()
    v = img.to(torch.int32)
    acc = 4 * v[..., 1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            acc = acc + v[..., dy:dy + h - 2, dx:dx + w - 2]
    out = img.clone()
    out[..., 1:-1, 1:-1] = torch.div(2 * acc + 13, 26, rounding_mode="floor").to(torch.uint8)  # floor(acc/13+.5)
    return out


def _pil_autocontrast(img: torch.Tensor) -> torch.Tensor:
    """Pillow ``ImageOps.autocontrast`` (cutoff 0): per channel, stretch [min, max] to [0, 255], truncating."""
    v = img.double()
    lo = v.amin(dim=(-2, -1), keepdim=True)
    hi = v.amax(dim=(-2, -1), keepdim=True)
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp(min=1)  # true division (255.0 / t is 255 * (1/t))
    out = (v * scale + (-lo * scale)).floor_().clamp_(0, 255)
    return torch.where(hi > lo, out, v).to(torch.uint8)


def apply_aug_op(img: torch.Tensor, op: str, magnitude_idx: int, sign: int = 1) -> torch.Tensor:
    """One AutoAug op of ``defendAugment.SubPolicy`` on uint8 images (B,3,H,W), magnitude from its 10-point grid."""
    if op not in AUTO_AUG_MAGNITUDES:
        raise ValueError(f"unknown AutoAug op {op!r}; expected one of {sorted(AUTO_AUG_MAGNITUDES)}")
    if not 0 <= int(magnitude_idx) <= 9:
        raise ValueError(f"magnitude_idx must be in 0..9, got {magnitude_idx}")
    if sign not in (-1, 1):
        raise ValueError(f"sign must be -1 or 1, got {sign}")
    if img.dtype != torch.uint8:
        raise ValueError(f"apply_aug_op works on uint8 images, got {img.dtype}")
    m = AUTO_AUG_MAGNITUDES[op][int(magnitude_idx)]
    h, w = img.shape[-2:]
    if op == "posterize":
        return TF.posterize(img, int(m))
    if op == "solarize":
        return img.clone() if m >= 256 else TF.solarize(img, m)  # PIL: invert where value >= threshold
    if op == "rotate":  # PIL rotate(m): counter-clockwise, nearest, grey fill through RGBA compositing
        return img.clone() if m % 360 == 0 else _pil_affine(img, _pil_rotate_coeffs(m, h, w), "nearest")
    if op == "shearX":
        return _pil_affine(img, (1, m * sign, 0, 0, 1, 0), "bicubic")
    if op == "shearY":
        return _pil_affine(img, (1, 0, 0, m * sign, 1, 0), "bicubic")
    if op == "translateX":
        return _pil_affine(img, (1, 0, m * w * sign, 0, 1, 0), "nearest")
    if op == "translateY":
        return _pil_affine(img, (1, 0, 0, 0, 1, m * h * sign), "nearest")
    factor = 1 + m * sign
    if op == "color":  # ImageEnhance.Color: blend with the PIL grey image
        return _pil_blend(_pil_luma_u8(img), img, factor)
    if op == "contrast":  # ImageEnhance.Contrast: blend with the rounded mean of the PIL grey image
        mean = torch.floor(_pil_luma_u8(img).float().mean(dim=(-3, -2, -1), keepdim=True) + 0.5)
        return _pil_blend(mean, img, factor)
    if op == "sharpness":  # ImageEnhance.Sharpness: blend with the SMOOTH-filtered image
        return _pil_blend(_pil_smooth(img), img, factor)
    if op == "brightness":
        return TF.adjust_brightness(img, factor)
    if op == "autocontrast":
        return _pil_autocontrast(img)
    if op == "equalize":
        return TF.equalize(img)
    return TF.invert(img)


def auto_aug(x: torch.Tensor, generators: Generators = None, *, policy: int | None = None) -> torch.Tensor:
    """The seed's ``AutoAugPolicy``: per image one of the 25 ImageNet sub-policies, each op with its probability.

    Works on the 8-bit image (rounded) and returns it / 255. ``policy`` forces one sub-policy index (tests).
    Images that share an op and magnitude are processed together.
    """
    x4, single = _as_batch(x)
    b = x4.shape[0]
    _check_generators(generators, b)
    if policy is not None and not 0 <= int(policy) < len(AUTO_AUG_POLICIES):
        raise ValueError(f"policy must be None or in 0..{len(AUTO_AUG_POLICIES) - 1}, got {policy}")
    u = _draw(b, generators, 5)  # sub-policy, apply op1, apply op2, sign op1, sign op2
    pol = (u[:, 0] * len(AUTO_AUG_POLICIES)).long().clamp_(max=len(AUTO_AUG_POLICIES) - 1)
    if policy is not None:
        pol.fill_(int(policy))
    img = _to_u8(x4)
    if b == 0:
        return _unbatch(_from_u8(img, x4.dtype), single)
    ul = u.tolist()
    for slot in (0, 1):
        groups: dict[tuple[str, int, int], list[int]] = {}
        for i, k in enumerate(pol.tolist()):
            prob, op, mag = AUTO_AUG_POLICIES[k][3 * slot:3 * slot + 3]
            if ul[i][1 + slot] < prob:
                sign = (-1 if ul[i][3 + slot] < 0.5 else 1) if op in SIGNED_OPS else 1
                groups.setdefault((op, mag, sign), []).append(i)
        for (op, mag, sign), rows in groups.items():
            if len(rows) == b:
                img = apply_aug_op(img, op, mag, sign)
            else:
                idx = _dev(torch.tensor(rows), img.device)
                img = img.index_copy(0, idx, apply_aug_op(img.index_select(0, idx), op, mag, sign))
    return _unbatch(_from_u8(img, x4.dtype), single)


# ------------------------------------------------------------------------------------------------------ LHT


def _check_probs(values: Sequence[float], names: Sequence[str], what: str) -> tuple[float, ...]:
    out = []
    for v, n in zip(values, names, strict=True):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not 0 <= v <= 1:
            raise ValueError(f"{what}: {n}={v!r} must be a probability in [0, 1]")
        out.append(float(v))
    if sum(out) > 1 + 1e-9:
        raise ValueError(f"{what}: the probabilities {dict(zip(names, out, strict=True))} sum to {sum(out):.6g}; "
                         "they are exclusive branches of one draw and must sum to <= 1")
    return tuple(out)


def _check_lht_probs(probs: Sequence[float]) -> tuple[float, ...]:
    if isinstance(probs, (str, bytes)) or not isinstance(probs, Sequence) or len(probs) != 4:
        raise ValueError(f"lht_probs must be 4 probabilities (gray, gray_rgb, sketch_rgb, aug), got {probs!r}")
    return _check_probs(probs, [f"lht_probs[{i}] ({n})" for i, n in enumerate(LHT_TRANSFORMS)], "LHT")


def _transform(kind: str, x: torch.Tensor, generators: Generators, fusion_mode: str) -> torch.Tensor:
    """T(x) for one of the homogeneous transforms, on a batch."""
    if kind == "gray":
        return grayscale(x)
    if kind == "gray_rgb":
        return channel_fusion(x, pil_luma(x), generators, mode=fusion_mode)
    if kind == "sketch_rgb":
        return channel_fusion(x, sketch(x), generators, mode=fusion_mode)
    return auto_aug(x, generators)


def _lht_kind(u: torch.Tensor, probs: Sequence[float]) -> torch.Tensor:
    """LHT transform ids (index into ``LHT_TRANSFORMS``; 4 = identity, the remainder) of uniforms ``u``."""
    return torch.searchsorted(torch.tensor(probs, dtype=torch.float64).cumsum(0), u, right=True)


def _homogeneous(x4: torch.Tensor, kind: torch.Tensor, lht: torch.Tensor, generators: Generators, *,
                 fusion_mode: str, rect_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy of ``x4`` where image i becomes ``LHT_TRANSFORMS[kind[i]](x_i)`` (kind >= 4: unchanged), and then the
    images ``lht`` (CPU indices) keep that only inside an LGT rectangle (returned, (len(lht), 4)).

    Each transform runs once, on all the images that need it (whole-image branches and LHT patches together).
    An image's draws come in the order: its transform's, then its rectangle's.
    """
    out = x4.clone()
    for k, name in enumerate(LHT_TRANSFORMS):
        sel = (kind == k).nonzero().flatten()
        if sel.numel():
            idx = _dev(sel, x4.device)
            out.index_copy_(0, idx, _transform(name, x4.index_select(0, idx), _subset(generators, sel), fusion_mode))
    h, w = x4.shape[-2:]
    rects = sample_lgt_rects(lht.numel(), h, w, _subset(generators, lht), mode=rect_mode)
    if lht.numel():
        idx = _dev(lht, x4.device)
        mask = rect_masks(_dev(rects, x4.device), h, w)
        out.index_copy_(0, idx, torch.where(mask, out.index_select(0, idx), x4.index_select(0, idx)))
    return out, rects


def local_homogeneous(x: torch.Tensor, generators: Generators = None, *, rect_mode: str = "reference",
                      probs: Sequence[float] = (0.2, 0.2, 0.2, 0.4), fusion_mode: str = "reference",
                      return_rects: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LHT (seed ``fusePR``): paste one rectangle of T(x) into x, T drawn among grey / grey-RGB / sketch-RGB / AutoAug.

    ``probs`` are T's probabilities in that order (the remainder keeps x); the rectangle is LGT's (no gate, 100
    attempts). ``return_rects`` also returns the (B,4) ``(top, left, h, w)`` rectangles (zeros: none fitted).
    """
    x4, single = _as_batch(x)
    probs = _check_lht_probs(probs)
    if rect_mode not in RECT_MODES:
        raise ValueError(f"rect_mode={rect_mode!r} is not supported; expected one of {RECT_MODES}")
    if fusion_mode not in FUSION_MODES:
        raise ValueError(f"fusion_mode={fusion_mode!r} is not supported; expected one of {FUSION_MODES}")
    b = x4.shape[0]
    _check_generators(generators, b)
    kind = _lht_kind(_draw(b, generators, 1)[:, 0], probs)
    out, rects = _homogeneous(x4, kind, torch.arange(b), generators, fusion_mode=fusion_mode, rect_mode=rect_mode)
    out = _unbatch(out, single)
    return (out, rects[0] if single else rects) if return_rects else out


# --------------------------------------------------------------------------------------------------- modules


class LocalGrayscale(nn.Module):
    """LGT augmentation (Gong et al., spec 3.1): with probability ``p`` one rectangle of the image turns grey."""

    def __init__(self, p: float = 0.4, *, sl: float = 0.02, sh: float = 0.4, r1: float = 0.3,
                 rect_mode: str = "reference", attempts: int = 100, luma_mode: str = "pil") -> None:
        super().__init__()
        (self.p,) = _check_probs([p], ["p"], "LocalGrayscale")
        if rect_mode not in RECT_MODES:
            raise ValueError(f"rect_mode={rect_mode!r} is not supported; expected one of {RECT_MODES}")
        self.sl, self.sh, self.r1 = float(sl), float(sh), float(r1)
        self.rect_mode, self.attempts, self.luma_mode = rect_mode, int(attempts), luma_mode
        lgt(torch.zeros(0, 3, 4, 4), None, self.p, sl=self.sl, sh=self.sh, r1=self.r1, mode=rect_mode,
            attempts=self.attempts, luma_mode=luma_mode)  # validates the remaining parameters now

    def forward(self, x: torch.Tensor, generators: Generators = None) -> torch.Tensor:
        """Copy of ``x`` (B,3,H,W) or (3,H,W) with the LGT patches (draws: gate, then 100 rectangle attempts)."""
        x4, single = _as_batch(x)
        _check_generators(generators, x4.shape[0])
        out = lgt(x4, generators, self.p, sl=self.sl, sh=self.sh, r1=self.r1, mode=self.rect_mode,
                  attempts=self.attempts, luma_mode=self.luma_mode)
        return _unbatch(out, single)

    def params(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able)."""
        return {"p": self.p, "sl": self.sl, "sh": self.sh, "r1": self.r1, "rect_mode": self.rect_mode,
                "attempts": self.attempts, "luma_mode": self.luma_mode}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.params().items())


class ProactiveDefense(nn.Module):
    """The seed's DL transform ``Fuse_LFusePR`` (spec 3.5): one uniform per image picks one exclusive branch.

    Branches, in threshold order: full grey, grey-RGB fusion, sketch-RGB fusion, AutoAug, LHT, unchanged. Each
    transform runs only on the images that need it, once per batch (whole-image branch and LHT patches together).
    """

    def __init__(self, gray: float = 0.05, gray_rgb: float = 0.01, sketch_rgb: float = 0.01, aug: float = 0.05,
                 lht: float = 0.10, *, fusion_mode: str = "reference", rect_mode: str = "reference",
                 lht_probs: Sequence[float] = (0.2, 0.2, 0.2, 0.4)) -> None:
        super().__init__()
        probs = _check_probs([gray, gray_rgb, sketch_rgb, aug, lht], BRANCHES[:5], "ProactiveDefense")
        self.gray, self.gray_rgb, self.sketch_rgb, self.aug, self.lht = probs
        if fusion_mode not in FUSION_MODES:
            raise ValueError(f"fusion_mode={fusion_mode!r} is not supported; expected one of {FUSION_MODES}")
        if rect_mode not in RECT_MODES:
            raise ValueError(f"rect_mode={rect_mode!r} is not supported; expected one of {RECT_MODES}")
        self.fusion_mode, self.rect_mode = fusion_mode, rect_mode
        self.lht_probs = _check_lht_probs(lht_probs)
        acc, cum = 0.0, []
        for p in probs:  # G, G+G_rgb, ... summed left to right as the reference's comparisons
            acc += p
            cum.append(acc)
        self._cum = torch.tensor(cum, dtype=torch.float64)

    def branch_of(self, u: torch.Tensor) -> torch.Tensor:
        """Branch ids (index into ``BRANCHES``) of uniforms ``u`` in [0,1): branch k iff cum[k-1] <= u < cum[k]."""
        return torch.searchsorted(self._cum, u.detach().double().cpu().contiguous(), right=True)

    def forward(self, x: torch.Tensor, generators: Generators = None, *,
                return_branches: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Transformed copy of ``x`` (same shape, dtype, device); ``return_branches`` adds the (B,) branch ids.

        Per image the draws are: the branch, then (LHT) the patch transform, then the transform's own, then (LHT)
        the rectangle; so with one generator per image the result does not depend on the batch.
        """
        x4, single = _as_batch(x)
        b = x4.shape[0]
        _check_generators(generators, b)
        branch = self.branch_of(_draw(b, generators, 1)[:, 0])
        kind = branch.clone()  # whole-image branches 0..3 are the LHT transforms 0..3; 5 = unchanged
        lht = (branch == 4).nonzero().flatten()
        if lht.numel():
            kind[lht] = _lht_kind(_draw(lht.numel(), _subset(generators, lht), 1)[:, 0], self.lht_probs)
        if bool((kind < 4).any()):
            out, _ = _homogeneous(x4, kind, lht, generators, fusion_mode=self.fusion_mode, rect_mode=self.rect_mode)
        else:
            out = x4.clone()
        out = _unbatch(out, single)
        return (out, branch[0] if single else branch) if return_branches else out

    def params(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able)."""
        return {"gray": self.gray, "gray_rgb": self.gray_rgb, "sketch_rgb": self.sketch_rgb, "aug": self.aug,
                "lht": self.lht, "fusion_mode": self.fusion_mode, "rect_mode": self.rect_mode,
                "lht_probs": list(self.lht_probs)}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.params().items())


# ---------------------------------------------------------------------------------------- presets, registry


PROACTIVE: Registry[Preset] = Registry("proactive defense")

_REFERENCE = {"gray": 0.05, "gray_rgb": 0.01, "sketch_rgb": 0.01, "aug": 0.05, "lht": 0.10}
_reference = PROACTIVE.add_preset("reference", ProactiveDefense, **_REFERENCE)
for _alias in ("jad", "dl"):
    PROACTIVE.register(_alias, _reference)
PROACTIVE.add_preset("paper", ProactiveDefense, **{**_REFERENCE, "gray_rgb": 0.025, "sketch_rgb": 0.025})
PROACTIVE.add_preset("no_lht", ProactiveDefense, **{**_REFERENCE, "lht": 0.0})
PROACTIVE.add_preset("cf", ProactiveDefense, **{**_REFERENCE, "aug": 0.0, "lht": 0.0})
PROACTIVE.add_preset("lgt", LocalGrayscale, p=0.4)


def build_proactive(name: str | None, params: dict[str, Any] | None = None) -> nn.Module | None:
    """The training-time transform of preset ``name`` (``list_proactive()``), ``params`` overriding its arguments.

    None or "none" -> None (no proactive defence; ``params`` must then be empty).
    """
    if name is None or (isinstance(name, str) and name.strip().lower() == "none"):
        if params:
            raise ValueError(f"proactive_params {sorted(params)} given but the proactive defence is {name!r}; "
                             f"choose one of {list_proactive()}")
        return None
    if not isinstance(name, str):
        raise ValueError(f"proactive defence must be a preset name or None, got {name!r}")
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"proactive_params must be a dict or None, got {type(params).__name__}")
    return PROACTIVE.get(name.strip())(**(params or {}))


def list_proactive() -> list[str]:
    """Names of the proactive-defence presets (aliases included); None / "none" disables the defence."""
    return PROACTIVE.names()
