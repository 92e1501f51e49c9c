"""Tests for the synthetic Market-1501-format generator (tiny settings, a few seconds in all)."""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from advreid.data import synthetic
from advreid.data.synthetic import META_NAME, SynthConfig, generate_synthetic, parse_imbalance, zipf_counts

MARKET_RE = re.compile(r"([-\d]+)_c(\d)")
NAME_RE = re.compile(r"^(-1|\d{4})_c(\d)s([1-6])_(\d{6})_(\d{2})\.jpg$")
SMALL = dict(
    num_train_ids=8,
    num_test_ids=6,
    num_cams=3,
    images_per_id_per_cam=(1, 2),  # the minimum: test ids still need a same-camera gallery image
    height=64,
    width=32,
    num_distractors=4,
    num_junk=3,
)
FOLDERS = ("bounding_box_train", "bounding_box_test", "query")


def _parse(root: Path, folder: str) -> list[tuple[str, int, int]]:
    out = []
    for f in sorted((root / folder).iterdir()):
        pid, cam = map(int, MARKET_RE.search(f.name).groups())
        out.append((f.name, pid, cam))
    return out


def _digest(root: Path) -> dict[str, str]:
    return {
        f"{d}/{f.name}": hashlib.sha256(f.read_bytes()).hexdigest()
        for d in FOLDERS
        for f in sorted((root / d).iterdir())
    }


def _torso_colour(path: Path) -> np.ndarray:
    """Mean RGB of a central crop around the chest (where the upper-body clothing is)."""
    a = np.asarray(Image.open(path).convert("RGB"), np.float64)
    h, w = a.shape[:2]
    return a[int(0.3 * h) : int(0.5 * h), int(0.35 * w) : int(0.65 * w)].reshape(-1, 3).mean(0)


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("s") / "synth", seed=3, **SMALL)


def test_layout_names_and_meta(ds: Path) -> None:
    assert sorted(p.name for p in ds.iterdir()) == sorted([*FOLDERS, META_NAME])
    for d in FOLDERS:
        names = [f.name for f in (ds / d).iterdir()]
        assert names, d
        bad = [n for n in names if not NAME_RE.match(n)]
        assert not bad, bad[:5]
        assert all(1 <= int(MARKET_RE.search(n).group(2)) <= 3 for n in names)
    meta = json.loads((ds / META_NAME).read_text())
    assert meta["params"]["seed"] == 3 and meta["params"]["num_cams"] == 3
    c = meta["counts"]
    assert c["train_images"] == len(list((ds / "bounding_box_train").iterdir()))
    assert c["query_images"] == len(list((ds / "query").iterdir()))
    assert c["gallery_images"] == len(list((ds / "bounding_box_test").iterdir()))
    assert not list(ds.parent.glob(".synth*")), "temporary build folders left behind"


def test_default_meta_records_unbiased_options(ds: Path) -> None:
    meta = json.loads((ds / META_NAME).read_text())
    assert meta["params"]["imbalance"] == "none" == SynthConfig().imbalance
    assert meta["params"]["camera_bias"] == 0.0 == SynthConfig().camera_bias
    assert meta["train_bias"] == {"imbalance": {"kind": "none"}, "camera_bias": 0.0, "applies_to": "train"}
    assert not SynthConfig().biased


def test_parse_imbalance_and_zipf_counts() -> None:
    assert parse_imbalance("none") is None and parse_imbalance(" NONE ") is None
    assert parse_imbalance("zipf:1.2") == (1.2, 2, 60)
    assert parse_imbalance("Zipf:0.5:3:40") == (0.5, 3, 40)
    # r^-1 over 3 ranks: (1/r - 1/3) / (2/3) = 1, 1/4, 0 -> 2 + 8 * that
    assert zipf_counts(3, 1.0, 2, 10).tolist() == [10, 4, 2]
    assert zipf_counts(1, 1.2, 2, 60).tolist() == [60]
    c = zipf_counts(100, 1.2, 2, 60)
    assert c[0] == 60 and c[-1] == 2 and np.all(np.diff(c) <= 0)


def test_imbalance_keeps_names_and_cross_camera_positives(tmp_path: Path) -> None:
    root = generate_synthetic(tmp_path / "z", seed=3, imbalance="zipf:1.5:2:12", camera_bias=0.6, **SMALL)
    train = _parse(root, "bounding_box_train")
    assert all(NAME_RE.match(n) for n, _, _ in train)
    per_id: dict[int, list[int]] = defaultdict(list)
    for _, p, c in train:
        per_id[p].append(c)
    assert sorted(len(v) for v in per_id.values()) == sorted(zipf_counts(8, 1.5, 2, 12).tolist())
    assert all(len(set(v)) >= 2 for v in per_id.values())
    meta = json.loads((root / META_NAME).read_text())
    assert meta["counts"]["train_images"] == len(train) == int(zipf_counts(8, 1.5, 2, 12).sum())


def test_camera_bias_wraps_the_box_field_beyond_99_images(tmp_path: Path) -> None:
    """A dominant camera holding >= 100 images of one identity still gets unique two-digit Market names."""
    kw = dict(num_train_ids=2, num_test_ids=1, num_cams=6, images_per_id_per_cam=(40, 40), height=32, width=16,
              num_distractors=0, num_junk=0, seed=0, camera_bias=0.95)
    root = generate_synthetic(tmp_path / "w", **kw)
    train = _parse(root, "bounding_box_train")
    assert all(NAME_RE.match(n) for n, _, _ in train)
    per_cam = defaultdict(int)
    for _, p, c in train:
        per_cam[(p, c)] += 1
    assert max(per_cam.values()) >= 100  # the wrap-around case really occurs with this seed
    assert len({n for n, _, _ in train}) == len(train) == json.loads((root / META_NAME).read_text())["counts"][
        "train_images"
    ]


def test_images_are_rgb_of_requested_size(ds: Path) -> None:
    for d in FOLDERS:
        for f in list((ds / d).iterdir())[:15]:
            with Image.open(f) as im:
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (32, 64)


def test_splits_disjoint_and_counts(ds: Path) -> None:
    train = _parse(ds, "bounding_box_train")
    query = _parse(ds, "query")
    gallery = _parse(ds, "bounding_box_test")
    train_pids = {p for _, p, _ in train}
    query_pids = {p for _, p, _ in query}
    gallery_pids = {p for _, p, _ in gallery} - {0, -1}
    assert len(train_pids) == 8 and len(query_pids) == 6
    assert gallery_pids == query_pids
    assert not train_pids & (query_pids | gallery_pids)
    assert 0 not in train_pids and -1 not in train_pids
    assert sum(p == 0 for _, p, _ in gallery) == 4
    assert sum(p == -1 for _, p, _ in gallery) == 3
    assert all(n.startswith("-1_c") for n, p, _ in gallery if p == -1)
    # every identity is seen by >= 2 cameras, and the training set has several images per id
    cams_of: dict[int, set[int]] = defaultdict(set)
    for _, p, c in train + query + gallery:
        if p > 0:
            cams_of[p].add(c)
    assert all(len(c) >= 2 for c in cams_of.values())
    assert len(train) >= 2 * 8


def test_query_protocol(ds: Path) -> None:
    query = _parse(ds, "query")
    gallery = _parse(ds, "bounding_box_test")
    per_pid_cam = defaultdict(int)
    for _, p, c in query:
        per_pid_cam[(p, c)] += 1
    assert set(per_pid_cam.values()) == {1}, "exactly one query per identity per camera"
    for name, p, c in query:
        same = [g for g in gallery if g[1] == p and g[2] == c]
        other = [g for g in gallery if g[1] == p and g[2] != c]
        assert same, f"{name}: no same-camera gallery image (junk under the protocol)"
        assert other, f"{name}: no cross-camera match"
    # every camera a test id appears in holds a query
    gallery_pid_cams = {(p, c) for _, p, c in gallery if p > 0}
    assert gallery_pid_cams == set(per_pid_cam)


def test_deterministic_same_seed(ds: Path, tmp_path: Path) -> None:
    again = generate_synthetic(tmp_path / "again", seed=3, progress=True, **SMALL)
    assert _digest(again) == _digest(ds)


def test_different_seed_differs(ds: Path, tmp_path: Path) -> None:
    other = generate_synthetic(tmp_path / "other", seed=4, **SMALL)
    a, b = _digest(ds), _digest(other)
    assert sorted(a) != sorted(b)
    assert not set(a.values()) & set(b.values())
    # the same pid looks different under another seed
    ca = np.mean([_torso_colour(f) for f in (ds / "bounding_box_train").glob("0001_*")], 0)
    cb = np.mean([_torso_colour(f) for f in (other / "bounding_box_train").glob("0001_*")], 0)
    assert np.abs(ca - cb).max() > 1.0


def test_identity_independent_of_other_ids(ds: Path, tmp_path: Path) -> None:
    more = generate_synthetic(tmp_path / "more", seed=3, **{**SMALL, "num_train_ids": 11, "num_test_ids": 4})
    picks = (("bounding_box_train", "0005_*"), ("query", "0002_*"), ("bounding_box_test", "0004_*"))
    for folder, glob in picks:
        fa = sorted((ds / folder).glob(glob))
        fb = sorted((more / folder).glob(glob))
        assert fa and [f.name for f in fa] == [f.name for f in fb]
        assert [f.read_bytes() for f in fa] == [f.read_bytes() for f in fb]
        ma = np.mean([_torso_colour(f) for f in fa], 0)
        mb = np.mean([_torso_colour(f) for f in fb], 0)
        np.testing.assert_allclose(ma, mb)
    assert len({p for _, p, _ in _parse(more, "bounding_box_train")}) == 11


def test_same_identity_closer_than_different(ds: Path) -> None:
    feats, pids, cams = [], [], []
    for d in FOLDERS:
        for name, p, c in _parse(ds, d):
            if p > 0:
                feats.append(_torso_colour(ds / d / name))
                pids.append(p)
                cams.append(c)
    f, p, c = np.array(feats), np.array(pids), np.array(cams)
    dist = np.linalg.norm(f[:, None] - f[None], axis=2)
    off = ~np.eye(len(p), dtype=bool)
    same_id = (p[:, None] == p[None]) & off
    intra, inter = dist[same_id].mean(), dist[p[:, None] != p[None]].mean()
    assert intra < 0.75 * inter, (intra, inter)
    # nearest neighbour by torso colour is mostly the same person (chance is 1/14)
    nn_dist = np.where(off, dist, np.inf)
    nn_acc = (p[nn_dist.argmin(1)] == p).mean()
    assert nn_acc > 0.35, nn_acc
    # the camera effect: the same person in the same camera is closer than across cameras
    same_cam = same_id & (c[:, None] == c[None])
    cross_cam = same_id & (c[:, None] != c[None])
    d_same, d_cross = dist[same_cam].mean(), dist[cross_cam].mean()
    assert d_same < 0.9 * d_cross, (d_same, d_cross)


def test_camera_changes_the_same_scene() -> None:
    """One person, one pose/background draw, rendered through two cameras gives clearly different pixels."""
    ident = synthetic._sample_identity(synthetic._identity_rng(0, 1))
    imgs = []
    for cam in (1, 2):
        model = synthetic._make_camera(0, cam, 64, 32)
        rng = np.random.default_rng(123)
        imgs.append(np.asarray(synthetic._render_image(ident, model, rng, 64, 32), np.float64))
    assert imgs[0].shape == (64, 32, 3)
    assert np.abs(imgs[0] - imgs[1]).mean() > 10.0


def test_refuses_to_replace_unrelated_folder(tmp_path: Path) -> None:
    victim = tmp_path / "mine"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine"):
        generate_synthetic(victim, **SMALL)
    with pytest.raises(FileExistsError, match=META_NAME):
        generate_synthetic(victim, overwrite=True, **SMALL)
    assert (victim / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_overwrite_replaces_previous_synthetic(tmp_path: Path) -> None:
    out = tmp_path / "syn"
    out.mkdir()  # an existing empty folder is fine
    generate_synthetic(out, seed=1, **SMALL)
    first = _digest(out)
    with pytest.raises(FileExistsError, match="syn"):
        generate_synthetic(out, seed=2, **SMALL)
    assert _digest(out) == first
    generate_synthetic(out, seed=2, overwrite=True, **SMALL)
    second = _digest(out)
    assert second != first and json.loads((out / META_NAME).read_text())["params"]["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = synthetic._render_image

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > 10:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(synthetic, "_render_image", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        generate_synthetic(tmp_path / "half", **SMALL)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_cams": 1}, "num_cams"),
        ({"num_cams": 7}, "num_cams"),
        ({"height": 0}, "height"),
        ({"width": -5}, "width"),
        ({"num_train_ids": 0}, "num_train_ids"),
        ({"num_test_ids": 5000}, "num_test_ids"),
        ({"num_distractors": -1}, "num_distractors"),
        ({"images_per_id_per_cam": (3, 2)}, "images_per_id_per_cam"),
        ({"images_per_id_per_cam": (0, 2)}, "images_per_id_per_cam"),
        ({"seed": -1}, "seed"),
        ({"jpeg_quality": 101}, "jpeg_quality"),
        ({"num_cams": 2.5}, "num_cams"),
        ({"imbalance": "zipf"}, "imbalance"),
        ({"imbalance": "zipf:0"}, "imbalance"),
        ({"imbalance": "zipf:-1"}, "imbalance"),
        ({"imbalance": "zipf:nan"}, "imbalance"),
        ({"imbalance": "zipf:1.2:1:60"}, "imbalance"),
        ({"imbalance": "zipf:1.2:10:5"}, "imbalance"),
        ({"imbalance": "zipf:1.2:2:100"}, "imbalance"),
        ({"imbalance": "zipf:1.2:2"}, "imbalance"),
        ({"imbalance": "pareto:1.2"}, "imbalance"),
        ({"imbalance": 1.2}, "imbalance"),
        ({"camera_bias": 1.0}, "camera_bias"),
        ({"camera_bias": -0.1}, "camera_bias"),
        ({"camera_bias": True}, "camera_bias"),
        ({"camera_bias": "0.5"}, "camera_bias"),
    ],
)
def test_validation(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate_synthetic(tmp_path / "x", **{**SMALL, **kwargs})
    assert not (tmp_path / "x").exists()
