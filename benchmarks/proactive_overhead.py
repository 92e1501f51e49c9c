"""Overhead of the proactive defence (JAD's DL transform) on a training step, timed in the same run.

Anchor ("plain"): a training step (forward + cross-entropy + backward + SGD step) of the model on a batch of random
8-bit images. Contender: the same step with ``build_proactive(preset)`` applied to the batch first (under no_grad,
one CPU ``torch.Generator`` seeded per step, as the trainer does). Steps are interleaved one by one (plain, then
each preset in a rotating order), so load on a shared machine hits all alike, and repeated over ``--steps`` x
``--repeats``. Reported per preset:

* overhead = median over steps of (defended step / the plain step just before it) - 1, and the ratio of medians;
* the transform's own time inside the defended steps (median, mean) and its share of the plain step
  (mean transform / median plain step): the part of the overhead that the defence itself costs;
* the transform alone on more seeded batches (``--transform-batches``), with the mean images per branch.

    PYTHONPATH=src python benchmarks/proactive_overhead.py [--model resnet18|cnn4] [--batch-size 32]
        [--height 128 --width 64] [--steps 10] [--repeats 3] [--presets reference,paper] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from advreid.defenses.proactive import BRANCHES, ProactiveDefense, build_proactive
from advreid.models import build_model


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def transform_alone(t: torch.nn.Module, x: torch.Tensor, batches: int,
                    dev: torch.device) -> tuple[list[float], torch.Tensor | None]:
    """Seconds per batch of the transform alone, and (ProactiveDefense) the total images per branch."""
    counts = torch.zeros(len(BRANCHES)) if isinstance(t, ProactiveDefense) else None
    tt: list[float] = []
    for s in range(batches):
        g = torch.Generator().manual_seed(10_000 + s)
        with torch.no_grad():
            _sync(dev)
            t0 = time.perf_counter()
            if counts is not None:
                _, br = t(x, generators=g, return_branches=True)
                counts += br.bincount(minlength=len(BRANCHES)).float()
            else:
                t(x, generators=g)
            _sync(dev)
        tt.append(time.perf_counter() - t0)
    return tt, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18", help="preset or backbone (default resnet18; e.g. cnn4)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="interleaved steps per round")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (after one warm-up step of each)")
    ap.add_argument("--presets", default="reference,paper", help="comma-separated proactive presets")
    ap.add_argument("--num-classes", type=int, default=100)
    ap.add_argument("--transform-batches", type=int, default=200, help="batches for the transform-alone timing")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=args.num_classes, pretrained=False).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)
    shape = (args.batch_size, 3, args.height, args.width)
    pool = [torch.randint(0, 256, shape, dtype=torch.uint8).float().div_(255).to(dev) for _ in range(4)]
    labels = [torch.randint(0, args.num_classes, (args.batch_size,), device=dev) for _ in range(4)]
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    transforms = {p: build_proactive(p) for p in presets}

    def step(s: int, t: torch.nn.Module | None) -> tuple[float, float]:
        """One training step on batch ``s``; returns (step seconds, of which transform seconds)."""
        x, y = pool[s % 4], labels[s % 4]
        _sync(dev)
        t0 = time.perf_counter()
        if t is not None:
            with torch.no_grad():
                x = t(x, generators=torch.Generator().manual_seed(s))
            _sync(dev)
        t1 = time.perf_counter()
        loss = F.cross_entropy(model(x)["logits"], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(dev)
        return time.perf_counter() - t0, t1 - t0

    print(f"model {args.model}, batch {args.batch_size} at {args.height}x{args.width}, {args.steps} interleaved "
          f"steps x {args.repeats} rounds, device {dev}, {torch.get_num_threads()} threads")
    step(0, None)  # warm-up
    for t in transforms.values():
        step(0, t)
    plain: list[float] = []
    times: dict[str, list[float]] = {p: [] for p in presets}
    ttime: dict[str, list[float]] = {p: [] for p in presets}
    ratios: dict[str, list[float]] = {p: [] for p in presets}
    n = 0
    for r in range(args.repeats):
        for _ in range(args.steps):
            tp, _ = step(n, None)
            plain.append(tp)
            k = n % len(presets)
            for p in presets[k:] + presets[:k]:
                td, tt = step(n, transforms[p])
                times[p].append(td)
                ttime[p].append(tt)
                ratios[p].append(td / tp)
            n += 1
        m = args.steps
        print(f"  round {r}: plain {1e3 * statistics.median(plain[-m:]):.1f} ms/step; "
              + ", ".join(f"{p} {1e3 * statistics.median(times[p][-m:]):.1f} ms/step "
                          f"({100 * (statistics.median(ratios[p][-m:]) - 1):+.1f}%)" for p in presets))

    mp = statistics.median(plain)
    print(f"\nplain training step: {1e3 * mp:.1f} ms (median of {len(plain)}), mean {1e3 * statistics.mean(plain):.1f}")
    print("| preset | ms / step (median) | overhead: median paired ratio / ratio of medians | transform in step, "
          "ms (median, mean) | transform mean / plain step | transform alone, ms / batch (median, mean) | "
          "images / batch per branch |")
    print("|---|---|---|---|---|---|---|")
    for p in presets:
        ta, counts = transform_alone(transforms[p], pool[0], args.transform_batches, dev)
        per = "-" if counts is None else ", ".join(
            f"{b} {c / args.transform_batches:.2f}" for b, c in zip(BRANCHES[:5], counts.tolist()[:5], strict=True))
        print(f"| {p} | {1e3 * statistics.median(times[p]):.1f} | "
              f"{100 * (statistics.median(ratios[p]) - 1):+.1f}% / "
              f"{100 * (statistics.median(times[p]) / mp - 1):+.1f}% | "
              f"{1e3 * statistics.median(ttime[p]):.2f}, {1e3 * statistics.mean(ttime[p]):.2f} | "
              f"{100 * statistics.mean(ttime[p]) / mp:.2f}% | "
              f"{1e3 * statistics.median(ta):.2f}, {1e3 * statistics.mean(ta):.2f} | {per} |")


if __name__ == "__main__":
    main()
