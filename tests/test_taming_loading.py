"""from_taming: tiny checkpoints in taming-transformers' exact layout (yaml + Lightning .ckpt).

The reference forward below is an independent, functional transcription of taming's
Encoder/Decoder/AttnBlock/Downsample math (bmm attention, (0, 1, 0, 1) pad, ...) that reads the raw
checkpoint tensors by key, so the loaded model is compared against taming's computation, not itself.
"""
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import yaml

from dalle_proto.image_tokenizer import ImageTokenizer, ImageTokenizerConfig

DD = dict(double_z=False, z_channels=32, resolution=16, in_channels=3, out_ch=3, ch=32,
          ch_mult=[1, 2, 2], num_res_blocks=2, attn_resolutions=[8], dropout=0.0)


# ---- taming's math, written out ---------------------------------------------------------------

class Recorder(dict):
    """A state dict that remembers which keys were read, to prove the reference used them all."""

    def __init__(self, *a):
        super().__init__(*a)
        self.used = set()

    def __getitem__(self, k):
        self.used.add(k)
        return super().__getitem__(k)


def _conv(sd, p, x, pad=1, stride=1):
    return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], stride=stride, padding=pad)


def _norm_swish(sd, p, x):
    h = F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)
    return h * torch.sigmoid(h)


def _resblock(sd, p, x):
    h = _conv(sd, p + ".conv1", _norm_swish(sd, p + ".norm1", x))
    h = _conv(sd, p + ".conv2", _norm_swish(sd, p + ".norm2", h))
    if p + ".nin_shortcut.weight" in sd:
        x = _conv(sd, p + ".nin_shortcut", x, pad=0)
    return x + h


def _attn(sd, p, x):
    h_ = F.group_norm(x, 32, sd[p + ".norm.weight"], sd[p + ".norm.bias"], eps=1e-6)
    q, k, v = (_conv(sd, f"{p}.{n}", h_, pad=0) for n in "qkv")
    b, c, h, w = q.shape
    w_ = torch.bmm(q.reshape(b, c, h * w).permute(0, 2, 1), k.reshape(b, c, h * w)) * c ** -0.5
    w_ = torch.softmax(w_, dim=2)
    h_ = torch.bmm(v.reshape(b, c, h * w), w_.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + _conv(sd, p + ".proj_out", h_, pad=0)


def _mid(sd, p, h):
    return _resblock(sd, p + ".block_2", _attn(sd, p + ".attn_1", _resblock(sd, p + ".block_1", h)))


def ref_encode_latents(sd, dd, x):
    L, h = len(dd["ch_mult"]), _conv(sd, "encoder.conv_in", x)
    for i in range(L):
        for j in range(dd["num_res_blocks"]):
            h = _resblock(sd, f"encoder.down.{i}.block.{j}", h)
            if f"encoder.down.{i}.attn.{j}.q.weight" in sd:
                h = _attn(sd, f"encoder.down.{i}.attn.{j}", h)
        if i != L - 1:
            h = _conv(sd, f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), pad=0, stride=2)
    h = _conv(sd, "encoder.conv_out", _norm_swish(sd, "encoder.norm_out", _mid(sd, "encoder.mid", h)))
    return _conv(sd, "quant_conv", h, pad=0)


def ref_decode(sd, dd, z_q):
    h = _mid(sd, "decoder.mid", _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", z_q, pad=0)))
    for i in reversed(range(len(dd["ch_mult"]))):
        for j in range(dd["num_res_blocks"] + 1):
            h = _resblock(sd, f"decoder.up.{i}.block.{j}", h)
            if f"decoder.up.{i}.attn.{j}.q.weight" in sd:
                h = _attn(sd, f"decoder.up.{i}.attn.{j}", h)
        if i != 0:
            h = _conv(sd, f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return _conv(sd, "decoder.conv_out", _norm_swish(sd, "decoder.norm_out", h))


# ---- building taming-format files ------------------------------------------------------------

def taming_state_dict(kind="vqgan", n_embed=64, embed_dim=8, dd=DD, seed=0):
    torch.manual_seed(seed)
    cfg = ImageTokenizerConfig(kind=kind, n_embed=n_embed, embed_dim=embed_dim,
                               **{k: v for k, v in dd.items() if k != "double_z"})
    sd = ImageTokenizer(cfg).state_dict()
    for k, v in sd.items():  # move every tensor off its init so a wrong mapping shows
        if "norm" in k:
            v.add_(torch.randn_like(v) * 0.1)
    if kind == "vqgan":
        sd["quantize.embedding.weight"].normal_()
    # The Lightning module's training loss lives in the same state dict: it must be dropped.
    sd["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    sd["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(4, 3, 3, 3)
    sd["loss.logvar"] = torch.zeros(())
    return sd


def write_taming(tmp_path, state_dict, kind="vqgan", n_embed=64, embed_dim=8, dd=DD, lightning_extras=True,
                 name="model"):
    params = {"embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": dict(dd),
              "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                             "params": {"disc_start": 250001, "disc_weight": 0.8, "codebook_weight": 1.0}}}
    target = "taming.models.vqgan.VQModel"
    if kind == "gumbel":
        target = "taming.models.vqgan.GumbelVQ"
        params.update(kl_weight=1.0e-08, temperature_scheduler_config={
            "target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
            "params": {"warm_up_steps": 0, "max_decay_steps": 1000001, "lr_start": 0.9,
                       "lr_max": 0.9, "lr_min": 1.0e-06}})
    yaml_path = tmp_path / f"{name}.yaml"
    yaml_path.write_text(yaml.safe_dump({"model": {"base_learning_rate": 4.5e-6, "target": target,
                                                   "params": params}}))
    ckpt = {"epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.0.8",
            "state_dict": state_dict, "optimizer_states": [], "lr_schedulers": []}
    ckpt_path = tmp_path / f"{name}.ckpt"
    if not lightning_extras:
        torch.save(ckpt, ckpt_path)
        return yaml_path, ckpt_path
    # Lightning 1.x keyed callback states by the callback *class*; weights_only=True rejects that.
    fake = types.ModuleType("pytorch_lightning_fake_callbacks")
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": fake.__name__})
    fake.ModelCheckpoint = ModelCheckpoint
    sys.modules[fake.__name__] = fake
    try:
        ckpt["callbacks"] = {ModelCheckpoint: {"best_model_score": torch.tensor(0.5), "monitor": "val/rec_loss"}}
        torch.save(ckpt, ckpt_path)
    finally:
        del sys.modules[fake.__name__]
    return yaml_path, ckpt_path


# ---- tests ------------------------------------------------------------------------------------

def test_key_layout_matches_taming():
    keys = {k: tuple(v.shape) for k, v in ImageTokenizer(ImageTokenizerConfig(
        kind="vqgan", n_embed=64, **{k: v for k, v in DD.items() if k != "double_z"})).state_dict().items()}
    # resolution 16, ch_mult [1, 2, 2] -> sides 16, 8, 4; attention only at side 8 (level 1).
    assert "encoder.down.1.attn.0.q.weight" in keys and "encoder.down.1.attn.1.proj_out.bias" in keys
    assert not any(k.startswith(("encoder.down.0.attn", "encoder.down.2.attn", "decoder.up.0.attn",
                                 "decoder.up.2.attn")) for k in keys)
    assert "decoder.up.1.attn.2.norm.weight" in keys  # num_res_blocks + 1 decoder blocks per level
    assert keys["encoder.down.1.block.0.nin_shortcut.weight"] == (64, 32, 1, 1)
    assert "encoder.down.2.block.0.nin_shortcut.weight" not in keys
    assert keys["decoder.up.0.block.0.nin_shortcut.weight"] == (32, 64, 1, 1)
    assert "decoder.up.0.upsample.conv.weight" not in keys and "encoder.down.2.downsample.conv.weight" not in keys
    assert keys["decoder.up.1.upsample.conv.weight"] == (64, 64, 3, 3)
    assert keys["encoder.down.0.downsample.conv.weight"] == (32, 32, 3, 3)
    assert keys["encoder.mid.attn_1.k.weight"] == (64, 64, 1, 1)
    assert keys["encoder.conv_out.weight"] == (32, 64, 3, 3) and keys["decoder.conv_in.weight"] == (64, 32, 3, 3)
    assert keys["decoder.conv_out.weight"] == (3, 32, 3, 3)
    assert keys["quant_conv.weight"] == (8, 32, 1, 1) and keys["post_quant_conv.weight"] == (32, 8, 1, 1)
    assert keys["quantize.embedding.weight"] == (64, 8)
    gumbel = ImageTokenizer(ImageTokenizerConfig(kind="gumbel", n_embed=64, embed_dim=32, **{
        k: v for k, v in DD.items() if k != "double_z"})).state_dict()
    assert tuple(gumbel["quantize.proj.weight"].shape) == (64, 32, 1, 1) and "quantize.proj.bias" in gumbel
    assert tuple(gumbel["quantize.embed.weight"].shape) == (64, 32)


def test_vqmodel_loads_and_matches_taming_math(tmp_path):
    sd = taming_state_dict()
    yaml_path, ckpt_path = write_taming(tmp_path, sd)
    model = ImageTokenizer.from_taming(yaml_path, ckpt_path)
    assert model.config.kind == "vqgan" and model.grid_size == 4 and model.codebook_size == 64
    ref = Recorder({k: v for k, v in sd.items() if not k.startswith("loss.")})
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z_ref = ref_encode_latents(ref, DD, x)
    torch.testing.assert_close(model.encode_latents(x), z_ref, atol=1e-5, rtol=1e-5)
    codes = ref["quantize.embedding.weight"]
    ids_ref = torch.cdist(z_ref.permute(0, 2, 3, 1).reshape(-1, 8), codes).argmin(1).view(2, 4, 4)
    ids = model.encode(x)
    assert ids.shape == (2, 4, 4) and torch.equal(ids, ids_ref)
    out_ref = ref_decode(ref, DD, codes[ids].permute(0, 3, 1, 2)).clamp(-1, 1)
    out = model.decode(ids)
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    assert ref.used == set(ref)  # the reference consumed every autoencoder key


def test_gumbel_loads_with_deterministic_tokens(tmp_path):
    sd = taming_state_dict(kind="gumbel", embed_dim=32)
    yaml_path, ckpt_path = write_taming(tmp_path, sd, kind="gumbel", embed_dim=32, lightning_extras=False)
    model = ImageTokenizer.from_taming(yaml_path, ckpt_path)
    assert model.config.kind == "gumbel" and model.config.kl_weight == 1e-8
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    ids = model.encode(x)
    assert ids.shape == (2, 4, 4) and torch.equal(ids, model.encode(x))
    ref = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    logits_ref = _conv(ref, "quantize.proj", ref_encode_latents(ref, DD, x), pad=0)
    assert torch.equal(ids, logits_ref.argmax(1))
    out_ref = ref_decode(ref, DD, ref["quantize.embed.weight"][ids].permute(0, 3, 1, 2)).clamp(-1, 1)
    torch.testing.assert_close(model.decode(ids), out_ref, atol=1e-5, rtol=1e-5)


def test_codebook_size_mismatch_names_both_numbers_and_files(tmp_path):
    sd = taming_state_dict(n_embed=1024)
    _, ckpt_path = write_taming(tmp_path, sd, n_embed=1024, name="vqgan_f16_1024")
    yaml_path, _ = write_taming(tmp_path, {}, n_embed=8192, name="edited_8192", lightning_extras=False)
    with pytest.raises(ValueError) as err:
        ImageTokenizer.from_taming(yaml_path, ckpt_path)
    msg = str(err.value)
    assert "1024" in msg and "8192" in msg and "vqgan_f16_1024.ckpt" in msg and "edited_8192.yaml" in msg


def test_missing_extra_and_misshaped_keys_fail_strictly(tmp_path):
    sd = taming_state_dict()
    del sd["decoder.conv_out.bias"]
    sd["encoder.extra.weight"] = torch.zeros(1)
    yaml_path, ckpt_path = write_taming(tmp_path, sd, lightning_extras=False)
    with pytest.raises(ValueError, match=r"model\.ckpt.*missing keys \['decoder\.conv_out\.bias'\].*"
                                         r"unexpected keys \['encoder\.extra\.weight'\]"):
        ImageTokenizer.from_taming(yaml_path, ckpt_path)
    yaml_path, ckpt_path = write_taming(tmp_path, taming_state_dict(), dd={**DD, "ch_mult": [1, 2, 4]},
                                        lightning_extras=False)
    expected = r"shape mismatches: .*decoder\.conv_in\.weight: file \(64, 32, 3, 3\) vs model \(128, 32, 3, 3\)"
    with pytest.raises(ValueError, match=expected):
        ImageTokenizer.from_taming(yaml_path, ckpt_path)


def test_yaml_target_must_match_checkpoint_kind(tmp_path):
    _, ckpt_path = write_taming(tmp_path, taming_state_dict(), lightning_extras=False)
    yaml_path, _ = write_taming(tmp_path, {}, kind="gumbel", embed_dim=8, name="gumbel", lightning_extras=False)
    with pytest.raises(ValueError, match="GumbelVQ.*VQModel codebook"):
        ImageTokenizer.from_taming(yaml_path, ckpt_path)


def test_bad_files_are_named(tmp_path):
    yaml_path, _ = write_taming(tmp_path, {}, lightning_extras=False)
    torch.save({"epoch": 1, "weights": {}}, tmp_path / "odd.ckpt")
    with pytest.raises(ValueError, match=r"odd\.ckpt.*'state_dict'"):
        ImageTokenizer.from_taming(yaml_path, tmp_path / "odd.ckpt")
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        ImageTokenizer.from_taming(yaml_path, tmp_path / "nope.ckpt")
    kl_yaml, _ = write_taming(tmp_path, {}, dd={**DD, "double_z": True}, name="kl", lightning_extras=False)
    with pytest.raises(ValueError, match=r"kl\.yaml.*double_z"):
        ImageTokenizer.from_taming(kl_yaml, tmp_path / "odd.ckpt")


class _Payload:
    """Unpickling this would create a file: the restricted loader must not call it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_fallback_loader_runs_no_code_from_the_file(tmp_path):
    sd = taming_state_dict()
    yaml_path, ckpt_path = write_taming(tmp_path, sd, lightning_extras=False)
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["hyper_parameters"] = _Payload(str(tmp_path / "pwned"))
    torch.save(ckpt, ckpt_path)
    model = ImageTokenizer.from_taming(yaml_path, ckpt_path)
    assert not (tmp_path / "pwned").exists()
    assert torch.equal(model.quantize.embedding.weight, sd["quantize.embedding.weight"])
