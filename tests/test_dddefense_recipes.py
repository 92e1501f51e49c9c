"""DDDefense recipes: the metric-AT / FNES / self-meta training steps (what they train on, checked against the loss
written out by hand in float64), exact resume of the self-meta recipe, the step-parameter and data guards, the
presets, the Phase I bench dataset and the demo's per-identity accuracy column."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import tiny_overrides

from advreid.config import ConfigError, load_config
from advreid.data import Record, build_dataset
from advreid.defenses.dddefense import MANIFEST_NAME, FNESAdversary, FNESLoss
from advreid.defenses.dddefense.steps import (
    SelfMetaStepConfig,
    build_fnes_step,
    build_metric_at_step,
    check_resampled_root,
)
from advreid.engine import Batch
from advreid.experiments import train
from advreid.experiments.demos import (
    DEMO_ROWS,
    check_resampled_spec,
    dddefense_demo_config,
    per_identity_of_cell,
    resampled_dataset,
)
from advreid.experiments.training import check_train_config
from advreid.losses import ReIDLoss, TripletLoss
from advreid.models import build_model
from advreid.ops import batch_generator

H, W = 64, 32
PRESETS = {"dddefense": ("selfmeta", True), "dd_no_resample": ("selfmeta", False), "dd_no_meta": ("fnes", True),
           "dd_fnes_only": ("fnes", False), "metric_at": ("metric_at", None)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on the shared 2-core test machine OpenMP spinning makes 2 threads much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _weights(run: Path) -> dict:
    return load_file(str(run / "checkpoints" / "final.safetensors"))


# ------------------------------------------------------------------------------------- what a step trains on
def _fake_trainer(model, pids, seed=3):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(len(pids), 3, H, W, generator=g, dtype=torch.float64)
    batch = Batch(images, pids, torch.zeros_like(pids), torch.arange(40, 40 + len(pids)))
    return SimpleNamespace(
        model=model, net=model, batch=batch, device=torch.device("cpu"), use_amp=False, world=1,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        scaler=torch.amp.GradScaler("cuda", enabled=False),
        criterion=ReIDLoss(12, ce_weight=1.0, triplet_weight=1.0, label_smooth=0.1, margin=0.3),
        step_generator=lambda stream: batch_generator(7, 2, 5, 0, stream))


@pytest.mark.parametrize("kind,clean_weight", [("fnes", 1.0), ("fnes", 0.0), ("metric_at", 0.5)])
def test_step_update_equals_the_loss_written_by_hand(kind, clean_weight):
    torch.manual_seed(0)
    model = build_model("cnn4", 12, pretrained=False).double().train()
    pids = torch.tensor([1, 1, 4, 4, 7, 7, 9, 9])
    ref = copy.deepcopy(model)
    t = _fake_trainer(model, pids)
    params = {"steps": 2, "eps": "4px", "alpha": "2px", "clean_weight": clean_weight}
    cfg = {"data": {"root": None}, "seed": 0}
    step = build_fnes_step(cfg, tau=0.7, extension_weight=0.5, **params) if kind == "fnes" else \
        build_metric_at_step(cfg, margin=0.3, **params)
    parts = step(t)

    # by hand: FNA with in-batch guides seeded from the step's own stream; one train-mode forward of [adv; clean];
    # the metric loss on the retrieval embeddings; the config's criterion on the clean half only; one SGD step
    seed = int(torch.randint(2**31 - 1, (1,), generator=batch_generator(7, 2, 5, 0, kind)))
    x = t.batch.images
    adv = FNESAdversary.build(ref, "fna", eps="4px", alpha="2px", steps=2)(x, pids, index=t.batch.index, seed=seed)
    out = ref(torch.cat([adv, x]))
    f = out["feat_after_bn"]
    if kind == "fnes":
        metric = FNESLoss(tau=0.7, extension_weight=0.5)(f[:8], pids, f[8:])[0]
    else:
        metric = TripletLoss(0.3)(f[:8], pids)
    total = metric
    if clean_weight:
        total = total + clean_weight * t.criterion({k: v[8:] for k, v in out.items()}, pids)[0]
    trainable = [p for p in ref.parameters() if p.requires_grad]  # (the BNNeck bias is frozen)
    grads = dict(zip(map(id, trainable), torch.autograd.grad(total, trainable, allow_unused=True), strict=True))
    assert abs(parts["total"] - float(total.detach())) < 1e-12
    for (name, p), p0 in zip(model.named_parameters(), ref.parameters(), strict=True):
        g = grads.get(id(p0))
        expected = p0.detach() if g is None else p0.detach() - 0.1 * g
        assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-12), name
    classifier = model.head.classifier.weight
    if clean_weight == 0:  # no classifier term on adversarial examples: the classifier gets no gradient at all
        assert classifier.grad is None
    else:
        assert classifier.grad is not None and classifier.grad.abs().sum() > 0
    assert torch.equal(t.batch.images, x)  # the clean batch is left as it was


# ------------------------------------------------------------------------------------------ self-meta recipe
@pytest.fixture(scope="module")
def teacher_run(synth_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("teacher") / "baseline"
    train("dd_demo_cpu", run, overrides=tiny_overrides(synth_root, epochs=1))
    return run


def _meta_overrides(root, epochs, teacher):
    return tiny_overrides(root, epochs) + [
        "train.step_params.steps=1", "train.step_params.eps=4px", "train.step_params.alpha=2px",
        "train.step_params.pool_train=[fna,sma]", "train.step_params.pool_test=[odfa,lta]",
        f"adv.source_run={teacher}"]


def test_selfmeta_recipe_resume_equals_straight_run(synth_root, tmp_path, teacher_run):
    """1 epoch + resume == 2 epochs straight for the self-meta recipe with its teacher (per-step generators)."""
    train("dd_demo", tmp_path / "a", overrides=_meta_overrides(synth_root, 2, teacher_run))
    train("dd_demo", tmp_path / "b", overrides=_meta_overrides(synth_root, 1, teacher_run))
    train(None, tmp_path / "b", resume=True, overrides=["train.epochs=2"])
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    la = [json.loads(s) for s in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(s) for s in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb] and len(la) == 2
    # it trained: the weights moved from the teacher's (same seed, same init) and the clean CE term was logged
    wt = _weights(teacher_run)
    assert any(not torch.equal(wa[k], wt[k]) for k in wa if k.startswith("backbone"))
    assert all(r["ce"] > 0 and r["triplet"] > 0 for r in la)


def test_selfmeta_needs_a_teacher_when_consistency_is_on(synth_root, tmp_path):
    with pytest.raises(ConfigError, match="teacher"):
        train("dd_demo", tmp_path / "r", overrides=tiny_overrides(synth_root, 1))
    assert not (tmp_path / "r").exists()  # refused before the run folder was touched
    with pytest.raises(ConfigError, match="neither a run directory"):
        train("dd_demo", tmp_path / "r", overrides=tiny_overrides(synth_root, 1) + ["adv.source_run=/nonexistent"])


# --------------------------------------------------------------------------------------------------- guards
def test_step_params_are_checked_before_any_data(tmp_path):
    cases = [("train.step=selfmeta", "train.step_params.tua=1", r"unknown parameter.*'tua'.*did you mean 'tau'"),
             ("train.step=selfmeta", "train.step_params.pool_test=[fna]", "disjoint"),
             ("train.step=fnes", "train.step_params.attack=fnaa", "unknown attack 'fnaa'"),
             ("train.step=fnes", "train.step_params.attack_params={pul: 1}", r"did you mean 'pull'"),
             ("train.step=fnes", "train.step_params.attack_params={eps: 1}", "use the step's eps"),
             ("train.step=metric_at", "train.step_params.margin=-1", "margin"),
             ("train.step=fnes", "train.step_params.tau=-0.5", "tau"),
             ("train.step=selfmeta", "train.step_params.split_ratio=1.5", "split_ratio"),
             ("train.step=fnes", "train.step_params.resampled=maybe", "resampled")]
    for step, bad, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            check_train_config("dd_demo_cpu", [step, bad])


def test_resampled_guard(synth_root, tmp_path):
    with pytest.raises(ConfigError, match=MANIFEST_NAME):
        train("dd_demo_fnes", tmp_path / "r", overrides=tiny_overrides(synth_root, 1)
              + ["train.step_params.resampled=true"])
    assert not (tmp_path / "r").exists()
    fake = tmp_path / "fake"
    fake.mkdir()
    check_resampled_root(fake, False, "fnes")
    (fake / MANIFEST_NAME).write_text(json.dumps({"complete": False}))
    with pytest.raises(ValueError, match="not a finished"):
        check_resampled_root(fake, True, "fnes")  # an interrupted resampling is not a dataset yet
    (fake / MANIFEST_NAME).write_text(json.dumps({"complete": True}))
    check_resampled_root(fake, True, "fnes")
    check_resampled_root(fake, None, "fnes")
    with pytest.raises(ValueError, match="resampled=false"):
        check_resampled_root(fake, False, "fnes")


def test_presets_select_their_steps():
    for name, (step, resampled) in PRESETS.items():
        cfg = check_train_config(name)
        assert cfg["train"]["step"] == step, name
        assert cfg["train"]["step_params"].get("resampled") == resampled, name
        assert cfg["model"]["name"] == "bot_r50" and cfg["train"]["step_params"]["eps"] == "8px", name
    full = load_config("dddefense")["train"]["step_params"]
    assert full["consistency_weight"] > 0 and set(full["pool_train"]).isdisjoint(full["pool_test"])
    for name in ("dd_demo_cpu", "dd_demo_metric_at", "dd_demo_goat", "dd_demo_fnes", "dd_demo"):
        cfg = check_train_config(name)
        assert cfg["model"]["name"] == "cnn4" and cfg["data"]["height"] == 64 and cfg["device"] == "cpu", name


# --------------------------------------------------------------------------------------------- demo / Phase I
def test_demo_config_rows_and_checks():
    for quick in (False, True):
        cfg = dddefense_demo_config(quick, 3, "cpu")
        assert tuple(cfg["models"]) == DEMO_ROWS and cfg["seed"] == 3
        for key, m in cfg["models"].items():
            check_train_config(m["config"], m.get("overrides"))
            want = {"synth": False, "balanced": True}[m["train_on"]]
            if "step_params.resampled" in " ".join(m.get("overrides") or []):
                assert f"train.step_params.resampled={str(want).lower()}" in m["overrides"], key
        check_resampled_spec("balanced", cfg["datasets"]["balanced"]["resampled"], cfg["datasets"])
    full, quick = dddefense_demo_config(False), dddefense_demo_config(True)
    assert quick["settings"]["max_images"] < full["settings"]["max_images"]
    assert set(quick["attacks"]) < set(full["attacks"]) and len(cells_of(quick)) < len(cells_of(full))
    bad = copy.deepcopy(cfg["datasets"])
    bad["balanced"]["resampled"]["resample"]["strenght"] = 0.5
    with pytest.raises(ValueError, match="did you mean 'strength'"):
        check_resampled_spec("balanced", bad["balanced"]["resampled"], bad)
    with pytest.raises(ValueError, match="from='nope'"):
        check_resampled_spec("balanced", {"from": "nope"}, bad)


def cells_of(cfg: dict) -> list:
    from advreid.experiments.grid import cells

    return cells(cfg)


@pytest.mark.parametrize("name", ["dddefense_demo", "market_dddefense", "duke_dddefense"])
def test_bench_presets_check(name):
    from advreid.config import read_yaml
    from advreid.experiments.grid import bench_dir, load_bench_config

    cfg = read_yaml(bench_dir() / f"{name}.yaml")
    rows = ["baseline", "metric-AT", "GOAT", "FNES", "resampled-FNES", "self-meta", "DDDefense"]
    assert [r for r in cfg["tables"][0]["rows"]] == rows and cfg["tables"][0]["per_identity"]
    for m in cfg["models"].values():  # every training recipe and its step parameters
        check_train_config(m["config"], m.get("overrides"))
    for key, d in cfg["datasets"].items():
        if d.get("resampled") is not None:
            check_resampled_spec(key, d["resampled"], cfg["datasets"])
    loaded = load_bench_config(name)  # the whole bench config: `resampled:` datasets, `init:` models
    assert len(cells_of(loaded)) > 50


MICRO = ["model.height=32", "model.width=16", "model.block_out_channels=[16,32]",
         "model.down_block_types=[DownBlock2D,DownBlock2D]", "model.up_block_types=[UpBlock2D,UpBlock2D]",
         "train.batch_size=16", "train.epochs=1", "data.num_workers=1", "sample.steps=4", "sample.batch_size=32"]


def test_resampled_dataset_trains_resamples_and_reuses(synth_root, tmp_path):
    spec = {"from": "synth", "generator": {"config": "diffusion_tiny", "overrides": MICRO},
            "resample": {"strength": 0.5, "per_camera": 1}}
    logs: list[str] = []
    data = resampled_dataset(spec, synth_root, tmp_path / "bal", device="cpu", seed=0, log=logs.append)
    manifest = json.loads((data / MANIFEST_NAME).read_text())
    src, new = build_dataset("market1501", synth_root), build_dataset("market1501", data)
    assert manifest["complete"] and manifest["summary"]["generated"] > 0
    assert len(new.train) == len(src.train) + manifest["summary"]["generated"]
    assert [r.pid for r in new.query] == [r.pid for r in src.query]
    check_resampled_root(data, True, "fnes")
    final = tmp_path / "bal" / "generator" / "checkpoints" / "final.safetensors"
    stamp = (final.stat().st_mtime_ns, (data / MANIFEST_NAME).stat().st_mtime_ns)
    logs.clear()
    assert resampled_dataset(spec, synth_root, tmp_path / "bal", device="cpu", seed=0, log=logs.append) == data
    assert logs == [] and stamp == (final.stat().st_mtime_ns, (data / MANIFEST_NAME).stat().st_mtime_ns)


def test_per_identity_of_cell_from_stored_ranks(tmp_path):
    # query pids 2,2,4,4,4,6; first-match ranks 0,3 | 0,0,-1 | 1 -> rank-1 per identity 50, 100 (the query
    # without a match is left out), 0 -> mean 50, variance (0 + 50^2 + 50^2) / 3
    query = [Record(f"q{i}.jpg", p, 0) for i, p in enumerate([2, 2, 4, 4, 4, 6])]
    (tmp_path / "cells").mkdir()
    pq = {"format": "advreid.per_query.v1", "first_match": [0, 3, 0, 0, -1, 1], "AP": [1] * 6, "INP": [1] * 6}
    (tmp_path / "cells" / "c.per_query.json").write_text(json.dumps({"clean": {"per_query": pq}}))
    cell = {"key": "c", "side": "query", "protocol": {"max_images": None}}
    s = per_identity_of_cell(cell, tmp_path, query)
    assert (s["num_ids"], s["num_queries"], s["mean"]) == (3, 5, 50.0)
    assert s["variance"] == pytest.approx(5000 / 3, abs=1e-9)
    # a max_images subset: evenly spaced queries 0, 2, 3, 5 -> pids 2, 4, 4, 6
    sub = {"format": "advreid.per_query.v1", "first_match": [1, 0, 2, 0], "AP": [1] * 4, "INP": [1] * 4}
    (tmp_path / "cells" / "d.per_query.json").write_text(json.dumps({"attacked": [{"per_query": sub}]}))
    s = per_identity_of_cell({"key": "d", "side": "query", "protocol": {"max_images": 4}}, tmp_path, query)
    assert (s["num_ids"], s["mean"]) == (3, 50.0) and s["variance"] == pytest.approx(5000 / 3, abs=1e-9)
    with pytest.raises(ValueError, match="per-query scores"):
        per_identity_of_cell({"key": "d", "side": "query", "protocol": {"max_images": 5}}, tmp_path, query)


def test_selfmeta_step_config_mirrors_the_meta_config():
    """``train.step_params`` of the selfmeta step is flat: every field of SelfMetaConfig (but the run's seed) and of
    FNESLoss must be a step parameter with the same default, so a field added to either cannot be silently dropped."""
    from dataclasses import MISSING, fields

    from advreid.defenses.dddefense import SelfMetaConfig

    step = {f.name: f for f in fields(SelfMetaStepConfig)}

    def default(f):
        return f.default_factory() if f.default is MISSING else f.default

    for f in fields(SelfMetaConfig):
        if f.name != "seed":
            assert f.name in step, f.name
            want = default(f)
            assert default(step[f.name]) == (list(want) if isinstance(want, tuple) else want), f.name
    loss = FNESLoss()
    for name in ("tau", "margin", "extension_margin", "triplet_weight", "extension_weight"):
        assert default(step[name]) == getattr(loss, name), name
    cfg = SelfMetaStepConfig(inner_lr=0.05, pool_train=["fna"], pool_test=["lta"]).meta_config(7)
    assert (cfg.inner_lr, cfg.pool_train, cfg.pool_test, cfg.seed) == (0.05, ("fna",), ("lta",), 7)
