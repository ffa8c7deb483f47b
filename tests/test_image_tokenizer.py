"""ImageTokenizer: sizes, input checks, encode/decode, save/load, gradients, quantizer behaviour."""
import pytest
import torch
import torch.nn.functional as F

from dalle_proto.image_tokenizer import (GumbelQuantizer, ImageTokenizer, ImageTokenizerConfig,
                                         VectorQuantizer)


def tiny_config(**overrides) -> ImageTokenizerConfig:
    values = dict(resolution=16, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8],
                  z_channels=32, embed_dim=8, n_embed=64)
    values.update(overrides)
    return ImageTokenizerConfig(**values)


def images(b=2, side=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, side, side, generator=g) * 2 - 1  # (B, 3, H, W) in [-1, 1]


@pytest.fixture(scope="module")
def model() -> ImageTokenizer:
    torch.manual_seed(0)
    return ImageTokenizer(tiny_config()).eval()


def test_sizes_follow_config():
    assert ImageTokenizerConfig().grid_size == 64 // 4  # defaults: 64 px, ch_mult (1, 2, 2)
    assert tiny_config().grid_size == 8
    assert tiny_config(ch_mult=[1, 1, 2, 2], resolution=32).grid_size == 4
    assert ImageTokenizerConfig(kind="dvae", resolution=256).grid_size == 32
    m = ImageTokenizer(tiny_config(n_embed=100))
    assert m.codebook_size == 100 and m.grid_size == 8


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="kind"):
        ImageTokenizerConfig(kind="vqvae2")
    with pytest.raises(ValueError, match="divisible by 32"):
        ImageTokenizerConfig(ch=48)
    with pytest.raises(ValueError, match="embed_dim .* must equal z_channels"):
        ImageTokenizerConfig(kind="gumbel", z_channels=64, embed_dim=8)
    with pytest.raises(ValueError, match="multiple of the downsampling factor"):
        ImageTokenizerConfig(resolution=30, ch_mult=[1, 2, 2])


def test_encode_decode_shapes_and_ranges(model):
    x = images()
    ids = model.encode(x)
    assert ids.shape == (2, 8, 8) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < 64
    out = model.decode(ids)
    assert out.shape == (2, 3, 16, 16)
    assert float(out.min()) >= -1 and float(out.max()) <= 1
    # Fully convolutional: any multiple of the downsampling factor works, not only `resolution`.
    assert model.encode(torch.zeros(1, 3, 16, 32)).shape == (1, 8, 16)


def test_forward_matches_encode_in_eval(model):
    x = images()
    recon, ids, aux = model(x)
    assert recon.shape == x.shape
    assert torch.equal(ids, model.encode(x))
    assert {"commit_loss", "codebook_loss", "quant_loss"} <= set(aux)
    assert all(aux[k].ndim == 0 for k in ("commit_loss", "codebook_loss", "quant_loss"))


def test_range_check_reports_observed_min_max(model):
    x = images()
    x[0, 0, 0, 0] = 1.5
    x[1, 2, 3, 4] = -1.25
    with pytest.raises(ValueError, match=r"\[-1, 1\].*min -1\.2500, max 1\.5000"):
        model.encode(x)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model(torch.rand(1, 3, 16, 16) * 255)  # a [0, 255] image
    model.encode(images().clamp(-1, 1) * 1.0005)  # within the 1e-3 tolerance: accepted


def test_bad_shapes_and_dtypes_are_rejected(model):
    with pytest.raises(ValueError, match="multiples of 2"):
        model.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match="float tensor"):
        model.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 64\).*max 64"):
        model.decode(torch.full((1, 8, 8), 64))
    with pytest.raises(ValueError, match="LongTensor"):
        model.decode(torch.zeros(1, 64))


def test_save_load_round_trip(tmp_path, model):
    model.save_pretrained(tmp_path / "tok")
    assert (tmp_path / "tok" / "config.json").is_file() and (tmp_path / "tok" / "model.safetensors").is_file()
    loaded = ImageTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.config == model.config
    x = images(seed=3)
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.equal(loaded.decode(model.encode(x)), model.decode(model.encode(x)))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        (tmp_path / "tok" / "model.safetensors").unlink()
        ImageTokenizer.from_pretrained(tmp_path / "tok")


def test_straight_through_gradient_reaches_encoder():
    torch.manual_seed(0)
    m = ImageTokenizer(tiny_config()).train()
    recon, _, aux = m(images())
    recon.square().mean().backward(retain_graph=True)  # reconstruction only: needs straight-through
    g = m.encoder.conv_in.weight.grad
    assert g is not None and g.abs().sum() > 0
    assert m.quantize.embedding.weight.grad is None  # codes move only through codebook_loss
    aux["quant_loss"].backward()
    assert m.quantize.embedding.weight.grad.abs().sum() > 0


def test_vector_quantizer_picks_nearest_code():
    torch.manual_seed(0)
    q = VectorQuantizer(n_embed=16, embed_dim=4)
    q.embedding.weight.data.normal_()
    z = torch.randn(2, 4, 3, 5)
    dist = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 4), q.embedding.weight)
    assert torch.equal(q.ids_from_latents(z).flatten(), dist.argmin(1))
    z_q, ids, _ = q(z)
    assert torch.allclose(z_q, q.embed_ids(ids), atol=1e-6)


def test_l2norm_quantizer_uses_cosine_and_unit_codes():
    torch.manual_seed(0)
    q = VectorQuantizer(n_embed=16, embed_dim=4, l2norm=True)
    q.embedding.weight.data.normal_()  # not unit norm: the lookup must normalise anyway
    z = torch.randn(2, 4, 3, 3) * 5
    cos = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 4), dim=1) @ F.normalize(q.embedding.weight, dim=1).t()
    z_q, ids, _ = q(z)
    assert torch.equal(ids.flatten(), cos.argmax(1))
    assert torch.allclose(z_q.norm(dim=1), torch.ones(2, 3, 3), atol=1e-5)


def test_restart_dead_codes_replaces_unused_codes_from_latents():
    torch.manual_seed(0)
    q = VectorQuantizer(n_embed=8, embed_dim=2).train()
    q.embedding.weight.data = torch.tensor([[10.0, 10.0]] + [[-50.0 - i, 0.0] for i in range(7)])
    z = torch.randn(1, 2, 4, 4) * 0.1 + 10  # every latent lands on code 0
    _, ids, aux = q(z)
    assert torch.all(ids == 0) and aux["codes_used"] == 1
    assert q.code_usage.tolist() == [16.0] + [0.0] * 7
    z_flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    restarted = q.restart_dead_codes(z_flat, generator=torch.Generator().manual_seed(0))
    assert restarted == 7
    assert torch.equal(q.embedding.weight[0], torch.tensor([10.0, 10.0]))
    for row in q.embedding.weight[1:]:  # each restarted code is one of the latents
        assert (z_flat - row).abs().sum(1).min() < 1e-6
    assert q.code_usage.sum() == 0
    _, ids, _ = q(z)
    assert len(ids.unique()) > 1  # latents now spread over several codes
    with pytest.raises(ValueError, match="z_flat"):
        q.restart_dead_codes(torch.zeros(3, 5))


def test_gumbel_tokens_are_deterministic_argmax():
    torch.manual_seed(0)
    m = ImageTokenizer(tiny_config(kind="gumbel", embed_dim=32)).train()  # train mode: noise on
    x = images()
    ids = m.encode(x)
    assert torch.equal(ids, m.encode(x))
    logits = m.quantize.proj(m.encode_latents(x))
    assert torch.equal(ids, logits.argmax(1))
    recon, train_ids, aux = m(x)  # training forward samples Gumbel noise but keeps shapes
    assert recon.shape == x.shape and train_ids.shape == ids.shape and "kl_loss" in aux
    aux["quant_loss"].backward()
    assert m.quantize.proj.weight.grad is not None


def test_gumbel_quantizer_eval_forward_is_argmax():
    torch.manual_seed(0)
    q = GumbelQuantizer(in_channels=4, n_embed=10, embed_dim=3).eval()
    z = torch.randn(2, 4, 2, 2)
    z_q, ids, _ = q(z)
    assert torch.equal(ids, q.proj(z).argmax(1))
    assert torch.allclose(z_q, q.embed_ids(ids), atol=1e-6)


def test_dvae_kind_round_trip_shapes(tmp_path):
    torch.manual_seed(0)
    cfg = ImageTokenizerConfig(kind="dvae", resolution=16, n_hid=8, n_init=8, n_blk_per_group=1,
                               n_embed=32, embed_dim=32)
    m = ImageTokenizer(cfg).eval()
    x = images()
    ids = m.encode(x)
    assert ids.shape == (2, 2, 2)
    out = m.decode(ids)
    assert out.shape == (2, 3, 16, 16) and float(out.min()) >= -1 and float(out.max()) <= 1
    m.save_pretrained(tmp_path / "dvae")
    assert torch.equal(ImageTokenizer.from_pretrained(tmp_path / "dvae").encode(x), ids)


def test_local_encoder_codes_do_not_see_far_objects(tmp_path):
    """taming's encoder (GroupNorm, mid attention) lets a far-away object's colour change the codes
    of white background; local_encoder keeps each code to its receptive field (at f4 with these
    widths about 38 px: the corner token, 37 px from the square, is outside it)."""
    x = -torch.ones(1, 3, 64, 64)
    x[:, :, 40:56, 40:56] = torch.tensor([1.0, -1.0, -1.0])[:, None, None]  # a red square, bottom right
    y = x.clone()
    y[:, :, 40:56, 40:56] = torch.tensor([-1.0, -1.0, 1.0])[:, None, None]  # the same square in blue
    corner = (slice(None), slice(None), slice(0, 1), slice(0, 1))  # token (0, 0): pixels 0-3
    latents = {}
    for local in (False, True):
        torch.manual_seed(0)
        model = ImageTokenizer(ImageTokenizerConfig(resolution=64, ch=32, ch_mult=[1, 1, 2], z_channels=32,
                                                    embed_dim=8, n_embed=64, local_encoder=local)).eval()
        with torch.no_grad():
            latents[local] = [model.encoder(image)[corner] for image in (x, y)]
        if local:
            assert not any(isinstance(m, torch.nn.GroupNorm) for m in model.encoder.modules())
            model.save_pretrained(tmp_path / "local")
            loaded = ImageTokenizer.from_pretrained(tmp_path / "local")
            assert loaded.config.local_encoder and torch.equal(loaded.encode(x), model.encode(x))
    assert not torch.allclose(*latents[False], atol=1e-4)  # the leak this option removes
    torch.testing.assert_close(*latents[True], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="local_encoder / cell_local_encoder apply to the vqgan and gumbel"):
        ImageTokenizerConfig(kind="dvae", local_encoder=True)


def test_cell_local_encoder_code_sees_only_its_own_cell(tmp_path):
    """cell_local_encoder: changing the pixels of one 4x4 cell changes that token's latent and no
    other, even its neighbours' (local_encoder's 3x3 convs reach them); saved and loaded exactly."""
    config = ImageTokenizerConfig(resolution=32, ch=32, ch_mult=[1, 1, 2], z_channels=32, embed_dim=8,
                                  n_embed=64, cell_local_encoder=True)
    torch.manual_seed(0)
    model = ImageTokenizer(config).eval()
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in model.encoder.modules())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    y = x.clone()
    y[:, :, 12:16, 20:24] = torch.rand(1, 3, 4, 4) * 2 - 1  # token (3, 5) of the 8x8 grid
    with torch.no_grad():
        changed = (model.encoder(x) - model.encoder(y)).abs().amax(dim=1)[0] > 1e-6  # (8, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[3, 5] = True
    assert torch.equal(changed, expected)
    model.save_pretrained(tmp_path / "cell")
    loaded = ImageTokenizer.from_pretrained(tmp_path / "cell")
    assert loaded.config.cell_local_encoder and torch.equal(loaded.encode(x), model.encode(x))
    with pytest.raises(ValueError, match="cell_local_encoder apply to the vqgan and gumbel"):
        ImageTokenizerConfig(kind="dvae", cell_local_encoder=True)


def test_code_pixels_average_each_codes_decoded_cells(model):
    g, f = model.grid_size, model.config.downsample_factor
    grids = torch.randint(0, 20, (5, g, g), generator=torch.Generator().manual_seed(0))  # codes 20.. never occur
    pixels = model.code_pixels(grids, batch_size=2)  # three batches, the last one short
    assert pixels.shape == (model.codebook_size, 3 * f * f) and pixels.dtype == torch.float32
    pictures = model.decode(grids)  # (5, 3, g*f, g*f)
    for code in (0, 7, 19):
        cells = [pictures[b, :, r * f:(r + 1) * f, c * f:(c + 1) * f].flatten()
                 for b, r, c in (grids == code).nonzero().tolist()]
        torch.testing.assert_close(pixels[code], torch.stack(cells).mean(0), atol=1e-5, rtol=0)  # batch shapes differ
    assert torch.equal(pixels[20:], torch.zeros(model.codebook_size - 20, 3 * f * f))
    with pytest.raises(ValueError, match="token ids must be in"):
        model.code_pixels(torch.full((1, g, g), model.codebook_size))
