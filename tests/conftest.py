import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A tiny synthetic Market-format dataset shared by the end-to-end tests."""
    from advreid.data import generate_synthetic

    root = tmp_path_factory.mktemp("synth") / "market"
    return generate_synthetic(root, num_train_ids=12, num_test_ids=8, num_cams=3, height=64, width=32,
                              num_distractors=4, num_junk=3, seed=0)


def tiny_overrides(root, epochs: int = 2) -> list[str]:
    """Config overrides for a seconds-long CPU training run on the tiny synthetic set."""
    return [
        f"data.root={root}", "data.height=64", "data.width=32", "data.num_workers=0",
        "model.name=cnn4", "model.pretrained=false", "sampler.p=4", "sampler.k=2",
        f"train.epochs={epochs}", "train.progress=false", "sched.warmup_epochs=1", "sched.milestones=[1]",
        "optim.lr=0.001", "device=cpu", "eval.batch_size=32",
    ]


def attack_extra(name: str) -> dict:
    """Extra constructor arguments a registered attack needs to be built in the generic attack tests: DMR needs a
    generator (a tiny random one here; trained generators are tested in test_dmr.py)."""
    if name != "dmr":
        return {}
    from advreid.attacks.dmr import Discriminator, DMRNets, Generator

    torch.manual_seed(0)
    return {"generator": DMRNets(Generator(4, 1), Discriminator(4, temperature=30))}


def untrained_cnn4_run(out, eval_batch_size: int = 32):
    """A run folder holding an untrained (seeded) cnn4 at 64x32, 12 classes: for tests of mechanics that do not need
    a good model (training one would take most of a test file's time budget)."""
    import torch

    from advreid.models import build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model("cnn4", 12, pretrained=False).eval()
    cfg = {"data": {"name": "market1501"}, "eval": {"batch_size": eval_batch_size}, "model": {"name": "cnn4"}}
    save_checkpoint(out / "checkpoints" / "final", model,
                    meta={"model_name": "cnn4", "dataset": "market1501", "input_size": [64, 32], "config": cfg})
    return out
