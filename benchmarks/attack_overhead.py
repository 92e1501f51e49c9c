"""Overhead of each iterative attack over the bare cost of its gradient steps, timed in the same run.

Anchor ("bare"): ``steps`` x (forward + input-gradient backward) of the same model on the same batch -- the cost
any iterative gradient attack must pay. Each attack's time per image is divided by the anchor's; LTA also runs
one no-grad reference forward per step (inherent to the method), so it is also compared with
``steps`` x (fwd + bwd) + ``steps`` x fwd_no_grad. Anchor and attacks are interleaved, repeated, and the median
taken, so a busy machine slows both alike.

    PYTHONPATH=src python benchmarks/attack_overhead.py [--model resnet18] [--batch 32] [--steps 15] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from advreid.attacks import GuideBank, build, list_attacks, parse_eps
from advreid.models import build_model

DEFAULT_ATTACKS = ["ifgsm", "mifgsm", "pgd", "sma", "fna", "fna_pull", "odfa", "lta", "lta_star"]
NO_GRAD_REFERENCE = {"lta"}  # its no-grad reference forward per step is the method (lta_star: one in all)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev: torch.device) -> float:
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    return time.perf_counter() - t0


def bare_steps(model: torch.nn.Module, x: torch.Tensor, steps: int, alpha: float) -> torch.Tensor:
    """``steps`` x (forward + backward to the input) with a sign step: the floor of an iterative attack."""
    x0 = x.detach()
    adv = x0.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = model.features(adv).square().sum()
        (g,) = torch.autograd.grad(loss, adv)
        adv = (adv.detach() + alpha * g.sign()).clamp_(0, 1)
    return adv


@torch.no_grad()
def no_grad_forwards(model: torch.nn.Module, x: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        model.features(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18", help="preset or backbone (default resnet18)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--eps", default="5px")
    ap.add_argument("--alpha", default="1px")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (median taken), after one warm-up")
    ap.add_argument("--guides", type=int, default=15913, help="guide bank size (default: Market-1501 gallery)")
    ap.add_argument("--ids", type=int, default=751)
    ap.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS), help="comma-separated attack names")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=args.ids).to(dev).eval()
    known = set(list_attacks())
    names = [n for n in args.attacks.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown attack(s) {unknown}; known: {', '.join(sorted(known))}")
    eps, alpha = parse_eps(args.eps), parse_eps(args.alpha)

    x = torch.rand(args.batch, 3, args.height, args.width, device=dev)
    pids = torch.randint(0, args.ids, (args.batch,), device=dev)
    camids = torch.randint(0, 6, (args.batch,), device=dev)
    index = torch.arange(args.batch, device=dev)
    with torch.no_grad():
        dim = model.features(x[:2]).shape[1]
    g = torch.Generator().manual_seed(1)
    gpids = torch.randint(0, args.ids, (args.guides,), generator=g)
    centres = torch.randn(args.ids, dim, generator=g)
    gfeat = (centres[gpids] + 0.5 * torch.randn(args.guides, dim, generator=g)).to(dev)
    guides = GuideBank(gfeat, gpids.to(dev), torch.randint(0, 6, (args.guides,), generator=g).to(dev),
                       source="gallery")

    attacks = {n: build(n, model, eps=eps, alpha=alpha, steps=args.steps, seed=0) for n in names}
    for n, atk in attacks.items():
        st = atk.params().get("steps")
        if st is not None and int(st) != args.steps:
            print(f"note: {n} runs {st} steps, not {args.steps}")

    def run_attack(n: str) -> None:
        atk = attacks[n]
        atk(x, pids, camids, guides if atk.needs_guides else None, index=index)

    def count_forwards(n: str) -> tuple[int, int]:
        """(no-grad, grad) calls of ``model.features`` during one call of attack ``n``."""
        counts = [0, 0]
        orig = model.features

        def counting(t: torch.Tensor) -> torch.Tensor:
            counts[int(torch.is_grad_enabled())] += 1
            return orig(t)

        model.features = counting
        try:
            run_attack(n)
        finally:
            del model.features  # back to the class's method
        return counts[0], counts[1]

    def anchor() -> None:
        bare_steps(model, x, args.steps, alpha)

    def nograd() -> None:
        no_grad_forwards(model, x, args.steps)

    print(f"model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {dim}-d), "
          f"batch {args.batch} at {args.height}x{args.width}, {args.steps} steps, device {dev}, "
          f"{torch.get_num_threads()} threads, guide bank {args.guides} x {dim}")
    # warm-up (allocator, kernels, lazy init)
    anchor()
    nograd()
    for n in names:
        run_attack(n)
    fwd = {n: count_forwards(n) for n in names}
    t_bare: list[float] = []
    t_ng: list[float] = []
    t_atk: dict[str, list[float]] = {n: [] for n in names}
    pair: dict[str, list[float]] = {n: [] for n in names}  # attack / the anchor run just before it
    floor: dict[str, list[float]] = {n: [] for n in names}  # attack / (that anchor + its no-grad forwards)
    for r in range(args.repeats):
        g = _timed(nograd, dev) / args.steps  # one no-grad forward of the batch, this round
        t_ng.append(g * args.steps)
        for n in names:  # an anchor right before every attack: both see the same machine load
            b = _timed(anchor, dev)
            t = _timed(lambda n=n: run_attack(n), dev)
            t_bare.append(b)
            t_atk[n].append(t)
            pair[n].append(t / b)
            floor[n].append(t / (b + fwd[n][0] * g))
        print(f"  round {r + 1}/{args.repeats} done", flush=True)

    per = 1000 / args.batch
    print(f"\nbare {args.steps} x (fwd + input-grad bwd): {statistics.median(t_bare) * per:.2f} ms/image "
          f"(median of {len(t_bare)})")
    print(f"{args.steps} x no-grad fwd: {statistics.median(t_ng) * per:.2f} ms/image (median of {len(t_ng)})")
    print("ratios: median over rounds of (attack time / the anchor timed just before it); 'own floor' adds the "
          "attack's no-grad forwards (counted) at this round's no-grad forward time")
    print("\n| attack | forwards (grad + no-grad) | ms/image | vs bare steps x (fwd+bwd) | overhead | "
          "vs own floor (+ no-grad fwds) |")
    print("|---|---|---|---|---|---|")
    worst_raw, worst_floor = (0.0, ""), (0.0, "")
    for n in names:
        ratio, own = statistics.median(pair[n]), statistics.median(floor[n])
        if n not in NO_GRAD_REFERENCE:
            worst_raw = max(worst_raw, (ratio, n))
        worst_floor = max(worst_floor, (own, n))
        print(f"| {n} | {fwd[n][1]} + {fwd[n][0]} | {statistics.median(t_atk[n]) * per:.2f} | {ratio:.3f}x | "
              f"{100 * (ratio - 1):+.1f}% | {own:.3f}x ({100 * (own - 1):+.1f}%) |")
    for label, (v, n) in (("raw, LTA aside", worst_raw), ("against its own floor", worst_floor)):
        print(f"worst overhead {label}: {n} {100 * (v - 1):+.1f}% ({'within' if v <= 1.10 else 'ABOVE'} the 10% "
              "target)")

if __name__ == "__main__":
    main()
