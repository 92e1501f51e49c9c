"""Tests for advreid.models: backbones, pooling, heads, ReIDNet, presets, pretrained loading, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from torch import nn

from advreid.models import (
    IBN,
    CheckpointError,
    CheckpointMismatchError,
    GeM,
    PretrainedWeightsError,
    PretrainedWeightsNotFound,
    ReIDNet,
    build_backbone,
    build_model,
    build_pooling,
    checkpoint_paths,
    load_checkpoint,
    load_pretrained_backbone,
    read_checkpoint,
    save_checkpoint,
)


def _x(b: int = 4, h: int = 64, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def cnn4() -> ReIDNet:
    torch.manual_seed(0)
    return build_model("cnn4", num_classes=7)


# ------------------------------------------------------------------------------------------ forward API


def test_train_dict_and_eval_embedding_shapes(cnn4: ReIDNet) -> None:
    x = _x()
    out = cnn4.train()(x)
    assert set(out) == {"logits", "feat_before_bn", "feat_after_bn"}
    assert out["logits"].shape == (4, 7)
    assert out["feat_before_bn"].shape == out["feat_after_bn"].shape == (4, 128)
    emb = cnn4.eval()(x)
    assert isinstance(emb, torch.Tensor) and emb.shape == (4, cnn4.embed_dim) == (4, 128)
    assert not torch.allclose(emb.norm(dim=1), torch.ones(4))  # not L2-normalised by the model


def test_bottleneck_head_embedding_is_bn_output() -> None:
    torch.manual_seed(0)
    m = build_model("cnn4", 5, head="bottleneck", embed_dim=24, dropout=0.5)
    x = _x()
    out = m.train()(x)
    assert out["feat_before_bn"].shape == (4, 24) and out["logits"].shape == (4, 5)
    m.eval()
    manual = m.head.bn(m.head.fc(m.pool(m.backbone(m.normalize(x)))))
    torch.testing.assert_close(m(x), manual)


def test_feature_only_model_and_input_errors() -> None:
    m = build_model("cnn4", 0)
    out = m.train()(_x())
    assert out["logits"] is None and out["feat_after_bn"].shape == (4, 128)
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        m(torch.rand(3, 64, 32))
    with pytest.raises(ValueError, match="uint8"):
        m(torch.zeros(1, 3, 64, 32, dtype=torch.uint8))


@pytest.mark.parametrize("ls, expected", [(1, (4, 2)), (2, (2, 1))])
def test_resnet18_last_stride_changes_final_map(ls: int, expected: tuple[int, int]) -> None:
    bb = build_backbone("resnet18", last_stride=ls)
    assert bb.out_channels == 512
    assert tuple(bb(_x(1))[0, 0].shape) == expected


def test_normalisation_inside_out_of_place(cnn4: ReIDNet) -> None:
    x = _x()
    x0 = x.clone()
    cnn4.eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    manual = cnn4.head.bn(cnn4.pool(cnn4.backbone((x - mean) / std)))
    torch.testing.assert_close(cnn4(x), manual)
    assert torch.equal(x, x0)
    # without normalisation the output would differ
    assert not torch.allclose(cnn4(x), cnn4.head.bn(cnn4.pool(cnn4.backbone(x))), atol=1e-3)


@pytest.mark.parametrize("train", [False, True])
def test_gradient_reaches_leaf_input(cnn4: ReIDNet, train: bool) -> None:
    x = _x().requires_grad_(True)
    cnn4.train(train)
    out = cnn4(x)
    feat = out["feat_after_bn"] if train else out
    feat.pow(2).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_eval_forward_equals_features_and_neck_feat(cnn4: ReIDNet) -> None:
    x = _x()
    cnn4.eval()
    assert torch.equal(cnn4(x), cnn4.features(x))
    cnn4.train()
    torch.testing.assert_close(cnn4.features(x), cnn4(x)["feat_after_bn"])  # BN in batch mode both times
    m = build_model("cnn4", 3, neck_feat="before").eval()
    torch.testing.assert_close(m(x), m.pool(m.backbone(m.normalize(x))))


def test_channels_last_matches_contiguous(cnn4: ReIDNet) -> None:
    x = _x()
    cnn4.eval()
    ref = cnn4(x)
    cl = cnn4.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------ pooling and heads


def test_gem_pooling() -> None:
    x = torch.rand(2, 5, 4, 3) + 0.1
    torch.testing.assert_close(GeM(p=1.0)(x), x.mean(dim=(2, 3)))
    torch.testing.assert_close(build_pooling("gem")(x), x.pow(3).mean(dim=(2, 3)).pow(1 / 3))
    torch.testing.assert_close(build_pooling("max")(x), x.amax(dim=(2, 3)))
    torch.testing.assert_close(build_pooling("avg")(x), x.mean(dim=(2, 3)))
    g = build_pooling("gem_learnable")
    g(x).sum().backward()
    assert isinstance(g.p, nn.Parameter) and g.p.grad is not None and g.p.grad.abs() > 0
    assert not any(True for _ in build_pooling("gem").parameters())


def test_bnneck_bias_frozen_and_excluded_from_param_groups(cnn4: ReIDNet) -> None:
    bn = cnn4.head.bn
    assert not bn.bias.requires_grad and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert cnn4.head.classifier.bias is None
    assert 0.0005 < cnn4.head.classifier.weight.std() < 0.002
    groups = cnn4.param_groups(0.005, 0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [p for p in cnn4.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(id(p) for p in trainable)
    assert id(bn.bias) not in ids
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in cnn4.backbone.parameters()}
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    out = cnn4.train()(_x())
    F.cross_entropy(out["logits"], torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_ibn_a_replaces_bn1_in_layers_1_to_3() -> None:
    bb = build_backbone("resnet50_ibn_a", last_stride=1)
    for layer in (bb.layer1, bb.layer2, bb.layer3):
        for block in layer:
            assert isinstance(block.bn1, IBN)
            assert block.bn1.half == block.conv1.out_channels // 2
            assert isinstance(block.bn2, nn.BatchNorm2d)
    assert all(type(b.bn1) is nn.BatchNorm2d for b in bb.layer4)
    assert "layer1.0.bn1.IN.weight" in bb.state_dict() and "layer1.0.bn1.BN.running_mean" in bb.state_dict()
    assert tuple(bb(_x(1))[0, 0].shape) == (4, 2)  # bottleneck last_stride=1: 64x32 -> 4x2
    ibn = bb.layer1[0].bn1.eval()
    t = torch.randn(2, 64, 5, 5)
    manual = torch.cat([ibn.IN(t[:, :32]), ibn.BN(t[:, 32:])], 1)
    torch.testing.assert_close(ibn(t), manual)
    assert not torch.allclose(ibn(t)[:, 32:], F.instance_norm(t[:, 32:]), atol=1e-3)


def test_build_model_presets_and_errors() -> None:
    arch = build_model("cnn4", 3).arch_config()
    assert arch["backbone"] == "cnn4" and arch["head"] == "bnneck" and "pretrained" not in arch
    json.dumps(arch)
    m = build_model("resnet18", 3)
    assert m.arch_config()["last_stride"] == 1
    with pytest.raises(TypeError, match="heads"):
        build_model("cnn4", 3, heads="bnneck")
    with pytest.raises(KeyError, match="nope"):
        build_model("nope", 3)
    with pytest.raises(ValueError, match="native last_stride=2"):
        ReIDNet("densenet121", 3, last_stride=1)
    with pytest.raises(KeyError, match="pooling"):
        build_model("cnn4", 3, pooling="median")


# ---------------------------------------------------------------------------------------- pretrained


def test_pretrained_true_with_empty_hub_dir_raises(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(PretrainedWeightsNotFound) as ei:
        ReIDNet("resnet18", 3, pretrained=True)
    msg = str(ei.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path / "checkpoints") in msg
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg and "pretrained=PATH" in msg
    assert isinstance(ei.value, FileNotFoundError)
    with pytest.raises(PretrainedWeightsNotFound, match="resnet50_ibn_a-d9d0bb7b.pth"):
        load_pretrained_backbone(nn.Identity(), "resnet50_ibn_a", True)
    with pytest.raises(ValueError, match="cnn4"):
        ReIDNet("cnn4", 3, pretrained=True)
    # once the file is in the hub cache, pretrained=True loads it
    ref = torchvision.models.resnet18(weights=None)
    (tmp_path / "checkpoints").mkdir()
    torch.save(ref.state_dict(), tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    m = ReIDNet("resnet18", 3, pretrained=True)
    assert torch.equal(m.backbone.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)


def test_pretrained_path_loads_and_mismatch_errors(tmp_path) -> None:
    ref = torchvision.models.resnet18(weights=None)
    sd = {f"module.{k}": v for k, v in ref.state_dict().items()}  # DataParallel prefix, fc kept
    path = tmp_path / "r18.safetensors"
    save_file(sd, str(path))
    m = ReIDNet("resnet18", 3, last_stride=1, pretrained=path)
    for k, v in ref.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(m.backbone.state_dict()[k], v), k
    pth = tmp_path / "r18.pth"
    torch.save({"state_dict": ref.state_dict(), "epoch": 3}, pth)
    m2 = ReIDNet("resnet18", 3, pretrained=str(pth))
    assert torch.equal(m2.backbone.conv1.weight, ref.conv1.weight)
    broken = dict(ref.state_dict())
    del broken["layer4.1.conv2.weight"]
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(PretrainedWeightsError, match=r"1 missing .*layer4\.1\.conv2\.weight"):
        ReIDNet("resnet18", 3, pretrained=tmp_path / "broken.safetensors")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="junk.pth"):
        ReIDNet("resnet18", 3, pretrained=tmp_path / "junk.pth")


# ---------------------------------------------------------------------------------------- checkpoints


def _step(model: ReIDNet, opt: torch.optim.Optimizer, seed: int) -> None:
    x = _x(4, seed=seed)
    out = model.train()(x)
    loss = F.cross_entropy(out["logits"], torch.tensor([0, 1, 2, 3])) + out["feat_before_bn"].pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_checkpoint_round_trip_identical_outputs(cnn4: ReIDNet, tmp_path) -> None:
    opt = torch.optim.SGD(cnn4.parameters(), lr=0.1)
    _step(cnn4, opt, 1)  # move weights and BN running stats away from init
    ret = save_checkpoint(tmp_path / "ck", cnn4, meta={"epoch": 4, "metrics": {"mAP": 0.5}})
    weights, meta = checkpoint_paths(tmp_path / "ck")
    assert ret == meta and weights.is_file() and meta.suffix == ".json"
    doc = json.loads(meta.read_text())
    assert doc["format"] == "advreid-checkpoint" and doc["arch"]["class"] == "ReIDNet"
    loaded = load_checkpoint(tmp_path / "ck.safetensors")
    assert not loaded.training and loaded.checkpoint_meta["meta"]["epoch"] == 4
    assert loaded.arch_config() == cnn4.arch_config()
    x = _x(3, seed=9)
    assert torch.equal(loaded(x), cnn4.eval()(x))
    loaded.train()
    cnn4.train()
    assert torch.equal(loaded(x)["logits"], cnn4(x)["logits"])


def test_train_state_round_trip_resumes_adam_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    a = build_model("cnn4", 4)
    opt_a = torch.optim.Adam(a.param_groups(1e-3, 1e-2), weight_decay=5e-4)
    for s in range(2):
        _step(a, opt_a, s)
    rng = torch.get_rng_state()
    state = {"optimizer": opt_a.state_dict(), "rng": rng, "epoch": 2, "np": np.arange(5, dtype=np.uint32),
             "pair": (1, [2.5, None]), "__odd__": {"k": True}}
    save_checkpoint(tmp_path / "run" / "last", a, meta={"epoch": 2}, train_state=state)
    _step(a, opt_a, 2)

    state_dict, doc, ts = read_checkpoint(tmp_path / "run" / "last.json")
    b = load_checkpoint(tmp_path / "run" / "last")
    opt_b = torch.optim.Adam(b.param_groups(1e-3, 1e-2), weight_decay=5e-4)
    assert set(ts["optimizer"]["state"]) == set(opt_a.state_dict()["state"])  # int keys restored
    assert all(isinstance(k, int) for k in ts["optimizer"]["state"])
    assert isinstance(ts["optimizer"]["param_groups"][0]["betas"], tuple)
    assert torch.equal(ts["rng"], rng) and ts["rng"].dtype == torch.uint8
    assert isinstance(ts["np"], np.ndarray) and ts["np"].dtype == np.uint32
    assert ts["np"].tolist() == [0, 1, 2, 3, 4]
    assert ts["pair"] == (1, [2.5, None]) and ts["__odd__"] == {"k": True} and ts["epoch"] == 2
    opt_b.load_state_dict(ts["optimizer"])
    _step(b, opt_b, 2)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), n


def test_expect_arch_mismatch_lists_keys(cnn4: ReIDNet, tmp_path) -> None:
    save_checkpoint(tmp_path / "ck", cnn4)
    load_checkpoint(tmp_path / "ck", expect_arch=cnn4.arch_config())  # equal: fine
    with pytest.raises(CheckpointMismatchError) as ei:
        expect = {"backbone": "resnet18", "num_classes": 5, "head": "bnneck"}
        load_checkpoint(tmp_path / "ck", expect_arch=expect)
    msg = str(ei.value)
    assert "backbone: expected 'resnet18', found 'cnn4'" in msg and "num_classes: expected 5, found 7" in msg
    assert msg.count(": expected ") == 2  # the matching "head" is not listed


def test_weight_mismatch_and_corrupt_files(cnn4: ReIDNet, tmp_path) -> None:
    meta = save_checkpoint(tmp_path / "ck", cnn4)
    doc = json.loads(meta.read_text())
    doc["arch"]["num_classes"] = 9
    meta.write_text(json.dumps(doc))
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch.*head\.classifier\.weight"):
        load_checkpoint(tmp_path / "ck")

    save_checkpoint(tmp_path / "bad", cnn4)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*not a valid safetensors"):
        load_checkpoint(tmp_path / "bad")

    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match=r"other\.json.*not an advreid checkpoint"):
        read_checkpoint(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        load_checkpoint(tmp_path / "missing")

    # weights from a different save paired with this json: detected by the checkpoint id
    save_checkpoint(tmp_path / "p1", cnn4)
    save_checkpoint(tmp_path / "p2", cnn4)
    (tmp_path / "p2.safetensors").replace(tmp_path / "p1.safetensors")
    with pytest.raises(CheckpointError, match="different saves"):
        load_checkpoint(tmp_path / "p1")


def test_train_state_rejects_unsupported_values(cnn4: ReIDNet, tmp_path) -> None:
    with pytest.raises(TypeError, match=r"train_state\['bad'\]"):
        save_checkpoint(tmp_path / "ck", cnn4, train_state={"bad": object()})
    assert not (tmp_path / "ck.json").exists() and not (tmp_path / "ck.safetensors").exists()
