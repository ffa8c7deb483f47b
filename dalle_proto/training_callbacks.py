"""Callbacks of transformer training: step checkpoints and sample grids.

`StepCheckpoint` writes `last.ckpt` every `every_n_steps` optimizer steps and at the end of
training. Lightning's ModelCheckpoint(every_n_train_steps) saves in on_train_batch_end, before a
validation that runs at the same step, and then refuses to save again at that step, so the
checkpoint would miss what that validation changed (the plateau schedule's state) and a resumed run
would diverge from an uninterrupted one; here a step with a validation is saved after it.
The file is written through the trainer, so the strategy's CheckpointIO (AtomicCheckpointIO:
temporary file + rename) applies.

`SampleGrid` samples the fixed captions with the EMA weights (the raw weights when EMA is off),
decodes them with the image tokenizer and saves `samples/step_XXXXXX.png`, captions under images.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from dalle_proto.image_grid import make_image_grid
from dalle_proto.pretrained import atomic_write_bytes
from dalle_proto.sampling import generate_image_tokens

LAST_CHECKPOINT = "last.ckpt"


class StepCheckpoint(Callback):
    def __init__(self, dirpath: str | os.PathLike, every_n_steps: int,
                 validation_due: Callable[[int], bool] = lambda step: False):
        if every_n_steps < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {every_n_steps}")
        self.path = Path(dirpath) / LAST_CHECKPOINT
        self.every_n_steps = every_n_steps
        self.validation_due = validation_due
        self._saved_step = -1

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and not self.validation_due(step):
            self._save(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        if not trainer.sanity_checking and step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer)  # the final step, whatever every_n_steps is

    def _save(self, trainer: Trainer) -> None:
        if trainer.global_step != self._saved_step:
            trainer.save_checkpoint(self.path, weights_only=False)  # every rank calls it; the strategy decides who writes
            self._saved_step = trainer.global_step


class SampleGrid(Callback):
    def __init__(self, out_dir: str | os.PathLike, captions: Sequence[str], every_n_steps: int,
                 text_tokenizer: Any, image_tokenizer: torch.nn.Module, cfg_scale: float = 1.0,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0):
        self.folder = Path(out_dir) / "samples"
        self.captions = list(captions)
        self.every_n_steps = every_n_steps
        self.text_tokenizer, self.image_tokenizer = text_tokenizer, image_tokenizer.eval()
        self.sampling = dict(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p)
        self.seed = seed
        self._sampled_step = -1

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.sample(trainer, pl_module)  # the final weights, whatever every_n_steps is

    def sample(self, trainer: Trainer, pl_module: LightningModule) -> Path | None:
        step = trainer.global_step
        if not self.captions or step == self._sampled_step:
            return None
        self._sampled_step = step
        unit = pl_module.sampling_unit
        fsdp = _is_fsdp(unit)
        if not fsdp and not trainer.is_global_zero:
            return None  # one rank is enough; under FSDP every rank must take part in the gathers
        device = pl_module.device
        text_ids = self.text_tokenizer.eval().encode(self.captions)  # (B, T)
        with _full_params(unit if fsdp else None), trainer.precision_plugin.forward_context():
            tokens = generate_image_tokens(pl_module.sampling_model, text_ids.to(device), seed=self.seed,
                                           **self.sampling)  # (B, h, w)
        if not trainer.is_global_zero:
            return None
        self.image_tokenizer.to(device)
        with trainer.precision_plugin.forward_context():
            images = self.image_tokenizer.decode(tokens)  # (B, 3, H, W) in [-1, 1]
        grid = make_image_grid(images.float().cpu(), captions=self.captions)
        buffer = io.BytesIO()
        grid.save(buffer, format="PNG")
        path = self.folder / f"step_{step:06d}.png"
        atomic_write_bytes(path, buffer.getvalue())
        rank_zero_info(f"step {step}: sample grid saved to {path}")
        return path


def _is_fsdp(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


def _full_params(fsdp_unit: torch.nn.Module | None):
    """Gather an FSDP unit's sharded parameters (on all ranks) so that the KV-cache entry points,
    which bypass FSDP's forward hooks, see whole tensors; a no-op without FSDP."""
    if fsdp_unit is None:
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(fsdp_unit, writeback=False, recurse=True)
