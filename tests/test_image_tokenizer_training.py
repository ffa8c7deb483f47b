"""Image tokenizer training on Lightning: artefacts, exact resume, dead-code restarts (tiny CPU runs)."""
from __future__ import annotations

import csv
import dataclasses

import pytest
import torch
from PIL import Image

from dalle_proto.datasets.shapes import ShapesDataset
from dalle_proto.image_tokenizer import ImageTokenizer, ImageTokenizerConfig, VectorQuantizer
from dalle_proto.image_tokenizer_training import (CodebookReviver, ImageTokenizerTrainConfig, StepSampler,
                                                  save_reconstruction_grid, train_image_tokenizer)

SIZE = 16  # 16 px shapes, grid 8x8: a few hundred ms per step


def tiny_model_config() -> ImageTokenizerConfig:
    return ImageTokenizerConfig(resolution=SIZE, ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=8,
                                embed_dim=4, n_embed=16, l2norm_codes=True)


def tiny_train_config(**overrides) -> ImageTokenizerTrainConfig:
    # The GAN switches on at step 2 and codes restart every step, so resume covers all of it.
    values = dict(steps=4, batch_size=4, lr=2e-3, warmup=2, disc_start=2, disc_ch=8, disc_layers=1,
                  restart_every=1, restart_threshold=0.5, restart_until=1.0, log_every=1, image_every=2,
                  val_every=2, val_count=8, checkpoint_every=2, precision="32-true", seed=3)
    values.update(overrides)
    return ImageTokenizerTrainConfig(**values)


def datasets():
    return ShapesDataset(64, seed=0, size=SIZE, split="train"), ShapesDataset(8, seed=0, size=SIZE, split="eval")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    model = train_image_tokenizer(tiny_model_config(), tiny_train_config(), *datasets(), out_dir, progress=False)
    return out_dir, model


def test_training_writes_checkpoint_images_logs_and_model(full_run):
    out_dir, model = full_run
    assert (out_dir / "last.ckpt").is_file()
    grid = Image.open(out_dir / "images" / "recon_step0000002.png")
    assert grid.size == (8 * SIZE, 2 * SIZE)  # 8 originals on top, their reconstructions below
    assert (out_dir / "images" / "recon_step0000004.png").is_file()
    with open(out_dir / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    for key in ("train/loss", "train/psnr", "train/codebook_usage", "train/perplexity", "train/d_loss",
                "val/psnr", "val/codebook_usage", "val/perplexity"):
        assert key in columns, key
    assert any(r["train/d_loss"] for r in rows)  # the discriminator ran after disc_start
    steps = sorted({int(r["step"]) for r in rows if r["train/loss"]})
    assert steps == [0, 1, 2, 3]
    loaded = ImageTokenizer.from_pretrained(out_dir / "image_tokenizer")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    ids = loaded.encode(torch.zeros(2, 3, SIZE, SIZE))
    assert ids.shape == (2, 8, 8) and int(ids.max()) < 16


def test_resume_is_exact(full_run, tmp_path):
    out_dir, uninterrupted = full_run
    first = train_image_tokenizer(tiny_model_config(), tiny_train_config(), *datasets(), tmp_path,
                                  max_steps=2, progress=False)
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 2
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                     uninterrupted.state_dict().values()))
    resumed = train_image_tokenizer(tiny_model_config(), tiny_train_config(), *datasets(), tmp_path,
                                    progress=False)
    for name, tensor in uninterrupted.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    # Everything else in the checkpoint too: discriminator, usage counters, optimizer moments.
    ckpt_a = torch.load(out_dir / "last.ckpt", weights_only=False)
    ckpt_b = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert ckpt_a["global_step"] == ckpt_b["global_step"] == 4
    assert ckpt_a["state_dict"].keys() == ckpt_b["state_dict"].keys()
    for name in ckpt_a["state_dict"]:
        assert torch.equal(ckpt_a["state_dict"][name], ckpt_b["state_dict"][name]), name
    state_a, state_b = ckpt_a["optimizer_states"][0]["state"], ckpt_b["optimizer_states"][0]["state"]
    for i in state_a:
        assert torch.equal(state_a[i]["exp_avg_sq"], state_b[i]["exp_avg_sq"]), i


def test_resume_refuses_a_different_model(full_run, tmp_path):
    out_dir, _ = full_run
    train_image_tokenizer(tiny_model_config(), tiny_train_config(), *datasets(), tmp_path, max_steps=2,
                          progress=False)
    other = dataclasses.replace(tiny_model_config(), n_embed=32)
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match="n_embed"):  # num_threads=1 applies to training only, even when it fails
        train_image_tokenizer(other, tiny_train_config(num_threads=1 if threads > 1 else 2), *datasets(), tmp_path,
                              progress=False)
    assert torch.get_num_threads() == threads


def test_dead_codes_are_revived():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(n_embed=64, embed_dim=4, l2norm=True)
    quantizer.embedding.weight.data[:] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # one code, 63 copies
    reviver = CodebookReviver(64, decay=0.5, threshold=0.1, seed=0)

    def usage(z):
        return quantizer.ids_from_latents(z).unique().numel()

    z = torch.randn(8, 4, 4, 4)  # (B, D, h, w): 128 latents all over the sphere
    assert usage(z) == 1  # argmax ties: every latent picks code 0, the others are dead
    for step in range(3):
        _, ids, _ = quantizer(z)
        reviver.update(torch.bincount(ids.flatten(), minlength=64).float())
        restarted = reviver.restart(quantizer, z, ids.numel(), step)
        if step == 0:
            assert restarted == 63
    assert usage(z) > 40
    assert int(reviver.restarted_total) >= 63
    used, _ = reviver.window_stats()
    assert used > 0.5


def test_step_sampler_resumes_mid_run_and_shards_ranks():
    full = list(StepSampler(10, batch_size=3, steps=8, seed=1))
    assert len(full) == 24 and sorted(full[:10]) == list(range(10))  # each item once per pass
    assert list(StepSampler(10, batch_size=3, steps=8, start_step=5, seed=1)) == full[15:]
    rank0 = list(StepSampler(10, batch_size=3, steps=4, seed=1, rank=0, world_size=2))
    rank1 = list(StepSampler(10, batch_size=3, steps=4, seed=1, rank=1, world_size=2))
    assert rank0 == full[0:3] + full[6:9] + full[12:15] + full[18:21]
    assert rank1 == full[3:6] + full[9:12] + full[15:18] + full[21:24]


def test_reconstruction_grid_layout(tmp_path):
    originals = -torch.ones(3, 3, 4, 4)  # black
    recons = torch.ones(3, 3, 4, 4)  # white
    path = save_reconstruction_grid(originals, recons, tmp_path / "grid.png")
    pixels = torch.from_numpy(__import__("numpy").asarray(Image.open(path)))  # (8, 12, 3)
    assert pixels.shape == (8, 12, 3)
    assert int(pixels[:4].max()) == 0 and int(pixels[4:].min()) == 255
