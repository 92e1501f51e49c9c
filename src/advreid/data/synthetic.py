"""Synthetic Market-1501-format ReID dataset: the toolkit's embedded default, generated on CPU in seconds.

Cartoon pedestrians (head, torso, arms, legs, bag) with identity-specific clothing colours, patterns and
proportions, seen by cameras with their own colour cast, exposure, blur, noise and scene. The result is a
folder the Market-1501 parser reads (``bounding_box_train/``, ``bounding_box_test/``, ``query/``) plus a
``synth_meta.json`` describing how it was made. Same seed -> same bytes; an identity's look depends only on
``(seed, pid)``, never on how many other identities exist.

Two options bias the *training split only* (query and gallery are planned exactly as without them), to give
DDDefense-style debiasing (spec §3.11) something to measure and repair; with their defaults the output is
byte-identical to a generator without them:

* ``imbalance="zipf:S[:MIN:MAX]"`` - a long tail of images per training identity. Identities get ranks
  ``r = 1..N`` in a seeded random order and ``n(r) = MIN + (MAX - MIN) (r^-S - N^-S) / (1 - N^-S)`` images
  (rounded): rank 1 gets MAX, rank N gets MIN, in between a Zipf curve with exponent S (``MIN=2, MAX=60`` by
  default: two images keep a positive pair for every identity; with S = 1.2 and 100 identities the median
  identity has 2 images, mean 3.8). Each identity keeps its usual 2..num_cams cameras (fewer
  if it has fewer images) and, without ``camera_bias``, its images are spread over them as evenly as a seeded
  multinomial draw allows (at least one per camera).
* ``camera_bias=b`` in [0, 1) - each training image is taken by the identity's dominant camera (a seeded
  random one of its cameras) with probability ``b``, otherwise by one of its other cameras uniformly. The
  dominant count is clipped to ``1..n-1`` so every identity keeps a cross-camera positive (as Market
  guarantees), so the expected dominant share is about ``b`` (for ``b`` below ``1 / #cameras`` that camera is
  under-represented instead). Without ``imbalance`` the number of images per identity is unchanged.
"""

from __future__ import annotations

import colorsys
import dataclasses
import io
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from advreid.registry import did_you_mean
from advreid.utils.io import atomic_write_json

__all__ = [
    "SynthConfig",
    "generate_synthetic",
    "META_NAME",
    "train_pid",
    "test_pid",
    "parse_imbalance",
    "zipf_counts",
]

META_NAME = "synth_meta.json"
FORMAT_VERSION = 1
_SS = 2  # supersampling factor for anti-aliased drawing
_MAX_IDS = 4999  # train pids are odd, test pids even, both must fit in 4 digits

# seed-stream namespaces: every random draw is keyed by (seed, namespace, ...) so streams never interact
_NS_IDENTITY, _NS_CAMERA, _NS_IMAGE, _NS_DISTRACTOR, _NS_JUNK, _NS_BIAS = 0, 1, 2, 3, 4, 5
_ZIPF_DEFAULT_RANGE = (2, 60)  # images per identity at the tail / head of an imbalanced training split
_ZIPF_MAX_IMAGES = 99  # the two-digit bounding-box field of a Market name stays unique below this


def train_pid(i: int) -> int:
    """Person id of the ``i``-th (0-based) training identity: 1, 3, 5, ... (Market-like, non-contiguous)."""
    return 2 * i + 1


def test_pid(j: int) -> int:
    """Person id of the ``j``-th (0-based) test identity: 2, 4, 6, ... (disjoint from the training pids)."""
    return 2 * j + 2


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of :func:`generate_synthetic` (validated by :meth:`validate`)."""

    num_train_ids: int = 100
    num_test_ids: int = 100
    num_cams: int = 6
    images_per_id_per_cam: tuple[int, int] = (2, 5)
    height: int = 128
    width: int = 64
    num_distractors: int = 50
    num_junk: int = 20
    seed: int = 0
    jpeg_quality: int = 95
    imbalance: str = "none"
    camera_bias: float = 0.0

    @property
    def biased(self) -> bool:
        """True when an option changes the training split (``imbalance`` or ``camera_bias`` not default)."""
        return parse_imbalance(self.imbalance) is not None or self.camera_bias != 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending parameter and what was expected."""

        def _int(name: str, lo: int, hi: int | None = None) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {v!r}")
            if v < lo or (hi is not None and v > hi):
                rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
                raise ValueError(f"{name} must be {rng}, got {v}")

        _int("num_train_ids", 1, _MAX_IDS)
        _int("num_test_ids", 1, _MAX_IDS)
        _int("num_cams", 2, 6)  # Market-1501 has cameras 1..6 (its parser enforces it); matching needs >= 2
        _int("height", 32)
        _int("width", 16)
        _int("num_distractors", 0)
        _int("num_junk", 0)
        _int("seed", 0)
        _int("jpeg_quality", 1, 100)
        ipc = self.images_per_id_per_cam
        if (
            not isinstance(ipc, (tuple, list))
            or len(ipc) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in ipc)
            or not 1 <= ipc[0] <= ipc[1] <= 49
        ):
            raise ValueError(
                f"images_per_id_per_cam must be a (low, high) pair of integers with 1 <= low <= high <= 49, "
                f"got {ipc!r}"
            )
        parse_imbalance(self.imbalance)
        b = self.camera_bias
        if isinstance(b, bool) or not isinstance(b, (int, float, np.integer, np.floating)) or not 0 <= b < 1:
            raise ValueError(f"camera_bias must be a number in [0, 1) (0 = no camera bias), got {b!r}")


def parse_imbalance(spec: str) -> tuple[float, int, int] | None:
    """``"none"`` -> None; ``"zipf:S"`` / ``"zipf:S:MIN:MAX"`` -> ``(S, MIN, MAX)``; else ``ValueError``."""
    expected = (
        f"'none' or 'zipf:S[:MIN:MAX]' (exponent S > 0, images per identity 2 <= MIN <= MAX <= "
        f"{_ZIPF_MAX_IMAGES}, default {_ZIPF_DEFAULT_RANGE[0]}:{_ZIPF_DEFAULT_RANGE[1]}), e.g. 'zipf:1.2'"
    )
    if not isinstance(spec, str):
        raise ValueError(f"imbalance must be {expected}; got {spec!r}")
    parts = spec.strip().lower().split(":")
    if parts == ["none"]:
        return None
    try:
        if parts[0] != "zipf" or len(parts) not in (2, 4):
            raise ValueError
        s = float(parts[1])
        lo, hi = (int(parts[2]), int(parts[3])) if len(parts) == 4 else _ZIPF_DEFAULT_RANGE
    except ValueError:
        raise ValueError(f"imbalance must be {expected}; got {spec!r}") from None
    if not (math.isfinite(s) and s > 0 and 2 <= lo <= hi <= _ZIPF_MAX_IMAGES):
        raise ValueError(f"imbalance must be {expected}; got {spec!r}")
    return s, lo, hi


def zipf_counts(n_ids: int, s: float, lo: int, hi: int) -> np.ndarray:
    """Images for the identities of rank ``1..n_ids``: ``lo + (hi - lo) (r^-s - N^-s) / (1 - N^-s)``, rounded."""
    if n_ids < 1 or not s > 0 or not 0 <= lo <= hi:
        raise ValueError(f"zipf_counts: expected n_ids >= 1, s > 0, 0 <= lo <= hi; got {n_ids}, {s}, {lo}, {hi}")
    r = np.arange(1, n_ids + 1, dtype=np.float64)
    tail = float(n_ids) ** -s
    frac = (r**-s - tail) / (1.0 - tail) if n_ids > 1 else np.ones(1)
    return np.floor(lo + (hi - lo) * frac + 0.5).astype(np.int64)


# --------------------------------------------------------------------------------------------- palettes


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


# 16 hues x 3 shades: neighbouring hues and shades are close enough that colour alone is not an identity key
_CLOTH_COLOURS: list[tuple[int, int, int]] = [
    _hsv(h / 16.0, s, v) for h in range(16) for s, v in ((0.45, 0.92), (0.75, 0.78), (0.75, 0.45))
]
_NEUTRALS: list[tuple[int, int, int]] = [
    (22, 22, 26),
    (60, 60, 64),
    (120, 120, 124),
    (185, 185, 185),
    (235, 235, 230),
    (30, 38, 70),
    (200, 185, 150),
    (100, 70, 45),
    (60, 80, 120),
    (90, 110, 150),
]
_SKIN = [(236, 200, 170), (224, 172, 130), (190, 140, 100), (150, 100, 70), (105, 70, 50)]
_HAIR = [(20, 18, 18), (60, 40, 25), (110, 75, 40), (190, 160, 100), (140, 140, 140), (120, 40, 25)]
_PATTERNS = ("plain", "hstripes", "vstripes", "checks", "dots", "logo")
_PATTERN_P = (0.40, 0.14, 0.1, 0.12, 0.1, 0.14)
_LOWER = ("trousers", "shorts", "skirt")
_LOWER_P = (0.62, 0.2, 0.18)
_VIEWS = ("front", "back", "side")


def _pick(rng: np.random.Generator, seq: list | tuple, p: tuple[float, ...] | None = None) -> Any:
    return seq[int(rng.choice(len(seq), p=p))]


def _cloth_colour(rng: np.random.Generator, p_neutral: float) -> tuple[int, int, int]:
    return _pick(rng, _NEUTRALS) if rng.random() < p_neutral else _pick(rng, _CLOTH_COLOURS)


def _jitter_colour(rng: np.random.Generator, c: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    v = np.clip(np.asarray(c, float) + rng.normal(0, amount, 3), 0, 255)
    return tuple(int(x) for x in v)  # type: ignore[return-value]


# -------------------------------------------------------------------------------------------- identities


@dataclass
class _Identity:
    upper: tuple[int, int, int]
    upper2: tuple[int, int, int]
    pattern: str
    period: float  # pattern period, fraction of figure height
    sleeves: str  # "long" | "short"
    lower: tuple[int, int, int]
    lower_kind: str
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    long_hair: bool
    shoes: tuple[int, int, int]
    bag: str  # "none" | "backpack" | "handbag"
    bag_colour: tuple[int, int, int]
    bag_side: int  # +1 right, -1 left (before a horizontal flip)
    fig_frac: float  # figure height / box height
    shoulder: float  # shoulder width / figure height
    leg: float  # leg length / figure height
    head: float  # head diameter / figure height


def _sample_identity(rng: np.random.Generator) -> _Identity:
    """Draw one person's appearance; the number and order of draws is fixed so looks are reproducible."""
    upper = _jitter_colour(rng, _cloth_colour(rng, 0.3), 6)
    upper2 = _cloth_colour(rng, 0.5)
    pattern = _pick(rng, _PATTERNS, _PATTERN_P)
    period = float(rng.uniform(0.035, 0.075))
    sleeves = "long" if rng.random() < 0.55 else "short"
    lower = _jitter_colour(rng, _cloth_colour(rng, 0.65), 6)
    lower_kind = _pick(rng, _LOWER, _LOWER_P)
    skin = _jitter_colour(rng, _pick(rng, _SKIN), 5)
    hair = _jitter_colour(rng, _pick(rng, _HAIR), 5)
    long_hair = bool(rng.random() < 0.3)
    shoes = _cloth_colour(rng, 0.75)
    u = rng.random()
    bag = "none" if u < 0.55 else ("backpack" if u < 0.8 else "handbag")
    bag_colour = _cloth_colour(rng, 0.6)
    bag_side = 1 if rng.random() < 0.5 else -1
    return _Identity(
        upper=upper,
        upper2=upper2,
        pattern=pattern,
        period=period,
        sleeves=sleeves,
        lower=lower,
        lower_kind=lower_kind,
        skin=skin,
        hair=hair,
        long_hair=long_hair,
        shoes=shoes,
        bag=bag,
        bag_colour=bag_colour,
        bag_side=bag_side,
        fig_frac=float(rng.uniform(0.82, 0.94)),
        shoulder=float(rng.uniform(0.2, 0.3)),
        leg=float(rng.uniform(0.43, 0.52)),
        head=float(rng.uniform(0.1, 0.14)),
    )


def _identity_rng(seed: int, pid: int) -> np.random.Generator:
    return np.random.default_rng([seed, _NS_IDENTITY, pid])


# ----------------------------------------------------------------------------------------------- cameras


@dataclass
class _Camera:
    gains: np.ndarray  # per-channel white-balance gains
    gamma: float
    saturation: float
    contrast: float
    brightness: float  # additive, in [0, 1] units
    blur: float  # Gaussian blur radius in native pixels
    noise: float  # sensor noise std in 0..255 units
    view_p: np.ndarray  # probabilities of front/back/side views
    scene: Image.Image  # wide supersampled background to crop from


def _make_camera(seed: int, cam: int, height: int, width: int) -> _Camera:
    """Camera ``cam``'s photometric model and scene, a function of ``(seed, cam)`` and the image size only."""
    rng = np.random.default_rng([seed, _NS_CAMERA, cam])
    gains = np.clip(1.0 + rng.normal(0.0, 0.06, 3), 0.85, 1.15)
    cam_params = dict(
        gains=gains,
        gamma=float(rng.uniform(0.85, 1.2)),
        saturation=float(rng.uniform(0.7, 1.15)),
        contrast=float(rng.uniform(0.72, 1.15)),
        brightness=float(rng.uniform(-0.1, 0.08)),
        blur=float(rng.uniform(0.0, 0.9)),
        noise=float(rng.uniform(2.0, 8.0)),
        view_p=rng.dirichlet(np.full(3, 1.5)),
    )
    hs, ws = int(height * 1.25) * _SS, width * 3 * _SS
    wall = np.asarray(_jitter_colour(rng, _pick(rng, _NEUTRALS + _CLOTH_COLOURS[1::3]), 25), float)
    wall = 0.5 * wall + 0.5 * wall.mean()  # walls are duller than clothes
    floor = np.asarray(_jitter_colour(rng, _pick(rng, _NEUTRALS), 20), float)
    horizon = int(hs * rng.uniform(0.4, 0.7))
    yy = np.linspace(0.0, 1.0, hs)[:, None, None]
    arr = np.empty((hs, ws, 3), float)
    arr[:horizon] = wall * (1.0 + 0.15 * (yy[:horizon] - 0.5))
    arr[horizon:] = floor * (0.85 + 0.3 * yy[horizon:])
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.6:  # tiled floor / wall panels
        step = int(rng.integers(10, 30)) * _SS
        line = tuple(int(v) for v in np.clip(floor * 0.8, 0, 255))
        for x in range(0, ws, step):
            draw.line([(x, horizon), (x + int(rng.integers(-step, step)), hs)], fill=line, width=_SS)
    for _ in range(int(rng.integers(3, 8))):  # clutter: doors, shop signs, benches, bins
        w = int(rng.uniform(0.15, 0.6) * width * _SS)
        h = int(rng.uniform(0.1, 0.5) * height * _SS)
        x0 = int(rng.integers(0, ws - w))
        y0 = int(rng.integers(max(0, horizon - 2 * h), max(1, min(hs - h, horizon + h // 2))))
        colour = _jitter_colour(rng, _cloth_colour(rng, 0.5), 15)
        draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
    return _Camera(scene=img, **cam_params)


# --------------------------------------------------------------------------------------------- rendering


def _limb(
    draw: ImageDraw.ImageDraw,
    p0: tuple[float, float],
    p1: tuple[float, float],
    w: float,
    colour: tuple[int, ...],
) -> None:
    r = w / 2.0
    draw.line([p0, p1], fill=colour, width=max(1, int(round(w))))
    for x, y in (p0, p1):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def _along(p0: tuple[float, float], p1: tuple[float, float], t: float) -> tuple[float, float]:
    return p0[0] + t * (p1[0] - p0[0]), p0[1] + t * (p1[1] - p0[1])


def _pattern_patch(ident: _Identity, hgt: int, wid: int, fig_h: float, view: str) -> np.ndarray:
    """Torso texture (hgt x wid x 3, uint8): stripes, checks, dots or a chest logo, vectorised."""
    base = np.empty((hgt, wid, 3), np.uint8)
    base[:] = ident.upper
    kind = ident.pattern
    if kind == "logo" and view != "front":
        return base
    if kind == "plain":
        return base
    yy, xx = np.mgrid[0:hgt, 0:wid]
    p = max(2.0, ident.period * fig_h)
    if kind == "hstripes":
        m = (yy // (p / 2)) % 2 == 1
    elif kind == "vstripes":
        m = ((xx - wid / 2) // (p / 2)) % 2 == 1
    elif kind == "checks":
        m = ((yy // (p / 2)) + ((xx - wid / 2) // (p / 2))) % 2 == 1
    elif kind == "dots":
        m = ((yy % p) - p / 2) ** 2 + ((xx % p) - p / 2) ** 2 < (p / 4) ** 2
    else:  # logo block on the chest
        m = (np.abs(xx - wid / 2) < wid * 0.22) & (yy > hgt * 0.18) & (yy < hgt * 0.48)
    base[m] = ident.upper2
    return base


@dataclass
class _Pose:
    """Geometry of one figure on the supersampled layer (pixels), shared by the drawing steps."""

    h: float
    top: float
    cx: float
    side: bool
    head_d: float
    sh_w: float
    y_sh: float
    y_hip: float
    leg_len: float
    leg_w: float
    arm_w: float
    arm_len: float
    swing: float
    phase: float


def _pose(ident: _Identity, hs: int, ws: int, rng: np.random.Generator, view: str, scale: float, dx: float,
          dy: float) -> _Pose:
    h = hs * ident.fig_frac * scale
    top = (hs - h) / 2.0 + dy * hs
    side = view == "side"
    head_d = ident.head * h
    sh_w = ident.shoulder * h * (0.55 if side else 1.0)
    y_hip = top + h * (1.0 - ident.leg)
    swing = float(rng.uniform(0.12, 0.4) if side else rng.uniform(0.0, 0.1))
    phase = 1.0 if rng.random() < 0.5 else -1.0
    return _Pose(h=h, top=top, cx=ws / 2.0 + dx * ws, side=side, head_d=head_d, sh_w=sh_w,
                 y_sh=top + head_d + 0.025 * h, y_hip=y_hip, leg_len=top + h - y_hip - 0.02 * h,
                 leg_w=0.095 * h * (1.2 if side else 1.0), arm_w=0.065 * h, arm_len=0.37 * h, swing=swing,
                 phase=phase)


def _rgba(c: tuple[int, int, int]) -> tuple[int, int, int, int]:
    return (*c, 255)


def _draw_legs(draw: ImageDraw.ImageDraw, ident: _Identity, p: _Pose, flip: bool) -> None:
    """Legs (hip -> foot) and shoes; shorts/skirt show skin below; the skirt over them."""
    skin, lower, shoes = _rgba(ident.skin), _rgba(ident.lower), _rgba(ident.shoes)
    cx = p.cx
    hips = [(cx, p.y_hip), (cx, p.y_hip)] if p.side else [(cx - p.sh_w * 0.22, p.y_hip),
                                                           (cx + p.sh_w * 0.22, p.y_hip)]
    spread = 0.0 if p.side else 0.05
    for k, hip in enumerate(hips):
        ang = p.phase * p.swing * (1 if k == 0 else -1) + spread * (-1 if k == 0 else 1)
        foot = (hip[0] + p.leg_len * np.sin(ang), hip[1] + p.leg_len * np.cos(ang))
        if ident.lower_kind == "trousers":
            _limb(draw, hip, foot, p.leg_w, lower)
        else:
            _limb(draw, hip, foot, p.leg_w * 0.8, skin)
            if ident.lower_kind == "shorts":
                _limb(draw, hip, _along(hip, foot, 0.42), p.leg_w, lower)
        sw = p.leg_w * 1.15
        toe = 1.0 if (p.side and not flip) else 0.0
        draw.ellipse([foot[0] - sw / 2, foot[1] - sw * 0.35, foot[0] + sw / 2 + toe * sw * 0.4, foot[1] + sw * 0.3],
                     fill=shoes)
    if ident.lower_kind == "skirt":
        hw = p.sh_w * (0.7 if p.side else 0.5)
        y_end = p.y_hip + 0.5 * p.leg_len
        draw.polygon([(cx - hw * 0.85, p.y_hip - 0.02 * p.h), (cx + hw * 0.85, p.y_hip - 0.02 * p.h),
                      (cx + hw * 1.25, y_end), (cx - hw * 1.25, y_end)], fill=lower)


def _draw_arm(draw: ImageDraw.ImageDraw, ident: _Identity, p: _Pose, k: int, shoulder: tuple[float, float]) -> None:
    """Arm ``k`` (0 = left/far, 1 = right/near) from ``shoulder``, with a handbag in the bag-side hand."""
    skin, upper, bagc = _rgba(ident.skin), _rgba(ident.upper), _rgba(ident.bag_colour)
    out = 0.0 if p.side else (0.1 if k == 1 else -0.1)
    ang = out - p.phase * p.swing * (1 if k == 0 else -1)
    hand = (shoulder[0] + p.arm_len * np.sin(ang), shoulder[1] + p.arm_len * np.cos(ang))
    if ident.sleeves == "long":
        _limb(draw, shoulder, hand, p.arm_w, upper)
        r = p.arm_w * 0.55
        draw.ellipse([hand[0] - r, hand[1] - r, hand[0] + r, hand[1] + r], fill=skin)
    else:
        _limb(draw, shoulder, hand, p.arm_w * 0.85, skin)
        _limb(draw, shoulder, _along(shoulder, hand, 0.35), p.arm_w * 1.05, upper)
    if ident.bag == "handbag" and (k == 1) == (ident.bag_side > 0):
        bw = 0.13 * p.h
        box = [hand[0] - bw / 2, hand[1] - bw * 0.2, hand[0] + bw / 2, hand[1] + bw * 0.8]
        draw.rounded_rectangle(box, radius=bw * 0.15, fill=bagc)


def _paste_torso(layer: Image.Image, ident: _Identity, p: _Pose, view: str, flip: bool) -> None:
    """The torso filled with the identity's clothing texture."""
    hs, ws = layer.height, layer.width
    cx, sh_w, y_sh, y_hip = p.cx, p.sh_w, p.y_sh, p.y_hip
    hip_w = sh_w * 0.88
    x0, x1 = int(cx - sh_w / 2 - 2), int(np.ceil(cx + sh_w / 2 + 2))
    y0, y1 = int(y_sh - 2), int(np.ceil(y_hip + 2))
    x0c, y0c = max(0, x0), max(0, y0)
    x1c, y1c = min(ws, x1), min(hs, y1)
    if not (x1c > x0c and y1c > y0c):
        return
    mask = Image.new("L", (x1c - x0c, y1c - y0c), 0)
    r = sh_w * 0.18
    poly = [(cx - sh_w / 2, y_sh + r), (cx - sh_w / 2 + r, y_sh), (cx + sh_w / 2 - r, y_sh),
            (cx + sh_w / 2, y_sh + r), (cx + hip_w / 2, y_hip), (cx - hip_w / 2, y_hip)]
    ImageDraw.Draw(mask).polygon([(px - x0c, py - y0c) for px, py in poly], fill=255)
    patch = _pattern_patch(ident, y1c - y0c, x1c - x0c, p.h, view)
    if flip:  # keep the texture phase fixed on the body when the layer gets mirrored
        patch = patch[:, ::-1]
    layer.paste(Image.fromarray(np.ascontiguousarray(patch)).convert("RGBA"), (x0c, y0c), mask)


def _draw_bags_over_torso(draw: ImageDraw.ImageDraw, ident: _Identity, p: _Pose, view: str) -> None:
    """A backpack seen from behind, its straps from the front, a handbag strap across the chest."""
    bagc = _rgba(ident.bag_colour)
    cx, sh_w, y_sh, y_hip, h = p.cx, p.sh_w, p.y_sh, p.y_hip, p.h
    if ident.bag == "backpack" and view == "back":
        bw, bh = sh_w * 0.7, (y_hip - y_sh) * 0.72
        draw.rounded_rectangle([cx - bw / 2, y_sh + 0.04 * h, cx + bw / 2, y_sh + 0.04 * h + bh],
                               radius=bw * 0.15, fill=bagc)
    elif ident.bag == "backpack" and view == "front":
        for sgn in (-1, 1):
            xs = cx + sgn * sh_w * 0.3
            draw.line([(xs, y_sh), (xs + sgn * sh_w * 0.02, y_sh + (y_hip - y_sh) * 0.6)], fill=bagc,
                      width=max(1, int(0.025 * h)))
    if ident.bag == "handbag" and not p.side:  # strap across the chest
        sgn = ident.bag_side
        draw.line([(cx - sgn * sh_w * 0.4, y_sh), (cx + sgn * sh_w * 0.45, y_hip - 0.05 * h)], fill=bagc,
                  width=max(1, int(0.02 * h)))


def _draw_head(draw: ImageDraw.ImageDraw, ident: _Identity, p: _Pose, view: str) -> None:
    """Neck and head; hair cap in front, full hair from behind."""
    skin, hair = _rgba(ident.skin), _rgba(ident.hair)
    cx, head_d = p.cx, p.head_d
    nw = head_d * 0.35
    draw.rectangle([cx - nw / 2, p.top + head_d * 0.8, cx + nw / 2, p.y_sh + 1], fill=skin)
    hw = head_d * (0.42 if p.side else 0.4)
    hy = p.top + head_d / 2
    box = [cx - hw, hy - head_d / 2, cx + hw, hy + head_d / 2]
    if view == "back":
        draw.ellipse(box, fill=hair)
    else:
        draw.ellipse(box, fill=skin)
        draw.chord([box[0] - 1, box[1] - 1, box[2] + 1, box[3] - head_d * 0.15], 180, 360, fill=hair)
        if p.side:
            draw.pieslice([box[0] - 1, box[1] - 1, box[2] + 1, box[3]], 90, 270, fill=hair)


def _render_person(
    ident: _Identity,
    hs: int,
    ws: int,
    rng: np.random.Generator,
    *,
    view: str,
    scale: float,
    dx: float,
    dy: float,
    flip: bool,
) -> Image.Image:
    """Draw one pedestrian on a transparent supersampled ``ws x hs`` RGBA layer."""
    layer = Image.new("RGBA", (ws, hs), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    p = _pose(ident, hs, ws, rng, view, scale, dx, dy)
    _draw_legs(draw, ident, p, flip)
    if ident.long_hair:  # long hair falls behind the shoulders (visible around the torso)
        hw = p.head_d * 0.55
        draw.rectangle([p.cx - hw, p.top + p.head_d * 0.4, p.cx + hw, p.y_sh + 0.12 * p.h], fill=_rgba(ident.hair))
    sh_pts = [(p.cx, p.y_sh), (p.cx, p.y_sh)] if p.side else [(p.cx - p.sh_w / 2, p.y_sh),
                                                              (p.cx + p.sh_w / 2, p.y_sh)]
    if p.side:  # far arm behind the body, and a backpack seen from the side before the torso
        _draw_arm(draw, ident, p, 0, sh_pts[0])
        if ident.bag == "backpack":
            bw, bh = 0.16 * p.h, (p.y_hip - p.y_sh) * 0.8
            bx = p.cx - p.sh_w / 2 - bw * 0.7
            draw.rounded_rectangle([bx, p.y_sh, bx + bw, p.y_sh + bh], radius=bw * 0.2,
                                   fill=_rgba(ident.bag_colour))
    _paste_torso(layer, ident, p, view, flip)
    draw = ImageDraw.Draw(layer)
    _draw_bags_over_torso(draw, ident, p, view)
    for k in ((1,) if p.side else (0, 1)):
        _draw_arm(draw, ident, p, k, sh_pts[k])
    _draw_head(draw, ident, p, view)
    if flip:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return layer


def _occlude(img: Image.Image, rng: np.random.Generator, cam: _Camera) -> None:
    """Cover 10-30% of the box with a bench/car (bottom), a pole/passer-by (side) or a random object."""
    w, h = img.size
    draw = ImageDraw.Draw(img)
    frac = rng.uniform(0.1, 0.3)
    kind = int(rng.integers(0, 3))
    if rng.random() < 0.5:  # background-like colour taken from the camera's scene
        sx, sy = int(rng.integers(0, cam.scene.width)), int(rng.integers(0, cam.scene.height))
        colour = tuple(int(v) for v in cam.scene.getpixel((sx, sy))[:3])
    else:
        colour = _jitter_colour(rng, _cloth_colour(rng, 0.4), 10)
    if kind == 0:
        bh = int(round(frac * h))
        draw.rectangle([0, h - bh, w, h], fill=colour)
    elif kind == 1:
        bw = int(round(frac * w))
        x0 = 0 if rng.random() < 0.5 else w - bw
        draw.rectangle([x0, 0, x0 + bw - 1, h], fill=colour)
    else:
        aspect = rng.uniform(0.5, 2.0)
        bw = int(np.clip(np.sqrt(frac * w * h * aspect), 4, w))
        bh = int(np.clip(frac * w * h / bw, 4, h))
        x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        draw.rectangle([x0, y0, x0 + bw, y0 + bh], fill=colour)


def _camera_pipeline(img: Image.Image, cam: _Camera, rng: np.random.Generator) -> Image.Image:
    """Apply the camera's colour cast, tone curve, blur and sensor noise, plus per-image lighting jitter."""
    x = np.asarray(img, np.float32) / 255.0
    x = np.power(x, cam.gamma) * cam.gains.astype(np.float32)
    gray = x.mean(axis=2, keepdims=True)
    x = gray + cam.saturation * (x - gray)
    illum = (1.0 + rng.uniform(-0.12, 0.12)) * (1.0 + rng.normal(0.0, 0.03, 3))
    x = ((x - 0.5) * cam.contrast + 0.5 + cam.brightness) * illum.astype(np.float32)
    out = Image.fromarray(np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if cam.blur > 0.05:
        out = out.filter(ImageFilter.GaussianBlur(cam.blur))
    arr = np.asarray(out, np.float32) + rng.normal(0.0, cam.noise, (out.height, out.width, 3))
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))


def _background(cam: _Camera, hs: int, ws: int, rng: np.random.Generator) -> Image.Image:
    x = int(rng.integers(0, cam.scene.width - ws + 1))
    y = int(rng.integers(0, cam.scene.height - hs + 1))
    return cam.scene.crop((x, y, x + ws, y + hs)).convert("RGBA")


def _render_image(
    ident: _Identity | None,
    cam: _Camera,
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    mode: str = "person",
) -> Image.Image:
    """One native-resolution RGB detection box: ``mode`` is person, fragment (bad detection) or background."""
    hs, ws = height * _SS, width * _SS
    canvas = _background(cam, hs, ws, rng)
    view = _VIEWS[int(rng.choice(3, p=cam.view_p))]
    flip = bool(rng.random() < 0.5)
    scale, dx, dy = 1.0, 0.0, 0.0
    if mode == "person":
        scale, dx, dy = rng.uniform(0.85, 1.05), rng.normal(0.0, 0.06), rng.normal(0.0, 0.025)
    elif mode == "fragment":  # zoomed-in part of a body, or a tiny far-away person
        if rng.random() < 0.7:
            scale, dx, dy = rng.uniform(1.4, 2.2), rng.uniform(-0.35, 0.35), rng.uniform(-0.6, 0.6)
        else:
            scale, dx, dy = rng.uniform(0.35, 0.6), rng.uniform(-0.3, 0.3), rng.uniform(-0.2, 0.3)
    if mode != "background" and ident is not None:
        layer = _render_person(
            ident, hs, ws, rng, view=view, scale=float(scale), dx=float(dx), dy=float(dy), flip=flip
        )
        canvas.alpha_composite(layer)
    img = canvas.convert("RGB").reduce(_SS)
    if mode == "person" and rng.random() < 0.2:
        _occlude(img, rng, cam)
    return _camera_pipeline(img, cam, rng)


# -------------------------------------------------------------------------------------------- generation


def _is_empty_dir(p: Path) -> bool:
    return p.is_dir() and not any(p.iterdir())


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    if out.is_dir() and not _is_empty_dir(out):
        if not overwrite:
            raise FileExistsError(
                f"output folder {out} already exists and is not empty; pass overwrite=True (--overwrite) to "
                "replace a previously generated synthetic dataset, or choose another folder"
            )
        if not (out / META_NAME).is_file():
            raise FileExistsError(
                f"refusing to overwrite {out}: it has no {META_NAME}, so it is not a synthetic dataset "
                "made by advreid; delete it yourself or choose another folder"
            )


def _biased_layout(
    cfg: SynthConfig, pid: int, cams: np.ndarray, n_images: int
) -> tuple[list[int], list[int]]:
    """(cameras, counts) of a training identity under ``imbalance`` / ``camera_bias`` (module docstring)."""
    rng = np.random.default_rng([cfg.seed, _NS_BIAS, pid])
    cams = rng.permutation(cams)[: min(len(cams), n_images)]  # an identity with few images keeps >= 2 cameras
    k = len(cams)
    if cfg.camera_bias == 0:
        counts = 1 + rng.multinomial(n_images - k, np.full(k, 1.0 / k))
    else:  # cams[0] (random after the permutation) is the dominant camera
        n_dom = int(np.clip(rng.binomial(n_images, cfg.camera_bias), 1, n_images - 1))
        counts = np.concatenate([[n_dom], rng.multinomial(n_images - n_dom, np.full(k - 1, 1.0 / (k - 1)))])
    order = np.argsort(cams)
    keep = [int(j) for j in order if counts[j] > 0]
    return [int(cams[j]) for j in keep], [int(counts[j]) for j in keep]


def _plan(cfg: SynthConfig) -> list[tuple[str, int, int, int]]:
    """(split, pid, cam, k) for every identity image; k == 0 of a test (pid, cam) is its query."""
    lo, hi = cfg.images_per_id_per_cam
    zipf = parse_imbalance(cfg.imbalance)
    sizes = None
    if zipf is not None:  # rank r of identity i is rank_of[i] + 1, in a seeded random order
        rank_of = np.random.default_rng([cfg.seed, _NS_BIAS]).permutation(cfg.num_train_ids)
        sizes = zipf_counts(cfg.num_train_ids, *zipf)[rank_of]
    biased = cfg.biased
    items: list[tuple[str, int, int, int]] = []
    for split, n, pid_of in (("train", cfg.num_train_ids, train_pid), ("test", cfg.num_test_ids, test_pid)):
        for i in range(n):
            pid = pid_of(i)
            rng = _identity_rng(cfg.seed, pid)
            _sample_identity(rng)  # appearance first, so layout draws never change a look
            n_cams = int(rng.integers(2, cfg.num_cams + 1))
            cams = np.sort(rng.choice(cfg.num_cams, n_cams, replace=False)) + 1
            counts = rng.integers(lo, hi + 1, size=n_cams)
            if split == "train" and biased:  # the test split is never biased
                total = int(counts.sum()) if sizes is None else int(sizes[i])
                cams, counts = _biased_layout(cfg, pid, cams, total)
            cams, counts = np.asarray(cams), np.asarray(counts)
            for cam, cnt in zip(cams.tolist(), counts.tolist(), strict=True):
                total = cnt if split == "train" else 1 + cnt  # test: one query + >= 1 same-camera gallery
                items.extend((split, pid, cam, k) for k in range(total))
    return items


def _bias_meta(cfg: SynthConfig) -> dict[str, Any]:
    """The training-split bias options as recorded in ``synth_meta.json`` (parsed, so readers need no parser)."""
    zipf = parse_imbalance(cfg.imbalance)
    imb: dict[str, Any] = {"kind": "none"}
    if zipf is not None:
        imb = {"kind": "zipf", "exponent": zipf[0], "min_images": zipf[1], "max_images": zipf[2]}
    return {"imbalance": imb, "camera_bias": float(cfg.camera_bias), "applies_to": "train"}


def _name(pid: int, cam: int, rng: np.random.Generator, bb: int, frame: int | None = None) -> str:
    seq = int(rng.integers(1, 7))
    frame = int(rng.integers(0, 1_000_000)) if frame is None else frame
    pid_s = "-1" if pid < 0 else f"{pid:04d}"
    return f"{pid_s}_c{cam}s{seq}_{frame:06d}_{bb:02d}.jpg"


def _synth_config(config: SynthConfig | None, params: dict[str, Any]) -> SynthConfig:
    names = {f.name for f in dataclasses.fields(SynthConfig)}
    for k in params:
        if k not in names:
            raise ValueError(f"generate_synthetic: unknown parameter {k!r}{did_you_mean(k, sorted(names))}; "
                             f"valid: {sorted(names)}")
    if isinstance(params.get("images_per_id_per_cam"), list):
        params["images_per_id_per_cam"] = tuple(params["images_per_id_per_cam"])
    return dataclasses.replace(config or SynthConfig(), **params)


def generate_synthetic(
    out: str | os.PathLike,
    config: SynthConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
    **params: Any,
) -> Path:
    """Write a Market-1501-format synthetic ReID dataset to ``out`` and return its path.

    ``config`` (a :class:`SynthConfig`) or its fields as keywords (``num_train_ids=12, num_cams=3, ...``) say what
    to generate.

    Train and test identities are disjoint (odd / even pids). Every identity appears in >= 2 random cameras;
    each test identity has exactly one query per camera plus >= 1 same-camera and >= 1 other-camera gallery
    image. The gallery also holds ``num_distractors`` pid-0000 bad detections and ``num_junk`` pid ``-1``
    images. The folder is built beside ``out`` and renamed into place, so it is never seen half-written;
    ``overwrite`` only ever replaces a folder holding a ``synth_meta.json``. ``imbalance`` (``"zipf:1.2"``)
    and ``camera_bias`` (0.9) bias the training split only; see the module docstring.
    """
    cfg = _synth_config(config, params)
    cfg.validate()
    out = Path(out)
    _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    plan = _plan(cfg)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(plan) + cfg.num_distractors + cfg.num_junk, desc=f"synth -> {out}", unit="img",
                   disable=None)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        writer = _Writer(tmp, cfg.jpeg_quality, bar)
        cams = {c: _make_camera(cfg.seed, c, cfg.height, cfg.width) for c in range(1, cfg.num_cams + 1)}
        idents = _write_identities(cfg, plan, cams, writer)
        _write_distractors_and_junk(cfg, cams, idents, writer)
        atomic_write_json(tmp / META_NAME, _meta(cfg, writer.counts))
        _swap_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return out


class _Writer:
    """Writes JPEGs into the split folders of a temporary dataset folder and counts them."""

    def __init__(self, root: Path, quality: int, bar: Any) -> None:
        self.dirs = {k: root / k for k in ("bounding_box_train", "bounding_box_test", "query")}
        for d in self.dirs.values():
            d.mkdir()
        self.quality, self.bar = quality, bar
        self.counts = {"train_images": 0, "query_images": 0, "gallery_images": 0}

    def save(self, img: Image.Image, folder: str, name: str) -> None:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=self.quality)
        path = self.dirs[folder] / name
        if path.exists():  # cannot happen by construction; guard against silent overwrites
            raise RuntimeError(f"duplicate synthetic file name {name}")
        path.write_bytes(buf.getvalue())
        if self.bar is not None:
            self.bar.update(1)


def _write_identities(cfg: SynthConfig, plan: list, cams: dict, writer: _Writer) -> dict[int, _Identity]:
    """Render every planned image of the training and test identities; return the identities drawn."""
    idents: dict[int, _Identity] = {}
    for split, pid, cam, k in plan:
        if pid not in idents:
            idents[pid] = _sample_identity(_identity_rng(cfg.seed, pid))
        rng = np.random.default_rng([cfg.seed, _NS_IMAGE, pid, cam, k])
        img = _render_image(idents[pid], cams[cam], rng, cfg.height, cfg.width)
        name = _name(pid, cam, rng, bb=k % 99 + 1)  # k >= 99 only under camera_bias: the random frame
        # number keeps such names distinct (and save() refuses a clash)
        if split == "train":
            folder, count = "bounding_box_train", "train_images"
        elif k == 0:
            folder, count = "query", "query_images"
        else:
            folder, count = "bounding_box_test", "gallery_images"
        writer.counts[count] += 1
        writer.save(img, folder, name)
    return idents


def _write_distractors_and_junk(cfg: SynthConfig, cams: dict, idents: dict, writer: _Writer) -> None:
    """Gallery pid 0000 (bad detections of strangers, empty background) and pid -1 (badly cut detections)."""
    test_pids = [test_pid(j) for j in range(cfg.num_test_ids)]
    for d in range(cfg.num_distractors):
        rng = np.random.default_rng([cfg.seed, _NS_DISTRACTOR, d])
        cam = int(rng.integers(1, cfg.num_cams + 1))
        stranger = _sample_identity(rng)
        mode = "background" if rng.random() < 0.35 else "fragment"
        img = _render_image(stranger, cams[cam], rng, cfg.height, cfg.width, mode=mode)
        writer.save(img, "bounding_box_test", _name(0, cam, rng, bb=1, frame=900_000 + d))
    for j in range(cfg.num_junk):  # half of them of real test identities
        rng = np.random.default_rng([cfg.seed, _NS_JUNK, j])
        cam = int(rng.integers(1, cfg.num_cams + 1))
        if rng.random() < 0.5:
            pid = test_pids[int(rng.integers(0, len(test_pids)))]
            who = idents.get(pid) or _sample_identity(_identity_rng(cfg.seed, pid))
        else:
            who = _sample_identity(rng)
        img = _render_image(who, cams[cam], rng, cfg.height, cfg.width, mode="fragment")
        writer.save(img, "bounding_box_test", _name(-1, cam, rng, bb=1, frame=800_000 + j))
    writer.counts["gallery_images"] += cfg.num_distractors + cfg.num_junk


def _meta(cfg: SynthConfig, counts: dict) -> dict:
    return {
        "generator": "advreid.data.synthetic", "format": "market1501", "format_version": FORMAT_VERSION,
        "params": asdict(cfg),
        "counts": {**counts, "train_ids": cfg.num_train_ids, "test_ids": cfg.num_test_ids,
                   "distractors": cfg.num_distractors, "junk": cfg.num_junk, "cams": cfg.num_cams},
        "train_bias": _bias_meta(cfg),
        "pids": {"train": f"odd 1..{train_pid(cfg.num_train_ids - 1)}",
                 "test": f"even 2..{test_pid(cfg.num_test_ids - 1)}", "distractor": 0, "junk": -1},
    }


def _swap_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished folder to ``out``; an old synthetic folder is moved aside first, deleted last."""
    old = None
    if out.is_dir():
        if _is_empty_dir(out):
            out.rmdir()
        else:
            _check_out(out, overwrite)  # re-check right before replacing anything
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "data")
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:  # put the previous dataset back
            os.replace(old / "data", out)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
