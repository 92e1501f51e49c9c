"""Dataset parsers, registry, summary table and image loading on tiny fake folders built in tmp_path."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from advreid.data import (
    BadImageError,
    DatasetLayoutError,
    ImageDataset,
    ReIDDataset,
    build_dataset,
    check_images,
    dataset_info,
    format_dataset_info,
    list_datasets,
    load_image,
    register_dataset,
)


def _img(path: Path, color=(10, 20, 30), size=(8, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _files(folder: Path, names: list[str]) -> None:
    for n in names:
        _img(folder / n)


def _market(d: Path, cams: tuple[int, ...] = (1, 2, 3, 6)) -> Path:
    a, b, c, e = cams
    _files(d / "bounding_box_train", [
        f"0002_c{a}s1_000001_00.jpg", f"0002_c{b}s1_000002_00.jpg", f"0007_c{c}s1_000003_00.jpg",
        f"0007_c{c}s1_000004_01.jpg", f"0005_c{e}s1_000005_00.jpg", f"0005_c{e}s1_000006_00.PNG",
    ])
    (d / "bounding_box_train" / "Thumbs.db").write_bytes(b"not an image")
    _files(d / "query", [f"0002_c{a}s1_000010_00.jpg", f"0007_c{b}s1_000011_00.jpg"])
    _files(d / "bounding_box_test", [
        f"0002_c{c}s1_000020_00.jpg", f"0007_c{a}s1_000021_00.jpg", f"0000_c{a}s1_000022_00.jpg",
        f"-1_c{b}s1_000023_00.jpg", f"-1_c{c}s1_000024_00.jpg", f"0005_c{e}s1_000025_00.jpeg",
    ])
    return d


# -------------------------------------------------------------------------------------------- Market/Duke
def test_market_from_parent_folder(tmp_path):
    d = _market(tmp_path / "market1501" / "Market-1501-v15.09.15")
    ds = build_dataset("market1501", tmp_path)
    assert ds.root == d
    train, query, gallery = ds
    assert (len(train), len(query), len(gallery)) == (6, 2, 4)
    # junk dropped, distractor 0 kept in the gallery
    assert sorted(r.pid for r in gallery) == [0, 2, 5, 7]
    assert all("-1_" not in Path(r.path).name for r in gallery)
    # train pids relabelled in sorted original order: 2->0, 5->1, 7->2
    assert ds.train_pid_map == {2: 0, 5: 1, 7: 2}
    assert sorted({r.pid for r in train}) == [0, 1, 2]
    by_name = {Path(r.path).name: r for r in train}
    assert by_name["0005_c6s1_000006_00.PNG"].pid == 1 and by_name["0005_c6s1_000006_00.PNG"].camid == 5
    assert by_name["0002_c1s1_000001_00.jpg"].camid == 0
    assert ds.num_train_pids == 3 and ds.num_train_cams == 4
    assert [r.path for r in train] == sorted(r.path for r in train)
    # query/gallery pids are not relabelled
    assert sorted(r.pid for r in query) == [2, 7]
    # train_all == train for Market-style sets
    assert build_dataset("market1501", d, train_all=True).train == train


def test_duke_eight_cameras_and_market_rejects_camera_7(tmp_path):
    _market(tmp_path / "DukeMTMC-reID", cams=(1, 7, 8, 2))
    ds = build_dataset("dukemtmcreid", tmp_path)
    assert sorted({r.camid for r in ds.train}) == [0, 1, 6, 7]
    with pytest.raises(ValueError, match=r"0002_c7s1_000002_00\.jpg.*camera 1\.\.6"):
        build_dataset("market1501", tmp_path / "DukeMTMC-reID")


def test_unparseable_name_is_named(tmp_path):
    d = _market(tmp_path / "m")
    _img(d / "query" / "holiday.jpg")
    with pytest.raises(ValueError, match=r"holiday\.jpg"):
        build_dataset("market1501", d)


def test_layout_error_lists_expected_and_found(tmp_path):
    (tmp_path / "bounding_box_train").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DatasetLayoutError) as ei:
        build_dataset("market1501", tmp_path)
    msg = str(ei.value)
    assert isinstance(ei.value, FileNotFoundError)
    for part in ("bounding_box_test/", "query/", "Market-1501-v15.09.15", "images/", "readme.txt"):
        assert part in msg
    for i in range(12):
        (tmp_path / f"extra{i:02d}").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"\+5 more"):
        build_dataset("market1501", tmp_path)
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        build_dataset("dukemtmcreid", tmp_path / "nope")


def test_empty_query_names_dataset_and_folder(tmp_path):
    d = _market(tmp_path / "m")
    for f in (d / "query").iterdir():
        f.unlink()
    _img(d / "query" / "-1_c1s1_000001_00.jpg")  # only junk
    with pytest.raises(ValueError, match=r"'market1501'.*query split is empty.*m/query"):
        build_dataset("market1501", d)


# ------------------------------------------------------------------------------------------------- MSMT17
def _msmt(d: Path, img_dirs=("train", "test")) -> Path:
    lists = {
        "list_train.txt": (img_dirs[0], ["0000/0000_000_01_0303morning_0015_0.jpg 0",
                                         "0000/0000_001_03_0303morning_0016_0.jpg 0",
                                         "0001/0001_000_15_0303noon_0001_0.jpg 1", ""]),
        "list_val.txt": (img_dirs[0], ["0002/0002_000_02_0303noon_0002_0.jpg 2"]),
        "list_query.txt": (img_dirs[1], ["0000/0000_000_05_0303morning_0001_0.jpg 0"]),
        "list_gallery.txt": (img_dirs[1], ["0000/0000_001_07_0303morning_0002_0.jpg 0",
                                           "0001/0001_000_05_0303morning_0003_0.jpg 1"]),
    }
    for name, (sub, lines) in lists.items():
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_text("\n".join(lines) + "\n")
        for line in filter(None, lines):
            _img(d / sub / line.split()[0])
    return d


def test_msmt17_lists_camids_train_all_and_parent_root(tmp_path):
    d = _msmt(tmp_path / "MSMT17_V1")
    ds = build_dataset("msmt17", tmp_path)
    assert ds.root == d and ds.version == "V1"
    assert (len(ds.train), len(ds.query), len(ds.gallery)) == (3, 1, 2)
    assert sorted(r.camid for r in ds.train) == [0, 2, 14]
    assert [r.camid for r in ds.query] == [4] and sorted(r.camid for r in ds.gallery) == [4, 6]
    assert all(Path(r.path).is_file() and "/train/" in r.path for r in ds.train)
    assert all("/test/" in r.path for r in ds.query + ds.gallery)
    assert ds.num_train_pids == 2
    full = build_dataset("msmt17", d, train_all=True)
    assert len(full.train) == 4 and full.num_train_pids == 3
    assert full.train_pid_map == {0: 0, 1: 1, 2: 2}


def test_msmt17_v2_and_bad_line(tmp_path):
    d = _msmt(tmp_path / "msmt17" / "MSMT17_V2", img_dirs=("mask_train_v2", "mask_test_v2"))
    ds = build_dataset("msmt17", tmp_path)
    assert ds.version == "V2" and all("mask_train_v2" in r.path for r in ds.train)
    with pytest.raises(DatasetLayoutError, match="train/"):
        build_dataset("msmt17", tmp_path, version="V1")
    (d / "list_query.txt").write_text("0000/0000_000_05_x.jpg 0\nbroken-line\n")
    with pytest.raises(ValueError, match=r"list_query\.txt:2"):
        build_dataset("msmt17", d)


# ------------------------------------------------------------------------------------------------- CUHK03
def test_cuhk03_np_detected_default_and_labeled(tmp_path):
    root = tmp_path / "cuhk03-np"
    for variant, n_train in (("detected", 3), ("labeled", 4)):
        v = root / variant
        _files(v / "bounding_box_train", [f"{i % 2 + 1:04d}_c{i % 2 + 1}_{i}.png" for i in range(n_train)])
        _files(v / "query", ["0100_c1_1.png"])
        _files(v / "bounding_box_test", ["0100_c2_1.png", "0101_c1_1.png"])
    det = build_dataset("cuhk03", tmp_path)
    lab = build_dataset("cuhk03", tmp_path, labeled=True)
    assert len(det.train) == 3 and all("/detected/" in r.path for r in det.train)
    assert len(lab.train) == 4 and all("/labeled/" in r.path for r in lab.train + lab.query)
    assert det.num_train_pids == 2 and sorted({r.camid for r in lab.gallery}) == [0, 1]
    with pytest.raises(DatasetLayoutError, match="labeled/bounding_box_train/"):
        build_dataset("cuhk03", tmp_path / "cuhk03-np" / "detected", labeled=True)


# ------------------------------------------------------------------------------------------------- folder
def test_folder_with_camids(tmp_path):
    _files(tmp_path / "bounding_box_train", ["0010_c1_a.jpg", "0010_c3_b.jpg", "0020_c2_a.jpg"])
    _files(tmp_path / "query", ["0030_c1_q.jpg"])
    _files(tmp_path / "bounding_box_test", ["0030_c1_g.jpg", "0030_c2_g.jpg", "-1_c2_junk.jpg"])
    ds = build_dataset("folder", tmp_path)
    assert ds.has_camids
    assert sorted(r.camid for r in ds.train) == [0, 1, 2]
    assert sorted(r.camid for r in ds.gallery) == [0, 1] and len(ds.gallery) == 2
    assert sorted(r.pid for r in ds.train) == [0, 0, 1]


def test_folder_without_camids_gives_query_0_gallery_1(tmp_path):
    _files(tmp_path / "bounding_box_train", ["7_a.jpg", "7_b.jpg", "9_a.jpg"])
    _files(tmp_path / "query", ["7_q.jpg", "8_q.png"])
    _files(tmp_path / "bounding_box_test", ["7_g.jpg", "8_g.jpg", "8_h.jpg"])
    ds = build_dataset("folder", tmp_path)
    assert not ds.has_camids
    assert [r.camid for r in ds.query] == [0, 0]
    assert [r.camid for r in ds.gallery] == [1, 1, 1]
    assert [r.camid for r in ds.train] == [0, 0, 0] and ds.num_train_pids == 2


def test_folder_subfolder_per_id_test_only_and_train_all(tmp_path):
    _files(tmp_path / "query" / "3", ["x.jpg"])
    _files(tmp_path / "gallery" / "3", ["y.jpg", "z.jpg"])
    _files(tmp_path / "gallery" / "4", ["w.jpg"])
    ds = build_dataset("folder", tmp_path)
    assert ds.train == [] and ds.num_train_pids == 0
    assert [(r.pid, r.camid) for r in ds.query] == [(3, 0)]
    assert sorted((r.pid, r.camid) for r in ds.gallery) == [(3, 1), (3, 1), (4, 1)]
    _files(tmp_path / "train" / "11", ["a.jpg"])
    _files(tmp_path / "val" / "12", ["b.jpg"])
    assert len(build_dataset("folder", tmp_path).train) == 1
    full = build_dataset("folder", tmp_path, train_all=True)
    assert len(full.train) == 2 and full.train_pid_map == {11: 0, 12: 1}


def test_folder_mixed_camids_is_an_error(tmp_path):
    _files(tmp_path / "query", ["1_c1_q.jpg"])
    _files(tmp_path / "bounding_box_test", ["1_g.jpg"])
    with pytest.raises(ValueError, match=r"some images have a camera id.*1_c1_q\.jpg.*1_g\.jpg"):
        build_dataset("folder", tmp_path)


# ----------------------------------------------------------------------------------- registry and summary
class _Tiny(ReIDDataset):
    def __init__(self, root, *, relabel=True):
        super().__init__([("a", 5, 0), ("b", 9, 1)], [("q", 5, 0)], [("g", 5, 1)], root=root, relabel=relabel)


def test_registry_custom_dataset_and_info(tmp_path):
    assert {"market1501", "dukemtmcreid", "msmt17", "cuhk03", "folder"} <= set(list_datasets())
    register_dataset("tiny_test", _Tiny, overwrite=True)
    ds = build_dataset("Tiny_Test", tmp_path)
    assert ds.name == "tiny_test" and [r.pid for r in ds.train] == [0, 1]
    assert [r.pid for r in build_dataset("tiny_test", tmp_path, relabel=False).train] == [5, 9]
    with pytest.raises(KeyError, match="market1501"):
        build_dataset("no_such_set", tmp_path)
    with pytest.raises(TypeError, match="ReIDDataset subclass"):
        register_dataset("bad", dict)
    info = dataset_info(ds)
    assert info["train"] == {"ids": 2, "images": 2, "cameras": 2}
    assert info["gallery"] == {"ids": 1, "images": 1, "cameras": 1}
    lines = format_dataset_info(ds).splitlines()
    assert lines[0].startswith("=> tiny_test")
    rows = [ln for ln in lines if ln.strip().startswith(("train", "query", "gallery"))]
    assert [r.split("|")[2].strip() for r in rows] == ["2", "1", "1"]
    assert len({len(ln) for ln in lines[1:]}) == 1  # aligned


# -------------------------------------------------------------------------------------------------- images
def _truncated_jpeg(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_load_image_errors_name_the_file(tmp_path):
    bad = _truncated_jpeg(tmp_path / "0001_c1_trunc.jpg")
    with pytest.raises(BadImageError, match=r"0001_c1_trunc\.jpg") as ei:
        load_image(bad)
    assert isinstance(ei.value, OSError) and ei.value.path == str(bad)
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(BadImageError, match=r"text\.jpg"):
        load_image(tmp_path / "text.jpg")
    with pytest.raises(BadImageError, match=r"missing\.png"):
        load_image(tmp_path / "missing.png")
    err = pickle.loads(pickle.dumps(ei.value))
    assert err.path == str(bad) and str(err) == str(ei.value)
    gray = tmp_path / "gray.png"
    Image.new("L", (5, 7), 200).save(gray)
    img = load_image(gray)
    assert img.mode == "RGB" and img.size == (5, 7)


def test_check_images_and_image_dataset(tmp_path):
    good = [_img(tmp_path / f"{i}_c1_ok.png", color=(255, 0, 128), size=(6, 10)) for i in range(4)]
    bad1 = _truncated_jpeg(tmp_path / "1_c1_bad.jpg")
    bad2 = tmp_path / "2_c1_gone.jpg"
    records = [(str(good[0]), 0, 0), (str(bad1), 1, 0), (str(good[1]), 2, 0), (str(bad2), 3, 0),
               (str(good[2]), 4, 0), (str(good[3]), 5, 0)]
    with pytest.raises(BadImageError, match=r"1_c1_bad\.jpg"):
        check_images(records)
    kept, skipped = check_images(records, skip_bad=True, num_workers=2)
    assert [r[1] for r in kept] == [0, 2, 4, 5]
    assert [p for p, _ in skipped] == [str(bad1), str(bad2)]

    ds = ImageDataset(records)
    img, pid, camid, idx = ds[0]
    assert img.shape == (3, 10, 6) and img.dtype == torch.float32
    assert torch.allclose(img[:, 0, 0], torch.tensor([1.0, 0.0, 128 / 255]))
    assert (pid, camid, idx) == (0, 0, 0)
    with pytest.raises(BadImageError, match=r"1_c1_bad\.jpg"):
        ds[1]
    lenient = ImageDataset(records, skip_bad_images=True)
    with pytest.warns(RuntimeWarning, match=r"1_c1_bad\.jpg"):
        _, pid, _, idx = lenient[1]
    assert (pid, idx) == (2, 2)
    assert lenient.bad_paths == {str(bad1)}
