"""GPU throughput of a ReID victim, each figure against its anchor in the same run.

* training: images/s of the training step advreid's ``standard_step`` runs (fp16 autocast + GradScaler,
  channels_last, CE-LS + triplet, Adam) on a PK batch;
* attacks: images/s of each attack against the floor of ``steps`` x bf16-autocast (forward + input-gradient
  backward) of the same model and batch (target: an attack reaches >= 80% of the floor's images/s);
* evaluation: advreid's ranking (``evaluate_rank`` on a CUDA distance matrix, chunked) and re-ranking from features at
  MSMT17 scale (11,659 x 82,161 queries x gallery by default).

It runs on the CPU too (``--device cpu --smoke``: tiny sizes, for checking the script, no figure to report).

    python benchmarks/gpu_throughput.py --device cuda [--model bot_r50] [--batch 64] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from advreid.attacks import GuideBank, build, parse_eps
from advreid.models import build_model

ATTACKS = ["ifgsm", "pgd", "fna", "lta"]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _median_time(fn, dev: torch.device, repeats: int) -> float:
    fn()  # warm-up: kernels, allocator, cudnn autotuning
    out = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def bf16_floor(model: torch.nn.Module, x: torch.Tensor, steps: int, alpha: float) -> None:
    """``steps`` x (bf16-autocast forward + backward to the input) with a sign step: the floor of any attack."""
    dev_type = x.device.type
    adv = x.detach().clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        with torch.autocast(device_type=dev_type, dtype=torch.bfloat16):
            loss = model.features(adv).float().square().sum()
        (g,) = torch.autograd.grad(loss, adv)
        adv = (adv.detach() + alpha * g.sign()).clamp_(0, 1)


def training(args: argparse.Namespace, dev: torch.device) -> None:
    from advreid.losses import ReIDLoss

    model = build_model(args.model, num_classes=args.ids).to(dev).train()
    use_amp = dev.type == "cuda"
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    criterion = ReIDLoss(args.ids, ce_weight=1.0, triplet_weight=1.0, label_smooth=0.1, margin=0.3)
    opt = torch.optim.Adam(model.parameters(), lr=3.5e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    b = args.p * args.k
    x = torch.rand(b, 3, args.height, args.width, device=dev)
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    pids = torch.arange(args.p, device=dev).repeat_interleave(args.k)

    def step() -> None:
        with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=use_amp):
            out = model(x)
        loss, _ = criterion({k: (v.float() if v is not None else None) for k, v in out.items()}, pids)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    iters = args.train_iters
    t_step = _median_time(lambda: [step() for _ in range(iters)], dev, args.repeats) / iters
    print(f"training ({args.model}, {args.height}x{args.width}, P x K = {args.p} x {args.k}, "
          f"{'fp16 AMP + channels_last' if use_amp else 'fp32'}): {b / t_step:.1f} images/s "
          f"({1000 * t_step:.1f} ms/step); fast-reid's published BoT R50 figure is the comparison to put beside it")


def attacks(args: argparse.Namespace, dev: torch.device) -> None:
    model = build_model(args.model, num_classes=args.ids).to(dev).eval()
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    x = torch.rand(args.batch, 3, args.height, args.width, device=dev)
    pids = torch.randint(0, args.ids, (args.batch,), device=dev)
    camids = torch.randint(0, 6, (args.batch,), device=dev)
    index = torch.arange(args.batch, device=dev)
    with torch.no_grad():
        dim = model.features(x[:2]).shape[1]
    g = torch.Generator().manual_seed(1)
    gp = torch.randint(0, args.ids, (args.guides,), generator=g)
    gfeat = torch.randn(args.ids, dim, generator=g)[gp] + 0.5 * torch.randn(args.guides, dim, generator=g)
    guides = GuideBank(gfeat.to(dev), gp.to(dev), torch.randint(0, 6, (args.guides,), generator=g).to(dev),
                       source="gallery")
    eps, alpha = parse_eps("8px"), parse_eps("2px")
    t_floor = _median_time(lambda: bf16_floor(model, x, args.steps, alpha), dev, args.repeats)
    floor_ips = args.batch / t_floor
    print(f"\nattack floor: {args.steps} x bf16 (fwd + input-grad bwd), batch {args.batch}: {floor_ips:.1f} images/s")
    print("| attack | images/s | share of the bf16 floor (target >= 80%) |")
    print("|---|---|---|")
    for name in ATTACKS:
        atk = build(name, model, eps=eps, alpha=alpha, steps=args.steps, seed=0)
        gb = guides if atk.needs_guides else None
        t = _median_time(lambda atk=atk, gb=gb: atk(x, pids, camids, gb, index=index), dev, args.repeats)
        ips = args.batch / t
        print(f"| {name} | {ips:.1f} | {100 * ips / floor_ips:.0f}% |")


def evaluation(args: argparse.Namespace, dev: torch.device) -> None:
    from advreid.evaluation import compute_distance_matrix, evaluate_rank
    from advreid.evaluation.rerank import re_ranking_features

    g = torch.Generator().manual_seed(0)
    nq, ng, d, ids = args.num_query, args.num_gallery, args.dim, args.eval_ids
    qp, gp = torch.randint(0, ids, (nq,), generator=g), torch.randint(0, ids, (ng,), generator=g)
    centres = torch.randn(ids, d, generator=g)
    qf = torch.nn.functional.normalize(centres[qp] + 0.8 * torch.randn(nq, d, generator=g), dim=1)
    gf = torch.nn.functional.normalize(centres[gp] + 0.8 * torch.randn(ng, d, generator=g), dim=1)
    qc, gc = torch.randint(0, 15, (nq,), generator=g), torch.randint(0, 15, (ng,), generator=g)

    def rank_on(device: torch.device) -> float:
        dist = compute_distance_matrix(qf.to(device), gf.to(device), metric="cosine")
        return float(evaluate_rank(dist, qp.numpy(), gp.numpy(), qc.numpy(), gc.numpy()).mAP)

    t_dev = _median_time(lambda: rank_on(dev), dev, args.repeats)
    print(f"\nevaluation at {nq} x {ng} ({d}-d): distances + CMC/mAP on {dev}: {t_dev:.2f} s")
    if dev.type == "cuda" and not args.smoke:
        t_cpu = _median_time(lambda: rank_on(torch.device("cpu")), torch.device("cpu"), 1)
        print(f"  same on the CPU: {t_cpu:.2f} s ({t_cpu / t_dev:.1f}x)")
    t0 = time.perf_counter()
    re_ranking_features(qf.to(dev), gf.to(dev))
    _sync(dev)
    print(f"re-ranking from features on {dev}: {time.perf_counter() - t0:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="bot_r50")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64, help="attack batch")
    ap.add_argument("--steps", type=int, default=10, help="attack steps")
    ap.add_argument("--p", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--ids", type=int, default=751)
    ap.add_argument("--guides", type=int, default=15913)
    ap.add_argument("--train-iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-query", type=int, default=11659)
    ap.add_argument("--num-gallery", type=int, default=82161)
    ap.add_argument("--eval-ids", type=int, default=3060)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--parts", default="training,attacks,evaluation")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: check the script on any device")
    args = ap.parse_args()
    if args.smoke:
        args.model, args.height, args.width, args.batch, args.steps = "cnn4", 64, 32, 4, 2
        args.p, args.k, args.ids, args.guides, args.train_iters, args.repeats = 4, 2, 10, 50, 2, 1
        args.num_query, args.num_gallery, args.eval_ids, args.dim = 50, 300, 20, 32
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    torch.manual_seed(0)
    parts = {"training": training, "attacks": attacks, "evaluation": evaluation}
    for p in args.parts.split(","):
        parts[p](args, dev)


if __name__ == "__main__":
    main()
