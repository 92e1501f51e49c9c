"""CMC/mAP speed at Market-1501 scale: advreid's evaluate_rank against torchreid's evaluator, same run.

Run by hand (not collected by pytest):

    PYTHONPATH=src python benchmarks/eval_speed.py                 # all anchors
    PYTHONPATH=src python benchmarks/eval_speed.py --no-anchor     # ours only
    PYTHONPATH=src python benchmarks/eval_speed.py --cython-so /path/rank_cy.cpython-311-x86_64-linux-gnu.so

Anchors: torchreid 0.2.5's ``eval_market1501`` (its pure-Python evaluator, loaded by file path from the
installed package so that ``import torchreid`` -- which needs cv2 etc. -- is never run; the wheel ships no
compiled ``rank_cy``); ``np.argsort`` of the whole matrix, the first step of torchreid's Cython evaluator and
so a lower bound of its time; optionally a compiled ``rank_cy`` extension given with ``--cython-so``. The
distances are seeded uniform random numbers (no ties), so all evaluators must agree.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from advreid.evaluation.rank import evaluate_rank

PUBLISHED_CYTHON_S = 2.0  # torchreid's Cython evaluator on this workload, measured earlier on the dev machine


def load_torchreid_rank():
    """torchreid's ``metrics/rank.py`` loaded from its file, with the package import blocked."""
    spec = importlib.util.find_spec("torchreid")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "reid" / "metrics" / "rank.py"
    if not path.exists():
        path = Path(spec.submodule_search_locations[0]) / "metrics" / "rank.py"
    saved = sys.modules.get("torchreid", None)
    sys.modules["torchreid"] = None  # its `from torchreid...rank_cy import` fails fast -> Python fallback
    try:
        mspec = importlib.util.spec_from_file_location("torchreid_rank_file", path)
        mod = importlib.util.module_from_spec(mspec)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mspec.loader.exec_module(mod)
    finally:
        if saved is None:
            del sys.modules["torchreid"]
        else:
            sys.modules["torchreid"] = saved
    return mod


def load_extension(path: str):
    name = Path(path).name.split(".")[0]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-query", type=int, default=3368)
    ap.add_argument("--num-gallery", type=int, default=15913)
    ap.add_argument("--num-ids", type=int, default=751)
    ap.add_argument("--num-cams", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5, help="runs of ours (median reported)")
    ap.add_argument("--no-anchor", action="store_true", help="skip torchreid's Python evaluator (~40 s)")
    ap.add_argument("--cython-so", default=None, help="a compiled torchreid rank_cy extension to time as well")
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    q, g = args.num_query, args.num_gallery
    q_pids = rng.integers(0, args.num_ids, q)
    g_pids = rng.integers(0, args.num_ids, g)
    q_cams = rng.integers(0, args.num_cams, q)
    g_cams = rng.integers(0, args.num_cams, g)
    dist = rng.random((q, g), dtype=np.float32)
    print(f"workload: {q} x {g} float32, {args.num_ids} ids, {args.num_cams} cams, seed {args.seed}; "
          f"torch threads {torch.get_num_threads()}")

    ours_s, ours = timed(lambda: evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, 50), args.repeats)
    one_s, _ = timed(lambda: evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, 50, num_workers=1),
                     args.repeats)
    print(f"advreid evaluate_rank          : {ours_s:8.3f} s (median of {args.repeats}; 1 thread {one_s:.3f} s)"
          f"  rank1 {ours.cmc[0]:.6f} mAP {ours.mAP:.6f}")

    sort_s, _ = timed(lambda: np.argsort(dist, axis=1), 1)
    print(f"np.argsort of the matrix       : {sort_s:8.3f} s  (lower bound of the Cython evaluator) "
          f"-> ours is {sort_s / ours_s:.1f}x faster")
    print(f"published Cython figure        : {PUBLISHED_CYTHON_S:8.3f} s  -> ratio {PUBLISHED_CYTHON_S / ours_s:.1f}x")

    if args.cython_so:
        cy = load_extension(args.cython_so)
        cy_s, (cmc, mAP) = timed(lambda: cy.evaluate_cy(dist, q_pids, g_pids, q_cams, g_cams, 50), 1)
        print(f"torchreid rank_cy (compiled)   : {cy_s:8.3f} s  -> ours is {cy_s / ours_s:.1f}x faster; "
              f"max|dcmc| {np.abs(cmc - ours.cmc).max():.2e} |dmAP| {abs(mAP - ours.mAP):.2e} (float32 sums)")

    if not args.no_anchor:
        tr = load_torchreid_rank()
        if tr is None:
            print("torchreid not installed: `pip install torchreid==0.2.5` (the bench extra) for the anchor")
            return
        print(f"torchreid Cython available     : {tr.IS_CYTHON_AVAI} (Python fallback eval_market1501 timed)")
        py_s, (cmc, mAP) = timed(lambda: tr.eval_market1501(dist, q_pids, g_pids, q_cams, g_cams, 50), 1)
        print(f"torchreid eval_market1501 (py) : {py_s:8.3f} s  -> ours is {py_s / ours_s:.1f}x faster")
        print(f"agreement: max|cmc diff| {np.abs(cmc - ours.cmc).max():.2e}  |mAP diff| {abs(mAP - ours.mAP):.2e}")


if __name__ == "__main__":
    main()
