"""The attack runner: ``advreid attack`` and ``advreid.evaluation.robustness`` on tiny trained CNNs.

The victim is trained on a purpose-built Market-format set of near-identical identities (a shared block pattern
plus a small per-identity change, camera brightness and pixel noise): a cnn4 reaches mAP ~0.9 there in about a
second, with decision margins small enough for 5/255 to matter, as in real ReID. (On the tiny ``synth_root`` a
seconds-long model sits near chance, mAP ~0.27, so no attack can show an effect; LTA even raised its mAP.)
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tests.conftest import tiny_overrides

from advreid.cli import main

EPS = 5 / 255
# every attack family at 5px, few steps to stay fast
ATTACKS = ["fgsm", "ifgsm", "mifgsm", "pgd", "sma", "fna", "fna_pull", "odfa", "lta", "lta_star"]


def write_blocks_dataset(root, *, n_train=12, n_test=8, cams=3, per_cam=4, spread=0.1, noise=0.1, seed=0):
    """Market-format folder: identity = a shared 8x4 colour-block pattern + ``spread`` x N(0,1) per block."""
    rng = np.random.default_rng(seed)
    base = rng.random((8, 4, 3))
    for sub in ("bounding_box_train", "bounding_box_test", "query"):
        (root / sub).mkdir(parents=True)
    for k in range(n_train + n_test):
        pid = 2 * k + 1 if k < n_train else 2 * (k - n_train) + 2  # train odd, test even (disjoint)
        proto = (base + spread * rng.normal(size=base.shape)).clip(0, 1)
        for c in range(cams):
            for j in range(per_cam):
                x = np.kron(proto, np.ones((8, 8, 1))) * (0.85 + 0.1 * c) + rng.normal(0, noise, (64, 32, 3))
                sub = "bounding_box_train" if k < n_train else ("query" if j == 0 else "bounding_box_test")
                img = Image.fromarray((x.clip(0, 1) * 255).round().astype(np.uint8))
                img.save(root / sub / f"{pid:04d}_c{c + 1}s1_{j:06d}_00.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_blocks_dataset(tmp_path_factory.mktemp("blocks") / "market")


@pytest.fixture(scope="module")
def runs(data_root, tmp_path_factory):
    """Two tiny runs on the same data (different seeds): the victim and a source model for transfer."""
    base = tmp_path_factory.mktemp("atk")
    out = {}
    for name, seed in (("victim", 0), ("source", 1)):
        run = base / name
        assert main(["train", "--config", "bot_r50", "--out", str(run), *tiny_overrides(data_root, epochs=8),
                     "sched.milestones=[100]", "optim.lr=0.003", f"seed={seed}"]) == 0
        out[name] = run
    return out


def _attack(run, data_root, out, *extra) -> dict:
    argv = ["attack", str(run), "--data", str(data_root), "--out", str(out), "--device", "cpu",
            "--num-workers", "0", *extra]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def noise_result(runs, data_root, tmp_path_factory):
    return _attack(runs["victim"], data_root, tmp_path_factory.mktemp("noise") / "o", "--attack", "noise",
                   "--eps", "5px")


@pytest.mark.parametrize("name", ATTACKS)
def test_attack_beats_noise(name, runs, data_root, noise_result, tmp_path, capsys):
    res = _attack(runs["victim"], data_root, tmp_path / "o", "--attack", name, "--eps", "5px", "--steps", "5")
    assert res["complete"] is True and res["attack"]["name"] == name and res["side"] == "query"
    (r,), (n,) = res["runs"], noise_result["runs"]
    assert r["clean"]["mAP"] == pytest.approx(n["clean"]["mAP"])  # same victim, same clean protocol
    clean = r["clean"]["mAP"]
    drop, noise_drop = clean - r["attacked"]["mAP"], clean - n["attacked"]["mAP"]
    assert clean > 0.8 and abs(noise_drop) < 0.01, (clean, noise_drop)
    assert drop > 0.08, (name, clean, r["attacked"]["mAP"], noise_drop)  # 0.13 to 0.75 measured; noise ~0.001
    assert 0 < r["linf_max"] <= EPS + 1e-6 and r["linf_mean"] <= r["linf_max"] and r["l2_mean"] > 0
    assert r["num_attacked"] == res["protocol"]["num_query"] and r["time_per_image_s"] > 0
    assert res["model"]["arch"]["backbone"] == "cnn4" and res["dataset"]["name"] == "market1501"
    assert res["protocol"]["metric"] == "cosine" and res["finalize"] == {"quantize": None, "reencode": None}
    printed = capsys.readouterr().out
    assert "clean" in printed and f"{name} 5px" in printed and "mAP" in printed


def test_gallery_side_and_rerank(runs, data_root, tmp_path):
    res = _attack(runs["victim"], data_root, tmp_path / "o", "--attack", "ifgsm", "--side", "gallery", "--steps",
                  "5", "--rerank")
    (r,) = res["runs"]
    # ifgsm states gallery guides for a query attack; on the gallery side the queries guide it (Bai's setting)
    assert res["side"] == "gallery" and res["guides"]["source"] == "query" and r["params"]["side"] == "gallery"
    assert r["num_attacked"] == res["protocol"]["num_gallery"]
    assert r["attacked"]["mAP"] < r["clean"]["mAP"] - 0.1
    assert 0 <= r["attacked"]["rr_mAP"] < r["clean"]["rr_mAP"] - 0.1


def test_gallery_preset_defaults_to_its_side(runs, data_root, tmp_path):
    res = _attack(runs["victim"], data_root, tmp_path / "o", "--attack", "ifgsm_bai", "--param", "momentum=0.5")
    assert res["side"] == "gallery" and res["guides"]["source"] == "query"
    assert res["attack"]["params"]["momentum"] == 0.5 and res["attack"]["extra_params"] == {"momentum": 0.5}
    assert res["runs"][0]["attacked"]["mAP"] < res["runs"][0]["clean"]["mAP"] - 0.1


def test_sweep_one_entry_per_eps_and_monotone(runs, data_root, tmp_path):
    res = _attack(runs["victim"], data_root, tmp_path / "o", "--attack", "ifgsm", "--sweep-eps", "1px,4px,8px",
                  "--steps", "5", "--alpha", "1px")
    assert [round(r["eps_px"], 6) for r in res["runs"]] == [1, 4, 8]
    maps = [r["attacked"]["mAP"] for r in res["runs"]]
    assert maps[2] < maps[0] - 0.1, maps
    assert all(r["linf_max"] <= r["eps"] + 1e-6 for r in res["runs"])


def test_default_out_dir_refused_then_overwritten(runs, data_root, capsys):
    argv = ["attack", str(runs["victim"]), "--data", str(data_root), "--attack", "fgsm", "--max-images", "6",
            "--num-workers", "0"]
    assert main(argv) == 0
    out = runs["victim"] / "attacks" / "fgsm-query"
    res = json.loads((out / "results.json").read_text())
    assert res["runs"][0]["num_attacked"] == 6 and res["protocol"]["num_query"] == 6
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert main([*argv, "--overwrite"]) == 0
    assert (out.parent / "fgsm-query.old-1" / "results.json").is_file()


def test_bad_eps_and_unknown_attack(runs, data_root, tmp_path, capsys):
    base = ["attack", str(runs["victim"]), "--data", str(data_root), "--out", str(tmp_path / "o")]
    assert main([*base, "--attack", "ifgsm", "--eps", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--eps" in err and "5px" in err
    assert main([*base, "--attack", "ifgsm", "--sweep-eps", "1,8"]) == 2
    assert "1px,8px" in capsys.readouterr().err
    assert main([*base, "--attack", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "nosuch" in err and "ifgsm" in err and "lta" in err
    assert main([*base, "--attack", "mifgsm", "--param", "momentun=0.5"]) == 2
    assert "did you mean 'momentum'" in capsys.readouterr().err
    assert main([*base, "--attack", "ifgsm", "--reencode", "jpeg:200"]) == 2
    assert "--reencode" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing created for a bad command line


def test_seed_compat_saves_jpeg(runs, data_root, tmp_path):
    adv = tmp_path / "adv"
    res = _attack(runs["victim"], data_root, tmp_path / "o", "--attack", "ifgsm", "--steps", "3",
                  "--seed-compat", "--save-adv", str(adv), "--max-images", "5")
    assert res["seed_compat"] is True and res["finalize"] == {"quantize": "floor", "reencode": "jpeg:75"}
    files = sorted(adv.iterdir())
    assert len(files) == 5
    query_stems = {p.stem for p in (data_root / "query").iterdir()}
    for f in files:
        assert f.stem in query_stems
        with Image.open(f) as im:
            assert im.format == "JPEG"


def test_save_adv_png_round_trip(runs, data_root, tmp_path):
    from advreid.attacks import build
    from advreid.data import build_dataset
    from advreid.evaluation import EvalProtocol, RunOptions, attack_dataset, build_guide_bank
    from advreid.models import load_checkpoint

    model = load_checkpoint(runs["victim"] / "checkpoints" / "final")
    p = EvalProtocol.of_model(model)
    ds = build_dataset("market1501", data_root)
    query = ds.query[:7]
    bank = build_guide_bank(model, ds.gallery, "gallery", protocol=p)
    atk = build("ifgsm", model, eps=EPS, steps=3, seed=0)
    out = attack_dataset(atk, query, model, protocol=p, guides=bank, save_dir=tmp_path / "png",
                         options=RunOptions(batch_size=4, device="cpu", keep_images=True))
    assert out.num_images == 7 and out.images.shape == (7, 3, p.height, p.width)
    for rec, img in zip(query, out.images, strict=True):
        f = tmp_path / "png" / (rec.path.rsplit("/", 1)[-1].rsplit(".", 1)[0] + ".png")
        with Image.open(f) as im:
            assert im.format == "PNG"
            back = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
        back = back.view(p.height, p.width, 3).permute(2, 0, 1).float() / 255
        assert (back - img).abs().max() <= 1 / 255 + 1e-6


def test_batching_does_not_change_results(runs, data_root):
    from advreid.data import build_dataset
    from advreid.evaluation import AttackSpec, EvalProtocol, RunOptions, evaluate_attack
    from advreid.models import load_checkpoint

    model = load_checkpoint(runs["victim"] / "checkpoints" / "final")
    p = EvalProtocol.of_model(model, max_images=9)
    ds = build_dataset("market1501", data_root)
    spec = AttackSpec("pgd", eps=EPS, steps=3, seed=3)
    a, b = (evaluate_attack(model, ds.query, ds.gallery, spec, protocol=p,
                            options=RunOptions(batch_size=bs, device="cpu", keep_images=True)) for bs in (2, 9))
    assert torch.allclose(a["images"][0], b["images"][0], atol=1e-5)
    assert a["runs"][0]["attacked"]["mAP"] == pytest.approx(b["runs"][0]["attacked"]["mAP"])


def test_transfer_records_both_runs(runs, data_root, tmp_path):
    res = _attack(runs["victim"], data_root, tmp_path / "o", "--attack", "ifgsm", "--steps", "5",
                  "--source-model", str(runs["source"]))
    assert res["transfer"] is True
    assert res["model"]["run_dir"] == str(runs["victim"]) and res["source_model"]["run_dir"] == str(runs["source"])
    white = _attack(runs["victim"], data_root, tmp_path / "w", "--attack", "ifgsm", "--steps", "5")
    (t,), (w,) = res["runs"], white["runs"]
    assert t["clean"]["mAP"] == pytest.approx(w["clean"]["mAP"])
    # transfer hurts the victim, but less than the white-box attack on the victim itself
    assert w["attacked"]["mAP"] < t["attacked"]["mAP"] < t["clean"]["mAP"]


def test_interrupt_leaves_complete_partial_results(runs, data_root, tmp_path, monkeypatch):
    import advreid.evaluation.robustness as rob

    real = rob.attack_dataset
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(rob, "attack_dataset", flaky)
    out = tmp_path / "o"
    rc = main(["attack", str(runs["victim"]), "--data", str(data_root), "--out", str(out), "--attack", "fgsm",
               "--sweep-eps", "2px,4px", "--num-workers", "0"])
    assert rc == 130
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] is False and len(res["runs"]) == 1 and res["runs"][0]["eps_px"] == pytest.approx(2)
    # no temp file left; the finished batches stay under shards/ for --resume
    assert sorted(p.name for p in out.iterdir()) == ["per_query.json", "results.json", "shards"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_defense_non_adaptive_vs_adaptive(runs, data_root, tmp_path, capsys):
    """CS in front of the model: the non-adaptive attack (seed setting) is blunted; the adaptive one, which
    differentiates through CS, is stronger -- what a robustness table has to show."""
    common = ("--attack", "ifgsm", "--eps", "5px", "--steps", "10", "--defense", "cs")
    na = _attack(runs["victim"], data_root, tmp_path / "na", *common)
    ad = _attack(runs["victim"], data_root, tmp_path / "ad", *common, "--adaptive")
    bare = _attack(runs["victim"], data_root, tmp_path / "bare", "--attack", "ifgsm", "--eps", "5px", "--steps", "10")
    assert na["threat"] == "non_adaptive" and ad["threat"] == "adaptive" and bare["threat"] == "white_box"
    assert na["defense"]["name"] == "cs" and bare["defense"] is None
    assert "non-adaptive attacker" in capsys.readouterr().out
    (n,), (a,), (b,) = na["runs"], ad["runs"], bare["runs"]
    assert n["clean"] == a["clean"]  # same defended clean protocol
    assert abs(n["clean"]["mAP"] - b["clean"]["mAP"]) < 0.05  # CS keeps clean accuracy
    assert max(n["linf_max"], a["linf_max"]) <= 5 / 255 + 1e-6
    assert a["attacked"]["mAP"] < n["attacked"]["mAP"]


def test_adaptive_needs_a_defense(runs, data_root, tmp_path, capsys):
    argv = ["attack", str(runs["victim"]), "--data", str(data_root), "--out", str(tmp_path / "o"), "--attack", "sma",
            "--adaptive", "--device", "cpu"]
    assert main(argv) == 2
    assert "--defense" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_eval_applies_the_runs_passive_defense(data_root, tmp_path, capsys):
    run = tmp_path / "jad"
    assert main(["train", "--config", "bot_r50", "--out", str(run), *tiny_overrides(data_root, epochs=1),
                 "defense.passive=cs"]) == 0
    assert main(["eval", str(run), "--data", str(data_root), "--device", "cpu"]) == 0
    assert main(["eval", str(run), "--data", str(data_root), "--device", "cpu", "--defense", "none"]) == 0
    assert ", defense cs" in capsys.readouterr().out
    evals = json.loads((run / "results.json").read_text())["evaluations"]
    assert evals[0]["defense"]["name"] == "cs" and evals[1]["defense"] is None
    assert evals[0]["mAP"] != evals[1]["mAP"]
