"""`advreid eval` / `advreid attack` print every metric with its 95% bootstrap interval, the one results.json stores."""

import json
import re

import pytest
from tests.conftest import tiny_overrides

from advreid.cli import main
from advreid.reporting import METRIC_COLUMNS, format_table

CELL = re.compile(r"(\d+\.\d) \[(\d+\.\d), (\d+\.\d)\]")
KEYS = [k for k, _ in METRIC_COLUMNS]


@pytest.fixture(scope="module")
def run(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_ci") / "run"
    assert main(["train", "--config", "bot_r50", "--out", str(out), *tiny_overrides(synth_root, epochs=1)]) == 0
    return out


def printed_cells(text: str, setting: str) -> list[tuple[float, float, float]]:
    """(point, lo, hi) of each metric cell on the table row whose label is ``setting`` (in %)."""
    (line,) = [s for s in text.splitlines() if s.strip().startswith(setting + "  ")]
    return [tuple(map(float, c)) for c in CELL.findall(line)]


def stored_cells(metrics: dict, prefix: str = "") -> list[tuple[float, float, float]]:
    out = []
    for k in KEYS:
        lo, hi = metrics[f"{prefix}{k}_ci"]
        out.append(tuple(round(100 * v, 1) for v in (metrics[prefix + k], lo, hi)))
    return out


def test_eval_prints_the_stored_intervals(run, synth_root, capsys):
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(synth_root), "--rerank", "--num-workers", "0"]) == 0
    text = capsys.readouterr().out
    res = json.loads((run / "results.json").read_text())["evaluations"][-1]
    plain, rr = printed_cells(text, "plain"), printed_cells(text, "re-ranked")
    assert plain == stored_cells(res) and rr == stored_cells(res, "rr_")
    assert any(lo < hi for _, lo, hi in plain)  # real intervals, not a point repeated
    assert all(lo <= p <= hi for p, lo, hi in plain + rr)


def test_attack_prints_the_stored_intervals(run, synth_root, tmp_path, capsys):
    out = tmp_path / "atk"
    capsys.readouterr()
    assert main(["attack", str(run), "--data", str(synth_root), "--out", str(out), "--device", "cpu",
                 "--num-workers", "0", "--attack", "ifgsm", "--sweep-eps", "2px,8px", "--steps", "2",
                 "--rerank"]) == 0
    text = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    clean = res["runs"][0]["clean"]
    assert printed_cells(text, "clean") == stored_cells(clean)
    assert printed_cells(text, "clean, re-ranked") == stored_cells(clean, "rr_")
    for r in res["runs"]:
        name = f"ifgsm {r['eps_px']:.3g}px"
        assert printed_cells(text, name) == stored_cells(r["attacked"])
        assert printed_cells(text, f"{name}, re-ranked") == stored_cells(r["attacked"], "rr_")
    assert "max Linf px" in text  # the attack's own columns stay


def test_format_table_interval_cells():
    """With `<key>_ci` a metric cell is `point [lo, hi]` (also under `rr_` keys); without, the point to 2 decimals;
    other floats keep 3 significant digits."""
    rows = [{"s": "a", "mAP": 0.38625, "mAP_ci": [0.337, 0.4291], "rr_rank1": 0.5, "rr_rank1_ci": [0.45, 0.55],
             "t": 0.012345},
            {"s": "b", "mAP": 0.25, "rr_rank1": 0.125, "t": 2.0}]
    text = format_table(rows, [("s", ""), ("mAP", "mAP"), ("rr_rank1", "rr R1"), ("t", "t")])
    a, b = text.splitlines()[2:]
    assert a.split("  ")[-3:] == ["38.6 [33.7, 42.9]", "50.0 [45.0, 55.0]", "0.0123"]
    assert b.split() == ["b", "25.00", "12.50", "2"]
