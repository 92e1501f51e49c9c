"""DMR's cost: generator images per second at 256x128, and one training step against the victim, each timed
against the victim's own cost on the same batch in the same run (interleaved, median of repeats).

Anchors: the victim's forward (embedding) of the batch for the generator, and the victim's forward + backward to
the input (what one step of an iterative attack costs) for the training step. The victim is a randomly
initialised preset (weights do not change the cost); the data is a small synthetic set written to a temp folder.

    PYTHONPATH=src python benchmarks/dmr_speed.py [--victim bot_r50] [--config dmr_market] [--batch 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from advreid.attacks.dmr.training import DMRTrainer, load_dmr_config
from advreid.data import generate_synthetic
from advreid.models import build_model, save_checkpoint
from advreid.utils.misc import get_device


def _timed(fn, dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--victim", default="bot_r50", help="victim preset (default bot_r50, ResNet-50)")
    ap.add_argument("--config", default="dmr_market", help="DMR config (default dmr_market: ngf 32, 6 blocks)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    dev = get_device(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_synthetic(Path(tmp) / "data", num_train_ids=12, num_test_ids=4, num_cams=3,
                                  height=a.height, width=a.width, num_distractors=0, num_junk=0)
        victim = build_model(a.victim, 12)
        run = Path(tmp) / "victim"
        save_checkpoint(run / "checkpoints" / "final", victim, meta={"epoch": 1, "input_size": [a.height, a.width]})
        cfg = load_dmr_config(a.config, [f"data.root={root}", f"victim_run={run}", f"device={dev}",
                                         f"data.height={a.height}", f"data.width={a.width}", "data.num_workers=0",
                                         f"sampler.p={a.batch // 4}", "sampler.k=4"])
        trainer = DMRTrainer(cfg, Path(tmp) / "out")
        x = torch.rand(a.batch, 3, a.height, a.width, device=dev)
        pids = torch.arange(a.batch // 4, device=dev).repeat_interleave(4)
        model = trainer.victim

        def gen() -> None:
            with torch.no_grad():
                trainer.nets.perturb(x, trainer.eps)

        def fwd() -> None:
            with torch.no_grad():
                model.features(x)

        def fwd_bwd() -> None:
            xr = x.clone().requires_grad_(True)
            torch.autograd.grad(model.features(xr).square().sum(), xr)

        def step() -> None:
            trainer.step(x, pids)

        trainer.nets.eval()
        for f in (gen, fwd, fwd_bwd):
            f()
        times: dict[str, list[float]] = {k: [] for k in ("gen", "fwd", "fwd_bwd", "step")}
        for _ in range(a.repeats):
            trainer.nets.eval()
            times["gen"].append(_timed(gen, dev))
            times["fwd"].append(_timed(fwd, dev))
            times["fwd_bwd"].append(_timed(fwd_bwd, dev))
            trainer.nets.train()
            times["step"].append(_timed(step, dev))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"device {dev}, victim {a.victim}, DMR {a.config}, batch {a.batch}, {a.height}x{a.width}, "
          f"median of {a.repeats}")
    print(f"generator (perturb):      {med['gen'] * 1000:8.1f} ms/batch  {a.batch / med['gen']:8.1f} images/s  "
          f"= {med['gen'] / med['fwd']:.2f} x the victim's forward ({med['fwd'] * 1000:.1f} ms)")
    print(f"one training step (G+D):  {med['step'] * 1000:8.1f} ms/batch  {a.batch / med['step']:8.1f} images/s  "
          f"= {med['step'] / med['fwd_bwd']:.2f} x the victim's forward+backward ({med['fwd_bwd'] * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
