"""The benchmark runner: grid cells, resume after an interruption without recomputing, tables in the seed's shapes."""

import json

import pytest
from tests.conftest import tiny_overrides

from advreid.config import ConfigError
from advreid.evaluation import robustness as bench_mod_robustness
from advreid.experiments import bench as bench_mod
from advreid.experiments.bench import run_bench
from advreid.experiments.grid import cells as grid_cells
from advreid.experiments.grid import load_bench_config
from advreid.reporting.bench_tables import build_tables, format_metric


@pytest.fixture(scope="module")
def tiny_run(synth_root, tmp_path_factory):
    from advreid.experiments import train

    run = tmp_path_factory.mktemp("bench") / "run"
    train("demo_cpu", run, overrides=tiny_overrides(synth_root, epochs=2))
    return run


def _cfg(run, root) -> dict:
    return {
        "name": "tiny", "seed": 0, "device": "cpu",
        "datasets": {"synth": {"name": "market1501", "root": str(root)}},
        "models": {"m": {"run": str(run)}},
        "defenses": {"none": None, "cs": {"name": "cs"}},
        "attacks": {"clean": None, "noise": {"name": "noise", "eps": "8px"},
                    "ifgsm": {"name": "ifgsm", "eps": "8px", "alpha": "2px", "steps": 3}},
        "settings": {"rerank": True, "batch_size": 16, "num_workers": 0, "progress": False},
        "grid": [{"models": ["m"], "datasets": ["synth"], "defenses": ["none", "cs"],
                  "attacks": ["clean", "noise", "ifgsm"], "threats": ["non_adaptive", "adaptive"]}],
        "tables": [{"name": "t", "kind": "attack", "dataset": "synth", "rows": ["m", "m+cs"],
                    "columns": ["clean", "noise", "ifgsm"], "threats": ["non_adaptive", "adaptive"]},
                   {"name": "c", "kind": "clean", "datasets": ["synth"], "rows": ["m", "m+cs"]}],
    }


def test_cells_collapse_threats_without_a_defense(tiny_run, synth_root):
    cells = grid_cells(load_bench_config(_cfg(tiny_run, synth_root)))
    # no defense: one white-box cell per attack; clean: one cell per defense; cs x 2 attacks x 2 threat models
    assert len(cells) == 2 + 2 + 4
    assert ("m", "synth", "cs", "ifgsm", "adaptive") in cells
    assert ("m", "synth", "none", "ifgsm", "white_box") in cells
    assert ("m", "synth", "cs", "clean", "clean") in cells


def test_bench_resumes_without_recomputing(tiny_run, synth_root, tmp_path, monkeypatch):
    cfg = _cfg(tiny_run, synth_root)
    out = tmp_path / "b"
    real = bench_mod.Bench.compute
    calls = []

    def crashing(self, cell):
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(cell)
        return real(self, cell)

    monkeypatch.setattr(bench_mod.Bench, "compute", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_bench(cfg, out, progress=False)
    done = [p for p in (out / "cells").glob("*.json") if not p.name.endswith(".per_query.json")]
    assert len(done) == 5 and len(list((out / "cells").glob("*.per_query.json"))) == 5
    partial = json.loads((out / "results.json").read_text())
    assert partial["complete"] is False and len(partial["cells"]) == 5

    with pytest.raises(FileExistsError, match="--resume"):
        run_bench(cfg, out, progress=False)  # never silently reuses the folder

    first = list(calls)
    calls.clear()
    cached = sorted(p.name for p in (out / "cache").rglob("*.safetensors"))
    assert len(cached) == 4  # clean query + gallery features, without and with CS
    extracted = []
    real_extract = bench_mod_robustness.extract_sharded  # extract_features, split over ranks under torchrun

    def counting_extract(*a, **k):
        extracted.append(k.get("desc"))
        return real_extract(*a, **k)

    monkeypatch.setattr(bench_mod_robustness, "extract_sharded", counting_extract)
    doc, _ = run_bench(cfg, out, resume=True, progress=False)
    assert len(calls) == 3 and not set(calls) & set(first)  # only the unfinished cells ran
    assert not [d for d in extracted if d and d.startswith("clean")]  # clean features came from the disk cache
    assert doc["complete"] is True and len(doc["cells"]) == 8

    calls.clear()
    doc2, _ = run_bench(cfg, out, resume=True, progress=False)
    assert calls == [] and doc2["complete"]

    cells = {tuple(c["cell"].values()): c for c in doc["cells"]}
    clean = cells[("m", "synth", "none", "clean", "clean")]["clean"]
    noise = cells[("m", "synth", "none", "noise", "white_box")]["runs"][0]
    attacked = cells[("m", "synth", "none", "ifgsm", "white_box")]["runs"][0]
    # every attacked cell's clean row equals the clean cell (same images, same cache)
    assert noise["clean"] == clean and attacked["clean"] == clean
    assert attacked["attacked"]["mAP"] < noise["attacked"]["mAP"]
    assert attacked["linf_max"] <= 8 / 255 + 1e-6
    adaptive = cells[("m", "synth", "cs", "ifgsm", "adaptive")]
    assert adaptive["threat"] == "adaptive" and adaptive["defense"]["name"] == "cs"
    assert adaptive["runs"][0]["params"]["eot_samples"] == 1  # CS is deterministic: no EOT to pay for
    assert cells[("m", "synth", "cs", "ifgsm", "non_adaptive")]["threat"] == "non_adaptive"

    tables = {t["name"]: t for t in build_tables(doc)}
    t = tables["t"]
    assert t["header"] == ["model", "threat model", "no attack", "noise", "ifgsm"]
    labels = [(r[0], r[1]) for r in t["rows"]]
    assert labels == [("m", "white-box"), ("m+cs", "non-adaptive"), ("m+cs", "adaptive"),
                      ("m + RK", "white-box"), ("m+cs + RK", "non-adaptive"), ("m+cs + RK", "adaptive")]
    ci = clean["rank1_ci"]
    assert ci[0] <= clean["rank1"] <= ci[1] and clean["mAP_ci"][0] <= clean["mAP"] <= clean["mAP_ci"][1]
    assert t["rows"][0][2] == format_metric(clean) == (
        f"{100 * clean['rank1']:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}] / {100 * clean['mAP']:.1f} "
        f"[{100 * clean['mAP_ci'][0]:.1f}, {100 * clean['mAP_ci'][1]:.1f}]")
    assert t["rows"][3][2] == format_metric(clean, rr=True) and "rr_rank1_ci" in clean
    md = (out / "tables" / "t.md").read_text()
    assert "| m+cs" in md and "R1 / mAP" in md
    csv_lines = (out / "tables" / "t.csv").read_text().splitlines()
    assert csv_lines[0] == "model,threat model,no attack,noise,ifgsm" and len(csv_lines) == 7
    assert (out / "tables" / "c.md").is_file()


def test_bench_config_errors(tiny_run, synth_root):
    cfg = _cfg(tiny_run, synth_root)
    cfg["attacks"]["ifgsm"]["stepz"] = 3
    with pytest.raises(ConfigError, match="stepz.*did you mean 'steps'"):
        load_bench_config(cfg)
    cfg = _cfg(tiny_run, synth_root)
    cfg["grid"][0]["defenses"] = ["none", "jpg"]
    with pytest.raises(ConfigError, match="'jpg' is not defined under defenses"):
        load_bench_config(cfg)
    with pytest.raises(ConfigError, match="threats"):
        load_bench_config({**_cfg(tiny_run, synth_root), "grid": [{"threats": ["white"]}]})
    for name in ("demo", "market_seed", "duke_seed"):
        assert grid_cells(load_bench_config(name))


def test_bench_cli_errors_leave_nothing_behind(tmp_path, capsys):
    from advreid.cli import main

    out = tmp_path / "b"
    # overrides are accepted before and after options; a missing dataset fails before the folder is made
    assert main(["bench", "market_seed", "--out", str(out), "datasets.market.root=/no/such/Market"]) == 2
    err = capsys.readouterr().err
    assert "/no/such/Market does not exist" in err and not out.exists()
    assert main(["bench", "demo", "attacks.lta.stepz=3", "--out", str(out)]) == 2
    assert "did you mean 'steps'" in capsys.readouterr().err and not out.exists()


def test_misspelt_names_fail_before_anything_is_trained(synth_root, tmp_path):
    base = {"name": "t", "seed": 0, "device": "cpu",
            "datasets": {"synth": {"name": "market1501", "root": str(synth_root)}},
            "models": {"m": {"config": "demo_cpu", "train_on": "synth"}},
            "defenses": {"none": None, "cs": {"name": "cs"}},
            "attacks": {"clean": None, "a": {"name": "ifgsm", "eps": "4px"}},
            "grid": [{"models": ["m"], "attacks": ["clean", "a"]}]}
    cases = [("attacks.a.name=ifgsn", r"attacks\.a: unknown attack 'ifgsn' \(did you mean 'ifgsm'\?\)"),
             ("attacks.a.params={momentun: 1}", r"did you mean 'momentum'"),
             ("defenses.cs.name=css", r"defenses\.cs: unknown passive defense 'css' \(did you mean 'cs'\?\)"),
             ("models.m.overrides=[model.name=cnn5]", r"models\.m: .*'cnn5': unknown model \(did you mean 'cnn4'\?\)"),
             ("models.m.overrides=[defense.proactive=refrence]", r"did you mean 'reference'"),
             ("datasets.synth.name=market", r"name='market': unknown dataset parser \(did you mean 'market1501'\?\)"),
             ("models.m.config=demo_cpx", r"did you mean 'demo_cpu'")]
    for override, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            run_bench(base, tmp_path / "b", overrides=[override], progress=False)
        assert not (tmp_path / "b").exists(), override  # nothing created, nothing trained


def test_bench_killed_before_a_models_first_checkpoint_resumes(synth_root, tmp_path, monkeypatch):
    import advreid.experiments.training as training

    cfg = {"name": "k", "seed": 0, "device": "cpu",
           "datasets": {"synth": {"name": "market1501", "root": str(synth_root)}},
           "models": {"m": {"config": "demo_cpu", "train_on": "synth",
                            "overrides": tiny_overrides(synth_root, epochs=1)[1:]}},
           "attacks": {"clean": None}, "settings": {"num_workers": 0, "progress": False, "report": False},
           "grid": [{"models": ["m"], "attacks": ["clean"]}]}
    real = training.Trainer.run_step

    def killed(self):
        raise KeyboardInterrupt("killed in the first epoch")

    monkeypatch.setattr(training.Trainer, "run_step", killed)
    with pytest.raises(KeyboardInterrupt):
        run_bench(cfg, tmp_path / "b", progress=False)
    run = tmp_path / "b" / "models" / "m"
    assert (run / "config.yaml").is_file() and not list(run.glob("checkpoints/*.json"))
    monkeypatch.setattr(training.Trainer, "run_step", real)
    doc, _ = run_bench(cfg, tmp_path / "b", resume=True, progress=False)
    assert doc["complete"] and (run / "checkpoints" / "final.json").is_file()


def test_comparisons_and_repeated_seeds(tiny_run, synth_root, tmp_path):
    cfg = _cfg(tiny_run, synth_root)
    cfg["grid"][0]["attacks"] = ["clean", "ifgsm"]
    cfg["settings"]["report"] = False
    doc, out = run_bench(cfg, tmp_path / "c", progress=False)
    comps = {c["what"].split(":")[0].split(" (")[0]: c for c in doc["comparisons"]}
    assert set(comps) == {"clean - attacked", "non-adaptive - adaptive"}
    for c in doc["comparisons"]:
        d = c["diff"]["mAP"]
        assert d["ci"][0] <= d["diff"] <= d["ci"][1] and d["significant"] == (d["ci"][0] > 0 or d["ci"][1] < 0)
    # the paired difference is exactly the difference of the two cells' point estimates
    cells = {tuple(x["cell"].values()): x for x in doc["cells"]}
    wb = cells[("m", "synth", "none", "ifgsm", "white_box")]["runs"][0]
    first = next(c for c in doc["comparisons"] if c["b"] == cells[("m", "synth", "none", "ifgsm", "white_box")]["key"])
    assert first["diff"]["mAP"]["diff"] == pytest.approx(wb["clean"]["mAP"] - wb["attacked"]["mAP"], abs=1e-6)
    assert "Paired comparisons" in (out / "tables" / "comparisons.md").read_text()

    doc2, out2 = run_bench(cfg, tmp_path / "s", progress=False, seeds=[0, 1])
    assert (out2 / "seed_0" / "results.json").is_file() and (out2 / "seed_1" / "results.json").is_file()
    assert doc2["seeds"] == [0, 1] and doc2["complete"]
    cell = next(c for c in doc2["cells"] if c["cell"]["attack"] == "ifgsm" and c["cell"]["threat"] == "white_box")
    m = cell["runs"][0]["attacked"]
    per_seed = [v["mAP"] for v in cell["seeds"]["values"]]
    assert m["n_seeds"] == 2 and m["mAP"] == pytest.approx(sum(per_seed) / 2)
    assert m["mAP_std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2 ** 0.5)
    assert "±" in (out2 / "tables" / "t.md").read_text()


def test_dmr_generator_and_transfer_columns(tiny_run, synth_root, tmp_path):
    """A DMR column trains its generator against one model (resumable, under OUT/generators) and attacks every
    row with it; a `source` column crafts the images on another model; the cells say transfer vs white-box."""
    from advreid.experiments import train

    other = tmp_path / "other"
    train("demo_cpu", other, overrides=tiny_overrides(synth_root, epochs=1) + ["seed=1"])
    cfg = {"name": "t8", "seed": 0, "device": "cpu",
           "datasets": {"synth": {"name": "market1501", "root": str(synth_root)}},
           "models": {"a": {"run": str(tiny_run)}, "b": {"run": str(other)}},
           "attacks": {"clean": None, "noise16": {"name": "noise", "eps": "16px"},
                       "dmr": {"name": "dmr", "eps": "16px", "generator": {"model": "a", "config": "dmr_tiny",
                                                                          "overrides": ["train.epochs=1"]}},
                       "ifgsm_a": {"name": "ifgsm", "eps": "8px", "steps": 3, "source": "a"}},
           "settings": {"num_workers": 0, "progress": False, "report": False, "rerank": False},
           "grid": [{"models": ["a", "b"], "datasets": ["synth"], "attacks": ["clean", "noise16", "dmr", "ifgsm_a"]}],
           "tables": [{"name": "t8", "kind": "attack", "dataset": "synth", "rows": ["a", "b"],
                       "columns": ["clean", "noise16", "dmr", "ifgsm_a"]}]}
    doc, out = run_bench(cfg, tmp_path / "b", progress=False)
    cells = {(c["cell"]["model"], c["cell"]["attack"]): c for c in doc["cells"]}
    assert cells[("a", "dmr")]["cell"]["threat"] == "white_box" and cells[("b", "dmr")]["cell"]["threat"] == "transfer"
    assert cells[("b", "ifgsm_a")]["threat"] == "transfer" and cells[("a", "ifgsm_a")]["threat"] == "white_box"
    assert cells[("b", "ifgsm_a")]["transfer"] is True and cells[("a", "ifgsm_a")]["transfer"] is False
    gen = out / "generators" / "dmr"
    assert (gen / "results.json").is_file()
    params = cells[("b", "dmr")]["runs"][0]["params"]
    assert params["generator"].startswith(str(gen)) and params["eps"] == pytest.approx(16 / 255)
    for m in ("a", "b"):
        r = cells[(m, "dmr")]["runs"][0]
        assert r["linf_max"] <= 16 / 255 + 1e-6
    table = next(t for t in doc["_tables"] if t["name"] == "t8")
    assert all(cell != "-" for row in table["rows"] for cell in row[2:])
    mtime = (gen / "results.json").stat().st_mtime_ns
    run_bench(cfg, tmp_path / "b", resume=True, progress=False)
    assert (gen / "results.json").stat().st_mtime_ns == mtime  # the generator is reused, not retrained


def test_saved_adversarial_images_are_the_reports_chosen_queries(tiny_run, synth_root, tmp_path):
    """With ``max_images`` the attacked queries are evenly spaced; the bench keeps the adversarial PNGs of the
    queries the report will choose (the first 3 valid ones of that subset), so no chosen query lacks its image."""
    from advreid.data import build_dataset
    from advreid.evaluation.robustness import subset_indices
    from advreid.reporting.selection import default_queries, valid_query_mask

    cfg = _cfg(tiny_run, synth_root)
    cfg["grid"][0].update(defenses=["none"], attacks=["ifgsm"])
    cfg["settings"].update(max_images=7, rerank=False)
    doc, out = run_bench(cfg, tmp_path / "q", progress=False)
    ds = build_dataset("market1501", synth_root)
    sub = subset_indices(len(ds.query), 7)
    assert sub[:3] != [0, 1, 2]  # evenly spaced, so the old fixed [0, 1, 2] would miss
    valid = valid_query_mask([r.pid for r in ds.query], [r.camid for r in ds.query],
                             [r.pid for r in ds.gallery], [r.camid for r in ds.gallery])
    chosen = default_queries(valid[sub], sub, 3)
    saved = sorted(int(p.stem) for p in (out / "cells").rglob("adv/*.png"))
    assert saved == chosen
    text = (out / "report.html").read_text()
    for q in chosen:
        assert f"/adv/{q:06d}.png)" not in text  # the report's "adversarial image not saved (...)" note
