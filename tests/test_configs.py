"""The dataclass config machinery shared by every subcommand: types, files, overrides, errors."""
import argparse
import json
from dataclasses import dataclass, field
from typing import Literal

import pytest

from exgrpo.configs import (
    add_dataclass_arguments,
    config_from_args,
    load_config_file,
    make_config,
    save_config,
)


@dataclass
class Cfg:
    name: str = "run"
    steps: int = 10                    # optimizer steps; 100% of them
    lr: float = 1e-3
    fast: bool = False
    mode: Literal["a", "b"] = "a"
    limit: int | None = None
    model: str | None = "m0"
    splits: tuple[str, ...] = ("test", "ood")
    tags: list[str] = field(default_factory=list)


def _parse(argv):
    p = argparse.ArgumentParser()
    add_dataclass_arguments(p, Cfg)
    return p.parse_args(argv)


def test_defaults_and_every_type_from_the_command_line():
    assert config_from_args(Cfg, _parse([])) == Cfg()
    cfg = config_from_args(Cfg, _parse([
        "--name", "x", "--steps", "3", "--lr", "0.5", "--fast", "--mode", "b", "--limit", "7",
        "--model", "none", "--splits", "held_in, ood,", "--tags", "a,b"]))
    assert cfg == Cfg(name="x", steps=3, lr=0.5, fast=True, mode="b", limit=7, model=None,
                      splits=("held_in", "ood"), tags=["a", "b"])
    assert config_from_args(Cfg, _parse(["--no-fast", "--splits", ""])).splits == ()
    with pytest.raises(SystemExit):  # argparse itself rejects a Literal outside its choices
        _parse(["--mode", "c"])


def test_help_shows_the_field_comment_and_default():
    p = argparse.ArgumentParser()
    add_dataclass_arguments(p, Cfg)
    text = " ".join(p.format_help().split())
    assert "--steps STEPS optimizer steps; 100% of them (default: 10)" in text
    assert "--splits SPLITS comma-separated; default: test,ood" in text


@pytest.mark.parametrize("key,value,msg", [
    ("steps", "x", "'steps' must be int"),
    ("steps", 2.5, "'steps' must be int"),
    ("steps", True, "'steps' must be int"),
    ("lr", "fast", "'lr' must be float"),
    ("fast", "maybe", "'fast' must be true or false"),
    ("mode", "c", "'mode' must be one of ['a', 'b']"),
    ("splits", [1, 2], "'splits' must be a list of strings"),
    ("name", None, "'name' cannot be empty"),
])
def test_bad_values_are_named(key, value, msg):
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        make_config(Cfg, {key: value})


def test_unknown_keys_are_named_with_their_source():
    with pytest.raises(ValueError, match=r"cfg.toml: unknown setting 'stpes'; known: name, steps"):
        make_config(Cfg, {"stpes": 1}, source="cfg.toml")
    with pytest.raises(ValueError, match=r"command line: unknown setting 'nope'"):
        make_config(Cfg, {}, {"nope": 1})


def test_file_then_overrides_toml_table_and_json(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[eval]\nsteps = 4\nlr = 2\nsplits = ["a", "b"]\nfast = true\n[other]\nx = 1\n')
    cfg = config_from_args(Cfg, argparse.Namespace(config=str(toml), steps="9"), table="eval")
    assert (cfg.steps, cfg.lr, cfg.splits, cfg.fast) == (9, 2.0, ("a", "b"), True)
    # No such table: the whole file is the settings, so the tables show up as unknown keys.
    with pytest.raises(ValueError, match="unknown setting 'eval'"):
        config_from_args(Cfg, argparse.Namespace(config=str(toml)), table="sft")
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"eval": {"limit": None, "tags": "x,y"}}))
    cfg = config_from_args(Cfg, argparse.Namespace(config=str(js), limit="3"), table="eval")
    assert cfg.limit == 3 and cfg.tags == ["x", "y"]


def test_save_config_round_trips(tmp_path):
    cfg = Cfg(splits=("x",), tags=["t"], limit=None, mode="b")
    path = save_config(cfg, tmp_path / "run" / "config.json")
    assert json.loads(path.read_text())["splits"] == ["x"]
    assert make_config(Cfg, load_config_file(path)) == cfg


def test_bad_files_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"steps": 1,,}')
    with pytest.raises(ValueError, match=r"bad.json:1: invalid JSON"):
        load_config_file(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a table/object"):
        load_config_file(bad)
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("steps = = 1\n")
    with pytest.raises(ValueError, match="invalid TOML"):
        load_config_file(bad_toml)


def test_unsupported_field_types_fail_loudly():
    @dataclass
    class Bad:
        d: dict = field(default_factory=dict)

    with pytest.raises(TypeError, match="unsupported config type"):
        make_config(Bad, {"d": "x"})


def test_nested_config_fields_as_the_demo_uses_them(tmp_path):
    """DemoConfig holds an SFTConfig (`sft`) and a TrainConfig (`rl`): --sft.* / --rl.* flags, dotted keys and
    nested tables set single sub-settings over the demo's defaults; what the demo sets itself (FIXED) and the
    demo's old flat names (RENAMED) are refused with a message naming the key; the saved config reads back."""
    from exgrpo.demo import PRESETS, DemoConfig
    p = argparse.ArgumentParser()
    add_dataclass_arguments(p, DemoConfig)
    default = DemoConfig()
    cfg = config_from_args(DemoConfig, p.parse_args(["--sft.lr", "0.5", "--rl.group-size", "3", "--rl.no-packed"]))
    assert (cfg.sft.lr, cfg.rl.group_size, cfg.rl.packed) == (0.5, 3, False)
    assert cfg.sft.epochs == default.sft.epochs and cfg.rl.steps == default.rl.steps == 20   # the demo's defaults
    assert config_from_args(DemoConfig, p.parse_args(["--rl.packed"])).rl.packed is True
    quick = make_config(DemoConfig, {**PRESETS["quick"], "sft": {"lr": 0.25}}, {"rl.beta": "0.1"})
    assert (quick.sft.lr, quick.sft.epochs, quick.rl.beta, quick.rl.steps, quick.size) == (0.25, 1.0, 0.1, 2, "tiny")
    with pytest.raises(ValueError, match="'rl.model' is set by DemoConfig itself"):
        make_config(DemoConfig, {"rl": {"model": "x"}})
    with pytest.raises(ValueError, match=r"'sft_lr' is now 'sft.lr' \(flag --sft.lr\)"):
        config_from_args(DemoConfig, p.parse_args(["--sft-lr", "0.1"]))
    with pytest.raises(ValueError, match="unknown setting 'rl.lrr'"):
        make_config(DemoConfig, {"rl.lrr": 1})
    with pytest.raises(ValueError, match="'sft' is a table of settings"):
        make_config(DemoConfig, {"sft": 3})
    with pytest.raises(SystemExit):                     # the demo sets it per arm: no flag for it
        p.parse_args(["--rl.model", "x"])
    save_config(cfg, tmp_path / "c.json")
    assert make_config(DemoConfig, load_config_file(tmp_path / "c.json", "demo")) == cfg
