import pytest

from advreid.config import DEFAULTS, ConfigError, list_presets, load_config, parse_overrides
from advreid.engine.optim import lr_factor


def test_overrides_parse_yaml_scalars_and_nest():
    ov = parse_overrides(["optim.lr=0.01", "train.amp=false", "sched.milestones=[10, 20]", "model.name=resnet18"])
    assert ov == {"optim": {"lr": 0.01}, "train": {"amp": False}, "sched": {"milestones": [10, 20]},
                  "model": {"name": "resnet18"}}


def test_load_preset_then_override():
    cfg = load_config("layumi_r50_seed", ["optim.lr=0.1", "train.epochs=3"])
    assert cfg["optim"]["name"] == "sgd"
    assert cfg["optim"]["lr"] == 0.1 and cfg["optim"]["backbone_lr"] == 0.005
    assert cfg["train"]["epochs"] == 3
    assert cfg["data"]["train_all"] is True
    # untouched keys keep the defaults
    assert cfg["eval"]["batch_size"] == DEFAULTS["eval"]["batch_size"]


def test_presets_all_load():
    names = list_presets()
    assert {"bot_r50", "layumi_r50_seed", "demo_cpu"} <= set(names)
    for n in names:
        load_config(n)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*did you mean optim.lr"):
        load_config(None, ["optim.lrr=0.1"])


def test_type_and_choice_errors_name_the_key():
    with pytest.raises(ConfigError, match="train.epochs.*integer"):
        load_config(None, ["train.epochs=ten"])
    with pytest.raises(ConfigError, match="optim.name.*sgd"):
        load_config(None, ["optim.name=rmsprop"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["optim.lr"])
    # an int is accepted where a float is expected, and converted
    assert load_config(None, ["optim.lr=1"])["optim"]["lr"] == 1.0


def test_base_inheritance_and_missing_file(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("optim: {lr: 0.2}\ntrain: {epochs: 7}\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\ntrain: {epochs: 9}\n")
    cfg = load_config(child)
    assert cfg["optim"]["lr"] == 0.2 and cfg["train"]["epochs"] == 9
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_bot_schedule_warmup_and_steps():
    s = load_config("bot_r50")["sched"]
    assert lr_factor(0, s, 120) == pytest.approx(0.01)
    assert lr_factor(5, s, 120) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(10, s, 120) == 1.0
    assert lr_factor(39, s, 120) == 1.0
    assert lr_factor(40, s, 120) == pytest.approx(0.1)
    assert lr_factor(70, s, 120) == pytest.approx(0.01)
    seed = load_config("layumi_r50_seed")["sched"]
    assert [lr_factor(e, seed, 60) for e in (0, 39, 40, 59)] == pytest.approx([1, 1, 0.1, 0.1])
