"""Cost of `advreid robust`: the ensemble's wall time vs the sum of its members run alone, and `quick` vs one PGD run.

    PYTHONPATH=src python benchmarks/robust_cost.py [--ids 12] [--height 128] [--width 64] [--threads 1] [--repeats 1]

Seeded synthetic Market-format data (``--ids`` test identities), an untrained cnn4 (the cost does not depend on the
weights), L-inf 8px, no defense. In the same run: every member of the ``standard`` ensemble alone (one
``evaluate_attack`` each: clean features, guides, attack, scoring -- what ``advreid attack`` does), the ensemble
(``run_robust``), one 20-step PGD (``pgd``, alpha 2px) and the ``quick`` ensemble; medians over ``--repeats``,
interleaved with the order flipped every repeat. Targets (issue 17): ensemble <= 1.05 x the sum of the members
alone; quick <= 2 x one PGD run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ids", type=int, default=12)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from advreid.data import build_dataset, generate_synthetic
    from advreid.evaluation import AttackSpec, EvalProtocol, RunOptions, evaluate_attack
    from advreid.models import build_model
    from advreid.robust import RobustJob, get_ensemble, run_robust

    tmp = Path(tempfile.mkdtemp(prefix="advreid-robust-cost-"))
    root = generate_synthetic(tmp / "data", num_train_ids=4, num_test_ids=a.ids, num_cams=3, height=a.height,
                              width=a.width, seed=0)
    ds = build_dataset("market1501", root)
    torch.manual_seed(0)
    model = build_model("cnn4", 4, pretrained=False).eval()
    model.checkpoint_meta = {"meta": {"input_size": [a.height, a.width], "config": {"eval": {"batch_size": 64}}}}
    proto = EvalProtocol.of_model(model)
    eps = 8 / 255

    def alone(spec: AttackSpec) -> float:
        t0 = time.perf_counter()
        evaluate_attack(model, ds.query, ds.gallery, spec, protocol=proto, options=RunOptions(batch_size=32))
        return time.perf_counter() - t0

    def ensemble(version: str, k: int) -> float:
        t0 = time.perf_counter()
        run_robust(RobustJob(model, {"name": "cnn4 untrained"}, str(root), str(tmp / f"{version}-{k}"),
                             ensemble=get_ensemble(version), options=RunOptions(batch_size=32)))
        return time.perf_counter() - t0

    std = get_ensemble("standard")
    times: dict[str, list[float]] = {}
    pgd = AttackSpec("pgd", eps=eps, alpha=2 / 255, steps=20)
    for k in range(a.repeats):  # interleaved, the order flipped every repeat (machine load drifts)
        jobs = ["members", "ensemble:standard", "pgd20", "ensemble:quick"]
        for name in (jobs if k % 2 == 0 else jobs[::-1]):
            if name == "members":
                for m in std.members:
                    times.setdefault(f"alone:{m.name}", []).append(alone(m.spec(eps, 0)))
            elif name == "pgd20":
                times.setdefault(name, []).append(alone(pgd))
            else:
                times.setdefault(name, []).append(ensemble(name.split(":")[1], k))
    med = {k: statistics.median(v) for k, v in times.items()}
    total = sum(med[f"alone:{m.name}"] for m in std.members)
    print(f"{len(ds.query)} queries / {len(ds.gallery)} gallery, {a.height}x{a.width}, cnn4, linf 8px, "
          f"{a.threads} thread(s), median of {a.repeats}")
    for m in std.members:
        print(f"  {m.name:>8} alone: {med[f'alone:{m.name}']:8.2f} s")
    print(f"  sum of members alone: {total:8.2f} s")
    print(f"  standard ensemble:    {med['ensemble:standard']:8.2f} s  ratio {med['ensemble:standard'] / total:.3f} "
          "(target <= 1.05)")
    print(f"  one PGD-20 run:       {med['pgd20']:8.2f} s")
    print(f"  quick ensemble:       {med['ensemble:quick']:8.2f} s  ratio {med['ensemble:quick'] / med['pgd20']:.3f} "
          "(target <= 2)")


if __name__ == "__main__":
    main()
