"""``advreid robust``: the per-query worst case over a versioned ensemble, its schema, resume, the randomised-defense
version, the gradient-masking flags, the new members (APGD, the rank attack, the random search) and the
leaderboard's files. End to end on a tiny trained cnn4 and the tiny synthetic set; ensembles scaled down where the
real step counts would take minutes (a scaled ensemble is labelled as such)."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch
from tests.conftest import untrained_cnn4_run
from torch import nn

from advreid.attacks import build
from advreid.attacks.apgd import checkpoints, loss_rises
from advreid.cli import main
from advreid.experiments.runs import load_run
from advreid.models import build_model
from advreid.robust import (
    QueryScores,
    RobustJob,
    get_ensemble,
    masking_flags,
    results_schema,
    run_robust,
    summarize,
    worst_case,
)
from advreid.robust import ensemble as ensemble_module


class HardQuant(nn.Module):
    """A 4-level quantiser with a zero gradient and no BPDA: a defense that masks gradients (test-only)."""

    name = "hardquant"
    randomized = False
    differentiable = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 3).detach() / 3 + 0 * x

    def params(self) -> dict:
        return {"name": self.name}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An untrained (seeded) cnn4 run at 64x32: the ensemble's mechanics do not need a good model."""
    return untrained_cnn4_run(tmp_path_factory.mktemp("robust") / "run")


def _files(out):
    """Every JSON file a robust run wrote, with the schema definition it must follow."""
    yield out / "results.json", None
    yield out / "job.json", "job_file"
    for p in sorted((out / "members").glob("*.json")):
        yield p, "member_file"


def _validate_all(out) -> dict:
    schema = results_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    n = 0
    for path, definition in _files(out):
        doc = json.loads(path.read_text())
        sub = schema if definition is None else {"$defs": schema["$defs"], "$ref": f"#/$defs/{definition}"}
        jsonschema.validate(doc, sub, cls=jsonschema.Draft202012Validator)
        n += 1
    assert n >= 4
    return json.loads((out / "results.json").read_text())


def _check_worst(doc: dict, out) -> None:
    """Worst case <= every member, overall and per query; winners name the member whose AP the query kept."""
    members = {n: json.loads((out / "members" / f"{n}.json").read_text()) for n in doc["members"]}
    for name, m in doc["members"].items():
        assert doc["worst_case"]["mAP"] <= m["mAP"], name  # exact: means of elementwise smaller APs
        assert all(len(m[f"{k}_ci"]) == 2 and m[f"{k}_ci"][0] <= m[k] <= m[f"{k}_ci"][1] for k in ("mAP", "rank1"))
    pq = doc["per_query"]
    assert len(pq["index"]) == len(pq["winner"]) == doc["data"]["num_attacked"]
    for i, (ap, w) in enumerate(zip(pq["worst_ap"], pq["winner"], strict=True)):
        if w is None:
            continue
        aps = {n: float(np.mean(r["scores"]["AP"][i])) for n, r in members.items()}
        assert ap == pytest.approx(aps[w], abs=1e-6)
        assert ap <= min(aps.values()) + 1e-6
    assert sum(m["wins"] for m in doc["members"].values()) == doc["worst_case"]["num_valid_queries"]
    assert doc["worst_case"]["mAP"] < doc["clean"]["mAP"]


# ---------------------------------------------------------------------------------------------- end to end
def test_cli_quick_worst_case_schema_and_leaderboard(run, synth_root, tmp_path, capsys):
    out = tmp_path / "quick"
    assert main(["robust", str(run), "--data", str(synth_root), "--version", "quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "worst case (per query)" in text and "apgd" in text and "square (gradient-free)" in text and "[" in text
    doc = _validate_all(out)
    _check_worst(doc, out)
    assert doc["ensemble"]["label"] == "quick-linf-r1" and doc["threat"]["eps_px"] == pytest.approx(8)
    assert doc["threat"]["defense"] is None
    # no silent overwrite; a resume of the same job is a no-op with the same numbers
    assert main(["robust", str(run), "--data", str(synth_root), "--version", "quick", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["robust", str(run), "--data", str(synth_root), "--version", "quick", "--out", str(out),
                 "--resume", "--eps", "4px"]) == 2
    assert "--resume" in capsys.readouterr().err
    # the leaderboard: two versions are never ranked together
    std = tmp_path / "std"
    model, info = load_run(run)
    run_robust(RobustJob(model, info, str(synth_root), str(std), ensemble=get_ensemble("standard").scaled(0.1)))
    sdoc = _validate_all(std)
    _check_worst(sdoc, std)
    board = tmp_path / "board"
    assert main(["leaderboard", str(out), str(std / "results.json"), "--out", str(board)]) == 0
    md = (board / "leaderboard.md").read_text()
    assert md.count("## ") == 2 and "quick-linf-r1" in md and "standard-x0.1-linf-r1" in md
    rows = (board / "leaderboard.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("group-1,1,") and rows[2].startswith("group-2,1,")
    html = (board / "leaderboard.html").read_text()
    assert "http://" not in html.replace("http://www.w3.org", "") and "<table class=\"board\"" in html
    assert main(["leaderboard", str(out), "--out", str(board)]) == 2  # refuses to overwrite
    assert main(["leaderboard", str(run), "--out", str(tmp_path / "b2")]) == 2  # a run folder is no robust result
    assert "no results.json" in capsys.readouterr().err


def test_resume_redoes_only_unfinished_members(run, synth_root, tmp_path):
    model, info = load_run(run)
    ens = get_ensemble("quick")
    out = tmp_path / "r"

    class Killed(Exception):
        pass

    def kill(name, rec):
        if name == "apgd":
            raise Killed

    with pytest.raises(Killed):
        run_robust(RobustJob(model, info, str(synth_root), str(out), ensemble=ens, on_member=kill))
    first = (out / "members" / "apgd.json").read_bytes()
    assert not (out / "results.json").exists() and not (out / "members" / "square.json").exists()
    done = []
    doc, _ = run_robust(RobustJob(model, info, str(synth_root), str(out), ensemble=ens, resume=True,
                                  on_member=lambda n, r: done.append(n)))
    assert (out / "members" / "apgd.json").read_bytes() == first and done == ["apgd", "square"]
    straight, _ = run_robust(RobustJob(model, info, str(synth_root), str(tmp_path / "s"), ensemble=ens))
    assert doc["worst_case"] == straight["worst_case"] and doc["per_query"] == straight["per_query"]


def test_rand_version_with_rrp_runs(run, synth_root, tmp_path, monkeypatch, capsys):
    table = dict(ensemble_module._TABLE)
    table[("rand", "linf")] = table[("rand", "linf")].scaled(0.1)
    monkeypatch.setattr(ensemble_module, "_TABLE", table)
    out = tmp_path / "rand"
    assert main(["robust", str(run), "--data", str(synth_root), "--defense", "rrp", "--adaptive", "--version", "rand",
                 "--max-images", "8", "--out", str(out)]) == 0
    assert "averaged over 5 defense draws" in capsys.readouterr().out
    doc = _validate_all(out)
    _check_worst(doc, out)
    assert doc["threat"]["eot_samples"] == 8 and doc["threat"]["defense"]["randomized"]
    assert doc["clean"]["draws"] == doc["worst_case"]["draws"] == 5
    member = json.loads((out / "members" / "apgd.json").read_text())
    ap = np.array(member["scores"]["AP"], dtype=float)
    assert ap.shape == (8, 5) and np.nanstd(ap, axis=1).max() > 0  # the draws differ
    assert main(["robust", str(run), "--data", str(synth_root), "--version", "rand", "--out", str(tmp_path / "x")]) == 2
    assert "randomised defenses" in capsys.readouterr().err


def test_gradient_masking_defense_is_flagged(run, synth_root, tmp_path):
    model, info = load_run(run)
    doc, _ = run_robust(RobustJob(model, info, str(synth_root), str(tmp_path / "m"), defense=HardQuant(),
                                  adaptive=True, ensemble=get_ensemble("quick"), max_images=8))
    assert doc["masking"]["flagged"]
    assert doc["masking"]["loss_not_rising_share"]["apgd"] == 1.0
    assert any("did not rise" in r for r in doc["masking"]["reasons"])


# ----------------------------------------------------------------------------------------- the worst case
def _qs(ap, fm, draws=1):
    ap = np.array(ap, dtype=float).reshape(-1, draws)
    fm = np.array(fm, dtype=np.int64).reshape(-1, draws)
    return QueryScores(ap, np.where(fm >= 0, 0.5, np.nan), fm)


def test_worst_case_rule_hand_built():
    a = _qs([0.5, 0.2, np.nan, 0.3], [1, 4, -1, 2])
    b = _qs([0.4, 0.2, np.nan, 0.3], [0, 6, -1, 2])
    worst, winners = worst_case({"a": a, "b": b})
    assert winners == ["b", "b", None, "a"]  # lower AP; tie: worse first match; full tie: the first member
    assert worst.ap[:, 0].tolist()[:2] == [0.4, 0.2] and worst.first_match[:, 0].tolist() == [0, 6, -1, 2]
    s = summarize(worst, min_resamples=100)
    assert s["mAP"] == pytest.approx((0.4 + 0.2 + 0.3) / 3) and s["rank1"] == pytest.approx(1 / 3)
    assert s["num_valid_queries"] == 3 and s["mAP_ci"][0] <= s["mAP"] <= s["mAP_ci"][1]


def test_summary_over_draws_is_the_mean_of_draw_metrics():
    qs = _qs([0.2, 0.6, 1.0, 0.5], [3, 0, 0, 1], draws=2)  # two queries x two draws
    s = summarize(qs, min_resamples=100)
    assert s["mAP"] == pytest.approx(np.mean([(0.2 + 1.0) / 2, (0.6 + 0.5) / 2]))
    assert s["rank1"] == pytest.approx(np.mean([0.5, 0.5])) and s["rank5"] == 1.0 and s["draws"] == 2


def test_masking_flags_hand_built():
    grad = _qs([0.5, 0.5, 0.5, 0.5], [0, 0, 0, 0])
    free = _qs([0.1, 0.9, 0.9, 0.9], [3, 0, 0, 0])
    assert masking_flags({"g": grad, "f": free}, ["f"], {})["flagged"] is False  # wins 25% but higher mAP
    free2 = _qs([0.1, 0.1, 0.6, 0.6], [3, 3, 0, 0])
    flags = masking_flags({"g": grad, "f": free2}, ["f"], {})
    assert flags["flagged"] and flags["gradient_free_beats_share"] == 0.5
    flags = masking_flags({"g": grad, "f": free}, ["f"], {"g": {0: True, 1: True, 2: True, 3: False}})
    assert flags["flagged"] and flags["loss_not_rising_share"]["g"] == 0.25


# ------------------------------------------------------------------------------------------- the members
def test_apgd_checkpoints_follow_croce_hein():
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]


@pytest.fixture(scope="module")
def net64():
    torch.manual_seed(0)
    return build_model("cnn4", 10, pretrained=False).double().eval()


MEMBER_CASES = [("apgd", {"restarts": 2, "steps": 6}), ("apgd", {"norm": "l2", "eps": 1.0, "steps": 6}),
                ("square", {"steps": 12}), ("square", {"norm": "l2", "eps": 1.0, "steps": 8}), ("rank", {"steps": 4})]


@pytest.mark.parametrize("name,kw", MEMBER_CASES)
def test_new_members_are_independent_per_sample_in_float64(net64, name, kw):
    from advreid.attacks import GuideBank

    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 64, 32, generator=g, dtype=torch.float64)
    bank = GuideBank.from_images(net64, torch.rand(8, 3, 64, 32, generator=g, dtype=torch.float64),
                                 torch.arange(8) % 4, torch.arange(8) % 2)
    pids, cams, index = torch.tensor([0, 1, 2]), torch.tensor([1, 0, 1]), torch.tensor([5, 9, 2])
    atk = build(name, net64, **kw)
    both = atk(x, pids, cams, bank, index=index)
    for i in range(3):
        alone = build(name, net64, **kw)(x[i:i + 1], pids[i:i + 1], cams[i:i + 1], bank, index=index[i:i + 1])
        assert torch.equal(alone[0], both[i]), (name, i)
    d = (both - x).flatten(1)
    bound = d.norm(dim=1) if kw.get("norm") == "l2" else d.abs().amax(1)
    assert (bound <= atk.eps + 1e-9).all() and not torch.equal(both, x)


def test_apgd_loss_rises_and_stalls_behind_a_zero_gradient(net64):
    x = torch.rand(2, 3, 64, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    atk = build("apgd", net64, steps=8)
    atk(x, index=torch.tensor([0, 1]))
    assert loss_rises(atk.progress) == {0: True, 1: True}
    masked = nn.Sequential(HardQuant(), net64)
    atk = build("apgd", masked, steps=8)
    atk(x, index=torch.tensor([0, 1]))
    assert loss_rises(atk.progress) == {0: False, 1: False}
    sq = build("square", masked, steps=20)  # no gradient needed: the random search still raises the loss
    y = sq(x, index=torch.tensor([0, 1]))
    with torch.no_grad():
        ref = sq.features(x)
        assert (sq.dist(sq.features(y), ref) > sq.dist(sq.features(x.clone()), ref)).all()


# -------------------------------------------------------------------------------------------- leaderboard
def fake_results(tmp_path, maps, *, eps=8 / 255, version="quick"):
    """Schema-valid results folders whose worst-case mAP is each of ``maps`` (one query, hand-built scores,
    assembled by the runner's own code): leaderboard tests without running attacks."""
    from advreid.evaluation import EvalProtocol
    from advreid.robust import validate_results
    from advreid.robust.runner import assemble

    ens = get_ensemble(version)
    out = []
    for i, m in enumerate(maps):
        header = {"format": "advreid.robust.v1", "advreid_version": "test", "model": {"name": f"model-{i}"},
                  "data": {"name": "synthetic", "root": "/data", "fingerprint": "0" * 64, "num_query": 1,
                           "num_gallery": 4, "num_attacked": 1, "max_images": None},
                  "threat": {"norm": "linf", "eps": eps, "eps_px": eps * 255, "eps_label": f"{eps * 255:g}px",
                             "kind": "white_box", "adaptive": False, "defense": None, "eot_samples": None},
                  "ensemble": ens.to_dict(), "seed": 0, "protocol": EvalProtocol().to_dict()}
        records = {}
        for member in ens.members:
            qs = QueryScores(np.array([[m]]), np.array([[m]]), np.array([[1]]))
            records[member.name] = {"member": member.to_dict(), "spec": member.spec(eps, 0).to_dict(), "params": {},
                                    "scores": qs.to_json(), "loss_rise": None, "seconds": 1.0, "linf_max_px": 8.0,
                                    "l2_mean": 1.0}
        clean = QueryScores(np.array([[0.9]]), np.array([[0.9]]), np.array([[0]]))
        doc = assemble(header, clean, records, [0], seconds=2.0)
        validate_results(doc)
        folder = tmp_path / f"entry{i}-{version}-{eps:.4f}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps(doc))
        out.append(folder)
    return out


def test_leaderboard_groups_and_ranks(tmp_path):
    from advreid.reporting.leaderboard import load_results, write_leaderboard

    entries = fake_results(tmp_path, [0.2, 0.6, 0.4]) + fake_results(tmp_path, [0.9], eps=4 / 255)
    entries += fake_results(tmp_path, [0.7], version="standard")
    paths, md = write_leaderboard(entries, tmp_path / "board")
    assert [p.name for p in paths] == ["leaderboard.html", "leaderboard.md", "leaderboard.csv"]
    rows = [r.split(",") for r in paths[2].read_text().splitlines()[1:]]
    assert [(r[0], r[1], r[2], float(r[3])) for r in rows] == [
        ("group-1", "1", "model-1", 0.6), ("group-1", "2", "model-2", 0.4), ("group-1", "3", "model-0", 0.2),
        ("group-2", "1", "model-0", 0.9), ("group-3", "1", "model-0", 0.7)]
    assert md.count("\n## ") == 3 and "linf 4px" in md and "standard-linf-r1" in md
    assert all(float(r[6]) <= float(r[3]) <= float(r[9]) for r in rows)  # mAP inside its interval
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not an `advreid robust` results file"):
        load_results([bad])
