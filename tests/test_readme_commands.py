"""The README's command lines name real subcommands and flags: every ``advreid ...`` line of its bash blocks parses
with advreid's own parser (placeholders such as ``...`` stand for arguments; nothing runs)."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from advreid.cli import build_parser
from advreid.config import preset_dir, resolve_config_path

README = Path(__file__).resolve().parents[1] / "README.md"


def _command_lines() -> list[str]:
    """``advreid`` command lines of the README's bash blocks (comments dropped, ``;``-chains split)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    lines = []
    for block in blocks:
        for raw in block.splitlines():
            code = raw.split("  #")[0].strip()
            for part in code.split(";"):
                part = part.strip()
                if part.startswith("torchrun"):
                    part = "advreid " + part.split(" -m advreid ", 1)[1]
                if part.startswith("advreid "):
                    lines.append(part)
    return lines


def _subparser(parser: argparse.ArgumentParser, words: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """Follow subcommand words down the parser tree; return the leaf parser and the remaining words."""
    while words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or words[0] not in subs[0].choices:
            break
        parser, words = subs[0].choices[words[0]], words[1:]
    return parser, words


def test_readme_has_command_lines():
    lines = _command_lines()
    assert len(lines) >= 30, lines
    assert any(line.startswith("advreid bench ") for line in lines)


@pytest.mark.parametrize("line", _command_lines())
def test_readme_command_flags_exist(line):
    words = shlex.split(line)[1:]
    parser, rest = _subparser(build_parser(), words)
    assert parser.prog != "advreid", f"{line!r}: no such subcommand"
    known = {s for a in parser._actions for s in a.option_strings}
    for w in rest:
        if w.startswith("--"):
            flag = w.split("=", 1)[0]
            assert flag in known, f"{line!r}: {parser.prog} has no flag {flag} (has {sorted(known)})"
    _check_presets(line, words)


# the preset folder of each command that takes a config name (``-c NAME`` / ``bench NAME``)
PRESET_FOLDERS = {"train": "", "diffusion": "diffusion", "dmr": "dmr", "bench": "bench"}


def _check_presets(line: str, words: list[str]) -> None:
    """A preset name given to ``-c``/``--config`` (or as ``bench``'s grid) exists in the command's preset folder."""
    folder = preset_dir() / PRESET_FOLDERS.get(words[0], "")
    names = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-c", "--config")]
    if words[0] == "bench":
        names.append(words[1])
    for name in names:
        resolve_config_path(name, folder)  # raises ConfigError naming the missing preset


def test_readme_python_example_runs(synth_root, tmp_path, monkeypatch, capsys):
    """The README's Python API block runs as written, on the tiny synthetic set instead of Market-1501 (two
    substitutions: the dataset path and the training overrides)."""
    from tests.conftest import tiny_overrides

    (code,) = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    market, over = 'MARKET = "/data/Market-1501-v15.09.15"', 'overrides=[f"data.root={MARKET}"]'
    assert market in code and over in code
    code = code.replace(market, f"MARKET = {str(synth_root)!r}").replace(over, "overrides=OVERRIDES")
    monkeypatch.chdir(tmp_path)
    ns: dict = {"OVERRIDES": tiny_overrides(synth_root, epochs=1)}
    exec(compile(code, str(README), "exec"), ns)
    res, adv = ns["res"], ns["adv"]
    assert res["rank1_ci"][0] <= res["rank1"] <= res["rank1_ci"][1] and "rr_mAP" in res
    assert ns["att"]["threat"] == "adaptive" and ns["att"]["defense"]["name"] == "cs"
    assert 0 <= adv["mAP"] <= 1 and adv["mAP_ci"][0] <= adv["mAP"] <= adv["mAP_ci"][1]
    assert ns["att"]["runs"][0]["linf_max"] <= 5 / 255 + 1e-6
    assert (tmp_path / "runs" / "bot_market" / "checkpoints").is_dir()
    assert "adaptive LTA through CS" in capsys.readouterr().out
