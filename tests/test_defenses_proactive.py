"""Tests for advreid.defenses.proactive: PIL/OpenCV-exact grey, sketch and AutoAug ops, CF statistics, LHT, DL."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageEnhance, ImageOps

from advreid.defenses.proactive import (
    AUTO_AUG_MAGNITUDES,
    AUTO_AUG_POLICIES,
    BRANCHES,
    PROACTIVE,
    LocalGrayscale,
    ProactiveDefense,
    apply_aug_op,
    auto_aug,
    build_proactive,
    channel_fusion,
    grayscale,
    list_proactive,
    local_homogeneous,
    sketch,
)
from advreid.ops import pil_luma, rect_masks, sample_generators, sample_lgt_rects


def _u8(b: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(b, h, w, 3), dtype=np.uint8)


def _smooth_u8(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A natural-looking (smooth) uint8 image: upsampled noise."""
    base = np.random.default_rng(seed).integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
    return np.array(Image.fromarray(base).resize((w, h), Image.BILINEAR))


def _t(a: np.ndarray) -> torch.Tensor:
    a = a[None] if a.ndim == 3 else a
    return torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255


def _img_u8(t: torch.Tensor) -> np.ndarray:
    return torch.round(t * 255).to(torch.uint8).permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------------------ grey, sketch


def test_grayscale_equals_pil_convert_L() -> None:
    a = _u8(3, 24, 12, seed=1)
    g = grayscale(_t(a))
    assert g.shape == (3, 3, 24, 12)
    for i in range(3):
        ref = np.asarray(Image.fromarray(a[i]).convert("L"))
        for c in range(3):
            assert np.array_equal(torch.round(g[i, c] * 255).to(torch.uint8).numpy(), ref)


def _np_sketch(rgb: np.ndarray) -> np.ndarray:
    """toSketch(gray) with NumPy: explicit 27x27 Gaussian (sigma 4.4), reflect-101 (numpy 'reflect'), cv2.divide."""
    gray = np.asarray(Image.fromarray(rgb).convert("L")).astype(np.float64)
    t = np.arange(27) - 13
    w = np.exp(-(t ** 2) / (2 * 4.4 ** 2))
    k2 = np.outer(w, w) / w.sum() ** 2
    pad = np.pad(255 - gray, 13, mode="reflect")
    blur = np.round(np.einsum("hwij,ij->hw", sliding_window_view(pad, (27, 27)), k2))
    den = 255 - blur
    return np.where(den > 0, np.clip(np.round(256 * gray / np.maximum(den, 1)), 0, 255), 0)


@pytest.mark.parametrize("shape", [(48, 32), (20, 12)])  # the second is smaller than the 27x27 kernel
def test_sketch_matches_numpy_colour_dodge(shape: tuple[int, int]) -> None:
    a = np.stack([_smooth_u8(*shape, seed=3), _u8(1, *shape, seed=4)[0]])
    s = sketch(_t(a))
    assert s.shape == (2, 1, *shape)
    for i in range(2):
        ref = _np_sketch(a[i])
        got = torch.round(s[i, 0] * 255).double().numpy()
        assert np.abs(got - ref).max() <= 1  # exact up to one 8-bit level (float rounding of the blur)
        assert np.mean(got == ref) > 0.99


def test_sketch_of_flat_images() -> None:
    for v in (1, 77, 200, 255):
        x = torch.full((1, 3, 40, 20), v / 255)
        assert torch.equal(sketch(x), torch.ones(1, 1, 40, 20))  # dodge of a flat image is white
    assert torch.equal(sketch(torch.zeros(2, 3, 40, 20)), torch.zeros(2, 1, 40, 20))  # 255 - B = 0 -> 0


# ------------------------------------------------------------------------------------------ channel fusion


def _fusion_inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor([0.1, 0.3, 0.5]).view(1, 3, 1, 1).repeat(n, 1, 2, 2)
    return x, torch.full((n, 1, 2, 2), 0.9)


def _sources(out: torch.Tensor) -> torch.Tensor:
    """(n,3) source ids (0,1,2 = R,G,B, 3 = X) of fused images made from _fusion_inputs."""
    vals = torch.tensor([0.1, 0.3, 0.5, 0.9])
    src = (out[:, :, 0, 0, None] - vals).abs().argmin(-1)
    assert torch.equal(out, vals[src][:, :, None, None].expand_as(out))  # every channel is one of R,G,B,X, whole
    return src


def test_channel_fusion_reference_statistics() -> None:
    n = 20000
    x, e = _fusion_inputs(n)
    src = _sources(channel_fusion(x, e, torch.Generator().manual_seed(0)))
    n_x = (src == 3).sum(1)
    assert n_x.max() <= 2
    rgb = src.masked_fill(src == 3, -1)
    for c in range(3):  # an RGB channel never appears twice
        assert ((rgb == c).sum(1) <= 1).all()
    kept = (3 - n_x).bincount(minlength=4)[1:].double() / n
    for f, p in zip(kept.tolist(), (0.3, 0.6, 0.1), strict=True):
        assert abs(f - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_channel_fusion_paper_mode() -> None:
    n = 20000
    x, e = _fusion_inputs(n)
    src = _sources(channel_fusion(x, e, torch.Generator().manual_seed(1), mode="paper"))
    kept = 3 - (src == 3).sum(1)
    assert set(kept.unique().tolist()) == {1, 2}
    assert abs((kept == 1).double().mean().item() - 0.5) < 4 * math.sqrt(0.25 / n)
    rgb = src.masked_fill(src == 3, -1)
    for c in range(3):
        assert ((rgb == c).sum(1) <= 1).all()
    assert len({tuple(r) for r in src.tolist()}) == 27  # 9 one-channel + 18 two-channel layouts


def test_channel_fusion_validates() -> None:
    x, e = _fusion_inputs(2)
    with pytest.raises(ValueError, match="mode"):
        channel_fusion(x, e, mode="bogus")
    with pytest.raises(ValueError, match="extra"):
        channel_fusion(x, e[:1])
    with pytest.raises(ValueError, match="generator"):
        channel_fusion(x, e, [torch.Generator()])


# ----------------------------------------------------------------------------------------------- AutoAug


def _pil_op(img: Image.Image, op: str, m: float, sign: int) -> Image.Image:
    """The seed's defendAugment.SubPolicy ops with a fixed sign."""
    if op == "rotate":
        r = img.convert("RGBA").rotate(m)
        return Image.composite(r, Image.new("RGBA", r.size, (128,) * 4), r).convert(img.mode)
    if op == "shearX":
        return img.transform(img.size, Image.AFFINE, (1, m * sign, 0, 0, 1, 0), Image.BICUBIC, fillcolor=(128,) * 3)
    enh = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast, "sharpness": ImageEnhance.Sharpness}
    if op in enh:
        return enh[op](img).enhance(1 + m * sign)
    if op == "posterize":
        return ImageOps.posterize(img, int(m))
    if op == "solarize":
        return ImageOps.solarize(img, m)
    return {"autocontrast": ImageOps.autocontrast, "equalize": ImageOps.equalize, "invert": ImageOps.invert}[op](img)


@pytest.mark.parametrize("op", ["rotate", "shearX", "color", "contrast", "sharpness", "posterize", "solarize",
                                "autocontrast", "equalize", "invert"])
def test_aug_ops_match_pillow(op: str) -> None:
    a = _smooth_u8(64, 32, seed=5).copy()
    t = torch.from_numpy(a).permute(2, 0, 1)[None].contiguous()
    for mi in (0, 3, 8):
        for sign in (1, -1):
            got = apply_aug_op(t, op, mi, sign)[0].permute(1, 2, 0).numpy().astype(int)
            ref = np.asarray(_pil_op(Image.fromarray(a), op, AUTO_AUG_MAGNITUDES[op][mi], sign)).astype(int)
            tol = 1 if op == "shearX" else 0  # bicubic: float rounding right at an integer
            assert np.abs(got - ref).max() <= tol, (op, mi, sign)


def test_aug_ops_match_torchvision_and_grids() -> None:
    img = torch.from_numpy(_u8(2, 16, 8, seed=6)).permute(0, 3, 1, 2).contiguous()
    assert torch.equal(apply_aug_op(img, "invert", 4), TF.invert(img))
    assert torch.equal(apply_aug_op(img, "posterize", 9), TF.posterize(img, 4))  # 4 bits
    assert torch.equal(apply_aug_op(img, "equalize", 0), TF.equalize(img))
    assert torch.equal(apply_aug_op(img, "solarize", 0), img)  # threshold 256: nothing inverted
    assert torch.equal(apply_aug_op(img, "solarize", 9), TF.invert(img))  # threshold 0: everything
    assert AUTO_AUG_MAGNITUDES["posterize"] == (8, 8, 7, 7, 6, 6, 5, 5, 4, 4)
    assert len(AUTO_AUG_POLICIES) == 25
    with pytest.raises(ValueError, match="op"):
        apply_aug_op(img, "blur", 1)


def test_auto_aug_range_shape_and_forced_policy() -> None:
    x = _t(_u8(16, 32, 16, seed=7))
    y = auto_aug(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype and 0 <= y.min() and y.max() <= 1
    # sub-policy 12 = (0.0 Equalize 7, 0.8 Equalize 8): each image is either unchanged or equalised
    z = auto_aug(x, torch.Generator().manual_seed(0), policy=12)
    eq = TF.equalize(torch.round(x * 255).to(torch.uint8)).float() / 255
    same, equalised = (z == x).flatten(1).all(1), (z == eq).flatten(1).all(1)
    assert (same | equalised).all() and equalised.any() and same.any()


# --------------------------------------------------------------------------------------------------- LHT


def test_lht_changes_only_the_rectangle() -> None:
    x = _t(_u8(8, 32, 16, seed=8))
    gens = sample_generators(3, range(8), "lht")
    out, rects = local_homogeneous(x, gens, probs=(1, 0, 0, 0), return_rects=True)
    mask = rect_masks(rects, 32, 16).expand_as(x)
    assert (rects[:, 2] > 0).all()
    assert torch.equal(out[~mask], x[~mask])
    assert torch.equal(out[mask], grayscale(x)[mask])
    # the same seed reproduces the rectangle: one uniform for T, then LGT's sampler (no gate, 100 attempts)
    gens2 = sample_generators(3, range(8), "lht")
    for g in gens2:
        torch.rand(1, generator=g, dtype=torch.float64)
    assert torch.equal(rects, sample_lgt_rects(8, 32, 16, gens2))
    # any transform mix: changed pixels lie inside the rectangle
    out, rects = local_homogeneous(x, sample_generators(4, range(8), "lht"), return_rects=True)
    changed = (out != x).any(1, keepdim=True)
    assert not (changed & ~rect_masks(rects, 32, 16)).any()


def test_lht_random_erasing_rect_mode_fits() -> None:
    x = _t(_u8(32, 32, 16, seed=9))
    _, rects = local_homogeneous(x, torch.Generator().manual_seed(0), rect_mode="random_erasing",
                                 return_rects=True)
    top, left, h, w = rects.unbind(1)
    assert ((top + h <= 32) & (left + w <= 16)).all()


def test_local_grayscale_module() -> None:
    x = _t(_u8(4, 32, 16, seed=10))
    assert torch.equal(LocalGrayscale(p=0.0)(x, torch.Generator().manual_seed(0)), x)
    y = LocalGrayscale(p=1.0)(x, sample_generators(0, range(4), "lgt"))
    changed = (y != x).any(1)
    assert changed.flatten(1).any(1).all()
    assert torch.equal(y[:, 0][changed], pil_luma(x)[:, 0][changed])
    assert LocalGrayscale(p=1.0)(x[0]).shape == (3, 32, 16)
    with pytest.raises(ValueError, match="p"):
        LocalGrayscale(p=1.5)


# -------------------------------------------------------------------------------------- ProactiveDefense


@pytest.mark.parametrize("preset", ["reference", "paper"])
def test_branch_frequencies(preset: str) -> None:
    d = build_proactive(preset)
    p = d.params()
    probs = [p[k] for k in BRANCHES[:5]]
    probs.append(1 - sum(probs))
    n = 100_000
    counts = d.branch_of(torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    freq = counts.bincount(minlength=6).double() / n
    for f, q in zip(freq.tolist(), probs, strict=True):
        assert abs(f - q) <= 4 * math.sqrt(q * (1 - q) / n) + 1e-12
    assert abs(probs[-1] - (0.78 if preset == "reference" else 0.75)) < 1e-9


def test_branch_thresholds_are_exclusive() -> None:
    d = ProactiveDefense(0.05, 0.01, 0.01, 0.05, 0.10)
    # cumulative thresholds are summed left to right in float64, as the reference's ``p < G + G_rgb + ...``
    u = torch.tensor([0.0, 0.0499, 0.0501, 0.0599, 0.0601, 0.0701, 0.1199, 0.1201, 0.2199, 0.2201, 0.9999],
                     dtype=torch.float64)
    assert d.branch_of(u).tolist() == [0, 0, 1, 1, 2, 3, 3, 4, 4, 5, 5]
    assert ProactiveDefense(0, 0, 0, 0, 0).branch_of(u).tolist() == [5] * len(u)


def test_proactive_identity_and_validation() -> None:
    x = _t(_u8(6, 32, 16, seed=11))
    assert torch.equal(ProactiveDefense(0, 0, 0, 0, 0)(x, torch.Generator().manual_seed(0)), x)
    with pytest.raises(ValueError, match="sum"):
        ProactiveDefense(0.5, 0.3, 0.3)
    with pytest.raises(ValueError, match="aug"):
        ProactiveDefense(aug=-0.1)
    with pytest.raises(ValueError, match="lht_probs"):
        ProactiveDefense(lht_probs=(0.5, 0.5))
    with pytest.raises(ValueError, match="fusion_mode"):
        ProactiveDefense(fusion_mode="both")
    with pytest.raises(ValueError, match="rect_mode"):
        ProactiveDefense(rect_mode="x")
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        ProactiveDefense()(torch.zeros(2, 1, 8, 8))


def test_branches_do_what_they_say() -> None:
    x = _t(_u8(64, 32, 16, seed=12))
    d = ProactiveDefense(0.2, 0.15, 0.15, 0.2, 0.2)
    y, br = d(x, torch.Generator().manual_seed(5), return_branches=True)
    assert set(br.tolist()) == set(range(6))
    g = grayscale(x)
    assert torch.equal(y[br == 0], g[br == 0])
    assert torch.equal(y[br == 5], x[br == 5])
    for k in (1, 2):  # every channel is an RGB channel of x or the grey (1) / sketch (2) channel
        xs = torch.cat([x, pil_luma(x) if k == 1 else sketch(x)], 1)[br == k]
        ys = y[br == k]
        assert all(any(torch.equal(ys[i, c], xs[i, s]) for s in range(4)) for i in range(len(ys)) for c in range(3))
    assert 0 <= y.min() and y.max() <= 1


def test_batch_independence_with_per_sample_generators() -> None:
    n = 24
    x = _t(np.stack([_smooth_u8(32, 16, seed=20 + i) for i in range(n)]))
    d = ProactiveDefense(0.15, 0.15, 0.15, 0.2, 0.2, fusion_mode="paper")
    y, br = d(x, sample_generators(7, range(n), "proactive"), return_branches=True)
    assert set(br.tolist()) == set(range(6))
    for i in range(n):
        yi = d(x[i], sample_generators(7, [i], "proactive"))
        assert torch.equal(yi, y[i]), i
    # the LHT branch is local_homogeneous after the branch draw
    for i in (br == 4).nonzero().flatten().tolist():
        (g,) = sample_generators(7, [i], "proactive")
        torch.rand(1, generator=g, dtype=torch.float64)
        assert torch.equal(y[i], local_homogeneous(x[i], [g], probs=d.lht_probs, fusion_mode="paper"))
    # one generator for the batch: seeded, reproducible
    a = d(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, d(x, torch.Generator().manual_seed(1)))


def test_single_image_inputs() -> None:
    x = _t(_u8(1, 32, 16, seed=13))[0]
    assert grayscale(x).shape == (3, 32, 16)
    assert sketch(x).shape == (1, 32, 16)
    assert channel_fusion(x, pil_luma(x[None])[0]).shape == (3, 32, 16)
    assert auto_aug(x).shape == (3, 32, 16)
    assert local_homogeneous(x).shape == (3, 32, 16)
    y, b = ProactiveDefense(0.2, 0.2, 0.2, 0.2, 0.2)(x, [torch.Generator().manual_seed(0)], return_branches=True)
    assert y.shape == (3, 32, 16) and b.dim() == 0


# ------------------------------------------------------------------------------------------------ presets


def test_presets_and_build_proactive() -> None:
    assert build_proactive(None) is None and build_proactive("none") is None and build_proactive("None", {}) is None
    ref = build_proactive("reference").params()
    assert (ref["gray"], ref["gray_rgb"], ref["sketch_rgb"], ref["aug"], ref["lht"]) == (0.05, 0.01, 0.01, 0.05, 0.1)
    assert build_proactive("jad").params() == ref == build_proactive("DL").params()
    paper = build_proactive("paper").params()
    assert (paper["gray_rgb"], paper["sketch_rgb"]) == (0.025, 0.025)
    assert build_proactive("no_lht").params()["lht"] == 0
    cf = build_proactive("cf").params()
    assert (cf["aug"], cf["lht"], cf["gray_rgb"]) == (0, 0, 0.01)
    lg = build_proactive("lgt")
    assert isinstance(lg, LocalGrayscale) and lg.p == 0.4
    custom = build_proactive("reference", {"lht": 0.2, "fusion_mode": "paper"})
    assert custom.params()["lht"] == 0.2 and custom.params()["fusion_mode"] == "paper"
    json.dumps(custom.params())
    assert ProactiveDefense(**custom.params()).params() == custom.params()
    assert {"reference", "jad", "dl", "paper", "no_lht", "cf", "lgt"} <= set(list_proactive())
    assert "lht=0.2" in repr(custom)
    assert len(PROACTIVE) >= 7


def test_build_proactive_errors() -> None:
    with pytest.raises(KeyError, match="reference"):
        build_proactive("jadd")
    with pytest.raises(ValueError, match=r"lhtt.*allowed"):
        build_proactive("reference", {"lhtt": 0.1})
    with pytest.raises(ValueError, match="proactive_params"):
        build_proactive(None, {"lht": 0.1})
    with pytest.raises(ValueError, match="sum"):
        build_proactive("paper", {"gray": 0.9})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    x = _t(np.stack([_smooth_u8(64, 32, seed=30 + i) for i in range(16)]))
    d = ProactiveDefense(0.15, 0.15, 0.15, 0.2, 0.3)
    a = d(x, torch.Generator().manual_seed(0))
    b = d(x.cuda(), torch.Generator().manual_seed(0))
    assert b.device.type == "cuda"
    # same draws, same branches; float64 blur/bicubic on the GPU may round a rare pixel differently
    assert ((a - b.cpu()).abs() > 1.5 / 255).float().mean() < 1e-3
