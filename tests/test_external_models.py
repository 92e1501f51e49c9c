"""Bring your own model: ``KIND:NAME[@WEIGHTS]`` specs evaluated and attacked from the CLI, agreement with torchreid's
own evaluation, safe loading (a code-executing pickle never runs), a kind added from outside (docs/extending.md)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from advreid.cli import main
from advreid.models.external import MODEL_KINDS, ModelCard, load_model_spec, load_state

H, W = 64, 32  # the synthetic images' size (tests/conftest.py): no resize anywhere, so pipelines agree exactly


def _eval(capsys, *args: str) -> dict:
    """``advreid eval`` through the CLI; the one evaluation it appended to OUT/results.json."""
    argv = ["eval", *args]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 0, err
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "results.json").read_text())["evaluations"][-1]


def _attack(capsys, *args: str) -> dict:
    argv = ["attack", "--attack", "ifgsm", "--eps", "8px", "--alpha", "2px", "--steps", "2", "--max-images", "4",
            "--num-workers", "0", *args]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 0, err
    return json.loads((Path(argv[argv.index("--out") + 1]) / "results.json").read_text())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_attacked(res: dict, weights: Path, kind: str) -> None:
    assert res["model"]["kind"] == kind and res["model"]["weights_sha256"] == _sha(weights)
    run = res["runs"][0]
    assert run["attacked"]["num_valid_queries"] == 4 and 0 < run["linf_max"] <= 8 / 255 + 1e-6
    # the attack moved the features: the attacked mAP differs from the clean one on the same 4 queries
    assert run["attacked"]["mAP"] != run["clean"]["mAP"]


class TinyCNN(nn.Module):
    """A small conv net ending in a classifier, standing for a user's model."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# ------------------------------------------------------------------------------------------------ torchvision
def test_torchvision_spec_eval_and_attack(synth_root, tmp_path, capsys):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet18().eval()
    weights = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), weights)
    spec = f"torchvision:resnet18@{weights}"
    # the wrapper takes [0,1] images and normalises inside: same features as the hand-made pipeline
    model = load_model_spec(spec, ModelCard(input_size=(H, W)))
    x = torch.rand(3, 3, H, W)
    ref.fc = nn.Identity()
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)
    torch.testing.assert_close(model.features(x), ref((x - mean) / std))
    assert model.description["dropped_keys"] == ["fc.weight", "fc.bias"]
    assert model.gradcam_layer() is model.net.layer4  # the last block with a spatial output

    res = _eval(capsys, "--model", spec, "--data", str(synth_root), "--input-size", f"{H}x{W}", "--out",
                str(tmp_path / "ev"))
    assert res["model"]["weights_sha256"] == _sha(weights) and res["model"]["input_size"] == [H, W]
    assert res["model"]["normalization"]["mean"] == [0.485, 0.456, 0.406] and 0 < res["mAP"] <= 1
    att = _attack(capsys, "--model", spec, "--data", str(synth_root), "--input-size", f"{H}x{W}", "--out",
                  str(tmp_path / "at"))
    _check_attacked(att, weights, "torchvision")
    # a feature layer: layer3's map, average-pooled (256 channels)
    deep = load_model_spec(spec, ModelCard(input_size=(H, W), feature_layer="layer3"))
    assert deep.features(x).shape == (3, 256)


# ------------------------------------------------------------------------------------------------ torchscript
def test_torchscript_spec_eval_and_attack(synth_root, tmp_path, capsys):
    torch.manual_seed(1)
    net = TinyCNN().eval()
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.trace(net, torch.rand(1, 3, H, W)), str(path))
    (tmp_path / "tiny.pt.yaml").write_text("input_size: 64x32\nnorm: none\n")  # the card beside the file
    model = load_model_spec(f"torchscript:{path}")
    x = torch.rand(2, 3, H, W)
    torch.testing.assert_close(model.features(x), net(x))  # norm none: the file sees the [0,1] images
    assert model.description["card"] == str((tmp_path / "tiny.pt.yaml").resolve())
    with pytest.raises(ValueError, match="no Grad-CAM"):
        model.gradcam_layer()

    res = _eval(capsys, str(f"torchscript:{path}"), "--data", str(synth_root), "--out", str(tmp_path / "ev"))
    assert res["model"]["normalization"] == {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    att = _attack(capsys, "--model", f"torchscript:{path}", "--data", str(synth_root), "--out", str(tmp_path / "at"))
    _check_attacked(att, path, "torchscript")


# ------------------------------------------------------------------------------------------------ python factory
def test_python_factory_spec_eval_and_attack(synth_root, tmp_path, capsys, monkeypatch):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        "from torch import nn\n\n\ndef tiny():\n"
        "    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1))
    weights = tmp_path / "tiny_w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, weights)  # DataParallel
    spec = f"python:userpkg.nets:tiny@{weights}"
    model = load_model_spec(spec, ModelCard.from_dict({"input_size": "64x32", "norm": "none"}))
    x = torch.rand(2, 3, H, W)
    torch.testing.assert_close(model.features(x), net(x).mean(dim=(2, 3)))  # a feature map: pooled

    res = _eval(capsys, "--model", spec, "--data", str(synth_root), "--input-size", "64x32", "--input-norm", "none",
                "--metric", "euclidean", "--out", str(tmp_path / "ev"))
    assert res["protocol"]["metric"] == "euclidean" and res["model"]["kind"] == "python"
    att = _attack(capsys, "--model", spec, "--data", str(synth_root), "--input-size", "64x32", "--input-norm", "none",
                  "--out", str(tmp_path / "at"))
    _check_attacked(att, weights, "python")


def test_source_model_spec_transfer(synth_root, tmp_path, capsys):
    """--source-model takes a spec (its card beside its file): images crafted on one spec, scored on another."""
    torch.manual_seed(7)
    target, source = tmp_path / "target.pt", tmp_path / "source.pt"
    torch.save(TinyCNN().state_dict(), target)
    torch.jit.save(torch.jit.trace(TinyCNN().eval(), torch.rand(1, 3, H, W)), str(source))
    (tmp_path / "source.pt.yaml").write_text("input_size: [64, 32]\n")
    res = _attack(capsys, "--model", f"python:{Path(__file__).resolve()}:TinyCNN@{target}", "--input-size", "64x32",
                  "--source-model", f"torchscript:{source}", "--data", str(synth_root), "--out", str(tmp_path / "at"))
    assert res["threat"] == "transfer" and res["source_model"]["kind"] == "torchscript"
    assert res["source_model"]["weights_sha256"] == _sha(source) and res["model"]["weights_sha256"] == _sha(target)
    assert 0 < res["runs"][0]["linf_max"] <= 8 / 255 + 1e-6


# ------------------------------------------------------------------------------------------------ torchreid
def _torchreid_checkpoint(tmp_path: Path) -> tuple[nn.Module, Path]:
    """osnet_x0_25 saved by torchreid's own save_checkpoint, as its engine does (module. prefix, numpy rank1)."""
    torchreid = pytest.importorskip("torchreid", reason="torchreid not installed (pip install --no-deps torchreid)")
    torch.manual_seed(3)
    net = torchreid.models.build_model("osnet_x0_25", num_classes=12, loss="softmax", pretrained=False,
                                       use_gpu=False)
    with torch.no_grad():  # trained-looking BN statistics, so features are not those of a fresh init
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    state = {"state_dict": nn.DataParallel(net).state_dict(), "epoch": 3, "rank1": np.float32(0.5),
             "optimizer": opt.state_dict()}
    torchreid.utils.save_checkpoint(state, str(tmp_path / "log"))
    return net, tmp_path / "log" / "model.pth.tar-3"


def _torchreid_map(net: nn.Module, synth_root: Path, tmp_path: Path) -> float:
    """mAP by torchreid alone: its Market1501 parser, test transforms, engine-style extraction, evaluate_rank."""
    import torchreid

    (tmp_path / "tr").mkdir()
    os.symlink(synth_root, tmp_path / "tr" / "market1501")
    ds = torchreid.data.datasets.image.Market1501(root=str(tmp_path / "tr"), verbose=False)
    _, transform = torchreid.data.transforms.build_transforms(H, W, transforms=None)
    net.eval()

    def extract(records):  # torchreid Engine._feature_extraction, on its own loader's images
        feats, pids, cams = [], [], []
        for i in range(0, len(records), 32):
            chunk = records[i:i + 32]
            imgs = torch.stack([transform(torchreid.utils.read_image(r[0])) for r in chunk])
            with torch.no_grad():
                feats.append(net(imgs))
            pids += [r[1] for r in chunk]
            cams += [r[2] for r in chunk]
        return torch.cat(feats), np.asarray(pids), np.asarray(cams)

    qf, qp, qc = extract(ds.query)
    gf, gp, gc = extract(ds.gallery)
    dist = torchreid.metrics.compute_distance_matrix(qf, gf, "euclidean").numpy()  # the engine's default
    _, m_ap = torchreid.metrics.evaluate_rank(dist, qp, gp, qc, gc, use_metric_cuhk03=False)
    return float(m_ap)


def test_torchreid_checkpoint_matches_torchreids_own_map_and_attacks(synth_root, tmp_path, capsys):
    net, ckpt = _torchreid_checkpoint(tmp_path)  # (torchreid's own loader cannot read it back under torch >= 2.6:
    # torch.load's weights_only default refuses the numpy rank1 that advreid allows as plain data)
    spec = f"torchreid:osnet_x0_25@{ckpt}"
    model = load_model_spec(spec, ModelCard(input_size=(H, W)))
    assert model.description["dropped_keys"] == ["classifier.weight", "classifier.bias"]  # 12 classes vs 1
    assert model.gradcam_layer() is model.net.conv5
    expected = _torchreid_map(net, synth_root, tmp_path)

    res = _eval(capsys, "--model", spec, "--data", str(synth_root), "--input-size", f"{H}x{W}", "--out",
                str(tmp_path / "ev"))
    p = res["protocol"]
    assert (p["metric"], p["normalize"], p["flip"]) == ("euclidean", False, False)  # torchreid's test defaults
    assert res["mAP"] == pytest.approx(expected, abs=1e-6)
    assert 0.05 < expected < 0.95  # a non-trivial ranking, so agreement means something
    att = _attack(capsys, "--model", spec, "--data", str(synth_root), "--input-size", f"{H}x{W}", "--out",
                  str(tmp_path / "at"))
    _check_attacked(att, ckpt, "torchreid")


# ------------------------------------------------------------------------------------------------ fast-reid
FASTREID_R18 = """MODEL:
  META_ARCHITECTURE: Baseline
  BACKBONE: {NAME: build_resnet_backbone, DEPTH: 18x, LAST_STRIDE: 1, FEAT_DIM: 512, PRETRAIN: False, NORM: BN}
  HEADS: {NAME: EmbeddingHead, NORM: BN, NECK_FEAT: after, POOL_LAYER: GlobalAvgPool, CLS_LAYER: Linear,
          NUM_CLASSES: 12}
INPUT: {SIZE_TEST: [64, 32]}
TEST: {METRIC: cosine}
"""


def test_fastreid_config_and_checkpoint(synth_root, tmp_path, capsys):
    pytest.importorskip("fastreid", reason="fastreid not installed (pip install --no-deps fastreid)")
    from fastreid.utils.checkpoint import Checkpointer

    from advreid.models.external.fastreid import build_fastreid

    cfg_file = tmp_path / "r18.yml"
    cfg_file.write_text(FASTREID_R18)
    torch.manual_seed(4)
    net, _ = build_fastreid(cfg_file)
    (tmp_path / "out").mkdir()
    Checkpointer(net, str(tmp_path / "out")).save("model_final", iteration=10)  # fast-reid's own checkpointer
    weights = tmp_path / "out" / "model_final.pth"
    model = load_model_spec(f"fastreid:{cfg_file}@{weights}")
    assert tuple(model.input_size) == (H, W) and model.card.metric == "cosine"
    x = torch.rand(2, 3, H, W)
    torch.testing.assert_close(model.features(x), net.eval()(x * 255.0))  # fast-reid's forward on [0,255] images
    with pytest.raises(ValueError, match="normalises its input itself"):
        load_model_spec(f"fastreid:{cfg_file}@{weights}", ModelCard.from_dict({"norm": "imagenet"}))
    res = _eval(capsys, "--model", f"fastreid:{cfg_file}@{weights}", "--data", str(synth_root), "--out",
                str(tmp_path / "ev"))
    assert res["model"]["config_sha256"] == _sha(cfg_file) and "inside_model" in res["model"]["normalization"]


# ------------------------------------------------------------------------------------------------ safety, errors
class _Payload:
    """Unpickling this runs ``os.system`` (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_executing_pickle_is_refused_and_never_runs(synth_root, tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": TinyCNN().state_dict(), "extra": _Payload(marker)}, ckpt)
    code = main(["eval", "--model", f"python:{Path(__file__).resolve()}:TinyCNN@{ckpt}", "--data", str(synth_root),
                 "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "refused" in err and "posix.system" in err and str(ckpt) in err
    assert not marker.exists() and not (tmp_path / "ev").exists()
    torch.load(ckpt, weights_only=False)  # the payload is live: an unsafe load would have run it
    assert marker.exists()


def test_missing_and_unexpected_keys_are_one_line():
    net = TinyCNN()
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("body.0.")}
    state["head.extra.weight"] = torch.zeros(3)
    state["body.2.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError) as e:
        load_state(net, state, "w.pth")
    msg = str(e.value)
    assert "\n" not in msg and "2 missing: body.0.weight, body.0.bias" in msg and "1 unexpected: head.extra.weight" \
        in msg and "body.2.weight (1, 1, 1, 1) vs (32, 16, 3, 3)" in msg
    assert load_state(net, {**net.state_dict(), "classifier.weight": torch.zeros(9, 32)}, "w", ("classifier",)) \
        == ["classifier.weight"]  # a classifier of another size is dropped, not an error


@pytest.mark.parametrize(("argv", "needle"), [
    (["eval", "--data", "D"], "give the model once"),
    (["eval", "run", "--model", "torchvision:resnet18", "--data", "D"], "got both"),
    (["eval", "--model", "torchvison:resnet18", "--data", "D"], "did you mean 'torchvision'"),
    (["eval", "--model", "torchvision:resnet18", "--data", "D"], "give --out DIR"),
    (["attack", "--model", "torchvision:resnet18", "--data", "D", "--attack", "fgsm"], "give --out DIR"),
    (["eval", "--model", "torchvision:resnet18", "--data", "D", "--out", "O", "--input-size", "256by128"],
     "expected HEIGHTxWIDTH"),
    (["eval", "--model", "torchvision:resnet18", "--data", "D", "--out", "O", "--input-norm", "none",
      "--mean", "0,0,0"],
     "exclude each other"),
])
def test_spec_errors_are_one_line(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "O").exists()


# ------------------------------------------------------------------------------------------------ bench + report
def test_bench_spec_model_and_report_gradcam(synth_root, tmp_path):
    from advreid.experiments.bench import run_bench
    from advreid.experiments.report import build_report

    torch.manual_seed(5)
    weights = tmp_path / "tiny.pt"
    torch.save(TinyCNN().state_dict(), weights)
    spec = f"python:{Path(__file__).resolve()}:TinyCNN@{weights}"
    cfg = {"name": "byom", "seed": 0, "device": "cpu",
           "datasets": {"synth": {"name": "market1501", "root": str(synth_root)}},
           "models": {"mine": {"spec": spec, "input_size": [H, W], "norm": "none", "train_on": "synth"}},
           "attacks": {"clean": None, "ifgsm": {"name": "ifgsm", "eps": "8px", "alpha": "2px", "steps": 2}},
           "settings": {"rerank": False, "batch_size": 16, "num_workers": 0, "progress": False, "max_images": 6,
                        "report": False},
           "grid": [{"models": ["mine"], "attacks": ["clean", "ifgsm"]}],
           "tables": [{"name": "t", "kind": "attack", "dataset": "synth", "rows": ["mine"],
                       "columns": ["clean", "ifgsm"]}]}
    doc, out = run_bench(cfg, tmp_path / "b", progress=False)
    cells = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))
             if not p.name.endswith(".per_query.json")]
    assert cells and all(c["model"]["kind"] == "python" and c["model"]["weights_sha256"] == _sha(weights)
                         for c in cells)
    html = build_report(out, gradcam=True).read_text()
    assert re.search(r"Grad-CAM: model mine", html)
    bad = {**cfg, "attacks": {**cfg["attacks"], "dmr": {"name": "dmr", "generator": {"model": "mine"}}}}
    with pytest.raises(ValueError, match="a model spec: training from it needs a run folder"):
        run_bench(bad, tmp_path / "b2", progress=False)


# ------------------------------------------------------------------------------------------------ extending
def test_new_kind_from_outside_in_about_20_lines(synth_root, tmp_path, capsys):
    """The docs/extending.md example: a kind registered from outside, then used from the CLI."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "extending.md").read_text(encoding="utf-8")
    section = doc.split("## A new model kind", 1)[1]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    assert len(code.strip().splitlines()) <= 25
    ns: dict = {}
    exec(compile(code, "docs/extending.md", "exec"), ns)
    try:
        torch.manual_seed(6)
        weights = tmp_path / "lab.pt"
        torch.save(ns["TinyNet"](8).state_dict(), weights)
        res = _eval(capsys, "--model", f"lab:tiny-8@{weights}", "--data", str(synth_root), "--out",
                    str(tmp_path / "ev"))
        assert res["model"]["kind"] == "lab" and res["model"]["input_size"] == [H, W]
        assert res["model"]["weights_sha256"] == _sha(weights) and 0 < res["mAP"] <= 1
    finally:
        MODEL_KINDS.unregister("lab")
