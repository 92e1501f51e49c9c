import json

import pytest
from tests.conftest import tiny_overrides

from advreid.cli import main


@pytest.fixture(scope="module")
def trained_run(synth_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--config", "bot_r50", "--out", str(run), *tiny_overrides(synth_root, epochs=2)]) == 0
    return run


def test_eval_prints_and_saves(trained_run, synth_root, capsys):
    assert main(["eval", str(trained_run), "--data", str(synth_root), "--rerank", "--ap", "official"]) == 0
    out = capsys.readouterr().out
    assert "R1" in out and "re-ranked" in out
    res = json.loads((trained_run / "results.json").read_text())["evaluations"][-1]
    for k in ("rank1", "rank5", "rank10", "mAP", "mINP", "rr_rank1", "rr_mAP"):
        assert 0.0 <= res[k] <= 1.0
    assert res["protocol"]["ap"] == "official" and res["protocol"]["rerank"] is True
    assert res["cross_domain"] is False


def test_cross_domain_eval(trained_run, tmp_path, capsys):
    from advreid.data import generate_synthetic

    other = generate_synthetic(tmp_path / "other", num_train_ids=4, num_test_ids=6, num_cams=4, height=64,
                               width=32, num_distractors=2, num_junk=1, seed=7)
    assert main(["eval", str(trained_run), "--data", str(other), "--dataset", "market1501"]) == 0
    res = json.loads((trained_run / "results.json").read_text())["evaluations"][-1]
    assert res["cross_domain"] is True and res["data_root"] == str(other)


def test_data_info_and_errors(synth_root, tmp_path, capsys):
    assert main(["data", "info", str(synth_root)]) == 0
    out = capsys.readouterr().out
    assert "query" in out and "gallery" in out and "train" in out
    assert main(["data", "info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("advreid: error:") and "missing" in err
    assert main(["train", "--out", str(tmp_path / "r"), "--data", str(synth_root), "optim.lrr=1"]) == 2
    assert "did you mean optim.lr" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())
    assert main(["eval", str(tmp_path / "nope"), "--data", str(synth_root)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_synth_refuses_to_overwrite(tmp_path, capsys):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    assert main(["synth", "--out", str(target), "--ids", "4", "--cams", "2"]) == 2
    assert (target / "notes.txt").read_text() == "precious"


def test_truncated_training_image_named_or_skipped(synth_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(synth_root, root)
    victim = sorted((root / "bounding_box_train").glob("*.jpg"))[3]
    victim.write_bytes(victim.read_bytes()[:200])
    ov = tiny_overrides(root, epochs=1)
    assert main(["train", "--out", str(tmp_path / "r1"), *ov]) == 2
    assert victim.name in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r2"), "--skip-bad-images", *ov]) == 0
    assert "skipped 1 unreadable training image" in capsys.readouterr().out
    assert main(["data", "info", str(root), "--check-images"]) == 1
    out = capsys.readouterr().out
    assert victim.name in out and "1 unreadable" in out


def test_demo_refuses_existing_folder(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["demo", "--out", str(out), "--quick"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "keep"


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    """The README's main command, quick mode: synthetic data -> training -> evaluation table (about 40 s)."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "re-ranked" in printed and "R1" in printed
    res = json.loads((out / "run" / "results.json").read_text())["evaluations"][-1]
    # 100 test identities: chance rank-1 is about 1%; 10 CPU epochs reach well above it, far below 100%
    assert 0.08 < res["rank1"] < 0.9 and 0.05 < res["mAP"] < 0.9
    assert res["protocol"]["num_query"] > 300 and res["rr_mAP"] > 0.05
    metrics = (out / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 10
    assert json.loads(metrics[-1])["loss"] < json.loads(metrics[0])["loss"]
