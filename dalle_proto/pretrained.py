"""Saving and loading model components as a folder: `config.json` + `model.safetensors`.

Every component (text tokenizer aside, which is one `tokenizer.json`) is saved this way, so a saved
model is readable without pickle and a config mismatch is caught before any weight is touched.

Every saved file is read through one of `read_safetensors`, `read_json_object` or `read_text_file`:
a truncated, foreign or pickled file fails with one `BadSavedFileError` line that names the file
and what was expected, and nothing is ever unpickled.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library refuses larger headers too

C = TypeVar("C")


class BadSavedFileError(ValueError):
    """A saved part's file is unreadable or not what save_pretrained writes. The message is one line
    that starts with the file's path; a ValueError, so the CLI prints it without a traceback."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = path
        super().__init__(f"{path}: " + " ".join(problem.split()))  # one line, whatever `problem` held


def _pickle_kind(head: bytes) -> str | None:
    """How the first bytes of a file show it is a torch.save / pickle file, or None."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive, as torch.save writes"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # PROTO opcode, protocol 2..5
        return f"pickle protocol {head[1]} data"
    return None


def _not_safetensors(path: Path, reason: str, head: bytes = b"") -> BadSavedFileError:
    if (kind := _pickle_kind(head)) is not None:
        return BadSavedFileError(path, f"not a valid safetensors file (looks like a torch.save pickle: {kind}); "
                                       "dalle_proto does not unpickle weight files; re-save with safetensors "
                                       "(the part's save_pretrained, or safetensors.torch.save_file(state_dict, path))")
    return BadSavedFileError(path, f"not a valid safetensors file ({reason}); expected the {WEIGHTS_NAME} "
                                   "written by save_pretrained")


def _check_safetensors_layout(path: Path) -> None:
    """Raise BadSavedFileError unless `path` is laid out as a complete safetensors file: an 8-byte
    little-endian header length, that many bytes of JSON header, then exactly the tensors' bytes.
    (A valid file may start with 0x80 too, a 128-byte header, so pickles are told apart only here.)"""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0:
            raise _not_safetensors(path, f"the file is {size} bytes, shorter than the 8-byte header length", head)
        if not 2 <= n <= min(size - 8, MAX_SAFETENSORS_HEADER):
            got = f"only {size - 8} bytes follow" if n > size - 8 else "safetensors allows 2 to 100,000,000"
            raise _not_safetensors(path, f"its first 8 bytes give a {n}-byte header, but {got}: truncated, "
                                         "or not a safetensors file", head)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError or json.JSONDecodeError
        raise _not_safetensors(path, f"its {n}-byte header is not JSON: {e}", head) from e
    if not isinstance(header, dict):
        raise _not_safetensors(path, f"its header is a JSON {_json_type(header)}, not an object of tensors")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        return  # malformed entries: the safetensors library names what is wrong with them
    data = size - 8 - n
    if end > data:
        raise _not_safetensors(path, f"truncated: its tensors need {end} bytes of data, but only {data} "
                                     "bytes follow the header")
    if end < data:
        raise _not_safetensors(path, f"{data - end} unexpected bytes after the last tensor")


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """t in `dtype` when it is floating-point and a dtype is given; integer tensors stay as they are."""
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def read_safetensors(path: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors file `path`, on the CPU; never unpickles. A truncated file, a
    pickle saved under the name (`torch.save(sd, "model.safetensors")`) or any other bad file
    raises BadSavedFileError naming `path` and what is wrong with it. `dtype` casts the
    floating-point tensors one at a time as they are read, so a 5 GB fp32 file read as bf16 never
    holds more than one fp32 tensor."""
    path = Path(path)
    try:
        _check_safetensors_layout(path)
        if dtype is None:
            return load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            return {k: _cast(f.get_tensor(k), dtype) for k in f.keys()}
    except OSError as e:
        raise BadSavedFileError(path, f"could not be read ({e.strerror or e})") from e
    except SafetensorError as e:  # not a ValueError, and its message names no file
        raise _not_safetensors(path, str(e).removeprefix("Error while deserializing header: ")) from e


def read_text_file(path: str | os.PathLike, expected: str) -> str:
    """The UTF-8 text of `path`; an unreadable, binary or pickled file raises BadSavedFileError
    naming `path` and `expected` (e.g. "the tokenizer.json written by save_pretrained")."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadSavedFileError(path, f"could not be read ({e.strerror or e}); expected {expected}") from e
    if (kind := _pickle_kind(data[:8])) is not None:
        raise BadSavedFileError(path, f"not text (looks like a torch.save pickle: {kind}); dalle_proto "
                                      f"does not unpickle; expected {expected}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSavedFileError(path, f"not UTF-8 text (byte {e.start}: {e.reason}); expected {expected}") from e


def read_json_object(path: str | os.PathLike, expected: str) -> dict[str, Any]:
    """The JSON object in `path`; invalid JSON or another JSON value raises BadSavedFileError
    naming `path` and `expected`."""
    text = read_text_file(path, expected)
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadSavedFileError(path, f"not valid JSON ({e}); expected {expected}") from e
    if not isinstance(values, dict):
        raise BadSavedFileError(path, f"holds a JSON {_json_type(values)}; expected {expected}")
    return values


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a config field's annotation (int, float, str, bool, list[X], X | None)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        args = typing.get_args(hint)
        item = args[0] if args and (origin is list or args[1:] == (Ellipsis,)) else Any
        return isinstance(value, (list, tuple)) and (item is Any or all(_matches(v, item) for v in value))
    return True  # any other annotation is left to the config's own checks


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
    """Build a dataclass config, failing (BadSavedFileError naming `source`) on a non-object, on
    unknown keys (the valid ones named), on a value of the wrong type and on the config's own checks."""
    if not isinstance(values, dict):
        raise BadSavedFileError(source, f"expected an object of {config_cls.__name__} fields, "
                                        f"got {type(values).__name__}")
    valid = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise BadSavedFileError(source, f"unknown key(s) {unknown} for {config_cls.__name__}; "
                                        f"valid keys: {sorted(valid)}")
    hints = typing.get_type_hints(config_cls)
    for key, value in values.items():
        hint = hints.get(key, Any)
        if not _matches(value, hint):
            wanted = hint.__name__ if isinstance(hint, type) else str(hint)
            raise BadSavedFileError(source, f"{config_cls.__name__}.{key} must be {wanted}, "
                                            f"got {type(value).__name__} {value!r:.80}")
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as e:  # the config's own __post_init__ checks
        raise BadSavedFileError(source, str(e)) from e


def save_component(folder: str | os.PathLike, config: Any, state_dict: dict[str, torch.Tensor],
                   dtype: torch.dtype | None = None) -> Path:
    """Save a dataclass `config` and a state dict as `folder/config.json` + `folder/model.safetensors`.

    `dtype` (e.g. torch.bfloat16) casts floating-point tensors, to keep shipped checkpoints small.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in state_dict.items():
        tensors[name] = _cast(t.detach().cpu(), dtype).contiguous()
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


def load_component(folder: str | os.PathLike, config_cls: type[C],
                   dtype: torch.dtype | None = None) -> tuple[C, dict[str, torch.Tensor]]:
    """Read back what `save_component` wrote; the config is validated key by key. `dtype` casts the
    floating-point weights while they are read (see `read_safetensors`)."""
    folder = Path(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: expected a saved model folder with {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME}, but {name} is missing")
    values = read_json_object(folder / CONFIG_NAME, f"the {CONFIG_NAME} written by save_pretrained: "
                                                    f"an object of {config_cls.__name__} fields")
    config = config_from_dict(config_cls, values, source=str(folder / CONFIG_NAME))
    return config, read_safetensors(folder / WEIGHTS_NAME, dtype)


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


@contextlib.contextmanager
def no_random_init():
    """torch.nn.init's fillers as no-ops while a model is built only to be loaded: drawing 1.3B random
    numbers was half of a 1.3B pipeline load on the 2-core CPU (48 s -> 23 s, BENCHMARKS.md). Every
    parameter must then be loaded strictly (load_state_dict_strict), or it holds uninitialised memory."""
    names = ("normal_", "uniform_", "zeros_", "ones_", "constant_", "kaiming_uniform_", "kaiming_normal_",
             "xavier_uniform_", "xavier_normal_", "trunc_normal_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


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
