"""Atomic Lightning checkpoints: a crash while saving never destroys the last good checkpoint."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .pretrained import atomic_write_bytes


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes the checkpoint to a temporary file in the same folder, then renames it into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(Path(path), buffer.getvalue())


def last_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The `last.ckpt` in `folder`, if training there has saved one (used for automatic resume)."""
    path = Path(folder) / "last.ckpt"
    return path if path.is_file() else None
