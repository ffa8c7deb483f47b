"""Image-token cache: round trip against ImageTokenizer.encode, captions, memory mapping, checks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_proto.datasets.augmentation import pil_to_tensor
from dalle_proto.datasets.shapes import ShapesDataset
from dalle_proto.image_tokenizer import ImageTokenizer, ImageTokenizerConfig
from dalle_proto.token_cache import TokenCache, encode_to_cache, token_dtype

SIZE = 16


def tiny_tokenizer(n_embed: int = 32, seed: int = 0) -> ImageTokenizer:
    torch.manual_seed(seed)
    config = ImageTokenizerConfig(resolution=SIZE, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=8,
                                  embed_dim=4, n_embed=n_embed, l2norm_codes=True)
    return ImageTokenizer(config).eval()


class ManyCaptions(torch.utils.data.Dataset):
    """Non-square images (the cache must centre-crop them) with three captions each."""

    def __len__(self) -> int:
        return 5

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE + 6, 3), dtype=np.uint8))  # (H, W+6)
        return image, self.captions(i)[0]

    def captions(self, i) -> list[str]:
        return [f"item {i} caption {k}" for k in range(3)]


def test_round_trip_matches_fp32_encode(tmp_path):
    tokenizer = tiny_tokenizer()
    dataset = ShapesDataset(10, seed=0, size=SIZE, split="eval")
    folder = encode_to_cache(tokenizer, dataset, tmp_path / "cache", batch_size=4, bf16=False, progress=False)
    cache = TokenCache(folder, image_tokenizer=tokenizer)
    images = torch.stack([pil_to_tensor(dataset[i][0]) for i in range(10)])  # (10, 3, 16, 16)
    # in the cache's batches of 4, 4, 2: CPU conv kernels round differently for other batch shapes, and
    # this random tokenizer has latents within 3e-5 (cosine) of two codes, so one batch of 10 could
    # pick the other code on another machine
    expected = torch.cat([tokenizer.encode(batch) for batch in images.split(4)])  # (10, 8, 8)
    assert len(cache) == 10 and cache.grid_size == 8 and cache.codebook_size == 32
    assert isinstance(cache.tokens, np.memmap) and cache.tokens.dtype == np.uint16
    assert cache.tokens.shape == (10, 8, 8)
    got = torch.stack([cache[i][0] for i in range(10)])
    assert got.dtype == torch.long
    assert torch.equal(got, expected)
    assert expected.unique().numel() > 1  # a real check, not all one code
    for i in range(10):
        assert cache[i][1] == dataset[i][1]
        assert cache.captions(i) == dataset.captions(i)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["count"] == 10 and meta["image_tokenizer_config"]["n_embed"] == 32
    assert not list(tmp_path.glob(".cache.*"))  # the temporary folder was renamed away


def test_bf16_encoding_mostly_agrees(tmp_path):
    tokenizer = tiny_tokenizer()
    dataset = ShapesDataset(8, seed=0, size=SIZE)
    fp32 = TokenCache(encode_to_cache(tokenizer, dataset, tmp_path / "fp32", bf16=False, progress=False))
    bf16 = TokenCache(encode_to_cache(tokenizer, dataset, tmp_path / "bf16", bf16=True, progress=False))
    agreement = (fp32.tokens[:] == bf16.tokens[:]).mean()
    assert agreement > 0.8


def test_several_captions_are_picked_reproducibly(tmp_path):
    tokenizer = tiny_tokenizer()
    folder = encode_to_cache(tokenizer, ManyCaptions(), tmp_path / "cache", bf16=False, progress=False)
    cache, same_seed = TokenCache(folder, seed=1), TokenCache(folder, seed=1)
    assert cache.captions(2) == ManyCaptions().captions(2)
    picks = [cache[i][1] for i in range(5)]
    assert picks == [same_seed[i][1] for i in range(5)]
    assert all(p in ManyCaptions().captions(i) for i, p in enumerate(picks))
    seen = set()
    for epoch in range(12):
        cache.set_epoch(epoch)
        seen.add(cache[0][1])
    assert len(seen) > 1  # a fresh pick per epoch
    # Non-square inputs were centre-cropped to the tokenizer's resolution.
    assert cache.tokens.shape == (5, 8, 8)


def test_codebook_mismatch_names_both_sizes(tmp_path):
    folder = encode_to_cache(tiny_tokenizer(32), ShapesDataset(3, size=SIZE), tmp_path / "cache",
                             bf16=False, progress=False)
    with pytest.raises(ValueError, match=r"32-code.*64 codes"):
        TokenCache(folder, image_tokenizer=tiny_tokenizer(64))


def test_existing_folder_needs_overwrite(tmp_path):
    tokenizer = tiny_tokenizer()
    dataset = ShapesDataset(3, size=SIZE)
    folder = encode_to_cache(tokenizer, dataset, tmp_path / "cache", bf16=False, progress=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        encode_to_cache(tokenizer, dataset, folder, bf16=False, progress=False)
    other = tiny_tokenizer(seed=1)
    encode_to_cache(other, dataset, folder, bf16=False, progress=False, overwrite=True)
    images = torch.stack([pil_to_tensor(dataset[i][0]) for i in range(3)])
    assert torch.equal(torch.stack([TokenCache(folder)[i][0] for i in range(3)]), other.encode(images))


def test_missing_files_and_wide_codebooks(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a token cache"):
        TokenCache(tmp_path)
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32


def test_a_cache_encoded_from_other_data_settings_is_refused(tmp_path):
    """`dalle-proto encode` records the run's data settings in meta.json; encoding or training again
    with other ones (here a shapes mix) names the setting instead of silently using the stale cache."""
    from dalle_proto import stages
    from dalle_proto.run_config import load_run_config

    common = [f"out_dir={tmp_path}", "data.image_size=16", "data.train_count=6", "data.eval_count=4"]
    config = load_run_config([], common)
    tiny_tokenizer().save_pretrained(tmp_path / "image_tokenizer")
    train_folder, eval_folder = stages.encode(config)
    assert TokenCache(train_folder).data["shapes_mix"] is None and TokenCache(train_folder).data["train_count"] == 6
    stages.encode(config)  # the same settings: the cache is reused
    mixed = load_run_config([], [*common, "data.shapes_mix=[0,100,0]"])
    with pytest.raises(ValueError, match=r"token_cache/train was encoded with data.shapes_mix=None "
                                         r"\(config: \[0, 100, 0\]\); delete the folder"):
        stages.encode(mixed)
    stages.check_cache_data(mixed, TokenCache(eval_folder))  # the eval split ignores the mix
    with pytest.raises(ValueError, match=r"data.train_count=6 \(config: 7\)"):
        stages.check_cache_data(load_run_config([], [*common, "data.train_count=7"]), TokenCache(train_folder))
