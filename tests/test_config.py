from dataclasses import dataclass, field

import pytest

from dalle_proto.config import ConfigError, load_config


@dataclass
class Model:
    depth: int = 2
    dim: int = 64
    attention: str = "sparse"


@dataclass
class Run:
    out_dir: str = "runs/x"
    model: Model = field(default_factory=Model)
    captions: list[str] = field(default_factory=list)
    path: str | None = None


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_yaml_then_overrides(tmp_path):
    p = write(tmp_path, "model:\n  depth: 8\ncaptions: [a red circle]\n")
    cfg = load_config(Run, [p], ["model.dim=128", "path=/data"])
    assert isinstance(cfg, Run) and isinstance(cfg.model, Model)
    assert (cfg.model.depth, cfg.model.dim, cfg.path) == (8, 128, "/data")
    assert cfg.captions == ["a red circle"]


def test_unknown_key_in_yaml_names_key_file_and_valid_keys(tmp_path):
    p = write(tmp_path, "model:\n  depht: 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(Run, [p])
    msg = str(e.value)
    assert "model.depht" in msg and str(p) in msg
    assert "['attention', 'depth', 'dim']" in msg


def test_unknown_top_level_override():
    with pytest.raises(ConfigError, match=r"unknown config key 'modle'.*valid keys at the top level"):
        load_config(Run, [], ["modle.depth=3"])


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="depth"):
        load_config(Run, [], ["model.depth=deep"])


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="not found"):
        load_config(Run, ["/nonexistent.yaml"])
    with pytest.raises(ConfigError, match="key.subkey=value"):
        load_config(Run, [], ["model.depth"])


@dataclass
class SizedModel:
    size: str | None = None
    depth: int = 2
    dim: int = 64


@dataclass
class SizedRun:
    model: SizedModel = field(default_factory=SizedModel)


SIZES = {"big": {"depth": 24, "dim": 1024}}
PRESETS = {"model.size": lambda name: {"model": SIZES[name]}}


def test_named_size_fills_section_but_explicit_values_win(tmp_path):
    p = write(tmp_path, "model:\n  size: big\n  dim: 512\n")
    cfg = load_config(SizedRun, [p], ["model.depth=30"], presets=PRESETS)
    assert (cfg.model.size, cfg.model.depth, cfg.model.dim) == ("big", 30, 512)
    cfg = load_config(SizedRun, [], ["model.size=big"], presets=PRESETS)
    assert (cfg.model.depth, cfg.model.dim) == (24, 1024)
    assert load_config(SizedRun, [], [], presets=PRESETS).model.depth == 2
