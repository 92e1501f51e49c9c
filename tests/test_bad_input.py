"""Clear errors on bad data: unreadable images (any DataLoader worker count, ``--skip-bad-images`` on every command
that reads test images, the in-training evaluation), ambiguous budgets, ``model.pretrained=PATH``, damaged result
files and output folders inside a dataset. "One line" = ``main`` returns 2 and stderr is one line naming the thing.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import tiny_overrides

from advreid.cli import main
from advreid.data import BadImageError, ImageDataset, build_dataset
from advreid.models import build_model
from advreid.models.features import extract_features
from advreid.ops import parse_eps, parse_eps_list


def quick(root, epochs: int) -> list[str]:
    """Seconds-long training: the tiny recipe, two steps per epoch (what is tested is not the model's quality)."""
    return [*tiny_overrides(root, epochs=epochs), "train.max_iters_per_epoch=2"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("advreid: error:") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def run(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "run"
    assert main(["train", "--config", "bot_r50", "--out", str(out), *quick(synth_root, 1)]) == 0
    return out


@pytest.fixture(scope="module")
def bad_root(synth_root, tmp_path_factory):
    """A copy of the synthetic set with a zero-byte query image and a truncated gallery image."""
    root = tmp_path_factory.mktemp("badroot") / "market"
    shutil.copytree(synth_root, root)
    q = sorted((root / "query").glob("*.jpg"))[2]
    q.write_bytes(b"")
    g = sorted((root / "bounding_box_test").glob("*.jpg"))[5]
    g.write_bytes(g.read_bytes()[:200])
    return root, q, g


# ---------------------------------------------------------------------------------------------- bad images
@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_is_the_same_one_line_error_in_any_worker(bad_root, workers):
    root, _, g = bad_root
    model = build_model("cnn4", 4, pretrained=False)
    with pytest.raises(BadImageError) as info:
        extract_features(model, ImageDataset(build_dataset("market1501", root).gallery), batch_size=8,
                         num_workers=workers)
    e = info.value
    assert e.path == str(g) and e.reason.startswith("OSError")  # the original error, not torch's wrapper
    assert str(e) == f"cannot load image {g}: {e.reason}" and "\n" not in str(e)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_eval_names_a_bad_image_then_skips_it(run, bad_root, capsys, workers):
    root, q, g = bad_root
    ds = build_dataset("market1501", root)
    assert main(["eval", str(run), "--data", str(root), "--num-workers", workers]) == 2
    err = one_line_error(capsys)
    assert (q.name in err or g.name in err) and "--skip-bad-images" in err
    assert main(["eval", str(run), "--data", str(root), "--num-workers", workers, "--skip-bad-images"]) == 0
    assert "skipped 2 unreadable image(s) (1 query, 1 gallery" in capsys.readouterr().out
    res = json.loads((run / "results.json").read_text())["evaluations"][-1]
    assert res["skipped_images"]["count"] == 2
    assert [b["path"] for b in res["skipped_images"]["query"]] == [str(q)]
    assert [b["path"] for b in res["skipped_images"]["gallery"]] == [str(g)]
    assert (res["protocol"]["num_query"], res["protocol"]["num_gallery"]) == (len(ds.query) - 1, len(ds.gallery) - 1)


def test_attack_names_a_bad_image_then_skips_it(run, bad_root, tmp_path, capsys):
    root, q, g = bad_root
    ds = build_dataset("market1501", root)
    base = ["attack", str(run), "--data", str(root), "--attack", "fgsm", "--num-workers", "2", "--max-images", "4"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 2
    err = one_line_error(capsys)
    assert (q.name in err or g.name in err) and "--skip-bad-images" in err
    assert main([*base, "--out", str(tmp_path / "b"), "--skip-bad-images"]) == 0
    assert "skipped 2 unreadable image(s) (1 query, 1 gallery" in capsys.readouterr().out
    doc = json.loads((tmp_path / "b" / "results.json").read_text())
    assert doc["skipped_images"]["count"] == 2 and doc["skipped_images"]["gallery"][0]["path"] == str(g)
    assert doc["protocol"]["num_gallery"] == len(ds.gallery) - 1


def test_in_training_evaluation_skips_bad_test_images(bad_root, tmp_path, capsys):
    root, q, g = bad_root
    argv = ["train", "--config", "bot_r50", *quick(root, 2), "train.eval_every=1"]
    assert main([*argv, "--out", str(tmp_path / "r1")]) == 2  # named before any epoch is spent
    err = one_line_error(capsys)
    assert q.name in err or g.name in err
    assert not (tmp_path / "r1" / "checkpoints").exists()
    assert main([*argv, "--out", str(tmp_path / "r2"), "--skip-bad-images"]) == 0
    assert "skipped 2 unreadable test image(s)" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "r2" / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= rows[0]["eval"]["mAP"] <= 1.0 and "eval" not in rows[1]  # the final evaluation is the caller's


def test_failed_in_training_evaluation_keeps_the_epoch(synth_root, tmp_path, capsys):
    """A test image that goes bad during training: the evaluation is a warning, the epoch and the run are kept."""
    from advreid.engine import HookBase
    from advreid.experiments import train

    root = tmp_path / "market"
    shutil.copytree(synth_root, root)
    victim = Path(build_dataset("market1501", root).gallery[0].path)

    class Corrupt(HookBase):
        def after_epoch(self) -> None:
            victim.write_bytes(b"")

    run_dir = tmp_path / "r"
    res = train("bot_r50", run_dir, overrides=[*quick(root, 2), "train.eval_every=1"],
                hooks=[Corrupt()])
    assert res.epochs == 2 and (run_dir / "checkpoints" / "final.safetensors").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and victim.name in rows[0]["eval_error"]
    err = capsys.readouterr().err
    assert "warning" in err and victim.name in err


# ------------------------------------------------------------------------------------------------ budgets
@pytest.mark.parametrize("bad", ["1", 1, np.int64(1), " 1 ", "01"])
def test_bare_one_is_refused_as_ambiguous(bad):
    with pytest.raises(ValueError, match=r"eps=1 is ambiguous.*use px\(1\) or '1px' \(= 1/255\)"):
        parse_eps(bad)


def test_unambiguous_budgets_still_parse():
    assert parse_eps(1.0) == parse_eps("1.0") == 1.0  # the whole range, written as a float
    assert parse_eps(0) == parse_eps("0") == 0.0
    assert parse_eps("1px") == 1 / 255 and parse_eps("255/255") == 1.0 and parse_eps(0.5) == 0.5
    assert parse_eps_list("0,1px,0.5") == [0.0, 1 / 255, 0.5]


def test_cli_refuses_ambiguous_budgets_naming_each(tmp_path, capsys):
    base = ["attack", str(tmp_path / "no-run"), "--data", str(tmp_path), "--attack", "ifgsm"]
    assert main([*base, "--eps", "1"]) == 2
    err = one_line_error(capsys)
    assert "--eps=1" in err and "'1px' (= 1/255)" in err
    assert main([*base, "--alpha", "1"]) == 2
    assert "--alpha=1" in one_line_error(capsys)
    assert main([*base, "--sweep-eps", "1,2"]) == 2
    err = one_line_error(capsys)
    assert "1 and 2 look like pixel units" in err and "1px,2px" in err
    assert main([*base, "--sweep-eps", "0.01,1,4px,8"]) == 2
    err = one_line_error(capsys)
    assert "1 and 8 look like pixel units" in err and "0.01,1px,4px,8px" in err


@pytest.mark.parametrize("flag", [["--eps", "0"], ["--eps", "5px", "--steps", "0"]])
def test_zero_budget_or_steps_warn_that_the_row_is_clean(run, synth_root, tmp_path, capsys, flag):
    out = tmp_path / "o"
    assert main(["attack", str(run), "--data", str(synth_root), "--attack", "ifgsm", *flag, "--max-images", "6",
                 "--num-workers", "0", "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("advreid: warning:") and " ".join(flag[-2:]) in err
    assert "equals the clean one" in err
    r = json.loads((out / "results.json").read_text())["runs"][0]
    assert r["linf_max"] == 0.0
    for k in ("rank1", "mAP", "mINP"):
        assert r["attacked"][k] == r["clean"][k]


# ---------------------------------------------------------------------------------------- model.pretrained
def test_pretrained_path_is_accepted_through_train(synth_root, tmp_path, capsys):
    from safetensors.torch import save_file

    from advreid.engine import HookBase
    from advreid.experiments import train

    torch.manual_seed(123)
    weights = {k: v.clone() for k, v in build_model("cnn4", 3, pretrained=False).backbone.state_dict().items()}
    path = tmp_path / "cnn4_backbone.safetensors"
    save_file(weights, str(path))
    seen = {}

    class Capture(HookBase):
        def before_train(self) -> None:
            seen.update({k: v.detach().clone() for k, v in self.trainer.model.backbone.state_dict().items()})

    train("bot_r50", tmp_path / "r", overrides=[*quick(synth_root, 1), f"model.pretrained={path}"],
          hooks=[Capture()])
    assert seen.keys() == weights.keys()
    for k, v in weights.items():
        assert torch.equal(seen[k], v), k  # the run started from the file's weights
    missing = tmp_path / "nowhere" / "weights.pth"
    argv = ["train", "--out", str(tmp_path / "r2"), *quick(synth_root, 1), f"model.pretrained={missing}"]
    assert main(argv) == 2
    assert str(missing) in one_line_error(capsys)
    assert not (tmp_path / "r2").exists()


# ------------------------------------------------------------------------------------------- result files
def test_eval_keeps_its_result_beside_a_damaged_results_json(run, synth_root, capsys, monkeypatch):
    import time

    path = run / "results.json"
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20250101-000000")  # two evaluations in one second
    for n, (content, why) in enumerate([("{not json", "is not valid JSON"),
                                        ("[1, 2]", 'does not hold {"evaluations": [...]}')]):
        path.write_text(content)
        assert main(["eval", str(run), "--data", str(synth_root), "--num-workers", "0"]) == 2
        aside = run / ("results.20250101-000000.json" if n == 0 else "results.20250101-000000-1.json")
        err = one_line_error(capsys)
        assert f"results file {path} {why}" in err and str(aside) in err
        assert path.read_text() == content  # the damaged file is left as it is
        saved = json.loads(aside.read_text())["evaluations"]
        assert len(saved) == 1 and 0.0 <= saved[0]["mAP"] <= 1.0
    path.unlink()


def test_bench_warns_about_a_damaged_cell_and_recomputes_it(run, synth_root, tmp_path, capsys):
    from advreid.experiments.bench import run_bench

    cfg = {"name": "one", "seed": 0, "device": "cpu",
           "datasets": {"synth": {"name": "market1501", "root": str(synth_root)}}, "models": {"m": {"run": str(run)}},
           "defenses": {"none": None}, "attacks": {"clean": None},
           "settings": {"batch_size": 16, "num_workers": 0, "progress": False, "report": False},
           "grid": [{"models": ["m"], "datasets": ["synth"], "defenses": ["none"], "attacks": ["clean"]}],
           "tables": [{"name": "c", "kind": "clean", "datasets": ["synth"], "rows": ["m"]}]}
    out = tmp_path / "b"
    doc, _ = run_bench(cfg, out, progress=False)
    cell = next(p for p in (out / "cells").glob("*.json") if not p.name.endswith(".per_query.json"))
    good = json.loads(cell.read_text())
    cell.write_text('{"key": "trunc')
    capsys.readouterr()
    doc, _ = run_bench(cfg, out, resume=True, progress=False)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(cell) in warnings[0] and "recomput" in warnings[0]
    again = json.loads(cell.read_text())
    assert doc["complete"] and again["clean"]["mAP"] == good["clean"]["mAP"]


# ------------------------------------------------------------------------------------ output folders
def test_attack_refuses_to_write_into_the_dataset(run, synth_root, tmp_path, capsys):
    root = tmp_path / "market"
    shutil.copytree(synth_root, root)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    base = ["attack", str(run), "--data", str(root), "--attack", "fgsm", "--max-images", "2", "--num-workers", "0"]
    for extra in (["--save-adv", str(root / "query"), "--overwrite", "--out", str(tmp_path / "o1")],
                  ["--out", str(root / "results"), "--overwrite"],
                  ["--out", str(tmp_path), "--overwrite"]):  # a folder holding the dataset
        assert main([*base, *extra]) == 2
        err = one_line_error(capsys)
        assert "inside (or contains) the dataset folder" in err and str(root) in err
        assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing moved, nothing written
        assert not (tmp_path / "o1").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["market"]
