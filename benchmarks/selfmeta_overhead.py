"""Cost of DDDefense's adversarially-enhanced self-meta step against a plain metric-AT step of the same batch, timed
in the same run, and the Phase I resampler's throughput.

Contenders (the registered training steps, on one fixed PK batch of random images, one model and optimizer):

* ``clean``: the standard supervised step (forward, CE + triplet, backward, update), for scale;
* ``metric_at`` (the anchor): FNA adversarial examples (in-batch guides) + hard batch-hard triplet + the clean term;
* ``fnes``: the same adversary, FNES on the adversarial embeddings against the clean ones + the clean term;
* ``selfmeta``: identity split, an attack from pool A on meta-train and one from pool B on meta-test, inner step,
  outer loss at the updated weights, one combined update (``--teacher`` adds the frozen-teacher consistency).

All use the same budget (``--eps``, ``--alpha``, ``--attack-steps``). Steps are interleaved one by one in a rotating
order, so load on a shared machine hits all alike; reported: the median seconds per step and the ratio of each
median to the ``metric_at`` median (the target is ``selfmeta`` <= 2.2x). The resampler part times SDEdit
(``Generator.resample``) of ``--resample-images`` images with an untrained generator of the given diffusion preset
(the speed does not depend on the weights) and prints images per second.

    PYTHONPATH=src python benchmarks/selfmeta_overhead.py [--model cnn4] [--height 64 --width 32] [--p 8 --k 4]
        [--attack-steps 3] [--eps 8px --alpha 3px] [--rounds 3 --iters 5] [--teacher] [--threads 1]
        [--resample-config diffusion_tiny --resample-images 64 --strength 0.3 --sample-steps 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from advreid.defenses.dddefense import ConditionalUNet, Generator, load_diffusion_config
from advreid.defenses.dddefense.steps import build_fnes_step, build_metric_at_step, build_selfmeta_step
from advreid.engine import Batch, standard_step
from advreid.losses import ReIDLoss
from advreid.models import build_model, save_checkpoint
from advreid.ops import batch_generator


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _trainer(args: argparse.Namespace, dev: torch.device) -> SimpleNamespace:
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=args.num_classes, pretrained=False).to(dev).train()
    pids = torch.arange(args.p).repeat_interleave(args.k).to(dev)
    images = torch.rand(len(pids), 3, args.height, args.width, generator=torch.Generator().manual_seed(1)).to(dev)
    t = SimpleNamespace(model=model, net=model, device=dev, use_amp=False, world=1,
                        batch=Batch(images, pids, torch.zeros_like(pids), torch.arange(len(pids))),
                        optimizer=torch.optim.Adam(model.parameters(), lr=1e-4),
                        scaler=torch.amp.GradScaler("cuda", enabled=False),
                        criterion=ReIDLoss(args.num_classes), step=0)
    t.step_generator = lambda stream: batch_generator(0, 0, t.step, 0, stream)
    return t


def _steps(args: argparse.Namespace, t: SimpleNamespace, tmp: Path) -> dict[str, Any]:
    budget = {"eps": args.eps, "alpha": args.alpha, "steps": args.attack_steps}
    cfg: dict[str, Any] = {"data": {"root": None}, "seed": 0, "adv": {}}
    meta: dict[str, Any] = {**budget, "consistency_weight": 0.0}
    if args.teacher:
        save_checkpoint(tmp / "teacher", t.model, meta={"epoch": 0})
        meta.update(consistency_weight=1.0, teacher=str(tmp / "teacher"))
    return {"clean": standard_step, "metric_at": build_metric_at_step(cfg, **budget),
            "fnes": build_fnes_step(cfg, **budget), "selfmeta": build_selfmeta_step(cfg, **meta)}


def time_steps(args: argparse.Namespace, dev: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each contender, interleaved (one warm-up call each first)."""
    t = _trainer(args, dev)
    with tempfile.TemporaryDirectory() as tmp:
        steps = _steps(args, t, Path(tmp))
        for fn in steps.values():
            fn(t)
        times: dict[str, list[float]] = {k: [] for k in steps}
        names = list(steps)
        for r in range(args.rounds):
            for i in range(args.iters):
                t.step = r * args.iters + i
                order = names[(t.step % len(names)):] + names[:(t.step % len(names))]
                for name in order:
                    _sync(dev)
                    t0 = time.perf_counter()
                    steps[name](t)
                    _sync(dev)
                    times[name].append(time.perf_counter() - t0)
    return times


def time_resampler(args: argparse.Namespace, dev: torch.device) -> float:
    """Images per second of SDEdit with an untrained generator of ``--resample-config``."""
    cfg = load_diffusion_config(args.resample_config)
    num_pids, num_cams = 100, 6
    torch.manual_seed(0)
    unet = ConditionalUNet(num_pids, num_cams, **cfg["model"]).to(dev)
    meta = {"config": cfg, "pid_map": {str(p): p for p in range(num_pids)},
            "cam_map": {str(c): c for c in range(num_cams)}, "image_size": [args.height, args.width], "epoch": 0}
    gen = Generator(unet, meta)
    n = args.resample_images
    images = torch.rand(n, 3, args.height, args.width, generator=torch.Generator().manual_seed(2))
    pids, cams = [i % num_pids for i in range(n)], [i % num_cams for i in range(n)]
    gen.resample(images[:2], cams[:2], pids[:2], args.strength, 0, steps=args.sample_steps)  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    gen.resample(images, cams, pids, args.strength, 0, steps=args.sample_steps, batch_size=args.resample_batch)
    _sync(dev)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cnn4", help="preset or backbone (cnn4, resnet50, bot_r50, ...)")
    ap.add_argument("--num-classes", type=int, default=100)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--p", type=int, default=8, help="identities per batch")
    ap.add_argument("--k", type=int, default=4, help="images per identity")
    ap.add_argument("--eps", default="8px")
    ap.add_argument("--alpha", default="3px")
    ap.add_argument("--attack-steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5, help="interleaved steps per round")
    ap.add_argument("--teacher", action="store_true", help="self-meta with the frozen-teacher consistency")
    ap.add_argument("--resample-config", default="diffusion_tiny")
    ap.add_argument("--resample-images", type=int, default=64)
    ap.add_argument("--resample-batch", type=int, default=64)
    ap.add_argument("--strength", type=float, default=0.3)
    ap.add_argument("--sample-steps", type=int, default=10)
    ap.add_argument("--no-resampler", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    print(f"model {args.model}, batch {args.p}x{args.k} at {args.height}x{args.width}, attacks eps {args.eps} step "
          f"{args.alpha} x{args.attack_steps}, {args.rounds}x{args.iters} interleaved steps, device {dev}, "
          f"{torch.get_num_threads()} thread(s)" + (", self-meta with teacher" if args.teacher else ""))
    times = time_steps(args, dev)
    anchor = statistics.median(times["metric_at"])
    for name, tt in times.items():
        med = statistics.median(tt)
        print(f"  {name:>9}: median {med * 1000:8.1f} ms/step (min {min(tt) * 1000:.1f}), "
              f"{med / anchor:5.2f}x the metric-AT step")
    ratio = statistics.median(times["selfmeta"]) / anchor
    print(f"self-meta / plain metric-AT step: {ratio:.2f}x (target <= 2.2x: {'met' if ratio <= 2.2 else 'NOT met'})")
    if not args.no_resampler:
        ips = time_resampler(args, dev)
        print(f"resampler ({args.resample_config}, SDEdit strength {args.strength}, {args.sample_steps} DDIM steps, "
              f"output {args.height}x{args.width}): {ips:.1f} images/s")


if __name__ == "__main__":
    main()
