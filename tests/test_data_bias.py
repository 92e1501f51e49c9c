"""Tests for the dataset-bias measurement (hand-built records and images, tiny synthetic sets)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from advreid.data import Record, build_dataset
from advreid.data.bias import (
    DUP_THRESHOLD,
    dataset_bias,
    gini,
    near_duplicate_mask,
    per_identity_accuracy,
)
from advreid.data.synthetic import generate_synthetic, zipf_counts

# ------------------------------------------------------------------------------------------------- gini


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1, 1, 1, 1], 0.0),
        ([1, 3], 0.25),  # |1-3| * 2 / (2 * 2^2 * 2)
        ([4, 1, 3, 2], 0.25),  # ordered pair diffs sum to 20; 20 / (2 * 16 * 2.5)
        ([0, 0, 0, 5], 0.75),  # one holder of everything: (n - 1) / n
        ([0, 0], 0.0),
        ([7], 0.0),
    ],
)
def test_gini_known_distributions(values: list[float], expected: float) -> None:
    assert gini(values) == pytest.approx(expected, abs=1e-12)
    assert gini(np.asarray(values) * 3.5) == pytest.approx(expected, abs=1e-12)  # scale invariant


def test_gini_matches_pairwise_definition() -> None:
    x = np.random.default_rng(0).integers(1, 80, 57).astype(np.float64)
    ref = np.abs(x[:, None] - x[None]).sum() / (2 * len(x) ** 2 * x.mean())
    assert gini(x) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("bad", [[], [1, -1], [1.0, float("nan")]])
def test_gini_rejects_bad_input(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="gini"):
        gini(bad)


# ------------------------------------------------------------------------------ counts and dominant camera


def _records(layout: dict[int, dict[int, int]]) -> list[Record]:
    """pid -> {camid: count} as records with unique fake paths (no files: duplicates are not checked)."""
    return [
        Record(f"/nowhere/{pid:04d}_c{cam + 1}_{k:03d}.jpg", pid, cam)
        for pid, cams in layout.items()
        for cam, n in cams.items()
        for k in range(n)
    ]


HAND = {1: {0: 3, 1: 1}, 2: {0: 1, 1: 1}, 3: {2: 6}, 4: {0: 1, 1: 1, 2: 2}}  # n = 4, 2, 6, 4


def test_dataset_bias_hand_built_counts() -> None:
    rep = dataset_bias(_records(HAND), check_duplicates=False)
    assert (rep.num_images, rep.num_ids, rep.num_cams) == (16, 4, 3)
    ipi = rep.images_per_id
    assert (ipi["min"], ipi["median"], ipi["max"], ipi["mean"]) == (2, 4, 6, 4)
    assert ipi["std"] == pytest.approx(math.sqrt(2.0))  # deviations 0, -2, 2, 0
    assert ipi["gini"] == pytest.approx(0.1875)  # unordered pair diffs 2+2+0+4+2+2 = 12; 24 / (2 * 16 * 4)
    assert rep.cams_per_id == {"min": 1, "median": 2, "max": 3, "mean": 2}
    ds = rep.dominant_share  # shares 3/4, 1/2, 6/6, 2/4
    assert ds["mean"] == pytest.approx(0.6875) and ds["median"] == pytest.approx(0.625)
    assert (ds["min"], ds["max"]) == (0.5, 1.0)
    assert (rep.num_dominated, rep.frac_dominated) == (2, 0.5)  # strictly above 0.5: pids 1 and 3
    assert rep.near_duplicates is None
    p = rep.per_id
    assert (p[1].dominant_cam, p[1].dominant_share, p[1].cam_counts) == (0, 0.75, {0: 3, 1: 1})
    assert p[2].dominant_cam == 0  # a tie goes to the lowest camid
    assert (p[3].dominant_cam, p[3].dominant_share, p[4].dominant_cam) == (2, 1.0, 2)


@pytest.mark.parametrize(("threshold", "count"), [(0.0, 4), (0.5, 2), (0.74, 2), (0.75, 1), (0.99, 1), (1.0, 0)])
def test_dominance_threshold_is_strict(threshold: float, count: int) -> None:
    rep = dataset_bias(_records(HAND), dominance_threshold=threshold, check_duplicates=False)
    assert rep.num_dominated == count and rep.frac_dominated == count / 4


def test_report_json_and_table() -> None:
    rep = dataset_bias(_records(HAND), check_duplicates=False)
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["images_per_id"]["gini"] == pytest.approx(0.1875)
    assert d["dominant_camera_share"]["num_ids_above"] == 2 and d["near_duplicates"] is None
    assert "per_id" not in d
    full = json.loads(json.dumps(rep.to_dict(per_id=True)))
    assert full["per_id"]["1"]["cam_counts"] == {"0": 3, "1": 1}
    text = rep.format()
    assert "16 images, 4 ids, 3 cameras" in text and "Gini 0.188" in text
    assert "2 of 4 (50.0%)" in text and "not checked" in text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"dominance_threshold": 1.5}, "dominance_threshold"), ({"dup_threshold": "high"}, "dup_threshold")],
)
def test_dataset_bias_rejects_bad_parameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataset_bias(_records(HAND), check_duplicates=False, **kwargs)


def test_dataset_bias_rejects_empty_and_malformed() -> None:
    with pytest.raises(ValueError, match="records is empty"):
        dataset_bias([])
    with pytest.raises(ValueError, match="records"):
        dataset_bias([("a.jpg", "x", 0)])


# --------------------------------------------------------------------------------------- near-duplicates


def _smooth(seed: int, h: int = 128, w: int = 64) -> np.ndarray:
    """A smooth random RGB picture (a bilinear-upsampled 16x8 grid): structure at the thumbnail's scale."""
    grid = np.random.default_rng(seed).integers(0, 256, (16, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BILINEAR), np.float64)


def _save(folder: Path, name: str, arr: np.ndarray, quality: int = 95) -> str:
    path = folder / name
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=quality)
    return str(path)


@pytest.fixture
def dup_records(tmp_path: Path) -> list[Record]:
    a, b = _smooth(1), _smooth(2)
    shifted = np.roll(a, 1, axis=1)  # consecutive frame: the box moved by one pixel
    flat = np.full((128, 64, 3), 120.0)
    recs = [
        Record(_save(tmp_path, "0001_c1_a.jpg", a), 1, 0),
        Record(_save(tmp_path, "0001_c1_a_copy.jpg", a * 0.9, quality=50), 1, 0),  # darker, re-encoded
        Record(_save(tmp_path, "0001_c1_b.jpg", b), 1, 0),  # another shot: not a duplicate
        Record(_save(tmp_path, "0001_c2_a.jpg", a), 1, 1),  # same picture, other camera: never compared
        Record(_save(tmp_path, "0002_c1_a.jpg", a), 2, 0),  # same picture, other identity: never compared
        Record(_save(tmp_path, "0003_c1_b.jpg", b), 3, 0),
        Record(_save(tmp_path, "0003_c1_b_shift.jpg", np.roll(b, 1, axis=1)), 3, 0),
        Record(_save(tmp_path, "0003_c1_x.jpg", _smooth(3)), 3, 0),
        Record(_save(tmp_path, "0004_c1_flat.jpg", flat), 4, 0),  # featureless: compared by mean grey
        Record(_save(tmp_path, "0004_c1_flat2.jpg", flat), 4, 0),
        Record(_save(tmp_path, "0004_c1_darkflat.jpg", flat - 40), 4, 0),
        Record(_save(tmp_path, "0005_c1_s.jpg", shifted), 5, 0),  # a singleton group
    ]
    return recs


def test_near_duplicate_mask_hand_made_images(dup_records: list[Record]) -> None:
    mask = near_duplicate_mask(dup_records)
    expected = [True, True, False, False, False, True, True, False, True, True, False, False]
    assert mask.tolist() == expected
    # a strict threshold keeps the re-encoded copy (corr ~0.9998) and the equal flat pair, not the shift (~0.992)
    strict = near_duplicate_mask(dup_records, threshold=0.999)
    assert strict.tolist() == [True, True] + [False] * 6 + [True, True, False, False]


def test_dataset_bias_counts_near_duplicates(dup_records: list[Record]) -> None:
    rep = dataset_bias(dup_records)
    nd = rep.near_duplicates
    assert nd is not None and nd["threshold"] == DUP_THRESHOLD
    assert nd["num_images"] == 6 and nd["rate"] == pytest.approx(6 / 12)
    assert nd["num_redundant"] == 3 and nd["redundant_rate"] == pytest.approx(3 / 12)  # later member of each pair
    assert nd["pairs_compared"] == 3 + 3 + 3  # groups (1, c0), (3, c0), (4, c0) of three; singletons skipped
    assert [rep.per_id[p].near_duplicates for p in (1, 2, 3, 4, 5)] == [2, 0, 2, 2, 0]
    assert "6 images (50.0%)" in rep.format()


def test_unreadable_image_named(tmp_path: Path) -> None:
    good = _save(tmp_path, "0001_c1_a.jpg", _smooth(1))
    bad = tmp_path / "0001_c1_b.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(OSError, match="0001_c1_b.jpg"):
        near_duplicate_mask([Record(good, 1, 0), Record(str(bad), 1, 0)])


def test_thumbnail_of_png_and_jpeg_agree(tmp_path: Path) -> None:
    """JPEG thumbnails are decoded at reduced scale (draft mode); a PNG of the same picture is a duplicate."""
    a = _smooth(4)
    jpg = _save(tmp_path, "0001_c1_a.jpg", a)
    png = tmp_path / "0001_c1_a.png"
    Image.fromarray(a.astype(np.uint8)).save(png)
    assert near_duplicate_mask([Record(jpg, 1, 0), Record(str(png), 1, 0)], threshold=0.99).all()


# --------------------------------------------------------------------------------- per-identity accuracy

Q_PIDS = [1, 1, 1, 1, 2, 2, 3, 3, 3, 4]
FIRST = [0, 0, 2, -1, 0, 5, -1, -1, -1, 1]  # pid 3 has no valid query and is left out


def test_per_identity_accuracy_rank1() -> None:
    r = per_identity_accuracy(np.asarray(FIRST), np.asarray(Q_PIDS), k=1)
    acc = [200 / 3, 50.0, 0.0]  # pid 1: 2 of 3 valid queries at rank 0; pid 2: 1 of 2; pid 4: 0 of 1
    mean = 350 / 9
    var = ((200 / 3 - mean) ** 2 + (50 - mean) ** 2 + (0 - mean) ** 2) / 3
    assert (r["k"], r["num_ids"], r["num_queries"]) == (1, 3, 6)
    assert r["mean"] == pytest.approx(sum(acc) / 3, abs=1e-12) == pytest.approx(mean)
    assert r["variance"] == pytest.approx(var, rel=1e-12)
    assert r["std"] == pytest.approx(math.sqrt(var), rel=1e-12)
    assert r["variance"] == pytest.approx(21666.666666666668 / 27, rel=1e-12)  # 802.47 %^2


def test_per_identity_accuracy_rank3_and_lists() -> None:
    r = per_identity_accuracy(FIRST, Q_PIDS, k=3)  # plain lists; acc 100, 50, 100
    assert r["mean"] == pytest.approx(250 / 3)
    assert r["variance"] == pytest.approx(5000 / 9)  # (2 (50/3)^2 + (100/3)^2) / 3
    assert r["std"] == pytest.approx(math.sqrt(5000 / 9))
    perfect = per_identity_accuracy([0, 0, 0], [7, 8, 8])
    assert (perfect["mean"], perfect["variance"], perfect["std"]) == (100.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("fm", "pids", "k", "match"),
    [
        ([0, 1], [1], 1, "equal length"),
        ([-1, -1], [1, 2], 1, "no query has a true match"),
        ([0, -2], [1, 2], 1, ">= -1"),
        ([0.5, 1.0], [1, 2], 1, "integer ranks"),
        ([0, 1], [1, 2], 0, "k must be"),
    ],
)
def test_per_identity_accuracy_rejects(fm: list, pids: list, k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        per_identity_accuracy(fm, pids, k=k)


# ------------------------------------------------------------------------- biased synthetic generation

TINY = dict(
    num_train_ids=24, num_test_ids=3, num_cams=4, images_per_id_per_cam=(2, 4), height=32, width=16,
    num_distractors=2, num_junk=1, seed=7,
)


def _digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("bias")
    opts = {"default": {}, "zipf": {"imbalance": "zipf:1.2"}, "cam": {"camera_bias": 0.9},
            "both": {"imbalance": "zipf:1.2", "camera_bias": 0.9}}
    return {k: generate_synthetic(base / k, **TINY, **v) for k, v in opts.items()}


def _report(root: Path):
    ds = build_dataset("market1501", root)
    return ds, dataset_bias(ds.train, check_duplicates=False)


def test_zipf_imbalance_raises_gini(tiny_sets: dict[str, Path]) -> None:
    _, base = _report(tiny_sets["default"])
    _, zipf = _report(tiny_sets["zipf"])
    assert base.images_per_id["gini"] < 0.3
    assert zipf.images_per_id["gini"] > base.images_per_id["gini"] + 0.15
    # the per-identity counts are exactly the Zipf curve, in some order
    counts = sorted(s.num_images for s in zipf.per_id.values())
    assert counts == sorted(zipf_counts(24, 1.2, 2, 60).tolist())
    assert (zipf.images_per_id["min"], zipf.images_per_id["max"]) == (2, 60)
    assert zipf.cams_per_id["min"] >= 2  # every identity keeps a cross-camera positive


def test_camera_bias_raises_dominant_share(tiny_sets: dict[str, Path]) -> None:
    ds0, base = _report(tiny_sets["default"])
    ds1, cam = _report(tiny_sets["cam"])
    assert base.dominant_share["mean"] < 0.6 and cam.dominant_share["mean"] > 0.8
    assert cam.frac_dominated >= 0.9 > base.frac_dominated
    assert cam.cams_per_id["min"] >= 2
    # camera bias alone moves images between cameras: every identity keeps its number of images
    assert {p: s.num_images for p, s in cam.per_id.items()} == {p: s.num_images for p, s in base.per_id.items()}
    assert cam.images_per_id == base.images_per_id


def test_both_options_and_test_split_untouched(tiny_sets: dict[str, Path]) -> None:
    _, base = _report(tiny_sets["default"])
    _, both = _report(tiny_sets["both"])
    assert both.images_per_id["gini"] > base.images_per_id["gini"] + 0.15
    assert both.dominant_share["mean"] > base.dominant_share["mean"] + 0.1
    for root in tiny_sets.values():  # query and gallery are byte-identical whatever the options
        for folder in ("query", "bounding_box_test"):
            assert _digest(root / folder) == _digest(tiny_sets["default"] / folder)
    meta = json.loads((tiny_sets["both"] / "synth_meta.json").read_text())
    assert meta["params"]["imbalance"] == "zipf:1.2" and meta["params"]["camera_bias"] == 0.9
    assert meta["train_bias"] == {
        "imbalance": {"kind": "zipf", "exponent": 1.2, "min_images": 2, "max_images": 60},
        "camera_bias": 0.9,
        "applies_to": "train",
    }


def test_biased_generation_deterministic(tiny_sets: dict[str, Path], tmp_path: Path) -> None:
    again = generate_synthetic(tmp_path / "again", **TINY, imbalance="zipf:1.2", camera_bias=0.9)
    assert _digest(again / "bounding_box_train") == _digest(tiny_sets["both"] / "bounding_box_train")
    other = generate_synthetic(tmp_path / "other", **{**TINY, "seed": 8}, imbalance="zipf:1.2", camera_bias=0.9)
    assert _digest(other / "bounding_box_train") != _digest(tiny_sets["both"] / "bounding_box_train")


def test_near_duplicates_on_synthetic_set_are_few(tiny_sets: dict[str, Path]) -> None:
    """Independently rendered synthetic boxes are mostly not near-duplicates of each other."""
    ds = build_dataset("market1501", tiny_sets["default"])
    rep = dataset_bias(ds.train)
    assert rep.near_duplicates is not None and rep.near_duplicates["rate"] < 0.3
    assert rep.near_duplicates["pairs_compared"] > 100
