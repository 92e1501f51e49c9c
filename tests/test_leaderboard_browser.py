"""The leaderboard as a browser sees it: headless Chromium loads a page built from real `advreid robust` results
(two ensembles, so two groups), the page logs no error, every group's table is there, and clicking-sort works: the
page's self-check sorts each table by worst-case mAP both ways and back by rank, and the DOM orders are checked.
Skipped, saying why, where no Chromium binary is installed."""

import pytest

from advreid.reporting.browser import check_report_in_browser, find_chromium

pytestmark = pytest.mark.skipif(
    find_chromium() is None,
    reason="no Chromium binary (/usr/bin/chromium, chromium or chromium-browser on PATH): the browser check needs "
           "Debian's chromium package (apt-get install -y chromium; .ci/run installs it when it can)")


def test_leaderboard_renders_and_sorts_in_chromium(tmp_path, synth_root):
    import torch

    from advreid.models import build_model
    from advreid.reporting.leaderboard import write_leaderboard
    from advreid.robust import RobustJob, get_ensemble, run_robust

    docs = []
    for seed in (0, 1):  # two models in the quick group, one in a scaled standard group
        torch.manual_seed(seed)
        model = build_model("cnn4", 12, pretrained=False).eval()
        info = {"name": f"cnn4 untrained seed {seed}"}
        out = tmp_path / f"q{seed}"
        run_robust(RobustJob(model, info, str(synth_root), str(out), ensemble=get_ensemble("quick"), max_images=8))
        docs.append(out)
    out = tmp_path / "s"
    run_robust(RobustJob(model, {"name": "cnn4 untrained seed 1"}, str(synth_root), str(out), max_images=8,
                         ensemble=get_ensemble("standard").scaled(0.05)))
    docs.append(out)
    paths, _ = write_leaderboard(docs, tmp_path / "board")
    res = check_report_in_browser(paths[0], tmp_path / "board.png", timeout=60)
    assert res["errors"] == []
    assert res["sections"] == ["group-1", "group-2"] == res["expected_sections"]
    sorts = {s["id"]: s for s in res["page"]["sorts"]}
    assert sorts["table-group-1"]["rows"] == 2 and sorts["table-group-2"]["rows"] == 1
    for s in sorts.values():
        assert s["map_ascending"] == sorted(s["map_ascending"])
        assert s["map_descending"] == sorted(s["map_descending"], reverse=True)
        assert s["ranks"] == list(range(1, s["rows"] + 1))
        assert s["map_by_rank"] == s["map_descending"]  # rank 1 holds the highest worst-case mAP

