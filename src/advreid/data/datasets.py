"""ReID dataset records, the dataset registry and the parsers for the standard on-disk layouts.

A dataset is three lists of :class:`Record` ``(path, pid, camid)`` (torchreid convention): train pids are
relabelled to ``0..N-1``, camids are 0-based, junk (pid ``-1``) is dropped and distractors (pid ``0``) stay in
the gallery.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from advreid.registry import Registry

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
MARKET_PATTERN = re.compile(r"([-\d]+)_c(\d)")

__all__ = [
    "IMAGE_EXTENSIONS",
    "DATASETS",
    "Record",
    "DatasetLayoutError",
    "ReIDDataset",
    "Market1501",
    "DukeMTMCReID",
    "MSMT17",
    "CUHK03NP",
    "FolderDataset",
    "register_dataset",
    "build_dataset",
    "list_datasets",
    "dataset_info",
    "format_dataset_info",
]


class Record(NamedTuple):
    """One image: absolute ``path``, person id ``pid`` and 0-based camera id ``camid``."""

    path: str
    pid: int
    camid: int


class DatasetLayoutError(FileNotFoundError):
    """A dataset root is missing or not laid out as the parser expects."""


DATASETS: Registry[type[ReIDDataset]] = Registry("dataset")


# ----------------------------------------------------------------------------------------------- base class
class ReIDDataset:
    """Base class: holds ``train``/``query``/``gallery`` record lists and checks them.

    Subclasses parse in ``__init__(self, root, **options)`` and then call
    ``super().__init__(train, query, gallery, root=...)``. Set ``relabel=False`` (or the class attribute
    ``relabel_train = False``) to keep the original train pids.
    """

    name: str = "reid"
    relabel_train: bool = True

    def __init__(
        self,
        train: Iterable[Sequence[Any]],
        query: Iterable[Sequence[Any]],
        gallery: Iterable[Sequence[Any]],
        *,
        root: str | os.PathLike,
        name: str | None = None,
        relabel: bool | None = None,
        sources: Mapping[str, str | os.PathLike] | None = None,
    ) -> None:
        self.name = name or type(self).name
        self.root = Path(root)
        sources = dict(sources or {})
        splits = {}
        for split, recs in (("train", train), ("query", query), ("gallery", gallery)):
            recs = sorted((Record(str(r[0]), int(r[1]), int(r[2])) for r in recs), key=lambda r: r.path)
            for r in recs:
                if r.pid < 0 or r.camid < 0:
                    raise ValueError(
                        f"dataset {self.name!r}: {split} record {r.path} has pid={r.pid}, camid={r.camid}; "
                        "expected both >= 0 (drop junk pid -1 before building the dataset)"
                    )
            splits[split] = recs
        for split in ("query", "gallery"):
            if not splits[split]:
                where = sources.get(split, self.root)
                raise ValueError(
                    f"dataset {self.name!r}: the {split} split is empty (no usable images in {where}); "
                    f"expected at least one image named <pid>_c<cam>... with pid >= 0"
                )
        relabel = self.relabel_train if relabel is None else relabel
        train_pids = sorted({r.pid for r in splits["train"]})
        if relabel:
            self.train_pid_map: dict[int, int] = {pid: i for i, pid in enumerate(train_pids)}
            splits["train"] = [r._replace(pid=self.train_pid_map[r.pid]) for r in splits["train"]]
        else:
            self.train_pid_map = {pid: pid for pid in train_pids}
        self.train: list[Record] = splits["train"]
        self.query: list[Record] = splits["query"]
        self.gallery: list[Record] = splits["gallery"]

    @property
    def num_train_pids(self) -> int:
        return len({r.pid for r in self.train})

    @property
    def num_train_cams(self) -> int:
        return len({r.camid for r in self.train})

    def __iter__(self) -> Iterator[list[Record]]:
        """Allow ``train, query, gallery = dataset``."""
        return iter((self.train, self.query, self.gallery))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, root={str(self.root)!r}, train={len(self.train)}, "
            f"query={len(self.query)}, gallery={len(self.gallery)})"
        )


# ------------------------------------------------------------------------------------------ registry API
def register_dataset(name: str, cls: type[ReIDDataset], *, overwrite: bool = False) -> type[ReIDDataset]:
    """Register a :class:`ReIDDataset` subclass under ``name`` (case-insensitive)."""
    if not (isinstance(cls, type) and issubclass(cls, ReIDDataset)):
        raise TypeError(f"register_dataset({name!r}, ...): expected a ReIDDataset subclass, got {cls!r}")
    return DATASETS.register(name, cls, overwrite=overwrite)


def build_dataset(name: str, root: str | os.PathLike, **options: Any) -> ReIDDataset:
    """Parse the dataset registered as ``name`` found at ``root`` (the dataset folder or a parent of it)."""
    cls = DATASETS.get(name)
    ds = cls(root, **options)
    if ds.name == ReIDDataset.name:  # a user subclass that did not set ``name``
        ds.name = name.lower()
    return ds


def list_datasets() -> list[str]:
    """Names accepted by :func:`build_dataset`."""
    return DATASETS.names()


# ---------------------------------------------------------------------------------------- summary table
def _split_stats(records: Sequence[Record]) -> dict[str, int]:
    return {
        "ids": len({r.pid for r in records}),
        "images": len(records),
        "cameras": len({r.camid for r in records}),
    }


def dataset_info(ds: ReIDDataset) -> dict[str, Any]:
    """Ids, images and cameras per split, e.g. ``info["query"]["images"]``."""
    return {
        "name": ds.name,
        "root": str(ds.root),
        "train": _split_stats(ds.train),
        "query": _split_stats(ds.query),
        "gallery": _split_stats(ds.gallery),
    }


def format_dataset_info(ds: ReIDDataset) -> str:
    """A small aligned text table of :func:`dataset_info` (what ``advreid data info`` prints)."""
    info = dataset_info(ds)
    cols = ("ids", "images", "cameras")
    header = f"  {'subset':<8} | {'# ids':>7} | {'# images':>9} | {'# cameras':>9}"
    rule = "  " + "-" * (len(header) - 2)
    lines = [f"=> {info['name']} ({info['root']})", rule, header, rule]
    for split in ("train", "query", "gallery"):
        s = info[split]
        lines.append(f"  {split:<8} | {s[cols[0]]:>7} | {s[cols[1]]:>9} | {s[cols[2]]:>9}")
    lines.append(rule)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- helpers
def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted."""
    with os.scandir(folder) as it:
        return sorted(Path(e.path) for e in it if e.is_file() and _is_image(e.name))


def _describe_contents(root: Path, limit: int = 10) -> str:
    if not root.exists():
        return f"{root} does not exist"
    if not root.is_dir():
        return f"{root} is not a directory"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    if not entries:
        return f"{root} is empty"
    shown = ", ".join(entries[:limit])
    more = f", ... (+{len(entries) - limit} more)" if len(entries) > limit else ""
    return f"found in {root}: {shown}{more}"


def _resolve_root(
    root: str | os.PathLike,
    dataset: str,
    candidates: Sequence[str],
    ok: Callable[[Path], bool],
    expected: str,
) -> Path:
    """Return ``root`` or ``root/<candidate>`` -- the first that ``ok`` accepts -- else DatasetLayoutError."""
    base = Path(root).expanduser().absolute()
    tried = [base] + [base / c for c in candidates]
    for d in tried:
        if d.is_dir() and ok(d):
            return d
    names = ", ".join(["<root>"] + [f"<root>/{c}" for c in candidates])
    raise DatasetLayoutError(
        f"{dataset}: cannot find the dataset under {base}: expected {expected} in one of {names}; "
        f"{_describe_contents(base)}"
    )


def _has_dirs(*names: str) -> Callable[[Path], bool]:
    return lambda d: all((d / n).is_dir() for n in names)


def _parse_market_dir(folder: Path, dataset: str, max_cam: int | None) -> list[Record]:
    """Market-style names ``<pid>_c<cam>...``; pid -1 (junk) dropped, camid made 0-based."""
    records = []
    for path in _list_images(folder):
        m = MARKET_PATTERN.search(path.name)
        if m is None:
            raise ValueError(
                f"{dataset}: cannot parse pid/camera from file name {path}; "
                "expected Market-style names like 0002_c1s1_000451_03.jpg (regex ([-\\d]+)_c(\\d))"
            )
        pid, cam = int(m.group(1)), int(m.group(2))
        if pid == -1:
            continue
        if pid < -1 or cam < 1 or (max_cam is not None and cam > max_cam):
            cams = f"1..{max_cam}" if max_cam else ">= 1"
            raise ValueError(
                f"{dataset}: file {path} has pid={pid}, camera={cam}; expected pid >= -1, camera {cams}"
            )
        records.append(Record(str(path), pid, cam - 1))
    return records


_MARKET_SPLITS = ("bounding_box_train", "bounding_box_test", "query")


class _MarketStyle(ReIDDataset):
    """Shared parser for datasets laid out like Market-1501."""

    candidates: tuple[str, ...] = ()
    max_cam: int | None = None

    def __init__(self, root: str | os.PathLike, *, train_all: bool = False) -> None:
        d = _resolve_root(
            root, self.name, self.candidates, _has_dirs(*_MARKET_SPLITS),
            "the subfolders " + ", ".join(f"{s}/" for s in _MARKET_SPLITS),
        )
        self._build_from(d, train_all=train_all)

    def _build_from(self, d: Path, *, train_all: bool) -> None:
        del train_all  # Market-style sets have no separate val split: train_all == train.
        dirs = {"train": d / "bounding_box_train", "query": d / "query", "gallery": d / "bounding_box_test"}
        parsed = {k: _parse_market_dir(v, self.name, self.max_cam) for k, v in dirs.items()}
        super().__init__(parsed["train"], parsed["query"], parsed["gallery"], root=d, sources=dirs)


class Market1501(_MarketStyle):
    """Market-1501: ``bounding_box_train/``, ``query/``, ``bounding_box_test/``; 6 cameras.

    ``root`` may be the dataset folder or a parent holding ``Market-1501-v15.09.15`` (or
    ``market1501/Market-1501-v15.09.15``). ``train_all`` equals ``train`` here: there is no separate val split
    (layumi's ``train_all`` is the whole ``bounding_box_train``).
    """

    name = "market1501"
    max_cam = 6
    candidates = (
        "Market-1501-v15.09.15",
        "market1501/Market-1501-v15.09.15",
        "Market-1501",
        "market1501",
        "Market",
    )


class DukeMTMCReID(_MarketStyle):
    """DukeMTMC-reID: Market-style names and folders, 8 cameras.

    ``root`` may be the dataset folder or a parent holding ``DukeMTMC-reID`` (or
    ``dukemtmc-reid/DukeMTMC-reID``). ``train_all`` equals ``train`` (no separate val split).
    """

    name = "dukemtmcreid"
    max_cam = 8
    candidates = ("DukeMTMC-reID", "dukemtmc-reid/DukeMTMC-reID", "dukemtmc-reid", "dukemtmcreid", "dukemtmc")


class CUHK03NP(_MarketStyle):
    """CUHK03-NP (the new 767/700 protocol): ``<root>/{detected,labeled}/<Market-style folders>``.

    ``labeled=False`` (the default, as in torchreid; fast-reid defaults to labeled) reads the detected boxes.
    ``root`` may be the ``cuhk03-np`` folder or a parent of it. ``train_all`` equals ``train``.
    """

    name = "cuhk03"
    candidates = ("cuhk03-np", "CUHK03-NP", "cuhk03/cuhk03-np", "cuhk03")

    def __init__(self, root: str | os.PathLike, *, labeled: bool = False, train_all: bool = False) -> None:
        variant = "labeled" if labeled else "detected"
        d = _resolve_root(
            root, self.name, self.candidates, _has_dirs(*(f"{variant}/{s}" for s in _MARKET_SPLITS)),
            "the subfolders " + ", ".join(f"{variant}/{s}/" for s in _MARKET_SPLITS),
        )
        self.labeled = labeled
        self._build_from(d / variant, train_all=train_all)


# ------------------------------------------------------------------------------------------------ MSMT17
_MSMT_IMAGE_DIRS = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}
_MSMT_LISTS = ("list_train.txt", "list_query.txt", "list_gallery.txt")


def _msmt_version(d: Path, version: str | None) -> str | None:
    if not all((d / f).is_file() for f in _MSMT_LISTS):
        return None
    for v in (version,) if version else ("V1", "V2"):
        if all((d / sub).is_dir() for sub in _MSMT_IMAGE_DIRS[v]):
            return v
    return None


def _read_msmt_list(list_file: Path, image_dir: Path) -> list[Record]:
    """Lines ``relpath pid``; camid from the third ``_`` field of the file name (1-based in the name)."""
    records = []
    for lineno, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            relpath, pid = parts[0], int(parts[1])
            cam = int(os.path.basename(relpath).split("_")[2])
        except (IndexError, ValueError):
            raise ValueError(
                f"MSMT17: {list_file}:{lineno}: cannot parse {line.strip()!r}; expected "
                "'<pid>/<pid>_<idx>_<cam>_<...>.jpg <pid>'"
            ) from None
        if cam < 1 or pid < 0:
            raise ValueError(
                f"MSMT17: {list_file}:{lineno}: pid={pid}, camera={cam}; expected pid >= 0, camera >= 1"
            )
        records.append(Record(str(image_dir / relpath), pid, cam - 1))
    return records


class MSMT17(ReIDDataset):
    """MSMT17 read from ``list_{train,val,query,gallery}.txt`` (lines ``relpath pid``), 15 cameras.

    ``root`` may be the ``MSMT17_V1``/``MSMT17_V2`` folder or a parent holding one (V1 is taken first when
    both exist, as in torchreid; ``version="V2"`` picks the face-blurred ``mask_*_v2`` images). Query/gallery
    pids are kept as listed. ``train_all`` adds ``list_val.txt`` to train (relabelled jointly).
    """

    name = "msmt17"

    def __init__(
        self, root: str | os.PathLike, *, train_all: bool = False, version: str | None = None
    ) -> None:
        if version is not None:
            version = str(version).upper().removeprefix("MSMT17_")
            if version not in _MSMT_IMAGE_DIRS:
                raise ValueError(f"MSMT17: version={version!r}; expected 'V1', 'V2' or None")
        candidates = [f"MSMT17_{v}" for v in ((version,) if version else ("V1", "V2"))]
        candidates += [f"msmt17/{c}" for c in candidates] + ["MSMT17", "msmt17"]
        dirs = " or ".join(f"{a}/+{b}/" for a, b in (
            [_MSMT_IMAGE_DIRS[version]] if version else _MSMT_IMAGE_DIRS.values()))
        d = _resolve_root(
            root, self.name, candidates, lambda p: _msmt_version(p, version) is not None,
            f"{', '.join(_MSMT_LISTS)} and image folders {dirs}",
        )
        self.version = _msmt_version(d, version)
        train_dir, test_dir = (d / s for s in _MSMT_IMAGE_DIRS[self.version])
        train = _read_msmt_list(d / "list_train.txt", train_dir)
        if train_all:
            val_list = d / "list_val.txt"
            if not val_list.is_file():
                raise DatasetLayoutError(
                    f"MSMT17: train_all=True needs {val_list}, which is missing; {_describe_contents(d)}"
                )
            train += _read_msmt_list(val_list, train_dir)
        query = _read_msmt_list(d / "list_query.txt", test_dir)
        gallery = _read_msmt_list(d / "list_gallery.txt", test_dir)
        sources = {"query": d / "list_query.txt", "gallery": d / "list_gallery.txt"}
        super().__init__(train, query, gallery, root=d, sources=sources)


# --------------------------------------------------------------------------------- generic custom folder
_FOLDER_TRAIN = ("bounding_box_train", "train")
_FOLDER_GALLERY = ("bounding_box_test", "gallery")
_PID_CAM = re.compile(r"^([-\d]+)_c(\d+)")
_PID_ONLY = re.compile(r"^([-\d]+)_")
_CAM_ANYWHERE = re.compile(r"_c(\d+)")
_PID_DIR = re.compile(r"^-?\d+$")


def _first_dir(d: Path, names: Sequence[str]) -> Path | None:
    return next((d / n for n in names if (d / n).is_dir()), None)


def _parse_folder_split(folder: Path) -> list[tuple[str, int, int | None]]:
    """Files ``<pid>_c<cam>...``/``<pid>_<any>`` in ``folder`` or any image in ``folder/<pid>/``."""
    out: list[tuple[str, int, int | None]] = []
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if e.is_dir():
            if not _PID_DIR.match(e.name):
                raise ValueError(
                    f"folder dataset: subfolder {e.path} is not an integer person id; expected "
                    "<split>/<pid>/<image> with <pid> like 0002"
                )
            pid = int(e.name)
            for img in _list_images(Path(e.path)):
                m = _CAM_ANYWHERE.search(img.stem)
                out.append((str(img), pid, int(m.group(1)) if m else None))
        elif e.is_file() and _is_image(e.name):
            m = _PID_CAM.match(e.name)
            if m:
                out.append((e.path, int(m.group(1)), int(m.group(2))))
                continue
            m = _PID_ONLY.match(e.name)
            if m is None:
                raise ValueError(
                    f"folder dataset: cannot parse a person id from {e.path}; expected "
                    "<pid>_c<cam>_<any>.jpg, <pid>_<any>.jpg or <pid>/<any>.jpg"
                )
            out.append((e.path, int(m.group(1)), None))
    return [r for r in out if r[1] != -1]


class FolderDataset(ReIDDataset):
    """A custom Market-style folder: ``query/``, ``bounding_box_test/`` (or ``gallery/``) and optionally
    ``bounding_box_train/`` (or ``train/``; absent = test-only dataset).

    Images are named ``<pid>_c<cam>_<any>.jpg``, ``<pid>_<any>.jpg``, or sit in ``<split>/<pid>/`` subfolders
    (a ``_c<cam>`` in the name is then used if present). pid ``-1`` is junk and dropped. Camera ids are
    optional: when **no** image has one, query images get camid 0, gallery images camid 1 (train camid 0),
    so same-id query/gallery matches are not discarded by the same-camera rule at evaluation.
    Mixing images with and without a camera is an error. ``train_all`` adds a ``val/`` folder when present,
    otherwise equals ``train``.
    """

    name = "folder"

    def __init__(self, root: str | os.PathLike, *, train_all: bool = False) -> None:
        d = _resolve_root(
            root,
            self.name,
            (),
            lambda p: (p / "query").is_dir() and _first_dir(p, _FOLDER_GALLERY) is not None,
            "the subfolders query/ and bounding_box_test/ (or gallery/), "
            "optionally bounding_box_train/ (or train/)",
        )
        dirs = {"query": d / "query", "gallery": _first_dir(d, _FOLDER_GALLERY)}
        train_dir = _first_dir(d, _FOLDER_TRAIN)
        parsed = {k: _parse_folder_split(v) for k, v in dirs.items()}
        parsed["train"] = _parse_folder_split(train_dir) if train_dir else []
        if train_all and (d / "val").is_dir():
            parsed["train"] += _parse_folder_split(d / "val")
        with_cam = [r for recs in parsed.values() for r in recs if r[2] is not None]
        without_cam = [r for recs in parsed.values() for r in recs if r[2] is None]
        if with_cam and without_cam:
            raise ValueError(
                f"folder dataset {d}: some images have a camera id and some do not (e.g. {with_cam[0][0]} vs "
                f"{without_cam[0][0]}); expected all names <pid>_c<cam>_... or none"
            )
        self.has_camids = bool(with_cam)
        if self.has_camids:
            bad = next((r for recs in parsed.values() for r in recs if r[2] < 1), None)
            if bad is not None:
                raise ValueError(
                    f"folder dataset: {bad[0]} has camera {bad[2]}; expected camera numbers >= 1"
                )
            fixed = {k: [(p, pid, cam - 1) for p, pid, cam in v] for k, v in parsed.items()}
        else:
            default_cam = {"train": 0, "query": 0, "gallery": 1}
            fixed = {k: [(p, pid, default_cam[k]) for p, pid, _ in v] for k, v in parsed.items()}
        if train_dir:
            dirs["train"] = train_dir
        super().__init__(fixed["train"], fixed["query"], fixed["gallery"], root=d, sources=dirs)


register_dataset("market1501", Market1501)
register_dataset("dukemtmcreid", DukeMTMCReID)
register_dataset("msmt17", MSMT17)
register_dataset("cuhk03", CUHK03NP)
register_dataset("folder", FolderDataset)
