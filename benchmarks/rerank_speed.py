"""k-reciprocal re-ranking time and peak memory: advreid against torchreid's ``re_ranking``, same run.

Run by hand (not collected by pytest); each contender runs in its own subprocess, whose peak RSS is read
with ``os.wait4`` when it exits:

    PYTHONPATH=src python benchmarks/rerank_speed.py                  # Market-1501 scale, all three
    PYTHONPATH=src python benchmarks/rerank_speed.py --dim 256        # smaller features, quicker
    PYTHONPATH=src python benchmarks/rerank_speed.py --no-anchor      # ours only
    PYTHONPATH=src python benchmarks/rerank_speed.py --msmt           # ours (features path) at MSMT17 scale

Contenders (k1=20, k2=6, lambda=0.3), all on the same seeded features:
  torchreid  : torchreid 0.2.5 ``utils/rerank.py:re_ranking`` (loaded by file path, the package is not imported)
               on dense q-g, q-q, g-g squared-Euclidean matrices, as its engine passes them;
  dense      : advreid ``re_ranking`` on the same dense matrices (drop-in);
  features   : advreid ``re_ranking_features`` straight from the features (no dense N x N, Q x Q, G x G).
"re-rank s" times the re-ranking call only (dense contenders: the distance matrices are computed before);
"child s" is the whole subprocess (data generation, distances, re-ranking); "peak GB" its maximum RSS.
Features: ``--features clustered`` (default; identity centres plus noise, so neighbour sets look like ReID
features) or ``gaussian`` (i.i.d. normal).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MARKET = (3368, 15913)
MSMT = (11659, 82161)


def make_features(q: int, g: int, dim: int, kind: str, seed: int):
    """Seeded float32 query and gallery features (generated in chunks to keep memory low)."""
    import torch

    rng = np.random.default_rng(seed)
    n = q + g
    x = np.empty((n, dim), dtype=np.float32)
    if kind == "clustered":
        ids = max(2, n // 25)
        centres = rng.standard_normal((ids, dim), dtype=np.float32)
        pid = rng.integers(0, ids, n)
    for r0 in range(0, n, 8192):
        r1 = min(n, r0 + 8192)
        x[r0:r1] = rng.standard_normal((r1 - r0, dim), dtype=np.float32)
        if kind == "clustered":
            x[r0:r1] += 1.5 * centres[pid[r0:r1]]
    t = torch.from_numpy(x)
    return t[:q], t[q:]


def load_torchreid_rerank():
    spec = importlib.util.find_spec("torchreid")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("torchreid not installed: `pip install torchreid==0.2.5` (the bench extra)")
    root = Path(spec.submodule_search_locations[0])
    path = root / "reid" / "utils" / "rerank.py"
    if not path.exists():
        path = root / "utils" / "rerank.py"
    mspec = importlib.util.spec_from_file_location("torchreid_rerank_file", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod


def child(args: argparse.Namespace) -> None:
    import resource

    import torch

    from advreid.evaluation.distance import compute_distance_matrix
    from advreid.evaluation.rerank import re_ranking, re_ranking_features

    t_start = time.perf_counter()
    qf, gf = make_features(args.num_query, args.num_gallery, args.dim, args.features, args.seed)
    info: dict = {"contender": args.child, "torch_threads": torch.get_num_threads()}
    if args.child in ("torchreid", "dense"):
        t0 = time.perf_counter()
        qg, qq, gg = (compute_distance_matrix(a, b, "sqeuclidean").numpy() for a, b in ((qf, gf), (qf, qf), (gf, gf)))
        info["dist_s"] = time.perf_counter() - t0
        fn = load_torchreid_rerank().re_ranking if args.child == "torchreid" else re_ranking
        t0 = time.perf_counter()
        out = fn(qg, qq, gg, k1=20, k2=6, lambda_value=0.3)
    else:
        t0 = time.perf_counter()
        out = re_ranking_features(qf, gf, 20, 6, 0.3, metric="sqeuclidean")
    info["rerank_s"] = time.perf_counter() - t0
    info["child_s"] = time.perf_counter() - t_start
    info["self_peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    info["out_shape"] = list(out.shape)
    info["out_finite"] = bool(np.isfinite(out).all())
    info["out_mean"] = float(out.mean(dtype=np.float64))
    if args.save:
        np.save(args.save, out)
    print("RESULT " + json.dumps(info), flush=True)


def run_child(name: str, args: argparse.Namespace, save: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--num-query", str(args.num_query),
           "--num-gallery", str(args.num_gallery), "--dim", str(args.dim), "--features", args.features,
           "--seed", str(args.seed)] + (["--save", save] if save else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    text = proc.stdout.read()
    proc.stdout.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{name} child failed (exit {proc.returncode}):\n{text}")
    info = json.loads(lines[-1][7:])
    info["wall_s"] = wall
    info["peak_gb"] = usage.ru_maxrss / 2**20  # Linux: KiB
    print(f"{name:10s} re-rank {info['rerank_s']:8.2f} s   child {info['child_s']:8.2f} s   "
          f"peak {info['peak_gb']:6.2f} GB" + (f"   (distances {info['dist_s']:.2f} s)" if "dist_s" in info else ""),
          flush=True)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", choices=["torchreid", "dense", "features"], help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    ap.add_argument("--num-query", type=int, default=None)
    ap.add_argument("--num-gallery", type=int, default=None)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--features", choices=["clustered", "gaussian"], default="clustered")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-anchor", action="store_true", help="skip torchreid (~90 s and ~9 GB at Market scale)")
    ap.add_argument("--msmt", action="store_true", help="MSMT17 scale (11,659 x 82,161), features path only")
    args = ap.parse_args()
    default = MSMT if args.msmt else MARKET
    args.num_query = args.num_query or default[0]
    args.num_gallery = args.num_gallery or default[1]
    if args.child:
        child(args)
        return

    print(f"workload: {args.num_query} queries x {args.num_gallery} gallery, {args.dim}-d {args.features} "
          f"features, seed {args.seed}, k1=20 k2=6 lambda=0.3")
    if args.msmt:
        info = run_child("features", args, None)
        print(f"MSMT17 scale: output {info['out_shape']} finite={info['out_finite']} mean={info['out_mean']:.6f}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        res = {}
        for name in (["features", "dense"] + ([] if args.no_anchor else ["torchreid"])):
            res[name] = run_child(name, args, os.path.join(tmp, f"{name}.npy"))
        outs = {k: np.load(os.path.join(tmp, f"{k}.npy"), mmap_mode="r") for k in res}
        print(f"max |dense - features| = {np.abs(outs['dense'] - outs['features']).max():.2e}")
        if "torchreid" in res:
            ref = res["torchreid"]
            for name in ("dense", "features"):
                print(f"{name:10s} vs torchreid: max|diff| {np.abs(outs[name] - outs['torchreid']).max():.2e}   "
                      f"re-rank {ref['rerank_s'] / res[name]['rerank_s']:5.1f}x faster   "
                      f"peak memory {res[name]['peak_gb'] / ref['peak_gb']:.2f} of torchreid's")
            tot = ref["rerank_s"] + ref["dist_s"]
            print(f"features path vs torchreid incl. its distance matrices: {tot / res['features']['rerank_s']:.1f}x")


if __name__ == "__main__":
    main()
