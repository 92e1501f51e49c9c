"""The visual report: query selection and rank lists (hand-built cases and a hand computation from stored features),
similarity Grad-CAM (against a direct computation of the Grad-CAM formula), the figures, the self-contained page, and
``build_report`` on a small bench folder built per the storage contract (a cnn4, the synthetic Market set, SMA)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from advreid.reporting import SECTIONS, FigureSpec, ReportData, format_ci, write_report
from advreid.reporting.selection import default_queries, ranked_gallery, valid_query_mask, worst_queries

H, W = 64, 32
PROTOCOL = {"metric": "cosine", "normalize": True, "flip": False, "ap": "standard", "rerank": False, "height": H,
            "width": W, "max_images": None}


# --------------------------------------------------------------------------------------- a bench folder
def _metrics(qf, gf, qp, gp, qc, gc):
    """Metrics dict (with intervals and CMC) and per-query JSON of one evaluation, as the bench stores them."""
    from advreid.evaluation import compute_distance_matrix, evaluate_rank, metric_intervals, per_query_to_json

    res = evaluate_rank(compute_distance_matrix(qf, gf, "cosine"), qp, gp, qc, gc, return_per_query=True)
    m = {**res.to_dict(), "num_valid_queries": res.num_valid_queries, "cmc": res.cmc.tolist(),
         **metric_intervals(res, resamples=100, min_resamples=100)}
    return m, per_query_to_json(res)


def _save_features(path, **arrays):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in arrays.items()}, str(path))


def make_fake_bench(out: Path, synth_root: Path) -> dict:
    """A bench folder per the storage contract: one cnn4 (checkpoint + metrics.jsonl), defenses none and cs, a clean
    cell per defense, an SMA sweep (4px, 8px) white-box cell and its non-adaptive cell behind cs. The adversarial
    PNGs of the report's queries are saved, except the second worst query's (a missing image the report must name)."""
    from advreid.attacks import build
    from advreid.data import ImageDataset, build_dataset, build_transforms
    from advreid.defenses import DefendedModel, build_passive
    from advreid.evaluation import embed
    from advreid.models import build_model, save_checkpoint
    from advreid.ops import save_images

    torch.manual_seed(0)
    ds = build_dataset("market1501", synth_root)
    model = build_model("cnn4", 12).eval()
    run = out / "models" / "base"
    stem = run / "checkpoints" / "final"
    save_checkpoint(stem, model, meta={"input_size": [H, W], "config": {"eval": {"metric": "cosine"}}})
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "loss": 3.0 / e, "ce": 2.0 / e, "acc": 0.2 * e,
                                                           "lr": [1e-3], "eval": {"rank1": 0.1 * e, "mAP": 0.05 * e}})
                                               + "\n" for e in (1, 2, 3)))
    tf = build_transforms(H, W, is_train=False)
    qx = torch.stack([ImageDataset(ds.query, tf)[i][0] for i in range(len(ds.query))])
    gx = torch.stack([ImageDataset(ds.gallery, tf)[i][0] for i in range(len(ds.gallery))])
    qp, qc = torch.tensor([r.pid for r in ds.query]), torch.tensor([r.camid for r in ds.query])
    gp, gc = torch.tensor([r.pid for r in ds.gallery]), torch.tensor([r.camid for r in ds.gallery])
    qi, gi = torch.arange(len(ds.query)), torch.arange(len(ds.gallery))
    advs = {e: build("sma", model, eps=e / 255, alpha=1 / 255, steps=4)(qx) for e in (4, 8)}
    advs = {e: torch.round(a * 255) / 255 for e, a in advs.items()}  # what an 8-bit PNG holds
    info = {"run_dir": str(run), "checkpoint": str(stem), "arch": model.arch_config(), "model_name": "cnn4",
            "trained_on": str(synth_root)}
    base = {"model": info, "dataset": {"name": "market1501", "root": str(synth_root)},
            "protocol": {**PROTOCOL, "num_query": len(ds.query), "num_gallery": len(ds.gallery)}, "side": "query"}
    cells, cell_dir = [], out / "cells"
    cell_dir.mkdir(parents=True)
    select = {}
    for dkey, dspec in (("none", None), ("cs", {"name": "cs"})):
        net = model if dspec is None else DefendedModel(model, build_passive("cs"))
        qf, gf = embed(net, qx), embed(net, gx)
        clean_m, clean_pq = _metrics(qf, gf, qp, gp, qc, gc)
        key = f"base__synth__{dkey}__clean__clean"
        cells.append({**base, "cell": {"model": "base", "dataset": "synth", "defense": dkey, "attack": "clean",
                                       "threat": "clean"}, "key": key, "label": f"no attack; defense {dkey}",
                      "attack_spec": None, "defense_spec": dspec, "threat": "clean", "clean": clean_m})
        (cell_dir / f"{key}.per_query.json").write_text(json.dumps({"clean": clean_pq}))
        _save_features(cell_dir / f"{key}.features.safetensors", query_features=qf, query_pids=qp, query_camids=qc,
                       query_index=qi, gallery_features=gf, gallery_pids=gp, gallery_camids=gc, gallery_index=gi)
        threat = "white_box" if dspec is None else "non_adaptive"
        key = f"base__synth__{dkey}__sma__{threat}"
        eps_list = (4, 8) if dspec is None else (4,)
        runs, att_pq = [], []
        for e in eps_list:
            m, pq = _metrics(embed(net, advs[e]), gf, qp, gp, qc, gc)
            runs.append({"eps": e / 255, "eps_px": float(e), "params": {}, "clean": clean_m, "attacked": m,
                         "linf_max_px": float(e)})
            att_pq.append(pq)
        cells.append({**base, "cell": {"model": "base", "dataset": "synth", "defense": dkey, "attack": "sma",
                                       "threat": threat}, "key": key,
                      "label": f"sma(eps=4px, alpha=1px, steps=4); threat {threat}; defense {dkey}",
                      "attack_spec": {"name": "sma", "eps": "4px"}, "defense_spec": dspec, "threat": threat,
                      "runs": runs})
        (cell_dir / f"{key}.per_query.json").write_text(json.dumps({"clean": clean_pq, "attacked": att_pq}))
        _save_features(cell_dir / f"{key}.features.safetensors", query_features=embed(net, advs[eps_list[0]]),
                       query_pids=qp, query_camids=qc, query_index=qi)
        if dspec is None:  # the bench's selection: the first 3 valid queries, the 2 largest AP drops
            valid = valid_query_mask(qp.numpy(), qc.numpy(), gp.numpy(), gc.numpy())
            chosen = default_queries(valid, qi.numpy(), 3)
            worst = worst_queries(clean_pq["AP"], att_pq[0]["AP"], qi.numpy(), 2, exclude=chosen)
            select = {"chosen": chosen, "worst": worst, "wb_key": key}
        keep = select["chosen"] + select["worst"][:1]
        save_images(advs[4][keep], [f"{i:06d}.png" for i in keep], cell_dir / key / "adv")
    doc = {"bench": "fake", "complete": True, "config": {"report": {"worst": 2, "tsne_ids": 4}}, "cells": cells,
           "tables": [{"name": "robustness", "title": "R1 / mAP (%)", "kind": "attack",
                       "protocol": "sma eps 4px, query side", "header": ["model", "clean", "sma"],
                       "rows": [["base", "37.5 [33.0, 42.1] / 30.9 [27.5, 34.6]", "1.0 [0.0, 2.0] / 3.0 [2.0, 4.0]"]]}]}
    (out / "results.json").write_text(json.dumps(doc))
    return {"dataset": ds, "model": model, "advs": advs, "qx": qx, **select}


@pytest.fixture(scope="module")
def bench(tmp_path_factory, synth_root):
    from advreid.experiments.report import build_report

    out = tmp_path_factory.mktemp("bench")
    meta = make_fake_bench(out, synth_root)
    html = build_report(out)
    return {"out": out, "html": html, "text": html.read_text(encoding="utf-8"), **meta}


# ------------------------------------------------------------------------------------- pure functions
def test_ranked_gallery_removes_junk_and_breaks_ties_pessimistically():
    # gallery: 0 same pid+cam (junk), 1 pid -1 (junk), 2 match at 0.5, 3 non-match at 0.5 (tie), 4 match 0.1, 5 other
    d = [0.0, 0.05, 0.5, 0.5, 0.1, 0.7]
    top = ranked_gallery(d, 7, 1, [7, -1, 7, 3, 7, 4], [1, 0, 2, 0, 0, 2], topk=10)
    assert [t["position"] for t in top] == [4, 3, 2, 5]
    assert [t["rank"] for t in top] == [1, 2, 3, 4]
    assert [t["match"] for t in top] == [True, False, True, False]
    assert [t["position"] for t in ranked_gallery(d, 7, 1, [7, -1, 7, 3, 7, 4], [1, 0, 2, 0, 0, 2], topk=2)] == [4, 3]
    with pytest.raises(ValueError, match="topk"):
        ranked_gallery(d, 7, 1, [7, -1, 7, 3, 7, 4], [1, 0, 2, 0, 0, 2], topk=0)


def test_query_selection():
    # query 0: its pid is only seen by its own camera -> invalid; 1 and 2 valid; 3: pid absent
    valid = valid_query_mask([5, 5, 6, 9], [0, 1, 0, 0], [5, 6, 6, -1], [0, 0, 1, 1])
    assert valid.tolist() == [False, True, True, False]
    assert default_queries(valid, [10, 11, 12, 13], 1) == [11]
    assert default_queries(valid[[2, 1]], [12, 11], 5) == [11, 12]
    ap_c, ap_a = [0.9, None, 0.8, 0.5, 0.6], [0.1, None, 0.0, 0.5, 0.0]
    assert worst_queries(ap_c, ap_a, [4, 3, 2, 1, 0], 3) == [2, 4, 0]  # drops .8 (q2), .8 (q4, tie -> index), .6
    assert worst_queries(ap_c, ap_a, [4, 3, 2, 1, 0], 2, exclude=[2]) == [4, 0]


def test_format_ci():
    m = {"rank1": 0.375, "rank1_ci": [0.33, 0.4214], "mAP": 0.309}
    assert format_ci(m, "rank1") == "37.5 [33.0, 42.1]"
    assert format_ci(m, "mAP") == "30.9"
    assert format_ci(m, "mINP") == "-"


def _reference_gradcam(model, x, t):
    """Grad-CAM by its definition on the backbone output: weights = spatial mean of d score / d A, map =
    ReLU(sum_c w_c A_c), min-max scaled, bilinearly resized to the image, min-max scaled again."""
    a = model.backbone(model.normalize(x)).detach().requires_grad_(True)
    before, after = model.head.embed(model.pool(a))
    f = after if model.neck_feat == "after" else before
    score = (f * F.normalize(t, dim=1)).sum()
    (g,) = torch.autograd.grad(score, a)
    cam = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))

    def scale(c):
        c = c - c.amin((2, 3), keepdim=True)
        return c / (1e-7 + c.amax((2, 3), keepdim=True))

    up = F.interpolate(scale(cam.detach()), size=x.shape[2:], mode="bilinear", align_corners=False)
    return scale(up)[:, 0].numpy()


@pytest.mark.parametrize("name", ["cnn4", "resnet18"])
def test_similarity_gradcam_matches_definition_and_restores_model(name):
    from advreid.evaluation.explain import similarity_gradcam
    from advreid.models import build_model

    torch.manual_seed(0)
    model = build_model(name, 5)
    model.eval()
    with torch.no_grad():  # non-trivial BN statistics
        model.head.bn.running_mean.normal_(0, 0.1)
    x = torch.rand(2, 3, H, W)
    with torch.no_grad():
        t = model(x)
    model.train()
    p0 = next(model.parameters())
    p0.grad = torch.ones_like(p0)
    model.eval()
    model.head.train()  # mixed modes must come back as they were
    flags = [p.requires_grad for p in model.parameters()]
    assert not all(flags)  # the BNNeck bias is frozen: it must stay so
    cams = similarity_gradcam(model, x, t)
    assert model.head.training and not model.backbone.training
    assert torch.equal(p0.grad, torch.ones_like(p0)) and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in list(model.parameters())[1:])
    model.eval()
    assert cams.shape == (2, H, W) and cams.min() >= 0 and cams.max() <= 1 and cams.max() > 0.99
    np.testing.assert_allclose(cams, _reference_gradcam(model, x, t), atol=2e-4)
    with pytest.raises(ValueError, match="target_features"):
        similarity_gradcam(model, x, t[:1].repeat(3, 1))


def test_write_report_is_self_contained_and_refuses_foreign_files(tmp_path):
    rep = ReportData(title="t", source="s", kind="bench",
                     tables=[{"name": "a", "title": "A", "protocol": "p", "header": ["x", "y"],
                              "rows": [["<b>", "37.5 [33.0, 42.1]"]]}],
                     figures=[FigureSpec("curves", "c", "cmc", [{"label": "l", "cmc": [0.1, 0.5, 1.0]}], "cap")])
    rep.add_unavailable("tsne", "no features")
    html = write_report(tmp_path, rep).read_text()
    assert "&lt;b&gt;" in html and '<span class="ci">[33.0, 42.1]</span>' in html
    assert html.count("data:image/png;base64,") == 1 and (tmp_path / "figures" / "c.png").is_file()
    assert "t-SNE of query features</b>: unavailable &mdash; no features" in html
    write_report(tmp_path, rep)  # its own report may be rewritten
    (tmp_path / "mine.html").write_text("<html>my notes</html>")
    with pytest.raises(FileExistsError, match="not a report written by advreid"):
        write_report(tmp_path, rep, filename="mine.html")
    with pytest.raises(ValueError, match="kind"):
        FigureSpec("curves", "c", "pie", [], "")


# ----------------------------------------------------------------------------------------- the bench
def test_bench_report_has_every_section_and_figure(bench):
    text, figs = bench["text"], bench["out"] / "figures"
    for sid, _ in SECTIONS:
        assert f'<section id="{sid}">' in text
    names = {p.stem for p in figs.glob("*.png")}
    chosen, worst = bench["chosen"], bench["worst"]
    assert len(chosen) == 3 and len(worst) == 2
    expected = {f"ranklist_chosen_{q:06d}" for q in chosen} | {f"ranklist_worst_{q:06d}" for q in worst}
    expected |= {f"perturbation_{chosen[0]:06d}", f"perturbation_{worst[0]:06d}", "map_vs_eps_0", "cmc_0_0",
                 "cmc_0_1", "tsne_0", "gradcam_0", "training_0"}
    assert expected <= names
    assert text.count('src="data:image/png;base64,') == len(names) == len(expected)
    assert not re.search(r"https?://", text)
    assert 'class="failure"' not in text
    assert f"adversarial image not saved (cells/{bench['wb_key']}/adv/{worst[1]:06d}.png)" in text
    assert "37.5 <span class=\"ci\">[33.0, 42.1]</span>" in text  # the bench's own table, intervals styled
    assert "sma(eps=4px, alpha=1px, steps=4); threat non_adaptive; defense cs" in text  # exact cell labels


def test_bench_report_selects_and_ranks_as_computed_by_hand(bench):
    from safetensors.numpy import load_file

    out, ds = bench["out"], bench["dataset"]
    doc = json.loads((out / "figures" / "ranklists.json").read_text())
    assert [(f["kind"], f["query"]) for f in doc["figures"]] == \
        [("chosen", q) for q in bench["chosen"]] + [("worst", q) for q in bench["worst"]]
    pids = np.array([r.pid for r in ds.gallery])
    cams = np.array([r.camid for r in ds.gallery])
    checked = 0
    for fig in doc["figures"]:
        q = fig["query"]
        assert [r["cell"] for r in fig["rows"]] == [
            "base__synth__none__clean__clean", "base__synth__none__sma__white_box", "base__synth__cs__clean__clean",
            "base__synth__cs__sma__non_adaptive"]
        for row in fig["rows"]:
            key = row["cell"]
            gal = load_file(str(out / "cells" / f"{key.rsplit('__', 2)[0]}__clean__clean.features.safetensors"))
            qf = load_file(str(out / "cells" / f"{key}.features.safetensors"))["query_features"][q].astype(np.float64)
            g = gal["gallery_features"].astype(np.float64)
            dist = 1 - (g / np.linalg.norm(g, axis=1, keepdims=True)) @ (qf / np.linalg.norm(qf))
            qpid, qcam = ds.query[q].pid, ds.query[q].camid
            keep = [j for j in range(len(g)) if not (pids[j] == qpid and cams[j] == qcam)]
            order = sorted(keep, key=lambda j: (dist[j], pids[j] == qpid, j))[:10]
            assert [x["index"] for x in row["gallery"]] == order
            assert [x["match"] for x in row["gallery"]] == [bool(pids[j] == qpid) for j in order]
            assert [x["rank"] for x in row["gallery"]] == list(range(1, 11))
            pq = json.loads((out / "cells" / f"{key}.per_query.json").read_text())
            pq = pq["clean"] if "attacked" not in pq else pq["attacked"][0]
            first = next((x["rank"] - 1 for x in row["gallery"] if x["match"]), None)
            if first is not None:  # the drawn first match is where the evaluation put it
                assert pq["first_match"][q] == first
                checked += 1
            else:
                assert pq["first_match"][q] >= 10 or pq["first_match"][q] == -1
    assert checked >= 4


def test_bench_report_gradcam_differs_between_clean_and_adversarial(bench):
    from advreid.evaluation.explain import similarity_gradcam
    from advreid.models import load_checkpoint

    out, q = bench["out"], bench["chosen"][0]
    model = load_checkpoint(out / "models" / "base" / "checkpoints" / "final")
    from PIL import Image

    adv = np.asarray(Image.open(out / "cells" / bench["wb_key"] / "adv" / f"{q:06d}.png"), dtype=np.float32) / 255
    xa = torch.from_numpy(adv).permute(2, 0, 1)[None]
    assert torch.equal(xa, bench["advs"][4][q:q + 1])  # the saved PNG is the attacked image
    x = bench["qx"][q:q + 1]
    with torch.no_grad():
        t = F.normalize(model(x), dim=1)
    cams = similarity_gradcam(model, torch.cat([x, xa]), torch.cat([t, t]))
    assert cams.shape == (2, H, W) and cams.min() >= 0 and cams.max() <= 1
    assert np.abs(cams[0] - cams[1]).mean() > 0.01


def test_attack_and_run_folders_report_what_they_have(bench, tmp_path):
    from advreid.experiments.report import build_report, detect_kind

    wb = next(c for c in json.loads((bench["out"] / "results.json").read_text())["cells"] if c.get("runs"))
    atk = tmp_path / "attack"
    atk.mkdir()
    (atk / "results.json").write_text(json.dumps({
        "dataset": wb["dataset"], "model": wb["model"], "attack": {"name": "sma"}, "side": "query",
        "threat": "white_box", "protocol": wb["protocol"], "runs": wb["runs"]}))
    run = bench["out"] / "models" / "base"
    (run / "results.json").write_text(json.dumps({"evaluations": [{**wb["runs"][0]["clean"], "dataset": "market1501",
                                                                   "protocol": wb["protocol"]}]}))
    assert (detect_kind(atk), detect_kind(run), detect_kind(bench["out"])) == ("attack", "run", "bench")
    for folder, figs in ((atk, {"map_vs_eps", "cmc", "training"}), (run, {"cmc", "training"})):
        text = build_report(folder, tmp_path / f"{folder.name}.html").read_text()
        assert {p.stem for p in (tmp_path / "figures").glob("*.png")} >= figs
        for sid, _ in SECTIONS:
            assert f'<section id="{sid}">' in text
        assert "<b>Rank lists</b>: unavailable &mdash;" in text and "run `advreid bench`" in text
        assert "<b>Grad-CAM</b>: unavailable" in text and not re.search(r"https?://", text)
    with pytest.raises(ValueError, match="not a bench folder"):
        detect_kind(tmp_path)


def test_bench_without_features_degrades_and_drops_stale_figures(bench, tmp_path):
    import shutil

    from advreid.experiments.report import build_report

    out = tmp_path / "bench"
    shutil.copytree(bench["out"], out)
    (out / "figures" / "mine.png").write_bytes(b"not the report's")
    for f in (out / "cells").glob("*.features.safetensors"):
        f.unlink()
    text = build_report(out).read_text()
    names = {p.name for p in (out / "figures").glob("*.png")}
    assert not any(n.startswith(("ranklist_", "tsne_")) for n in names)  # the old report's, now stale: removed
    assert {"mine.png", "gradcam_0.png", f"perturbation_{bench['chosen'][0]:06d}.png"} <= names
    assert "<b>Rank lists</b>: unavailable &mdash; queries [" in text and "features not stored" in text
    assert "recomputed with the model: the clean features were not stored" in text
