"""Atomic Lightning checkpoints: a crash while saving never destroys the last good checkpoint.

Checkpoints are read back only with torch's weights-only unpickler (tensors, containers and
primitives; no code from the file runs), and a file that does not load that way fails with one line
naming it.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .pretrained import atomic_write_bytes


def load_training_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint written by dalle_proto training, read with `weights_only=True` (never a
    full unpickle); a corrupt or foreign file raises ValueError naming it."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # corrupt zip, truncated file, or globals the weights-only unpickler refuses
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: not a training checkpoint that torch.load(weights_only=True) can read "
                         f"({reason}); expected a last.ckpt written by dalle_proto training (move it away "
                         "to restart the stage from scratch)") from e
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{path}: expected a Lightning checkpoint with a 'state_dict' entry, "
                         f"found {type(checkpoint).__name__}")
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes the checkpoint to a temporary file in the same folder, then renames it into place;
    reads it back with `load_training_checkpoint` (weights-only, whatever Lightning asks for)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(Path(path), buffer.getvalue())

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return load_training_checkpoint(path)  # on the CPU; Lightning moves the states where they belong


def last_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The `last.ckpt` in `folder`, if training there has saved one (used for automatic resume)."""
    path = Path(folder) / "last.ckpt"
    return path if path.is_file() else None
