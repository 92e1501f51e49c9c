"""Cost of bootstrap confidence intervals at Market-1501 scale: evaluate_rank alone vs evaluate_rank with the
per-query arrays plus ``metric_intervals`` (1000 resamples), same run, same workload.

Run by hand (not collected by pytest):

    PYTHONPATH=src python benchmarks/bootstrap_overhead.py [--rounds 21] [--resamples 1000] [--workers N]

Workload as in ``eval_speed.py``: seeded uniform float32 distances, 3,368 queries x 15,913 gallery items,
751 identities, 6 cameras. Each round times the plain call and the call with intervals back to back (the order
alternates between rounds), after one warm-up of each; the overhead is the median over rounds of the paired
ratio, so load on a shared machine hits both alike. Wall time and process CPU time (all threads) are both
reported: on a machine shared with other jobs the CPU-time ratio is the steadier one. ``--workers`` sets the
threads of both ``evaluate_rank`` and ``metric_intervals`` (default: torch's thread count, as both use by default).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from advreid.evaluation.bootstrap import metric_intervals, paired_difference
from advreid.evaluation.rank import evaluate_rank


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-query", type=int, default=3368)
    ap.add_argument("--num-gallery", type=int, default=15913)
    ap.add_argument("--num-ids", type=int, default=751)
    ap.add_argument("--num-cams", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=21, help="paired rounds (median reported)")
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=None, help="threads for both (default torch's thread count)")
    ap.add_argument("--features", type=int, default=0, metavar="DIM",
                    help="also time the whole evaluation from DIM-d features (distances + ranking, "
                    "advreid.evaluation.evaluate_features) without and with intervals; 0: skip (e.g. 2048)")
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    q, g = args.num_query, args.num_gallery
    q_pids = rng.integers(0, args.num_ids, q)
    g_pids = rng.integers(0, args.num_ids, g)
    q_cams = rng.integers(0, args.num_cams, q)
    g_cams = rng.integers(0, args.num_cams, g)
    dist = rng.random((q, g), dtype=np.float32)
    workers = args.workers or torch.get_num_threads()
    print(f"workload: {q} x {g} float32, {args.num_ids} ids, {args.num_cams} cams, seed {args.seed}; "
          f"{workers} threads, {args.resamples} resamples, {args.rounds} rounds")

    def plain():
        return evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, 50, num_workers=workers)

    def with_ci():
        res = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, 50, num_workers=workers, return_per_query=True)
        w1, c1 = time.perf_counter(), time.process_time()
        ci = metric_intervals(res, resamples=args.resamples, num_workers=workers)
        return res, ci, (time.perf_counter() - w1, time.process_time() - c1)

    plain(), with_ci()  # warm-up
    wall: dict[str, list[float]] = {"plain": [], "ci": [], "boot": []}
    cpu: dict[str, list[float]] = {"plain": [], "ci": [], "boot": []}
    for r in range(args.rounds):
        for which in ("plain", "ci") if r % 2 == 0 else ("ci", "plain"):
            w0, c0 = time.perf_counter(), time.process_time()
            if which == "plain":
                plain()
            else:
                res, ci, (boot_w, boot_c) = with_ci()
                wall["boot"].append(boot_w)
                cpu["boot"].append(boot_c)
            wall[which].append(time.perf_counter() - w0)
            cpu[which].append(time.process_time() - c0)
    one = []
    for _ in range(args.rounds):
        w0 = time.perf_counter()
        metric_intervals(res, resamples=args.resamples, num_workers=1)
        one.append(time.perf_counter() - w0)

    med = statistics.median
    for name, t in (("wall", wall), ("CPU ", cpu)):
        ratio = med([c / p for c, p in zip(t["ci"], t["plain"], strict=True)])
        print(f"{name}: evaluate_rank {med(t['plain']) * 1e3:7.1f} ms | with per-query + CIs "
              f"{med(t['ci']) * 1e3:7.1f} ms | metric_intervals alone {med(t['boot']) * 1e3:6.1f} ms | "
              f"median paired ratio {ratio:.4f} (+{100 * (ratio - 1):.1f}%)")
    print(f"metric_intervals with 1 thread: {med(one) * 1e3:.1f} ms wall; target: ratio <= 1.05")

    point = res.to_dict()
    print("point and 95% interval (%): " + ", ".join(
        f"{k} {100 * point[k]:.2f} [{100 * ci[k + '_ci'][0]:.2f}, {100 * ci[k + '_ci'][1]:.2f}]" for k in point))
    t0 = time.perf_counter()
    paired_difference(res, res, resamples=args.resamples, num_workers=workers)
    print(f"paired_difference (same queries, {args.resamples} resamples): {(time.perf_counter() - t0) * 1e3:.1f} ms")
    if args.features:
        _whole_evaluation(args, q_pids, g_pids, q_cams, g_cams)


def _whole_evaluation(args: argparse.Namespace, q_pids, g_pids, q_cams, g_cams) -> None:
    """The evaluation users run (cosine distances from L2-normalised features, then ranking), without and with the
    intervals (which add the per-query arrays, the bootstrap and the CMC list), paired rounds as above."""
    from advreid.evaluation import evaluate_features

    g = torch.Generator().manual_seed(args.seed)
    qf = torch.nn.functional.normalize(torch.randn(len(q_pids), args.features, generator=g), dim=1)
    gf = torch.nn.functional.normalize(torch.randn(len(g_pids), args.features, generator=g), dim=1)
    labels = [torch.as_tensor(x) for x in (q_pids, q_cams, g_pids, g_cams)]

    def run(ci: bool) -> None:
        evaluate_features(qf, labels[0], labels[1], gf, labels[2], labels[3], intervals=ci)

    run(False), run(True)
    t: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for ci in (False, True) if r % 2 == 0 else (True, False):
            c0 = time.process_time()
            run(ci)
            t[ci].append(time.process_time() - c0)
    ratio = statistics.median([c / p for c, p in zip(t[True], t[False], strict=True)])
    print(f"whole evaluation from {args.features}-d features (CPU time): without intervals "
          f"{statistics.median(t[False]) * 1e3:.0f} ms | with {statistics.median(t[True]) * 1e3:.0f} ms | "
          f"median paired ratio {ratio:.4f} (+{100 * (ratio - 1):.1f}%)")


if __name__ == "__main__":
    main()
