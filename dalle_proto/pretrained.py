"""Saving and loading model components as a folder: `config.json` + `model.safetensors`.

Every component (text tokenizer aside, which is one `tokenizer.json`) is saved this way, so a saved
model is readable without pickle and a config mismatch is caught before any weight is touched.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

C = TypeVar("C")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def config_from_dict(config_cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Build a dataclass config, failing on unknown keys with the key and the valid ones named."""
    valid = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(
            f"{source}: unknown key(s) {unknown} for {config_cls.__name__}; valid keys: {sorted(valid)}"
        )
    return config_cls(**values)


def save_component(folder: str | os.PathLike, config: Any, state_dict: dict[str, torch.Tensor],
                   dtype: torch.dtype | None = None) -> Path:
    """Save a dataclass `config` and a state dict as `folder/config.json` + `folder/model.safetensors`.

    `dtype` (e.g. torch.bfloat16) casts floating-point tensors, to keep shipped checkpoints small.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in state_dict.items():
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[name] = t.contiguous()
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{WEIGHTS_NAME}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, folder / WEIGHTS_NAME)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    config_dict = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    atomic_write_bytes(folder / CONFIG_NAME, (json.dumps(config_dict, indent=2) + "\n").encode())
    return folder


def load_component(folder: str | os.PathLike, config_cls: type[C]) -> tuple[C, dict[str, torch.Tensor]]:
    """Read back what `save_component` wrote; the config is validated key by key."""
    folder = Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: expected a saved model folder with {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME}, but {name} is missing")
    values = json.loads((folder / CONFIG_NAME).read_text())
    config = config_from_dict(config_cls, values, source=str(folder / CONFIG_NAME))
    return config, load_file(str(folder / WEIGHTS_NAME))


class PretrainedMixin:
    """`save_pretrained` / `from_pretrained` for an nn.Module built as `cls(config)` from one
    dataclass config of type `config_class` (the diffusers ModelMixin pattern, in a few lines)."""

    config_class: type

    def save_pretrained(self, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write `folder/config.json` + `folder/model.safetensors` (no pickle); `dtype` (e.g.
        torch.bfloat16) casts the floating-point weights."""
        return save_component(folder, self.config, self.state_dict(), dtype=dtype)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike):
        """The model `save_pretrained` wrote, in eval mode; config and weights are checked strictly."""
        config, state_dict = load_component(folder, cls.config_class)
        model = cls(config)
        load_state_dict_strict(model, state_dict, source=os.path.join(str(folder), WEIGHTS_NAME))
        return model.eval()


def load_state_dict_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """`module.load_state_dict(strict=True)` with an error that names the file and every bad key."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shape_errors = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in sorted(set(own) & set(state_dict)) if own[k].shape != state_dict[k].shape]
    if missing or unexpected or shape_errors:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
        if shape_errors:
            parts.append("shape mismatches: " + "; ".join(shape_errors[:10]))
        raise ValueError(f"{source}: weights do not match {type(module).__name__}: " + ", ".join(parts))
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()}, strict=True)
