"""The code in docs/extending.md runs as written (from outside the package, without editing advreid)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tests.conftest import tiny_overrides

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_the_docs_have_the_three_examples() -> None:
    blocks = _blocks()
    assert len(blocks) >= 3  # later sections (a new model kind) are run by their own tests
    assert 15 <= len(blocks[0].strip().splitlines()) <= 25  # the hook example stays about 20 lines


def test_hook_and_step_examples_run(synth_root, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    ov = tiny_overrides(synth_root, epochs=2)
    ns: dict = {"OVERRIDES": ov}
    exec(compile(_blocks()[0], str(DOC), "exec"), ns)
    rows = [json.loads(x) for x in (tmp_path / "runs/gradnorm/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["grad_norm"] > 0 for r in rows)
    ns = {"OVERRIDES": ov}
    exec(compile(_blocks()[1], str(DOC), "exec"), ns)
    rows = [json.loads(x) for x in (tmp_path / "runs/custom_step/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["ce"] == 0 and r["triplet"] > 0 for r in rows)


def test_registration_example_runs() -> None:
    import torch

    from advreid.attacks import ATTACKS, build
    from advreid.defenses import PASSIVE, build_passive
    from advreid.models import build_model

    exec(compile(_blocks()[2], str(DOC), "exec"), {})
    try:
        model = build_model("cnn4", 3).eval()
        atk = build("my_shift", model)
        x = torch.rand(2, 3, 64, 32)
        assert atk.steps == 10 and (atk(x) - x).abs().max() <= atk.eps + 1e-6
        assert build_passive("cs_small").hop_sizes(256, 128)[0] == (100, 46)
        with pytest.raises(KeyError, match="did you mean 'steps'"):
            build("my_shift", model, stepz=3)
    finally:
        ATTACKS.unregister("my_shift")
        PASSIVE.unregister("cs_small")
