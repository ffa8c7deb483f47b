"""Reading third-party torch pickles (Lightning .ckpt, OpenAI's dall_e .pkl) without running their code.

`torch.load(weights_only=True)` refuses files that pickle anything beyond tensors and containers:
Lightning 1.x checkpoints hold callback classes and hyper-parameter objects, and OpenAI's dVAE
files are whole `dall_e` nn.Modules. Importing those packages would be both fragile (taming needs
pytorch-lightning < 1.8 and torchvision) and unsafe (unpickling can call any importable function).

`restricted_torch_load` instead resolves only an allowlist of globals — the tensor-rebuild
functions, containers, torch dtypes/devices and `torch.nn.modules` layers — to the real objects.
Every other global becomes either a caller-provided stub (e.g. an nn.Module stand-in for
`dall_e.encoder.Encoder`) or an inert `Opaque` placeholder that just stores what it was given.
No function named in the file is ever called.
"""
from __future__ import annotations

import os
import pickle
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

# (module, name) pairs that are safe to build for real: they only rebuild tensors or containers.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("__builtin__", "set"), ("__builtin__", "frozenset"), ("__builtin__", "slice"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "device"), ("torch", "Size"),
}


class Opaque:
    """Inert stand-in for a pickled object whose class we refuse to import (kept for inspection)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "Opaque":
        obj = object.__new__(cls)
        obj.__dict__["_pickle_args"] = (args, kwargs)
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_pickle_state"] = state

    def __repr__(self) -> str:
        return f"<placeholder for {type(self).__module__}.{type(self).__qualname__}>"


StubFactory = Callable[[str, str], "type | None"]


def _make_unpickler_class(stub_for: StubFactory | None) -> type:
    opaque_classes: dict[tuple[str, str], type] = {}

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if stub_for is not None:
                stub = stub_for(module, name)
                if stub is not None:
                    return stub
            if (module, name) in _ALLOWED_GLOBALS:
                return super().find_class(module, name)
            if module.startswith("torch.nn.modules."):
                obj = super().find_class(module, name)
                if isinstance(obj, type) and issubclass(obj, nn.Module):
                    return obj  # plain layers (Sequential, ReLU, MaxPool2d, ...): data only
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
            # Anything else: a distinct inert class per global, so dict keys that were classes
            # (Lightning 1.x keys callbacks by their type) stay distinct.
            key = (module, name)
            if key not in opaque_classes:
                opaque_classes[key] = type(name, (Opaque,), {"__module__": module, "__qualname__": name})
            return opaque_classes[key]

    return RestrictedUnpickler


def restricted_torch_load(path: str | os.PathLike, stub_for: StubFactory | None = None) -> Any:
    """`torch.load(path, map_location="cpu")` with the restricted unpickler described above.

    stub_for(module, name) may return a class to use for that global (or None for the default).
    """
    unpickler_cls = _make_unpickler_class(stub_for)

    def load(file: Any, **kwargs: Any) -> Any:  # used by torch for the legacy (non-zip) format
        return unpickler_cls(file, **kwargs).load()

    pickle_module = types.SimpleNamespace(Unpickler=unpickler_cls, load=load, __name__="restricted_pickle")
    # weights_only=False is required by torch whenever a pickle_module is given; safety comes from
    # the allowlist in RestrictedUnpickler.find_class, not from torch's own weights-only unpickler.
    return torch.load(path, map_location="cpu", pickle_module=pickle_module, weights_only=False)
