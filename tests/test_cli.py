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
    """The README's main command, quick mode: synthetic data -> baseline + JAD models -> 4 attacks, non-adaptive and
    adaptive -> table, results, rank-list picture (about 2 minutes)."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    for word in ("threat model", "non-adaptive", "adaptive", "white-box", "no attack", "ifgsm_seed", "lta",
                 "jad+cs + RK", "DMR", "transfer"):
        assert word in printed
    doc = json.loads((out / "results.json").read_text())
    assert doc["complete"] and len(doc["cells"]) == 28 + 10  # + the black-box table: noise, DMR, transfer
    cells = {tuple(c["cell"].values()): c for c in doc["cells"]}
    for model in ("baseline", "jad"):
        metrics = (out / "models" / model / "metrics.jsonl").read_text().splitlines()
        assert len(metrics) == 8
        clean = cells[(model, "synth", "none", "clean", "clean")]["clean"]
        assert clean["num_valid_queries"] == 60
        for attack in ("ifgsm_seed", "sma", "fna", "lta"):
            run = cells[(model, "synth", "none", attack, "white_box")]["runs"][0]
            assert run["clean"] == clean and run["linf_max"] <= 5 / 255 + 1e-6
            assert run["attacked"]["mAP"] < clean["mAP"]  # white-box attacks hurt the bare model
            for threat in ("non_adaptive", "adaptive"):
                c = cells[(model, "synth", "cs", attack, threat)]
                assert c["threat"] == threat and c["defense"]["name"] == "cs"
    import yaml

    assert yaml.safe_load((out / "models" / "jad" / "config.yaml").read_text())["defense"]["proactive"] == "reference"
    assert yaml.safe_load((out / "models" / "baseline" / "config.yaml").read_text())["defense"]["proactive"] is None
    rl = json.loads((out / "ranklist" / "ranklist.json").read_text())
    assert [r["label"] for r in rl["rows"]] == ["clean", "attacked (LTA)", "attacked, JAD"]
    assert all(len(r["gallery"]) == 10 for r in rl["rows"])
    png = (out / "ranklist.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert (out / "tables" / "robustness.md").is_file() and (out / "tables" / "robustness.csv").is_file()
    # the black-box table: DMR's generator was trained against the baseline; it transfers to JAD
    dmr_b, dmr_j = cells[("baseline", "synth", "none", "dmr", "white_box")], cells[("jad", "synth", "none", "dmr",
                                                                                      "transfer")]
    assert dmr_b["runs"][0]["linf_max"] <= 16 / 255 + 1e-6 and dmr_j["transfer"] and not dmr_b["transfer"]
    assert (out / "generators" / "dmr" / "results.json").is_file()
    lt = cells[("jad", "synth", "none", "lta_transfer", "transfer")]
    assert lt["transfer"] is True and lt["threat"] == "transfer"
    # paired comparisons and the report
    assert any(c["what"].startswith("non-adaptive - adaptive") for c in doc["comparisons"])
    assert (out / "report.html").is_file() and (out / "tables" / "comparisons.md").is_file()


@pytest.mark.slow
def test_dddefense_demo_quick_end_to_end(tmp_path, capsys):
    """``advreid demo dddefense --quick`` (the README's second demo, about 2 minutes on one thread): biased synthetic
    data -> diffusion generator -> resampled dataset -> seven training recipes -> attacks, transfer, cross-dataset
    -> the summary table with a per-identity variance column; a second call with --resume recomputes nothing."""
    out = tmp_path / "dd"
    assert main(["demo", "dddefense", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = ["baseline", "metric-AT", "GOAT", "FNES", "resampled-FNES", "self-meta", "DDDefense"]
    for word in rows + ["per-ID var, clean", "per-ID var, pgd", "pgd_l2", "transfer", "clean on other"]:
        assert f"| {word} " in printed or f"| {word}" in printed, word
    doc = json.loads((out / "results.json").read_text())
    assert doc["complete"] and len(doc["cells"]) == 49
    cells = {tuple(c["cell"].values()): c for c in doc["cells"]}
    import yaml

    steps = {"baseline": "standard", "metric-AT": "metric_at", "FNES": "fnes", "resampled-FNES": "fnes",
             "self-meta": "selfmeta", "DDDefense": "selfmeta"}
    manifest = json.loads((out / "data" / "balanced" / "data" / "resample_manifest.json").read_text())
    assert manifest["complete"] and manifest["summary"]["generated"] > 0
    for row in rows:
        cfg = yaml.safe_load((out / "models" / row / "config.yaml").read_text())
        if row in steps:
            assert cfg["train"]["step"] == steps[row], row
        on_resampled = cfg["data"]["root"] == str(out / "data" / "balanced" / "data")
        assert on_resampled == (row in ("resampled-FNES", "DDDefense")), row
        clean = cells[(row, "synth", "none", "clean", "clean")]
        assert clean["clean"]["num_valid_queries"] == 60
        pgd = cells[(row, "synth", "none", "pgd", "white_box")]
        assert pgd["runs"][0]["linf_max"] <= 8 / 255 + 1e-6
        var = pgd["per_identity"]
        assert var["variance"] == pytest.approx(var["std"] ** 2) and var["num_queries"] == 60
    assert cells[("GOAT", "synth", "none", "pgd", "white_box")]
    assert (out / "tables" / "dddefense_summary.md").read_text().startswith("### DDDefense demo (quick)")
    stamp = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")}
    assert len(stamp) >= 49
    assert main(["demo", "dddefense", "--quick", "--out", str(out), "--resume"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")} == stamp
