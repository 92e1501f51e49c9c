"""DDDefense Phase I: the resampling rule on hand-built counts, the conditional diffusion generator (training, exact
resume, deterministic batch-independent sampling) and the resampled dataset (originals untouched, parseable,
resumable, never written into the source)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from advreid.config import ConfigError
from advreid.data import build_dataset
from advreid.defenses.dddefense import (
    MANIFEST_NAME,
    GenerationTask,
    ResampleConfig,
    default_delta1,
    generated_name,
    load_diffusion_config,
    load_generator,
    plan_resampling,
    resample_dataset,
    train_diffusion,
)
from advreid.defenses.dddefense import diffusion as diffusion_mod
from advreid.defenses.dddefense import resample as resample_mod

# a ~50k-parameter UNet at 32x16: seconds on CPU
MICRO = [
    "model.height=32", "model.width=16", "model.block_out_channels=[16,32]",
    "model.down_block_types=[DownBlock2D,DownBlock2D]", "model.up_block_types=[UpBlock2D,UpBlock2D]",
    "train.batch_size=16", "train.lr=0.003", "device=cpu", "data.num_workers=1", "sample.steps=4",
    "sample.batch_size=8",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on the shared 2-core test machine OpenMP spinning makes 2 threads ~5x slower here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _records(counts: dict[int, list[int]]) -> list[tuple[str, int, int]]:
    return [(f"{pid}_{c}_{k}.jpg", pid, c) for pid, per_cam in counts.items()
            for c, n in enumerate(per_cam) for k in range(n)]


def _per(tasks: list[GenerationTask], pid: int, rule: str | None = None) -> dict[int, int]:
    return dict(Counter(t.camid for t in tasks if t.pid == pid and (rule is None or t.rule == rule)))


def _tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ the rule
def test_plan_counts_rule1_and_rule2_exact():
    counts = {1: [2, 0, 0, 0], 3: [3, 3, 0, 0], 5: [5, 1, 1, 0], 7: [1, 1, 1, 1]}
    tasks = plan_resampling(_records(counts), 4, delta1=6, delta2=0.5, per_camera=1)
    # pid 1 (single camera, n=2): rule 1 water-fills 4 images into cams 1,2,3 then 1; rule 2 adds one per other cam
    assert _per(tasks, 1, "count") == {1: 2, 2: 1, 3: 1}
    assert _per(tasks, 1, "camera") == {1: 1, 2: 1, 3: 1}
    # pid 3: n=6 = delta1, dominant share 3/6 = 0.5 is not > 0.5 -> nothing
    assert _per(tasks, 3) == {}
    # pid 5: n=7, share 5/7 > 0.5 -> one image for each of cams 1, 2, 3
    assert _per(tasks, 5, "count") == {} and _per(tasks, 5, "camera") == {1: 1, 2: 1, 3: 1}
    # pid 7: n=4 < 6 -> 2 images to the lowest-count cameras (all tie at 1 -> cams 0, 1); share 0.25
    assert _per(tasks, 7) == {0: 1, 1: 1} and all(t.rule == "count" for t in tasks if t.pid == 7)
    assert len(tasks) == 7 + 0 + 3 + 2
    # indices run 0.. per identity, rule-1 tasks first; order is by pid then index
    assert [t.index for t in tasks if t.pid == 1] == list(range(7))
    assert [(t.pid, t.index) for t in tasks] == sorted((t.pid, t.index) for t in tasks)
    assert [t.rule for t in tasks if t.pid == 1] == ["count"] * 4 + ["camera"] * 3


def test_plan_balance_and_per_camera_k():
    counts = {9: [9, 1, 0, 0], 1: [2, 0, 0, 0], 5: [5, 1, 1, 0]}
    tasks = plan_resampling(_records(counts), 4, delta1=6, delta2=0.5, per_camera="balance")
    # pid 9: n=10, 9/(10+m) <= 0.5 -> m = 8, water-filled over cams 1..3 from (1,0,0): (3,3,3)
    assert _per(tasks, 9, "camera") == {1: 2, 2: 3, 3: 3} and _per(tasks, 9, "count") == {}
    # pid 1: rule 1 gives (2,2,1,1): share 2/6 <= 0.5 already -> balance adds nothing
    assert _per(tasks, 1, "camera") == {} and sum(_per(tasks, 1, "count").values()) == 4
    # pid 5: n=7 -> m = 10 - 7 = 3 over (1,1,0): cam 3, then cam 1, cam 2
    assert _per(tasks, 5, "camera") == {1: 1, 2: 1, 3: 1}
    # per_camera=k: k images per other camera; 0 disables rule 2; delta2=1 never triggers
    k2 = plan_resampling(_records({9: [9, 1, 0, 0]}), 4, delta1=1, delta2=0.5, per_camera=2)
    assert _per(k2, 9) == {1: 2, 2: 2, 3: 2}
    assert plan_resampling(_records({9: [9, 1, 0, 0]}), 4, delta1=1, per_camera=0) == []
    assert plan_resampling(_records({9: [9, 1, 0, 0]}), 4, delta1=1, delta2=1.0) == []
    # a share computed exactly: 3/5 = 0.6 is not above delta2 = 0.6
    assert plan_resampling(_records({2: [3, 2]}), 2, delta1=1, delta2=0.6) == []


def test_plan_defaults_and_edge_cases():
    assert default_delta1(_records({1: [2], 2: [6], 3: [7], 4: [4]})) == 5  # median 5.0
    assert default_delta1(_records({1: [2], 2: [3]})) == 3  # median 2.5 -> 3
    recs = _records({1: [1, 0, 0], 2: [3, 3, 0], 3: [2, 2, 2]})  # totals 1, 6, 6 -> median delta1 = 6
    tasks = plan_resampling(recs, 3)  # defaults: delta1 = 6, delta2 = 0.5, per_camera = 1
    assert _per(tasks, 1, "count") == {0: 1, 1: 2, 2: 2} and _per(tasks, 1, "camera") == {1: 1, 2: 1}
    assert _per(tasks, 2) == {} and _per(tasks, 3) == {}
    # one camera in the whole dataset: rule 2 has no other camera to fill
    one = plan_resampling(_records({4: [2]}), 1, delta1=3)
    assert one == [GenerationTask(4, 0, "count", 0)]
    assert plan_resampling([], 3, delta1=2) == []
    with pytest.raises(ValueError, match="delta2"):
        plan_resampling(recs, 3, delta2=0.0)
    with pytest.raises(ValueError, match="delta1"):
        plan_resampling(recs, 3, delta1=0)
    with pytest.raises(ValueError, match="per_camera"):
        plan_resampling(recs, 3, per_camera="all")
    with pytest.raises(ValueError, match="camid 3"):
        plan_resampling(_records({1: [0, 0, 0, 1]}), 3)
    assert generated_name(7, 2, 12) == "0007_c3s9_900012_00.png"


# ------------------------------------------------------------------------------------------- the generator
@pytest.fixture(scope="module")
def gen_dir(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddd") / "gen"
    return train_diffusion(synth_root, out, overrides=MICRO + ["train.epochs=4"])


def test_config_presets_and_errors():
    tiny, market = load_diffusion_config("diffusion_tiny"), load_diffusion_config("diffusion_market")
    assert (tiny["model"]["height"], tiny["model"]["width"]) == (64, 32)
    assert (market["model"]["height"], market["model"]["width"]) == (128, 64)
    assert market["schedule"]["num_train_timesteps"] == 1000 and market["train"]["ema_decay"] > 0
    with pytest.raises(ConfigError, match="did you mean train.epochs"):
        load_diffusion_config(None, ["train.epoch=3"])
    with pytest.raises(ConfigError, match="model.down_block_types"):
        load_diffusion_config(None, ["model.block_out_channels=[16,32]"])
    with pytest.raises(ConfigError, match="model.height"):
        load_diffusion_config(None, ["model.height=30"])


def test_training_loss_decreases_and_loads(gen_dir, synth_root):
    lines = [json.loads(s) for s in (gen_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    losses = [r["loss"] for r in lines]
    assert losses[-1] < 0.75 * losses[0], losses
    ck = gen_dir / "checkpoints"
    assert sorted(p.name for p in ck.glob("*.json")) == ["epoch_003.json", "epoch_004.json", "final.json"]
    gen = load_generator(gen_dir)
    ds = build_dataset("market1501", synth_root)
    assert sorted(gen.pid_map) == sorted(ds.train_pid_map) == list(range(1, 24, 2))  # synthetic odd train pids
    assert sorted(gen.cam_map) == sorted({r.camid for r in ds.train})
    assert gen.image_size == (64, 32) and gen.model_size == (32, 16) and gen.epoch == 4
    with pytest.raises(FileExistsError, match="not empty"):
        train_diffusion(synth_root, gen_dir, overrides=MICRO)


def test_training_resume_is_bitwise_equal(synth_root, tmp_path, monkeypatch):
    ov = MICRO + ["train.epochs=3", "train.max_iters_per_epoch=2"]
    straight = train_diffusion(synth_root, tmp_path / "straight", overrides=ov)
    real_step, calls = diffusion_mod._train_step, {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # killed inside epoch 2 (epoch 1 is checkpointed)
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(diffusion_mod, "_train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_diffusion(synth_root, tmp_path / "killed", overrides=ov)
    monkeypatch.setattr(diffusion_mod, "_train_step", real_step)
    assert not (tmp_path / "killed/checkpoints/final.json").exists()
    with pytest.raises(FileNotFoundError, match="allow_incomplete"):
        load_generator(tmp_path / "killed")
    assert load_generator(tmp_path / "killed", allow_incomplete=True).epoch == 1
    with pytest.raises(ValueError, match="train.lr"):
        train_diffusion(None, tmp_path / "killed", overrides=["train.lr=0.1"], resume=True)
    resumed = train_diffusion(None, tmp_path / "killed", resume=True)
    a = load_file(straight / "checkpoints/final.safetensors")
    b = load_file(resumed / "checkpoints/final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(s)["loss"] for s in (straight / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(s)["loss"] for s in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == 3


def test_sampling_deterministic_and_batch_independent(gen_dir):
    gen = load_generator(gen_dir)
    pids, cams = [1, 3, 5, 7, 1], [0, 1, 2, 0, 2]
    x = gen.sample(pids, cams, seed=11, steps=3)
    assert x.shape == (5, 3, 64, 32) and x.min() >= 0 and x.max() <= 1
    assert torch.equal(x, gen.sample(pids, cams, seed=11, steps=3))
    assert (x - gen.sample(pids, cams, seed=12, steps=3)).abs().mean() > 1e-2
    # batch composition does not change a sample (equal up to float rounding of batched convolutions)
    torch.testing.assert_close(gen.sample(pids, cams, seed=11, steps=3, batch_size=2), x, atol=1e-5, rtol=0)
    sub = gen.sample([5, 1], [2, 2], seed=11, keys=[2, 4], steps=3)
    torch.testing.assert_close(sub, x[[2, 4]], atol=1e-5, rtol=0)
    # SDEdit: deterministic, identity at strength 0, output at the input's size
    real = x[:2].clone()
    y = gen.resample(real, [1, 2], [1, 3], strength=0.5, seed=3, steps=4)
    assert y.shape == real.shape and torch.equal(y, gen.resample(real, [1, 2], [1, 3], 0.5, 3, steps=4))
    assert (y - real).abs().mean() > 1e-3
    assert torch.equal(gen.resample(real, [1, 2], [1, 3], strength=0.0, seed=3), real)
    with pytest.raises(ValueError, match="not training identities"):
        gen.sample([2], [0], seed=0)
    with pytest.raises(ValueError, match="strength"):
        gen.resample(real, [1, 2], [1, 3], strength=1.5, seed=0)
    with pytest.raises(ValueError, match="cond_drop_p"):
        gen.config["train"]["cond_drop_p"] = 0.0
        gen.sample([1], [0], seed=0, guidance_scale=2.0)


class _Oracle(torch.nn.Module):
    """The exact epsilon-predictor of a data set holding one image per identity: eps = (x_t - sqrt(a_t) x0) /
    sqrt(1 - a_t). DDIM (eta 0) with it must land exactly on that identity's image."""

    def __init__(self, x0: torch.Tensor, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.x0, self.ac = x0, alphas_cumprod
        self.num_pids, self.num_cams = len(x0), 2
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, pid, cam):
        a = self.ac[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * self.x0[pid]) / (1 - a).sqrt()


def test_ddim_sampling_and_sdedit_hit_the_oracle_target():
    from diffusers import DDPMScheduler

    from advreid.defenses.dddefense import Generator

    cfg = load_diffusion_config(None, ["model.height=8", "model.width=4"])
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 3, 8, 4, generator=g) * 1.6 - 0.8  # three identities' images in [-1, 1]
    ac = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02).alphas_cumprod
    meta = {"config": cfg, "pid_map": {"11": 0, "13": 1, "15": 2}, "cam_map": {"0": 0, "1": 1},
            "image_size": [8, 4], "epoch": 1}
    gen = Generator(_Oracle(x0, ac), meta)
    target = (x0 + 1) / 2
    x = gen.sample([13, 11, 15], [1, 0, 0], seed=0, steps=10)
    torch.testing.assert_close(x, target[[1, 0, 2]], atol=1e-4, rtol=0)
    # SDEdit from identity 11's image, denoised under identity 15's label, ends on 15's image
    y = gen.resample(target[[0, 0]], [1, 1], [15, 13], strength=0.5, seed=1, steps=10)
    torch.testing.assert_close(y, target[[2, 1]], atol=1e-4, rtol=0)
    big = gen.sample([13], [1], seed=0, steps=10, size=(16, 8))
    assert big.shape == (1, 3, 16, 8)


def test_generator_dir_missing_or_corrupt(gen_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_generator(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no finished generator"):
        load_generator(tmp_path / "empty")
    bad = tmp_path / "bad"
    shutil.copytree(gen_dir, bad)
    (bad / "checkpoints/final.json").write_text("{not json")
    with pytest.raises(ValueError, match="diffusion generator"):
        load_generator(bad)
    shutil.copy(gen_dir / "checkpoints/final.json", bad / "checkpoints/final.json")
    w = bad / "checkpoints/final.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ValueError, match="safetensors"):
        load_generator(bad)


# ------------------------------------------------------------------------------------- the resampled dataset
@pytest.fixture(scope="module")
def resampled(synth_root, gen_dir, tmp_path_factory):
    before = _tree_hashes(synth_root)
    out = tmp_path_factory.mktemp("rs") / "balanced"
    resample_dataset(synth_root, gen_dir, out, ResampleConfig(steps=3, batch_size=8, seed=5))
    return out, before


def test_resample_dataset_adds_planned_images_and_keeps_originals(synth_root, resampled):
    out, before = resampled
    assert _tree_hashes(synth_root) == before  # the source is untouched
    src = build_dataset("market1501", synth_root)
    new = build_dataset("market1501", out)
    orig = {v: k for k, v in src.train_pid_map.items()}
    tasks = plan_resampling([r._replace(pid=orig[r.pid]) for r in src.train], 3)
    assert len(tasks) > 0
    assert len(new.train) == len(src.train) + len(tasks)
    assert len(new.query) == len(src.query) and len(new.gallery) == len(src.gallery)
    for split in ("query", "bounding_box_test", "bounding_box_train"):
        for p in (synth_root / split).iterdir():
            assert (out / split / p.name).read_bytes() == p.read_bytes()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] and manifest["rule"]["delta1"] == default_delta1(src.train)
    assert len(manifest["files"]) == len(tasks)
    for e, t in zip(manifest["files"], tasks, strict=True):
        f = out / e["file"]
        assert f.name == generated_name(t.pid, t.camid, t.index) and f.read_bytes()[:4] == b"\x89PNG"
        assert (e["pid"], e["camid"], e["rule"], e["mode"], e["strength"]) == (t.pid, t.camid, t.rule, "sdedit", 0.6)
        assert e["source"].startswith("bounding_box_train/") and Path(e["source"]).name.split("_")[0] == f"{t.pid:04d}"
        assert hashlib.sha256(f.read_bytes()).hexdigest() == e["sha256"] and e["seed"] == 5
    # after resampling every identity has at least delta1 images
    per_id = Counter(r.pid for r in new.train)
    assert min(per_id.values()) >= manifest["rule"]["delta1"]


def test_resample_resume_matches_straight_run(synth_root, gen_dir, resampled, tmp_path, monkeypatch):
    straight, _ = resampled
    cfg = ResampleConfig(steps=3, batch_size=8, seed=5)
    out = tmp_path / "killed"
    real, calls = resample_mod._generate, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(resample_mod, "_generate", dying)
    with pytest.raises(KeyboardInterrupt):
        resample_dataset(synth_root, gen_dir, out, cfg)
    monkeypatch.setattr(resample_mod, "_generate", real)
    assert not json.loads((out / MANIFEST_NAME).read_text())["complete"]
    with pytest.raises(FileExistsError):
        resample_dataset(synth_root, gen_dir, out, cfg)
    with pytest.raises(ValueError, match="another source, generator or config"):
        resample_dataset(synth_root, gen_dir, out, ResampleConfig(steps=3, batch_size=8, seed=6), resume=True)
    first = json.loads((out / MANIFEST_NAME).read_text())["files"][0]
    kept_mtime = (out / first["file"]).stat().st_mtime_ns
    resample_dataset(synth_root, gen_dir, out, cfg, resume=True)
    assert (out / first["file"]).stat().st_mtime_ns == kept_mtime  # written before the kill: kept
    assert _tree_hashes(out) == _tree_hashes(straight)
    # a damaged generated file is detected by its hash and regenerated identically
    (out / first["file"]).write_bytes(b"broken")
    resample_dataset(synth_root, gen_dir, out, cfg, resume=True)
    assert _tree_hashes(out) == _tree_hashes(straight)


def test_resample_refuses_to_write_into_the_source(synth_root, gen_dir, tmp_path):
    before = sorted(p.name for p in synth_root.iterdir())
    for bad in (synth_root, synth_root / "balanced", synth_root.parent):
        with pytest.raises(ValueError, match="overlaps the source dataset"):
            resample_dataset(synth_root, gen_dir, bad)
    assert sorted(p.name for p in synth_root.iterdir()) == before
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resample_dataset(synth_root, tmp_path / "no_generator", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failed_start_leaves_nothing_and_the_retry_runs(synth_root, tmp_path):
    """Bad data is refused before the output folder exists, so the corrected command is not blocked by it."""
    out = tmp_path / "gen"
    with pytest.raises(FileNotFoundError, match="cannot find the dataset"):
        train_diffusion(tmp_path / "nope", out, overrides=MICRO)
    assert not out.exists()
    train_diffusion(synth_root, out, overrides=MICRO)
    assert (out / "checkpoints" / "final.json").is_file()
