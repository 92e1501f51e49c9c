"""Tests for advreid.ops.lgt: PIL-exact luma, the rectangle sampler in both axis conventions, batch independence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from advreid.attacks import (
    lgt,
    linear_luma,
    local_grayscale,
    pil_luma,
    rect_masks,
    rects_from_uniform,
    sample_generators,
    sample_lgt_rects,
)


def _u8(b: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(b, h, w, 3), dtype=np.uint8)


def _to_tensor(a: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(a).permute(0, 3, 1, 2).to(dtype) / 255


# ---------------------------------------------------------------------------------------------- luma


def test_pil_luma_matches_pil_convert_L_on_every_gray_code_and_random_images() -> None:
    # all 256 values on each channel alone, plus random colours: the fixed-point formula PIL uses is matched exactly
    v = np.arange(256, dtype=np.uint8)
    ramp = np.zeros((3, 256, 3), dtype=np.uint8)
    for c in range(3):
        ramp[c, :, c] = v
    imgs = np.concatenate([ramp.reshape(1, 3, 256, 3), _u8(1, 3, 256, seed=1)], axis=0)
    for dtype in (torch.float32, torch.float64):
        got = pil_luma(_to_tensor(imgs, dtype))
        assert got.dtype == dtype and got.shape == (2, 1, 3, 256)
        want = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in imgs])
        assert np.array_equal(torch.round(got[:, 0] * 255).to(torch.uint8).numpy(), want)
    # documented formula: the ITU-R 601-2 weights (the fixed-point form differs from it by < 1 grey level)
    lin = linear_luma(_to_tensor(imgs, torch.float64))
    assert (lin - pil_luma(_to_tensor(imgs, torch.float64))).abs().max() <= 0.5 / 255 + 1e-9


def test_pil_luma_differs_from_naive_truncated_integer_formula_somewhere() -> None:
    # guards against silently using (299R+587G+114B)//1000 (older PIL): it disagrees with convert("L") today
    a = _u8(1, 64, 64, seed=3)
    x = a.astype(np.int64)
    naive = (x[..., 0] * 299 + x[..., 1] * 587 + x[..., 2] * 114) // 1000
    got = torch.round(pil_luma(_to_tensor(a))[0, 0] * 255).long().numpy()
    assert (got != naive[0]).any()
    assert np.array_equal(got, np.asarray(Image.fromarray(a[0]).convert("L")))


# ------------------------------------------------------------------------------------------ sampler


def test_reference_axis_example_from_spec() -> None:
    # 256x128, S = 0.2*H*W, r = 0.3 -> h = 44, w = 148: accepted by the reference (w < H, h < W), a band that hits
    # the right edge; Random Erasing rejects it (w >= W) and, with one attempt, draws nothing.
    H, W, sl, sh = 256, 128, 0.02, 0.4
    u = torch.tensor([[0.0, (0.2 - sl) / (sh - sl), 0.0, 0.999, 0.5]], dtype=torch.float64)
    top, left, h, w = rects_from_uniform(u, H, W, mode="reference")[0].tolist()
    assert (h, w) == (44, 148)
    assert left == math.floor(0.999 * (W - h + 1)) == 84 and top == math.floor(0.5 * (H - w + 1)) == 54
    m = rect_masks(torch.tensor([[top, left, h, w]]), H, W)[0, 0]
    assert int(m.sum()) == h * (W - left)  # cut at the right border: 44 rows x 44 columns
    assert m[:, W - 1].any() and not m[:, : left].any()
    assert rects_from_uniform(u, H, W, mode="random_erasing")[0].tolist() == [0, 0, 0, 0]


def _reference_lgt(img: Image.Image, u: np.ndarray, sl: float, sh: float, r1: float, p: float) -> Image.Image:
    """Port of the seed's trans_gray.py LGT with its random draws replaced by the given uniforms."""
    gray = np.asarray(img.convert("L"))
    img_gray = np.dstack([gray, gray, gray])
    if u[0] >= p:
        return img
    for a in range(1, len(u), 4):
        area = img.size[0] * img.size[1]
        target_area = (sl + (sh - sl) * u[a]) * area
        aspect_ratio = r1 + (1 / r1 - r1) * u[a + 1]
        h = int(round(math.sqrt(target_area * aspect_ratio)))
        w = int(round(math.sqrt(target_area / aspect_ratio)))
        if w < img.size[1] and h < img.size[0]:
            x1 = int(u[a + 2] * (img.size[0] - h + 1))
            y1 = int(u[a + 3] * (img.size[1] - w + 1))
            arr = np.asarray(img).astype("float")
            arr[y1:y1 + h, x1:x1 + w, :] = img_gray[y1:y1 + h, x1:x1 + w, :]
            return Image.fromarray(arr.astype("uint8"))
    return img


def _random_erasing_gray(a: np.ndarray, u: np.ndarray, sl: float, sh: float, r1: float) -> np.ndarray:
    """Random Erasing's tensor-axis convention (h < H, w < W, img[top:top+h, left:left+w]) with a grey patch."""
    H, W = a.shape[:2]
    gray = np.asarray(Image.fromarray(a).convert("L"))
    for k in range(1, len(u), 4):
        target_area = (sl + (sh - sl) * u[k]) * H * W
        ratio = r1 + (1 / r1 - r1) * u[k + 1]
        h = int(round(math.sqrt(target_area * ratio)))
        w = int(round(math.sqrt(target_area / ratio)))
        if h < H and w < W:
            top, left = int(u[k + 2] * (H - h + 1)), int(u[k + 3] * (W - w + 1))
            out = a.copy()
            out[top:top + h, left:left + w, :] = gray[top:top + h, left:left + w, None]
            return out
    return a


@pytest.mark.parametrize("mode", ["reference", "random_erasing"])
def test_local_grayscale_equals_ported_reference_exactly(mode: str) -> None:
    H, W, n, attempts = 64, 32, 40, 4
    a = _u8(n, H, W, seed=5)
    u = torch.rand(n, 1 + 4 * attempts, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u[::7, 0] = 0.95  # some skipped at p = 0.9
    rects = rects_from_uniform(u, H, W, mode=mode, p=0.9)
    out = local_grayscale(_to_tensor(a, torch.float64), rects)
    got = torch.round(out * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    n_patched = 0
    for i in range(n):
        if mode == "reference":
            want = np.asarray(_reference_lgt(Image.fromarray(a[i]), u[i].numpy(), 0.02, 0.4, 0.3, 0.9))
        else:
            want = a[i] if u[i, 0] >= 0.9 else _random_erasing_gray(a[i], u[i].numpy(), 0.02, 0.4, 0.3)
        assert np.array_equal(got[i], want), i
        n_patched += int((got[i] != a[i]).any())
    assert n_patched >= n // 2  # the comparison is not vacuous


@pytest.mark.parametrize("mode", ["reference", "random_erasing"])
def test_rect_area_fraction_and_fit(mode: str) -> None:
    H, W, sl, sh = 64, 32, 0.02, 0.4
    rects = sample_lgt_rects(400, H, W, torch.Generator().manual_seed(1), mode=mode)
    top, left, h, w = rects.T.double()
    assert (h > 0).all()
    # the untruncated area is S = U(sl, sh)*H*W up to the rounding of h and w
    assert ((h - 0.5) * (w - 0.5) <= sh * H * W).all() and ((h + 0.5) * (w + 0.5) >= sl * H * W).all()
    masks = rect_masks(rects, H, W)[:, 0]
    area = masks.flatten(1).sum(1).double()
    if mode == "random_erasing":
        assert torch.equal(area, h * w) and (top + h <= H).all() and (left + w <= W).all()
        assert ((area / (H * W) >= sl * 0.8) & (area / (H * W) <= sh * 1.15)).all()
    else:
        assert (area <= h * w).all() and (area < h * w).any()  # sometimes cut at the border
        assert torch.equal(area, torch.minimum(h, H - top) * torch.minimum(w, W - left))


def test_probability_zero_is_identity_and_one_always_patches() -> None:
    x = torch.rand(16, 3, 32, 16, generator=torch.Generator().manual_seed(0))
    y0 = lgt(x, torch.Generator().manual_seed(0), p=0.0)
    assert torch.equal(y0, x) and y0 is not x
    r1 = sample_lgt_rects(16, 32, 16, torch.Generator().manual_seed(0), p=1.0)
    assert (r1[:, 2] * r1[:, 3] > 0).all()
    rh = sample_lgt_rects(2000, 32, 16, torch.Generator().manual_seed(0), p=0.4)
    frac = (rh[:, 2] > 0).double().mean().item()
    assert abs(frac - 0.4) < 0.04


def test_patch_is_gray_inside_and_input_outside() -> None:
    x = torch.rand(8, 3, 40, 24, generator=torch.Generator().manual_seed(2))
    rects = sample_lgt_rects(8, 40, 24, sample_generators(0, torch.arange(8), "t"))
    y = local_grayscale(x, rects)
    m = rect_masks(rects, 40, 24).expand_as(y)
    assert torch.equal(y[~m], x[~m])
    g = pil_luma(x).expand_as(y)
    assert torch.equal(y[m], g[m])
    assert torch.equal(y[:, 0][m[:, 0]], y[:, 1][m[:, 1]]) and torch.equal(y[:, 1][m[:, 1]], y[:, 2][m[:, 2]])


def test_per_sample_generators_make_rects_batch_independent() -> None:
    idx = torch.tensor([5, 9, 2])
    full = sample_lgt_rects(3, 64, 32, sample_generators(7, idx, "lgt"), draws=4)
    assert full.shape == (4, 3, 4)
    alone = sample_lgt_rects(1, 64, 32, sample_generators(7, idx[1:2], "lgt"), draws=4)
    assert torch.equal(full[:, 1:2], alone)
    assert not torch.equal(full[0], full[1])  # fresh rectangles per draw


def test_sampler_argument_errors() -> None:
    with pytest.raises(ValueError, match="sl <= sh"):
        sample_lgt_rects(2, 8, 8, sl=0.5, sh=0.1)
    with pytest.raises(ValueError, match="mode='bogus'"):
        sample_lgt_rects(2, 8, 8, mode="bogus")
    with pytest.raises(ValueError, match="one generator per sample"):
        sample_lgt_rects(3, 8, 8, sample_generators(0, torch.arange(2), "x"))
    with pytest.raises(ValueError, match="B,3,H,W"):
        pil_luma(torch.rand(2, 1, 4, 4))
