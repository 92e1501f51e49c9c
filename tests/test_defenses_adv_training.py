"""Adversarial training (GOAT online, offline AT) and the trainer's defense hooks (proactive defense)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import tiny_overrides
from torch import nn

from advreid.attacks import build, goat_guides, goat_objective
from advreid.config import ConfigError
from advreid.defenses.adv_training import offline_adv_dir
from advreid.experiments import train
from advreid.models import IMAGENET_STD, build_model, load_checkpoint
from advreid.ops import batch_generator

EPS = 4 / 255


def _weights(run):
    return load_file(f"{Path(run) / 'checkpoints' / 'final'}.safetensors")


def _same_weights(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _meta(run):
    return load_checkpoint(Path(run) / "checkpoints" / "final").checkpoint_meta["meta"]


@pytest.fixture(scope="module")
def plain_run(synth_root, tmp_path_factory):
    """A plain 1-epoch tiny run, the reference the defended runs are compared with."""
    run = tmp_path_factory.mktemp("plain") / "run"
    train("bot_r50", run, overrides=tiny_overrides(synth_root, epochs=1))
    return run


def _tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn4", 0).eval()


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(8, 3, 64, 32, generator=g)
    x[0, :, :4] = 0.0  # pixels at the box edges: the projection must keep [0,1]
    x[1, :, :4] = 1.0
    return x, torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])


# ------------------------------------------------------------------------------------------------- GOAT


def test_goat_guides_match_hand_computation():
    f = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [5.0, 5.0], [2.0, 2.0]])
    pids = torch.tensor([0, 1, 0, 0, 2])
    g = goat_guides(f, pids, push=4, pull=1)
    # same-pid partners in batch order, padded; samples 1 and 4 have none -> their own feature (SMA)
    assert g.push_index.tolist() == [[2, 3, -1, -1], [1, -1, -1, -1], [0, 3, -1, -1], [0, 2, -1, -1],
                                     [4, -1, -1, -1]]
    assert g.push_mask.tolist() == [[True, True, False, False], [True, False, False, False],
                                    [True, True, False, False], [True, True, False, False],
                                    [True, False, False, False]]
    assert torch.equal(g.push[0, :2], f[[2, 3]]) and torch.equal(g.push[1, 0], f[1])
    # furthest L2 feature in the batch, only the sample itself excluded (pid not checked)
    d = torch.cdist(f, f).fill_diagonal_(-1)
    assert g.pull_index[:, 0].tolist() == d.argmax(1).tolist() == [3, 3, 3, 0, 3]
    assert torch.equal(g.pull[:, 0], f[d.argmax(1)]) and bool(g.pull_mask.all())
    g1 = goat_guides(f, pids, push=1, pull=2)  # push=1 keeps the first partner; pull=2 the two furthest
    assert g1.push_index[:, 0].tolist() == [2, 1, 0, 0, 4]
    assert g1.pull_index.tolist() == [[3, 2], [3, 2], [3, 1], [0, 1], [3, 0]]
    g0 = goat_guides(f, pids, push=0, pull=0)  # GOAT^{0,0}: SMA guide = own clean feature, no pull
    assert g0.push_index[:, 0].tolist() == [0, 1, 2, 3, 4] and torch.equal(g0.push[:, 0], f)
    assert g0.pull.shape == (5, 0, 2)


def _goat(model, steps=5, **kw):
    return build("goat", model, eps=EPS, alpha=1 / 255, steps=steps, **kw)


@pytest.mark.parametrize("space", ["pixel", "normalized"])
def test_goat_perturbation_budget(space):
    model = _tiny_model()
    x, pids = _batch()
    adv = _goat(model, eps_space=space, push=4, pull=1, seed=1)
    out = adv(x, pids, index=torch.arange(8))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    delta = (out - x).abs().amax(dim=(0, 2, 3))  # per channel
    bound = torch.full((3,), EPS) if space == "pixel" else EPS * torch.tensor(IMAGENET_STD)
    assert bool((delta <= bound + 1e-6).all()), (delta, bound)
    assert bool((delta > 0.9 * bound).all())  # the budget is used
    assert all(p.grad is None for p in model.parameters())  # gradients w.r.t. the input only
    assert model.training is False  # the caller's mode is restored (model_mode=train switched it on)
    # deterministic given the seed and the sample indices; steps=0 is the identity without any forward
    again = adv(x, pids, index=torch.arange(8))
    assert torch.equal(out, again)
    assert torch.equal(_goat(model, steps=0)(x, pids), x)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_goat_objective_increases(mode):
    model = _tiny_model()
    x, pids = _batch(1)
    adv = _goat(model, random_start=False, push=2, pull=1, model_mode=mode)
    model.train(mode == "train")
    with torch.no_grad():
        f0 = adv.features(x)
        guides = goat_guides(f0, pids, 2, 1)
        before = goat_objective(f0, guides).sum()
    model.eval()
    out = adv(x, pids)
    model.train(mode == "train")
    with torch.no_grad():
        after = goat_objective(adv.features(out), guides).sum()
    assert float(after) > float(before)


def test_goat_bad_arguments():
    model = _tiny_model()
    with pytest.raises(ValueError, match="pixel units"):
        build("goat", model, eps=5)
    with pytest.raises(ValueError, match="eps_space"):
        build("goat", model, eps_space="tensor")
    with pytest.raises(ValueError, match="push"):
        build("goat", model, push=-1)


def test_goat_training_run(synth_root, tmp_path, plain_run):
    ov = tiny_overrides(synth_root, epochs=1)
    # steps=0: no perturbation, no forward, no RNG consumed -> bit-for-bit the plain run
    train("bot_r50", tmp_path / "g0", overrides=ov + ["adv.method=goat", "adv.steps=0"])
    assert _same_weights(tmp_path / "g0", plain_run)
    train("bot_r50", tmp_path / "g", overrides=ov + ["adv.method=goat", "adv.steps=2", "adv.eps=4px"])
    assert (tmp_path / "g/checkpoints/final.json").is_file()
    assert not _same_weights(tmp_path / "g", plain_run)
    meta = _meta(tmp_path / "g")
    assert meta["adv_training"]["method"] == "goat" and meta["adv_training"]["eps"] == pytest.approx(EPS)
    assert meta["config"]["adv"]["method"] == "goat" and "defense" in meta["config"]
    rec = json.loads((tmp_path / "g/metrics.jsonl").read_text().splitlines()[0])
    assert rec["loss"] > 0


# ------------------------------------------------------------------------------------------- offline AT


def test_offline_adversarial_training(synth_root, tmp_path, plain_run):
    from advreid.data import build_dataset

    train_names = sorted(Path(r.path).stem for r in build_dataset("market1501", synth_root).train)
    ov = tiny_overrides(synth_root, epochs=1) + ["adv.method=offline", f"adv.source_run={plain_run}",
                                                 "adv.steps=2", "adv.eps=4px"]
    run = tmp_path / "at"
    train("bot_r50", run, overrides=ov)
    out = offline_adv_dir(run, "ifgsm")
    pngs = sorted(out.glob("*.png"))
    assert [p.stem for p in pngs] == train_names  # one PNG per training image, original names
    man = json.loads((out / "manifest.json").read_text())
    assert man["complete"] and man["count"] == len(train_names) and man["attack"] == "ifgsm"
    assert man["params"]["exclude_self"] is True and man["guides"]["source"] == "train"
    assert man["params"]["steps"] == 2 and man["linf_max_px"] <= 4 + 1e-4
    meta = _meta(run)
    assert meta["num_train_images"] == 2 * len(train_names)  # clean ∪ adversarial
    assert meta["adv_training"]["reused"] is False
    assert meta["config"]["adv"]["source_run"] == str(Path(plain_run).resolve())
    # resume: the complete manifest with the same parameters is reused, the images are not rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in pngs}
    train(None, run, resume=True, overrides=["train.epochs=2"])
    assert {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("*.png"))} == mtimes
    assert _meta(run)["adv_training"]["reused"] is True and _meta(run)["epoch"] == 2
    # mix=replace: adversarial images only
    rep = tmp_path / "rep"
    train("bot_r50", rep, overrides=ov + ["adv.mix=replace"])
    assert _meta(rep)["num_train_images"] == len(train_names)


# ------------------------------------------------------------------------------------------ proactive hook


class _StandIn(nn.Module):
    """Stand-in proactive defense: greys a random half of the batch, drawn from the step's generator."""

    calls: list = []

    def forward(self, imgs, generators=None):
        assert isinstance(generators, torch.Generator) and generators.device.type == "cpu"
        pick = torch.rand(imgs.shape[0], generator=generators) < 0.5
        _StandIn.calls.append(pick.tolist())
        grey = imgs.mean(1, keepdim=True).expand_as(imgs)
        return torch.where(pick.to(imgs.device)[:, None, None, None], grey, imgs)


@pytest.fixture
def standin():
    """The stand-in registered as a proactive preset, as a user would register their own transform."""
    from advreid.defenses import PROACTIVE

    PROACTIVE.add_preset("standin", _StandIn)
    yield "standin"
    PROACTIVE.unregister("standin")


@pytest.fixture
def proactive_preset():
    return "reference"


def test_proactive_hook_changes_training(synth_root, tmp_path, plain_run, proactive_preset):
    run = tmp_path / "pd"
    train("bot_r50", run, overrides=tiny_overrides(synth_root, epochs=1) + [f"defense.proactive={proactive_preset}"])
    assert not _same_weights(run, plain_run)
    assert _meta(run)["defense"]["proactive"] == proactive_preset


def test_proactive_and_goat_resume_bit_exact(synth_root, tmp_path, proactive_preset):
    """1 epoch + resume == 2 epochs straight with the proactive defense and GOAT on (per-step generators)."""
    ov = tiny_overrides(synth_root, epochs=2) + [f"defense.proactive={proactive_preset}", "adv.method=goat",
                                                 "adv.steps=1", "adv.eps=4px", "adv.alpha=2px"]
    train("bot_r50", tmp_path / "a", overrides=ov)
    train("bot_r50", tmp_path / "b", overrides=ov + ["train.epochs=1"])
    train(None, tmp_path / "b", resume=True, overrides=["train.epochs=2"])
    assert _same_weights(tmp_path / "a", tmp_path / "b")
    la = [json.loads(x)["loss"] for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert la == lb


def test_proactive_generator_contract(synth_root, tmp_path, standin):
    """The hook passes one CPU generator per step, seeded from (seed, epoch, step, rank) only."""
    _StandIn.calls = []
    train("bot_r50", tmp_path / "s", overrides=tiny_overrides(synth_root, epochs=1) + ["defense.proactive=standin"])
    first = _StandIn.calls[0]
    b = len(first)
    assert first == (torch.rand(b, generator=batch_generator(0, 0, 0, 0, "proactive")) < 0.5).tolist()
    assert batch_generator(0, 0, 1, 0, "proactive").initial_seed() != batch_generator(0, 1, 0, 0,
                                                                                      "proactive").initial_seed()


# ---------------------------------------------------------------------------------------------- bad config


@pytest.mark.parametrize("extra, key", [
    (["adv.method=offline"], "adv.source_run"),
    (["adv.method=offline", "adv.source_run=/nonexistent/run"], "adv.source_run"),
    (["adv.method=goat", "adv.eps=5"], "adv.eps"),
    (["adv.method=goat", "adv.alpha=2/0"], "adv.alpha"),
    (["adv.method=goat", "adv.pull=-1"], "adv.pull"),
    (["adv.method=goat", "adv.eps_space=tensor"], "adv.eps_space"),
])
def test_bad_adv_config_names_the_key(synth_root, tmp_path, extra, key):
    run = tmp_path / "bad"
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train("bot_r50", run, overrides=tiny_overrides(synth_root, epochs=1) + extra)
    assert not run.exists()  # fails before the run directory is created


def test_bad_offline_attack_config(synth_root, tmp_path, plain_run):
    base = tiny_overrides(synth_root, epochs=1) + ["adv.method=offline", f"adv.source_run={plain_run}"]
    with pytest.raises(ConfigError, match=r"adv\.attack"):
        train("bot_r50", tmp_path / "a", overrides=base + ["adv.attack=nosuchattack"])
    with pytest.raises(ConfigError, match=r"adv\.attack_params"):
        train("bot_r50", tmp_path / "b", overrides=base + ["adv.attack_params={momentm: 1.0}"])
    with pytest.raises(ConfigError, match=r"adv\.eps_space"):
        train("bot_r50", tmp_path / "c", overrides=base + ["adv.eps_space=normalized"])


def test_bad_proactive_name(synth_root, tmp_path, standin):
    with pytest.raises(ConfigError, match=r"defense\.proactive"):
        train("bot_r50", tmp_path / "p", overrides=tiny_overrides(synth_root, epochs=1) + ["defense.proactive=nope"])
    assert not (tmp_path / "p").exists()


def test_goat_pool_draws_same_identity_training_images_with_replacement(synth_root):
    """The reference's guides: for every sample, ``push`` training images of its identity (with replacement),
    embedded by the current model; the attack then pushes away from exactly those features."""
    from advreid.attacks import build
    from advreid.data import build_dataset
    from advreid.defenses import GuidePool

    ds = build_dataset("market1501", synth_root)
    pool = GuidePool(ds.train, 64, 32, draws=4)
    pids = torch.tensor([ds.train[0].pid, ds.train[0].pid, ds.train[-1].pid])
    idx = pool.sample(pids, torch.Generator().manual_seed(0))
    assert len(idx) == 12
    assert [ds.train[i].pid for i in idx] == [int(p) for p in pids.repeat_interleave(4)]
    again = pool.sample(pids, torch.Generator().manual_seed(0))
    assert idx == again and pool.sample(pids, torch.Generator().manual_seed(1)) != idx
    n0 = len(pool.by_pid[int(pids[0])])
    draws = pool.sample(pids[:1].repeat(200), torch.Generator().manual_seed(2))
    assert len(set(draws)) == n0  # every image of the identity is drawn, some of them several times
    model = _tiny_model()
    goat = build("goat", model, eps=EPS, steps=2, push=4, pull=1)
    g = pool.guides(goat, pids, torch.Generator().manual_seed(0))
    assert g.push.shape == (3, 4, goat.features(torch.rand(1, 3, 64, 32)).shape[1])
    assert model.training is False  # the caller's mode is restored
    x = torch.stack([pool.dataset[i][0] for i in (0, 0, len(ds.train) - 1)])
    adv = goat(x, pids, guides=g, index=torch.arange(3))
    assert (adv - x).abs().max() <= EPS + 1e-6


def test_goat_training_with_pool_and_batch_guides(synth_root, tmp_path):
    ov = tiny_overrides(synth_root, epochs=1) + ["adv.method=goat", "adv.steps=1", "adv.eps=4px"]
    train("bot_r50", tmp_path / "pool", overrides=ov)
    train("bot_r50", tmp_path / "batch", overrides=ov + ["adv.guides=batch"])
    assert _meta(tmp_path / "pool")["adv_training"]["guides"].startswith("pool: 4 draws")
    assert _meta(tmp_path / "batch")["adv_training"]["guides"].startswith("batch")
    assert not _same_weights(tmp_path / "pool", tmp_path / "batch")
    with pytest.raises(ConfigError, match=r"adv\.guides"):
        train("bot_r50", tmp_path / "bad", overrides=ov + ["adv.guides=dictionary"])
