"""``advreid data bias`` and ``advreid data fidelity`` from the command line, and the fidelity measure on
hand-made 'generated' images: copies of real images of the right identity score like real data, images labelled
with the wrong identity score at chance."""

from __future__ import annotations

import json
import shutil

import pytest
from tests.conftest import tiny_overrides

from advreid.cli import main


@pytest.fixture(scope="module")
def run_and_data(synth_root, tmp_path_factory):
    from advreid.experiments import train

    run = tmp_path_factory.mktemp("fid") / "run"
    train("bot_r50", run, overrides=tiny_overrides(synth_root, epochs=3) + ["optim.lr=0.003"])
    return run, synth_root


def _fake_resampled(src, out, relabel: bool):
    """A resampled-like folder: every training identity gets copies of its own first image (an oracle generator)
    named as generated images, or (relabel) copies of another identity's image."""
    from advreid.data import build_dataset

    shutil.copytree(src, out)
    ds = build_dataset("market1501", src)
    original = {v: k for k, v in ds.train_pid_map.items()}  # file names carry the original pids
    first: dict[int, object] = {}
    for r in ds.train:
        first.setdefault(original[r.pid], r)
    pids = sorted(first)
    files = []
    for k, pid in enumerate(pids):
        donor = first[pids[(k + 1) % len(pids)]] if relabel else first[pid]
        name = f"{pid:04d}_c1s9_9{k:05d}_00.jpg"
        shutil.copy(donor.path, out / "bounding_box_train" / name)
        files.append({"file": f"bounding_box_train/{name}", "pid": pid, "camid": 0,
                      "source": f"bounding_box_train/{donor.path.rsplit('/', 1)[-1]}"})
    (out / "resample_manifest.json").write_text(json.dumps({"files": files}))
    return out


def test_fidelity_separates_identity_preserving_from_random(run_and_data, tmp_path, capsys):
    from advreid.experiments.analysis import generated_fidelity

    run, root = run_and_data
    good = generated_fidelity(str(_fake_resampled(root, tmp_path / "good", relabel=False)), str(run), device="cpu")
    bad = generated_fidelity(str(_fake_resampled(root, tmp_path / "bad", relabel=True)), str(run), device="cpu")
    assert good["generated"] == bad["generated"] == good["identities"] == 12
    assert good["identity_top1"] >= 0.5 and bad["identity_top1"] <= 0.25  # chance 1/12
    assert good["identity_top1_real_loo"] > 3 * good["identity_chance_top1"]  # the measure on real data
    assert main(["data", "fidelity", str(tmp_path / "good"), "--run", str(run), "--device", "cpu"]) == 0
    assert "identity: top-1" in capsys.readouterr().out


def test_data_bias_cli_with_a_run(run_and_data, capsys):
    run, root = run_and_data
    assert main(["data", "bias", str(root), "--json", "--run", str(run), "--attack", "noise", "--eps", "8px",
                 "--device", "cpu"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["split"] == "train" and doc["num_ids"] == 12 and "gini" in doc["images_per_id"]
    acc = doc["per_identity_accuracy"]
    assert acc["clean"]["num_ids"] == 8 and acc["attacked"]["num_ids"] == 8
    assert acc["clean"]["std"] == pytest.approx(acc["clean"]["variance"] ** 0.5)
