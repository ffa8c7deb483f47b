"""Batches for transformer training: token cache -> {"text_ids" (B, T), "image_ids" (B, N)}.

Everything random here is a pure function of (seed, global step, slot in the global batch), never
of process history, so a run resumed from a checkpoint at step s sees exactly the batches an
uninterrupted run sees from step s on, whatever the number of data-loader workers:

- order: batch s holds positions [s * G, (s + 1) * G) of an endless stream made of one seeded
  permutation of the training indices per pass (G = batch size x world size); rank r takes slice r.
- caption dropout: per sample, a coin from a generator seeded by (seed, step, slot); a dropped
  caption becomes the null text (all per-position pads), the unconditional input that
  classifier-free guidance needs at sampling time.
- BPE dropout: `TextTokenizer` in train mode, drawing from a generator seeded by (seed, step, slot)
  per sample (`bpe_dropout.py`), so a caption's pieces, like its caption-dropout coin, depend only on
  where it sits in the run. Validation always encodes in eval mode, without dropout.
- caption-contrast negatives (`contrast=True`): per sample, the caption with one attribute changed
  through the shapes grammar (`caption_perturbations.py`, exchanges included), from a generator
  seeded by (seed, step, slot); a caption outside the grammar, or a dropped one, gets none.
  `negatives="binding"` draws only the hard ones (`perturb_binding`: exchanged or copied pair
  attributes, another number for a count); `negatives="exchange"` only a pair's exchanged colours
  or shapes (other captions get none).
- converse relations (`converse_relations=p`): per sample, a coin seeded by (seed, step, slot)
  restates a shapes pair caption "A to the right of B" / "A below B" with probability p as "B to the
  left of A" / "B above A" (`caption_perturbations.converse_caption`), the same scene. With uniform
  relations, which object is drawn first (the upper or left one) depends on the relation word AND the
  word order together, an exclusive-or with no gradient towards either alone; at p = 0.5, 3 of 4 pair
  captions name the upper or left object first, so word order alone pays, and the relation word
  then has something to flip (BENCHMARKS.md, issue 16). `converse_steps=n` restates only in the
  first n steps (a curriculum: the order first, then the relation word must overturn it).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dalle_proto.caption_perturbations import converse_caption, perturb_binding, perturb_caption
from dalle_proto.text_tokenizer import TruncationReportedOnce
from dalle_proto.transformer_config import TransformerConfig

# separate random streams per purpose, so adding one never shifts another
_ORDER, _CAPTION_DROPOUT, _DROPOUT, _BPE_DROPOUT, _CONTRAST, _CONVERSE = 0, 1, 2, 3, 4, 5
RESTATED_RELATIONS = (" to the right of ", " below ")  # restated as their converses "to the left of", "above"
# caption-contrast negatives by name: one attribute changed (exchanges too) | binding ones | pair exchanges only
_PERTURBATIONS = {"any": partial(perturb_caption, exchanges=True), "binding": perturb_binding,
                  "exchange": partial(perturb_binding, exchanges_only=True)}
CONTRAST_NEGATIVES = tuple(_PERTURBATIONS)


def step_rng(seed: int, step: int, slot: int, purpose: int) -> np.random.Generator:
    """A generator that depends only on its arguments (SeedSequence mixes them well)."""
    return np.random.default_rng([seed, step, slot, purpose])


def step_seed(seed: int, step: int, rank: int) -> int:
    """A torch seed for the model's own randomness (dropout) at one training step on one rank."""
    return int(step_rng(seed, step, rank, _DROPOUT).integers(0, 2**62))


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Hold out a seeded random `val_fraction` of 0..n-1 (at least one sample) -> (train, val)."""
    if n < 2:
        raise ValueError(f"a token cache of {n} sample(s) cannot be split into train and validation; "
                         "pass a separate val_cache or set val_fraction=0")
    order = np.random.default_rng([seed, _ORDER, n]).permutation(n)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


class StepBatchSampler:
    """Yields, for each training step from `start_step()` to `total_steps - 1`, this rank's batch as
    keys (step, slot, dataset index, pass); `slot` is the sample's place in the global batch and
    `pass` counts the passes over the data (the token cache's epoch, for its caption picks)."""

    def __init__(self, indices: Sequence[int], batch_size: int, total_steps: int, seed: int,
                 rank: int = 0, world_size: int = 1, start_step: Callable[[], int] = lambda: 0):
        if len(indices) == 0:
            raise ValueError("StepBatchSampler: no training samples")
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size, self.total_steps, self.seed = batch_size, total_steps, seed
        self.rank, self.world_size = rank, world_size
        self.start_step = start_step
        self._pass, self._permutation = -1, None

    def __len__(self) -> int:
        # Lightning sizes the (single) epoch and the progress bar's ETA with this
        return self.total_steps

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        for step in range(self.start_step(), self.total_steps):
            slots = range(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
            yield [(step, slot, *self.index_at(step * global_batch + slot)) for slot in slots]

    def index_at(self, position: int) -> tuple[int, int]:
        """(dataset index, pass) at `position` of the endless stream of seeded permutations."""
        n = len(self.indices)
        pass_number, offset = divmod(position, n)
        if pass_number != self._pass:
            self._pass = pass_number
            self._permutation = np.random.default_rng([self.seed, _ORDER, pass_number]).permutation(n)
        return int(self.indices[self._permutation[offset]]), pass_number


class FixedBatchSampler:
    """Validation: consecutive batches of `indices` in order; rank r takes batches r, r + W, ...,
    at most `max_batches` of them. Every rank gets the same number of batches, as DDP needs (a rank
    with none stops Lightning): where the batches do not divide evenly, the last ranks wrap around to
    the first batches, as torch's DistributedSampler pads by repeating samples."""

    def __init__(self, indices: Sequence[int], batch_size: int, max_batches: int, rank: int = 0,
                 world_size: int = 1):
        indices = list(indices)
        n_batches = -(-len(indices) // batch_size)
        per_rank = min(max_batches, -(-n_batches // world_size))
        starts = [((j * world_size + rank) % n_batches) * batch_size for j in range(per_rank)]
        self.batches = [indices[i:i + batch_size] for i in starts]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            yield [(0, slot, index, 0) for slot, index in enumerate(batch)]


class KeyedDataset(Dataset):
    """Wraps a token cache so that a key (step, slot, index, pass) returns the sample with its step
    and slot. A cache with several captions per image picks one as a function of its epoch, which
    is set to the pass here, so each pass over the data draws fresh picks, reproducibly."""

    def __init__(self, cache: Dataset):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, key: tuple[int, int, int, int]) -> tuple[int, int, torch.Tensor, str]:
        step, slot, index, pass_number = key
        if hasattr(self.cache, "set_epoch"):
            self.cache.set_epoch(pass_number)
        image_ids, caption = self.cache[index]
        return step, slot, torch.as_tensor(image_ids), caption


class CaptionCollate:
    """Samples -> {"text_ids": (B, T), "image_ids": (B, N)}; tokenises the captions here, in the
    data pipeline (and so in the workers), with BPE dropout and caption dropout when `train`.
    With `contrast`, also "contrast_text_ids" (M, T): perturbed captions, and "contrast_index" (M,):
    the batch row each belongs to (M <= B; see the module docstring)."""

    def __init__(self, text_tokenizer: Any, train: bool, caption_dropout: float, seed: int,
                 contrast: bool = False, negatives: str = "any", converse_relations: float = 0.0,
                 converse_steps: int | None = None):
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        if not 0.0 <= converse_relations <= 1.0:
            raise ValueError(f"converse_relations must be in [0, 1], got {converse_relations}")
        if converse_steps is not None and converse_steps < 1:
            raise ValueError(f"converse_steps must be >= 1 (None: restate for the whole run), got {converse_steps}")
        if negatives not in CONTRAST_NEGATIVES:
            raise ValueError(f"contrast negatives must be one of {CONTRAST_NEGATIVES}, got {negatives!r}")
        self.perturb = _PERTURBATIONS[negatives]
        self.text_tokenizer, self.train = text_tokenizer, train
        self.caption_dropout, self.seed, self.contrast = caption_dropout, seed, contrast
        self.converse_relations = converse_relations if train else 0.0
        self.converse_steps = converse_steps
        self.null_ids = text_tokenizer.null_ids()  # (T,): per-position pads, or one [PAD] id everywhere
        self.report_truncation = TruncationReportedOnce(f"this run's {'training' if train else 'validation'} batches")

    def __call__(self, samples: list[tuple[int, int, torch.Tensor, str]]) -> dict[str, torch.Tensor]:
        steps, slots, images, captions = zip(*samples)
        if self.converse_relations > 0:
            captions = tuple(self.restated(caption, step, slot) for caption, step, slot in zip(captions, steps, slots))
        # the mode is set on every call: train and validation batches may share one tokenizer object
        rngs = ([step_rng(self.seed, step, slot, _BPE_DROPOUT) for step, slot in zip(steps, slots)]
                if self.train and self.text_tokenizer.config.bpe_dropout > 0 else None)  # eval mode draws nothing
        with self.report_truncation():
            text_ids = self.text_tokenizer.train(self.train).encode(list(captions), rng=rngs)  # (B, T)
        if self.train and self.caption_dropout > 0:
            drop = torch.tensor([self.drops_caption(step, slot) for step, slot in zip(steps, slots)])
            text_ids[drop] = self.null_ids
        image_ids = torch.stack(images).long().flatten(1)  # (B, h*w), raster order
        batch = {"text_ids": text_ids, "image_ids": image_ids}
        if self.contrast:
            dropped = drop.tolist() if self.train and self.caption_dropout > 0 else [False] * len(captions)
            batch.update(self.negatives(steps, slots, captions, dropped))
        return batch

    def negatives(self, steps, slots, captions, dropped) -> dict[str, torch.Tensor]:
        index, texts = [], []
        for row, (step, slot, caption) in enumerate(zip(steps, slots, captions)):
            if not dropped[row]:
                text = self.perturb(caption, step_rng(self.seed, step, slot, _CONTRAST))
                if text is not None:
                    index.append(row)
                    texts.append(text)
        if not texts:
            return {"contrast_text_ids": torch.zeros(0, self.text_tokenizer.text_len, dtype=torch.long),
                    "contrast_index": torch.zeros(0, dtype=torch.long)}
        # eval mode: a negative differs from its caption in a word, not in how BPE dropout split it
        with self.report_truncation():
            ids = self.text_tokenizer.train(False).encode(texts)  # (M, T)
        self.text_tokenizer.train(self.train)
        return {"contrast_text_ids": ids, "contrast_index": torch.tensor(index, dtype=torch.long)}

    def restated(self, caption: str, step: int, slot: int) -> str:
        """The caption, or with probability converse_relations its converse (see the module docstring)."""
        if not any(word in caption for word in RESTATED_RELATIONS) or \
                (self.converse_steps is not None and step >= self.converse_steps) or \
                step_rng(self.seed, step, slot, _CONVERSE).random() >= self.converse_relations:
            return caption
        return converse_caption(caption) or caption  # None: not of the shapes grammar

    def drops_caption(self, step: int, slot: int) -> bool:
        return bool(step_rng(self.seed, step, slot, _CAPTION_DROPOUT).random() < self.caption_dropout)


class ResumableDataLoader(DataLoader):
    """A DataLoader over a `StepBatchSampler`. Its position is the trainer's restored global step,
    read when iteration starts, so there is nothing to restore; the state_dict methods tell
    Lightning so (otherwise it warns that a mid-epoch resume is unreliable)."""

    def state_dict(self) -> dict[str, int]:
        return {"next_step": int(self.batch_sampler.start_step())}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        pass  # the sampler reads the restored global step itself


class TokenCacheBatches(pl.LightningDataModule):
    """Training and validation loaders over token caches; built when the trainer knows its rank."""

    def __init__(self, text_tokenizer: Any, train_cache: Dataset, train_indices: Sequence[int],
                 val_cache: Dataset | None, val_indices: Sequence[int], *, batch_size: int, steps: int,
                 seed: int, caption_dropout: float, val_batches: int, num_workers: int,
                 contrast: bool = False, contrast_negatives: str = "any", converse_relations: float = 0.0,
                 converse_steps: int | None = None):
        super().__init__()
        self.text_tokenizer = text_tokenizer
        self.train_cache, self.train_indices = train_cache, list(train_indices)
        self.val_cache, self.val_indices = val_cache, list(val_indices)
        self.batch_size, self.steps, self.seed = batch_size, steps, seed
        self.caption_dropout, self.val_batches, self.num_workers = caption_dropout, val_batches, num_workers
        self.contrast, self.contrast_negatives = contrast, contrast_negatives
        self.converse_relations, self.converse_steps = converse_relations, converse_steps

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        sampler = StepBatchSampler(self.train_indices, self.batch_size, self.steps, self.seed,
                                   trainer.global_rank, trainer.world_size,
                                   start_step=lambda: trainer.global_step)  # restored before iteration
        return ResumableDataLoader(
            KeyedDataset(self.train_cache), batch_sampler=sampler, num_workers=self.num_workers,
            collate_fn=CaptionCollate(self.text_tokenizer, True, self.caption_dropout, self.seed, self.contrast,
                                      self.contrast_negatives, self.converse_relations, self.converse_steps),
            pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_cache is None or not self.val_indices or self.val_batches == 0:
            return []
        trainer = self.trainer
        sampler = FixedBatchSampler(self.val_indices, self.batch_size, self.val_batches,
                                    trainer.global_rank, trainer.world_size)
        return DataLoader(KeyedDataset(self.val_cache), batch_sampler=sampler, num_workers=self.num_workers,
                          collate_fn=CaptionCollate(self.text_tokenizer, False, 0.0, self.seed, self.contrast,
                                                     self.contrast_negatives),
                          pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0)


def check_compatible(config: TransformerConfig, text_tokenizer: Any, train_cache: Any, val_cache: Any,
                      image_tokenizer: Any) -> None:
    """Fail before training when the parts disagree about vocabulary or geometry."""
    pairs = [("text tokenizer vocab_size", text_tokenizer.vocab_size, "text_vocab_size", config.text_vocab_size),
             ("text tokenizer text_len", text_tokenizer.text_len, "text_len", config.text_len)]
    for name, cache in (("train_cache", train_cache), ("val_cache", val_cache)):
        if cache is not None:
            pairs += [(f"{name} grid_size", cache.grid_size, "image_grid", config.image_grid),
                      (f"{name} codebook_size", cache.codebook_size, "image_vocab_size", config.image_vocab_size)]
    if image_tokenizer is not None:
        pairs += [("image tokenizer grid_size", image_tokenizer.grid_size, "image_grid", config.image_grid),
                  ("image tokenizer codebook_size", image_tokenizer.codebook_size, "image_vocab_size",
                   config.image_vocab_size)]
    for part, value, field_name, expected in pairs:
        if value != expected:
            raise ValueError(f"{part} is {value} but TransformerConfig.{field_name} is {expected}; "
                             f"they must match (build the transformer config from the tokenizers and cache)")
    if config.code_pixels:  # before any picture is decoded for them
        if image_tokenizer is None:
            raise ValueError("TransformerConfig.code_pixels needs the image tokenizer (its codes' decoded pixels)")
        f = image_tokenizer.config.downsample_factor
        if config.code_pixels != 3 * f * f:
            raise ValueError(f"TransformerConfig.code_pixels={config.code_pixels}, but this image tokenizer's "
                             f"codes each decode to 3 x {f} x {f} = {3 * f * f} pixel values: set "
                             f"transformer.code_pixels={3 * f * f} (or 0 to turn the option off)")
    if len(train_cache) == 0:
        raise ValueError("train_cache is empty")
