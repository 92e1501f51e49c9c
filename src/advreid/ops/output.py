"""What happens to adversarial images after the attack: 8-bit quantisation, re-encoding, saving.

Attacks are evaluated in memory (float) by default. The seed wrote each adversarial query through ``ToPILImage``
(``mul(255).byte()``: truncation) under its original ``.jpg`` name, i.e. as a JPEG of quality 75: ``SEED_COMPAT``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from advreid.utils.io import atomic_write_bytes

QUANTIZE_MODES = (None, "round", "floor")
SEED_COMPAT: dict[str, str] = {"quantize": "floor", "reencode": "jpeg:75"}


def _check(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] not in (1, 3) or not x.is_floating_point():
        desc = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected float images (B,3,H,W) in [0,1], got {desc}")


def to_uint8(x: torch.Tensor, mode: str = "round") -> torch.Tensor:
    """Float [0,1] -> uint8 0..255: "round" (nearest) or "floor" (truncation, as ``ToPILImage``)."""
    if mode not in ("round", "floor"):
        raise ValueError(f"quantize={mode!r} is not supported for 8-bit output; expected 'round' or 'floor'")
    v = x.detach() * 255
    v = torch.round(v) if mode == "round" else torch.floor(v)
    return v.clamp_(0, 255).to(torch.uint8)


def quantize(x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    """Snap to multiples of 1/255 ("round" or "floor"); None returns ``x`` as is."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize={mode!r} is not supported; expected one of {QUANTIZE_MODES}")
    if mode is None:
        return x
    return to_uint8(x, mode).to(x.dtype) / 255


def quantize_within(x: torch.Tensor, x0: torch.Tensor, eps: float, mode: str | None) -> torch.Tensor:
    """Quantise ``x`` like :func:`quantize`, then clip it back into the 8-bit levels that lie within ``eps`` of
    ``x0`` (and in [0,1]): float rounding before ``floor`` can otherwise drop one level past the budget (a 5px
    attack saved with the seed's truncation lost up to 6 levels). ``x0`` on the 8-bit grid keeps exactly +-eps
    levels."""
    q = quantize(x, mode)
    if mode is None:
        return q
    tol = 1e-4  # a level within float noise of the budget's edge still counts as inside
    lo = torch.ceil((x0.double() - eps) * 255 - tol).clamp_(0, 255) / 255
    hi = torch.floor((x0.double() + eps) * 255 + tol).clamp_(0, 255) / 255
    return torch.minimum(torch.maximum(q.double(), lo), hi).to(x.dtype)


def parse_format(fmt: str) -> tuple[str, int | None]:
    """"png" -> ("png", None); "jpeg" / "jpg" -> ("jpeg", 75); "jpeg:Q" -> ("jpeg", Q) with 1 <= Q <= 100."""
    s = str(fmt).strip().lower()
    kind, _, q = s.partition(":")
    if kind == "png" and not q:
        return "png", None
    if kind in ("jpeg", "jpg"):
        try:
            quality = int(q) if q else 75
        except ValueError:
            raise ValueError(f"format {fmt!r}: the JPEG quality must be an int, e.g. 'jpeg:75'") from None
        if not 1 <= quality <= 100:
            raise ValueError(f"format {fmt!r}: JPEG quality must be in 1..100, got {quality}")
        return "jpeg", quality
    raise ValueError(f"image format {fmt!r} is not supported; expected 'png', 'jpeg' or 'jpeg:Q'")


def _encode(img: np.ndarray, kind: str, quality: int | None) -> bytes:
    buf = io.BytesIO()
    pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    if kind == "png":
        pil.save(buf, format="PNG")
    else:
        pil.save(buf, format="JPEG", quality=quality)  # PIL defaults otherwise (4:2:0), as the seed's img.save()
    return buf.getvalue()


def _hwc(x8: torch.Tensor) -> list[np.ndarray]:
    return list(x8.permute(0, 2, 3, 1).cpu().numpy())


def reencode(x: torch.Tensor, fmt: str | None = None, *, quantize_mode: str = "round") -> torch.Tensor:
    """Round-trip through an in-memory PNG/JPEG (``fmt`` "png" / "jpeg:Q"); float [0,1] out, same dtype/device.

    The image is first made 8-bit with ``quantize_mode`` (rounding by default). None returns ``x``.
    """
    if fmt is None:
        return x
    _check(x)
    kind, quality = parse_format(fmt)
    out = []
    for img in _hwc(to_uint8(x, quantize_mode)):
        with Image.open(io.BytesIO(_encode(img, kind, quality))) as im:
            arr = np.asarray(im.convert("L" if img.shape[-1] == 1 else "RGB"))
        out.append(torch.from_numpy(arr.copy()).reshape(img.shape))
    return (torch.stack(out).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype) / 255).contiguous()


def finalize(x: torch.Tensor, quantize: str | None = None, reencode: str | None = None) -> torch.Tensor:
    """Quantise (None/"round"/"floor") then re-encode (None/"png"/"jpeg:Q"); ``finalize(x, **SEED_COMPAT)``.

    Re-encoding without a quantize mode rounds to 8 bits first.
    """
    q = _quantize(x, quantize)
    return _reencode(q, reencode, quantize_mode=quantize or "round")


_quantize, _reencode = quantize, reencode


def output_name(name: str | os.PathLike, fmt: str) -> PurePosixPath:
    """The file name an image is saved under: the original stem (and sub-folders) with the format's suffix.

    PNG -> ``.png``; JPEG keeps a ``.jpg``/``.jpeg`` suffix and otherwise uses ``.jpg``.
    """
    kind, _ = parse_format(fmt)
    p = PurePosixPath(str(name).replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.name or p.name in (".",):
        raise ValueError(f"image name {str(name)!r} must be a relative path inside the output folder")
    if kind == "png":
        return p.with_suffix(".png")
    return p if p.suffix.lower() in (".jpg", ".jpeg") else p.with_suffix(".jpg")


def save_images(x: torch.Tensor, names: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                fmt: str = "png", quantize: str = "round") -> list[Path]:
    """Write each image as an 8-bit file ``out_dir/<stem><suffix>`` atomically; returns the paths written.

    Names keep their stem and sub-folders, and take the format's suffix (``output_name``): by default lossless PNG,
    so ``0001_c1s1_001051_00.jpg`` is saved as ``0001_c1s1_001051_00.png``. ``fmt="jpeg:75", quantize="floor"``
    reproduces the seed's files.
    """
    _check(x)
    names = [str(n) for n in names]
    if len(names) != x.shape[0]:
        raise ValueError(f"save_images: {x.shape[0]} images but {len(names)} names")
    kind, quality = parse_format(fmt)
    targets = [output_name(n, fmt) for n in names]
    seen: dict[PurePosixPath, str] = {}
    for n, t in zip(names, targets, strict=True):
        if t in seen:
            raise ValueError(f"save_images: names {seen[t]!r} and {n!r} both map to the file {str(t)!r}")
        seen[t] = n
    out = Path(out_dir)
    written = []
    for img, t in zip(_hwc(to_uint8(x, quantize)), targets, strict=True):
        written.append(atomic_write_bytes(out / Path(*t.parts), _encode(img, kind, quality)))
    return written
