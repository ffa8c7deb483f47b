"""Image-token cache: encode a data set with the image tokenizer once, train the transformer many times.

Layout of a cache folder:
    image_tokens.npy   uint16 (N, h, w) token ids (int32 when the codebook has more than 65536 codes),
                       a plain .npy file read back memory-mapped, so a cache larger than RAM works
    captions.jsonl     line i: a JSON list of every caption of item i
    meta.json          count, grid size, codebook size, the image tokenizer's config, dtype

    folder = encode_to_cache(image_tokenizer, dataset, "runs/shapes_tokens")
    cache = TokenCache(folder, seed=0, image_tokenizer=image_tokenizer)  # checks the codebook size
    image_ids, caption = cache[0]  # LongTensor (h, w), str

Images are center-cropped and resized to the tokenizer's resolution: no random augmentation, since
every epoch reuses the same tokens. Encoding runs under bf16 autocast by default (much faster on
CPUs with bf16 units); the codebook lookup itself is fp32 inside the quantizer, but bf16 encoder
activations still flip a small fraction of tokens between near-tie codes (measured in
benchmarks/image_tokenizer.py, `bf16_token_agreement`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .datasets.augmentation import DalleImageAugmentation

TOKENS_NAME = "image_tokens.npy"
CAPTIONS_NAME = "captions.jsonl"
META_NAME = "meta.json"
FORMAT_VERSION = 1


class _CenterCropped(Dataset):
    """Wraps a (PIL image, caption) data set: yields (tensor (3, S, S), index)."""

    def __init__(self, dataset, size: int):
        self.dataset = dataset
        self.center_crop = DalleImageAugmentation(size, train=False)  # the project's eval crop

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.dataset[index][0]
        if not isinstance(image, Image.Image):
            raise TypeError(f"encode_to_cache: item {index} of {type(self.dataset).__name__} is a "
                            f"{type(image).__name__}; expected a PIL image (build the data set without a transform)")
        return self.center_crop(image), index


def _all_captions(dataset, index: int) -> list[str]:
    """Every caption of item `index`: `dataset.captions(i)` when the data set has it, else its one caption."""
    if hasattr(dataset, "captions"):
        captions = list(dataset.captions(index))
    else:
        captions = [dataset[index][1]]
    if not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"item {index} of {type(dataset).__name__}: expected one or more string captions, "
                         f"got {captions!r}")
    return captions


def token_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.uint16) if codebook_size <= 65536 else np.dtype(np.int32)


@torch.no_grad()
def encode_to_cache(image_tokenizer, dataset, out_dir: str | os.PathLike, batch_size: int = 64,
                    bf16: bool = True, progress: bool = True, overwrite: bool = False,
                    num_workers: int = 0, data: dict | None = None) -> Path:
    """Encode every image of `dataset` once into a token cache folder `out_dir`; returns its path.
    `data`: a JSON-able description of the data set (the run config's `data`), kept in meta.json so
    that a later run with other data settings is told the cache is stale (`TokenCache.data`).

    The cache is written into a temporary sibling folder and renamed into place at the end, so an
    interrupted run never leaves a half-written cache where `TokenCache` would read it.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"token cache folder {out_dir} already exists and is not empty; "
                              f"pass overwrite=True to replace it")
    n = len(dataset)
    if n == 0:
        raise ValueError(f"encode_to_cache: {type(dataset).__name__} is empty")
    size = int(image_tokenizer.config.resolution)
    side = int(image_tokenizer.grid_size)
    codebook_size = int(image_tokenizer.codebook_size)
    dtype = token_dtype(codebook_size)
    device = next(image_tokenizer.parameters()).device
    was_training = image_tokenizer.training
    image_tokenizer.eval()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        tokens = np.lib.format.open_memmap(tmp / TOKENS_NAME, mode="w+", dtype=dtype, shape=(n, side, side))
        loader = DataLoader(_CenterCropped(dataset, size), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers)
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())
        with open(tmp / CAPTIONS_NAME, "w", encoding="utf-8") as captions_file:
            for images, indices in tqdm(loader, desc="encoding images", unit="batch", disable=not progress):
                with autocast:
                    ids = image_tokenizer.encode(images.to(device))  # (B, h, w)
                if ids.shape[1:] != (side, side):
                    raise RuntimeError(f"image tokenizer returned a {tuple(ids.shape[1:])} grid, "
                                       f"expected ({side}, {side}) from its grid_size")
                start = int(indices[0])
                tokens[start:start + len(indices)] = ids.cpu().numpy().astype(dtype)
                for i in indices.tolist():
                    captions_file.write(json.dumps(_all_captions(dataset, i), ensure_ascii=False) + "\n")
        tokens.flush()
        del tokens
        config = image_tokenizer.config
        meta = {
            "format_version": FORMAT_VERSION,
            "count": n,
            "grid_size": side,
            "codebook_size": codebook_size,
            "image_size": size,
            "dtype": dtype.name,
            "bf16": bf16,
            "image_tokenizer_config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config),
        }
        if data is not None:
            meta["data"] = data
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.exists():
            # Swap in: move the old folder aside first, since rename cannot replace a non-empty folder.
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".old"))
            os.replace(out_dir, old / "cache")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        image_tokenizer.train(was_training)
    return out_dir


class TokenCache(Dataset):
    """A cache folder as a map-style data set of `(image_ids LongTensor (h, w), caption str)`.

    Tokens are memory-mapped, and captions are read by byte offset from a memory-mapped
    captions.jsonl, so opening a cache costs one scan for newlines and little RAM. When an item has
    several captions, one is picked at random as a pure function of (seed, epoch, index): runs are
    reproducible and resume exactly; call `set_epoch` to draw fresh picks each epoch.
    """

    def __init__(self, folder: str | os.PathLike, seed: int = 0, image_tokenizer=None):
        self.folder = Path(folder)
        self.seed = seed
        self.epoch = 0
        for name in (TOKENS_NAME, CAPTIONS_NAME, META_NAME):
            if not (self.folder / name).is_file():
                raise FileNotFoundError(f"{self.folder}: not a token cache, {name} is missing "
                                        f"(build one with dalle_proto.token_cache.encode_to_cache)")
        self.meta: dict[str, Any] = json.loads((self.folder / META_NAME).read_text())
        self.tokens = np.load(self.folder / TOKENS_NAME, mmap_mode="r")  # (N, h, w)
        side, count = self.meta["grid_size"], self.meta["count"]
        if self.tokens.shape != (count, side, side):
            raise ValueError(f"{self.folder / TOKENS_NAME}: shape {self.tokens.shape} does not match "
                             f"{META_NAME} (count {count}, grid {side}x{side})")
        self._captions = np.memmap(self.folder / CAPTIONS_NAME, dtype=np.uint8, mode="r")
        ends = np.flatnonzero(self._captions == ord("\n"))  # (N,) byte offset of each line's newline
        if len(ends) != count:
            raise ValueError(f"{self.folder / CAPTIONS_NAME}: {len(ends)} lines, expected {count} "
                             f"(one per image, from {META_NAME})")
        self._starts = np.concatenate([[0], ends[:-1] + 1])
        self._ends = ends
        if image_tokenizer is not None:
            self.check_matches(image_tokenizer)

    @property
    def grid_size(self) -> int:
        return int(self.meta["grid_size"])

    @property
    def codebook_size(self) -> int:
        return int(self.meta["codebook_size"])

    def __len__(self) -> int:
        return int(self.meta["count"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def data(self) -> dict | None:
        """The data description it was encoded from (None for caches written without one)."""
        return self.meta.get("data")

    def check_matches(self, image_tokenizer) -> None:
        """Raise if this cache was not made by a tokenizer with `image_tokenizer`'s codebook and grid."""
        if int(image_tokenizer.codebook_size) != self.codebook_size:
            raise ValueError(f"token cache {self.folder} holds ids of a {self.codebook_size}-code codebook "
                             f"({META_NAME}), but the image tokenizer has {image_tokenizer.codebook_size} codes; "
                             f"re-encode the data with this tokenizer")
        if int(image_tokenizer.grid_size) != self.grid_size:
            raise ValueError(f"token cache {self.folder} holds {self.grid_size}x{self.grid_size} token grids "
                             f"({META_NAME}), but the image tokenizer makes {image_tokenizer.grid_size}x"
                             f"{image_tokenizer.grid_size} grids; re-encode the data with this tokenizer")

    def captions(self, index: int) -> list[str]:
        line = bytes(self._captions[self._starts[index]:self._ends[index]])
        return json.loads(line.decode("utf-8"))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a token cache of {len(self)} items")
        index = index % len(self)
        ids = torch.from_numpy(self.tokens[index].astype(np.int64))  # (h, w)
        options = self.captions(index)
        pick = 0
        if len(options) > 1:
            pick = int(np.random.default_rng((self.seed, self.epoch, index)).integers(len(options)))
        return ids, options[pick]
