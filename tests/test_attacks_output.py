"""Tests for advreid.ops.output: 8-bit quantisation, in-memory re-encoding, the seed-compatible path, saving."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from advreid.attacks import SEED_COMPAT, finalize, output_name, quantize, reencode, save_images


def _img(b: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(b, 3, 8, 4, generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)  # some structure
    return (base + 0.02 * torch.rand(b, 3, 32, 16, generator=g)).clamp(0, 1)


def test_quantize_round_and_floor_on_hand_values() -> None:
    x = torch.tensor([0.49, 1.4, 1.6, 254.7, 255.0]).div(255).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert torch.equal(quantize(x, "round")[0, 0, 0] * 255, torch.tensor([0.0, 1, 2, 255, 255]))
    assert torch.equal(quantize(x, "floor")[0, 0, 0] * 255, torch.tensor([0.0, 1, 1, 254, 255]))
    assert quantize(x) is x
    k = torch.arange(256, dtype=torch.float32).div(255).view(1, 1, 1, 256).expand(1, 3, 1, 256)
    assert torch.equal(quantize(k, "floor"), k)  # 8-bit images survive truncation exactly
    with pytest.raises(ValueError, match="quantize='ceil'"):
        quantize(x, "ceil")


def test_png_reencode_is_lossless_and_jpeg_matches_pil() -> None:
    x = _img()
    assert torch.equal(reencode(x, "png"), quantize(x, "round"))
    y = reencode(x, "jpeg:75")
    assert y.dtype == x.dtype and y.shape == x.shape
    u8 = torch.round(x * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(2):
        buf = io.BytesIO()
        Image.fromarray(u8[i]).save(buf, format="JPEG", quality=75)
        want = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        assert np.array_equal(torch.round(y[i] * 255).to(torch.uint8).permute(1, 2, 0).numpy(), want)
    assert not torch.equal(y, quantize(x, "round")) and (y - x).abs().mean() < 0.1
    assert reencode(x, None) is x
    assert (reencode(x, "jpeg:95") - x).abs().mean() < (reencode(x, "jpeg:10") - x).abs().mean()


def test_seed_compat_is_floor_then_pil_default_jpeg() -> None:
    x = _img(1, seed=3)
    got = finalize(x, **SEED_COMPAT)
    # the seed: ToPILImage (mul(255).byte(): truncation), img.save("name.jpg") (quality 75), reload
    pil = Image.fromarray(x[0].mul(255).byte().permute(1, 2, 0).numpy())
    buf = io.BytesIO()
    pil.save(buf, format="JPEG")
    want = torch.from_numpy(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).copy())
    assert torch.equal(torch.round(got[0] * 255).to(torch.uint8).permute(1, 2, 0), want)
    assert torch.equal(finalize(x), x) and torch.equal(finalize(x, quantize="floor"), quantize(x, "floor"))


@pytest.mark.parametrize("fmt, bad", [("gif", "not supported"), ("jpeg:0", "1..100"), ("jpeg:hi", "must be an int")])
def test_format_errors(fmt: str, bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        reencode(_img(), fmt)


def test_save_images_names_suffixes_and_content(tmp_path) -> None:
    x = _img(3)
    names = ["0001_c1s1_001051_00.jpg", "sub/0002_c2s1_000301_01.jpg", "0003_c3.png"]
    paths = save_images(x, names, tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "0001_c1s1_001051_00.png", "sub/0002_c2s1_000301_01.png", "0003_c3.png"]
    for i, p in enumerate(paths):
        back = torch.from_numpy(np.asarray(Image.open(p)).copy()).permute(2, 0, 1).float() / 255
        assert torch.equal(back, quantize(x[i:i + 1], "round")[0])
    jp = save_images(x[:2], names[:2], tmp_path / "j", fmt="jpeg:75", quantize="floor")
    assert [p.name for p in jp] == ["0001_c1s1_001051_00.jpg", "0002_c2s1_000301_01.jpg"]
    assert Image.open(jp[0]).format == "JPEG"
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temp files
    assert output_name("a/b.jpeg", "jpeg").as_posix() == "a/b.jpeg" and output_name("c.bmp", "jpg").name == "c.jpg"


def test_save_images_errors(tmp_path) -> None:
    x = _img(2)
    with pytest.raises(ValueError, match="2 images but 1 names"):
        save_images(x, ["a.jpg"], tmp_path)
    with pytest.raises(ValueError, match="both map to the file 'a.png'"):
        save_images(x, ["a.jpg", "a.png"], tmp_path)
    with pytest.raises(ValueError, match="relative path"):
        save_images(x, ["/etc/a.jpg", "b.jpg"], tmp_path)
    with pytest.raises(ValueError, match="relative path"):
        save_images(x, ["../a.jpg", "b.jpg"], tmp_path)
    with pytest.raises(ValueError, match="expected 'round' or 'floor'"):
        save_images(x, ["a.jpg", "b.jpg"], tmp_path, quantize=None)  # type: ignore[arg-type]


def test_floor_quantisation_stays_within_the_budget_over_every_grey_level() -> None:
    """The seed's output path (floor) on a 5px attack: every level 0..255 keeps the perturbation within 5 levels."""
    from advreid.ops import quantize, quantize_within

    eps = 5 / 255
    x0 = (torch.arange(256, dtype=torch.float32) / 255).view(1, 1, 16, 16).expand(1, 3, 16, 16).contiguous()
    for sign in (-1.0, 1.0):
        adv = (x0 + sign * eps).clamp(0, 1)  # float32, as an attack leaves it: the edge of the budget
        naive = quantize(adv, "floor")
        levels = ((naive - x0) * 255).round().abs().max()
        q = quantize_within(adv, x0, eps, "floor")
        d = ((q.double() - x0.double()) * 255).round()
        assert d.abs().max() <= 5 and torch.equal(q, quantize(q, "round"))  # on the grid, within 5 levels
        if sign < 0:
            assert levels > 5  # what the plain floor did: one level past the budget somewhere
            # clipping only undoes the overshoot: where floor was within the budget nothing changes
            inside = ((naive - x0) * 255).round().abs() <= 5
            assert torch.equal(q[inside], naive[inside])
