"""A ReID model trained **without advreid**: a torchvision ResNet-18 (random init), plain PyTorch, identity
cross-entropy on a Market-1501-format folder, saved as a plain ``state_dict``. It stands for "a model from someone
else's code" in the README's ``advreid robust --model torchvision:resnet18@...`` example; nothing here imports advreid.

    python benchmarks/train_outside_advreid.py --data data/synth --out resnet18_synth.pth [--epochs 15]
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.transforms import v2


class MarketTrain(torch.utils.data.Dataset):
    """``bounding_box_train/<pid>_c<cam>s..jpg`` with pids relabelled 0..N-1 (junk -1 skipped)."""

    def __init__(self, root: Path, tf: nn.Module) -> None:
        files = sorted((root / "bounding_box_train").glob("*.jpg"))
        pids = [int(re.match(r"(-?\d+)_", f.name).group(1)) for f in files]
        keep = [(f, p) for f, p in zip(files, pids, strict=True) if p >= 0]
        label = {p: i for i, p in enumerate(sorted({p for _, p in keep}))}
        self.items = [(f, label[p]) for f, p in keep]
        self.num_classes, self.tf = len(label), tf

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        f, y = self.items[i]
        return self.tf(Image.open(f).convert("RGB")), y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    tf = v2.Compose([v2.ToImage(), v2.Resize((args.height, args.width)), v2.RandomHorizontalFlip(),
                     v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    ds = MarketTrain(Path(args.data), tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, num_workers=0)
    net = torchvision.models.resnet18(num_classes=ds.num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    for epoch in range(args.epochs):
        t0, total, correct, n = time.perf_counter(), 0.0, 0, 0
        net.train()
        for x, y in loader:
            logits = net(x)
            loss = nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
        sched.step()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / n:.3f}, train acc {correct / n:.1%} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
    torch.save(net.state_dict(), args.out)
    print(f"saved {args.out} ({ds.num_classes} identities; its classifier is dropped by the torchvision: spec)")


if __name__ == "__main__":
    main()
