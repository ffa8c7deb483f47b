"""Typed run configuration: dataclasses, loaded from YAML files with dotted command-line overrides.

    cfg = load_config(RunConfig, ["configs/shapes.yaml"], ["transformer.depth=4"])

Unknown keys are errors that name the key, the file and the valid keys. Values are type-checked by
OmegaConf against the dataclass annotations.
"""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration file or override does not fit the typed schema."""


def _dataclass_field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _nested_dataclass(tp: Any) -> type | None:
    """The dataclass inside `tp` (also inside `X | None`), or None if it is a plain value type."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def check_keys(cls: type, values: Any, source: str, prefix: str = "") -> None:
    """Raise ConfigError for the first key in `values` (a nested dict) that `cls` does not define."""
    if not isinstance(values, dict):
        return
    types = _dataclass_field_types(cls)
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in types:
            where = f"under '{prefix[:-1]}'" if prefix else "at the top level"
            raise ConfigError(f"{source}: unknown config key '{full}'; valid keys {where}: {sorted(types)}")
        sub = _nested_dataclass(types[key])
        if sub is not None:
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{source}: '{full}' must be a mapping of {sub.__name__} fields, got {value!r}")
            check_keys(sub, value, source, f"{full}.")


def load_config(cls: type[C], yaml_paths: list[str | Path] = (), overrides: list[str] = (),
                presets: dict[str, Callable[[Any], dict]] | None = None) -> C:
    """Build `cls` from its defaults, then each YAML file in order, then `key.sub=value` overrides.

    `presets` maps a dotted key to a function of its value returning a nested dict of defaults that
    is applied before every file, e.g. `{"transformer.size": lambda name: {"transformer": SIZES[name]}}`:
    a named size fills the section, and whatever the files and overrides set still wins.
    """
    merged = OmegaConf.structured(cls)
    layers: list[tuple[str, Any]] = []
    for path in yaml_paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            layers.append((str(path), OmegaConf.load(path)))
        except Exception as e:  # yaml syntax errors come in several types
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.subkey=value")
        layers.append((f"override {item!r}", OmegaConf.from_dotlist([item])))
    for key, preset in (presets or {}).items():
        chosen = [OmegaConf.select(layer, key) for _, layer in layers]
        chosen = [value for value in chosen if value is not None]
        value = chosen[-1] if chosen else OmegaConf.select(merged, key)
        if value is not None:
            layers.insert(0, (f"{key}={value}", OmegaConf.create(preset(value))))
    for source, layer in layers:
        plain = OmegaConf.to_container(layer, resolve=False) or {}
        if not isinstance(plain, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {type(plain).__name__}")
        check_keys(cls, plain, source)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{source}: {e.msg if hasattr(e, 'msg') else e}") from e
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"incomplete or invalid config: {e}") from e
    except ValueError as e:  # a dataclass's __post_init__ check: a bad value, not a bug to trace back
        raise ConfigError(str(e)) from e


def config_to_yaml(config: Any) -> str:
    """The resolved config as YAML, e.g. to save next to a run so it can be repeated."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))
