"""OpenAI's DALL·E dVAE (github.com/openai/DALL-E) as plain PyTorch, and a loader for its pickles.

Module and parameter names are dall_e's (`blocks.input.w`, `blocks.group_1.block_1.res_path.conv_1.w`,
..., `blocks.output.conv.b`), so `state_dict()` keys are the released files' parameter names.
Math (dall_e/encoder.py, decoder.py, utils.py):
- Conv2d: parameters `w` (out, in, k, k) and `b`, "same" padding (k - 1) // 2. dall_e runs most
  convs in fp16 on CUDA; here everything runs in the module's dtype (fp32 by default).
- Block: id_path (1x1 conv if widths differ, else identity) + post_gain * res_path, with
  post_gain = 1 / n_layers**2, n_layers = group_count * n_blk_per_group; res_path is
  relu -> conv, four times (encoder kernels 3, 3, 3, 1; decoder kernels 1, 3, 3, 3).
- Encoder: 7x7 input conv -> 4 groups (widths n_hid x1, x2, x4, x8; 2x2 max-pool after groups 1-3)
  -> relu -> 1x1 conv to vocab logits. Input: map_pixels(x in [0, 1]).
- Decoder: 1x1 conv from the one-hot vocab (n_init wide) -> 4 groups (widths x8, x4, x2, x1;
  nearest x2 upsample after groups 1-3) -> relu -> 1x1 conv to 2 * channels logit-Laplace
  statistics; the image is unmap_pixels(sigmoid(first `channels` statistics)).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle_proto.pretrained import load_state_dict_strict

from .unpickling import restricted_torch_load

if TYPE_CHECKING:
    from .model import ImageTokenizer

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps], the dVAE encoder's input range."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


def logits_to_image(stats: torch.Tensor) -> torch.Tensor:
    """Decoder statistics (B, 2C, H, W) -> image (B, C, H, W) in [0, 1] (the Laplace location)."""
    return unmap_pixels(torch.sigmoid(stats[:, : stats.shape[1] // 2].float()))


class Conv2d(nn.Module):
    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        self.kw = kw
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / (n_in * kw**2) ** 0.5)
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class _Block(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers: list[tuple[str, nn.Module]] = []
        for i, k in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", Conv2d(widths[i], widths[i + 1], k))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class EncoderBlock(_Block):
    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__(n_in, n_out, n_layers, kernels=(3, 3, 3, 1))


class DecoderBlock(_Block):
    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__(n_in, n_out, n_layers, kernels=(1, 3, 3, 3))


def _group(blocks: list[nn.Module], resample: tuple[str, nn.Module] | None) -> nn.Sequential:
    items = [(f"block_{i + 1}", blk) for i, blk in enumerate(blocks)]
    return nn.Sequential(OrderedDict(items + ([resample] if resample else [])))


class DVAEEncoder(nn.Module):
    """map_pixels(images in [0, 1]) (B, C, H, W) -> vocabulary logits (B, vocab, H/8, W/8)."""

    def __init__(self, input_channels: int = 3, n_hid: int = 256, n_blk_per_group: int = 2,
                 vocab_size: int = 8192, group_count: int = 4):
        super().__init__()
        n_layers = group_count * n_blk_per_group
        widths = [n_hid, n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]  # input width, then per group
        groups: list[tuple[str, nn.Module]] = [("input", Conv2d(input_channels, n_hid, 7))]
        for g in range(1, 5):
            blocks = [EncoderBlock(widths[g - 1] if i == 0 else widths[g], widths[g], n_layers)
                      for i in range(n_blk_per_group)]
            groups.append((f"group_{g}", _group(blocks, ("pool", nn.MaxPool2d(2)) if g < 4 else None)))
        groups.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", Conv2d(8 * n_hid, vocab_size, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)  # (B, vocab, H/8, W/8)


class DVAEDecoder(nn.Module):
    """One-hot tokens (B, vocab, h, w) -> logit-Laplace statistics (B, 2 * C, 8h, 8w)."""

    def __init__(self, output_channels: int = 3, n_init: int = 128, n_hid: int = 256,
                 n_blk_per_group: int = 2, vocab_size: int = 8192, group_count: int = 4):
        super().__init__()
        n_layers = group_count * n_blk_per_group
        widths = [n_init, 8 * n_hid, 4 * n_hid, 2 * n_hid, n_hid]
        groups: list[tuple[str, nn.Module]] = [("input", Conv2d(vocab_size, n_init, 1))]
        for g in range(1, 5):
            blocks = [DecoderBlock(widths[g - 1] if i == 0 else widths[g], widths[g], n_layers)
                      for i in range(n_blk_per_group)]
            up = ("upsample", nn.Upsample(scale_factor=2, mode="nearest")) if g < 4 else None
            groups.append((f"group_{g}", _group(blocks, up)))
        groups.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", Conv2d(n_hid, 2 * output_channels, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)  # (B, 2C, 8h, 8w)


# ---- loading OpenAI's encoder.pkl / decoder.pkl without the dall_e package ---------------------

class _PickledDallEModule(nn.Module):
    """Stand-in for a pickled dall_e class: nn.Module's __setstate__ restores its __dict__
    (`_parameters`, `_modules`, hyper-parameters such as n_hid), nothing of dall_e runs."""


def _dall_e_stub(module: str, name: str) -> type | None:
    if module == "dall_e" or module.startswith("dall_e."):
        return type(name, (_PickledDallEModule,), {"__module__": module, "__qualname__": name})
    return None


def _read_dall_e_pickle(path: str | os.PathLike, expected: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    try:
        obj = restricted_torch_load(path, stub_for=_dall_e_stub)
    except FileNotFoundError:
        raise
    except Exception as e:  # corrupt or not a torch file
        raise ValueError(f"{path}: could not read as a pickled dall_e {expected}: {e}") from e
    found = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if not isinstance(obj, _PickledDallEModule) or type(obj).__qualname__ != expected:
        raise ValueError(f"{path}: expected a pickled dall_e.{expected.lower()}.{expected} module "
                         f"(OpenAI's {expected.lower()}.pkl), found {found}")
    return obj, {k: v.detach() for k, v in obj.named_parameters()}


def _hparam(obj: nn.Module, name: str, path: str | os.PathLike, default: Any = None) -> Any:
    value = obj.__dict__.get(name, default)
    if value is None:
        raise ValueError(f"{path}: pickled {type(obj).__qualname__} has no attribute {name!r}")
    return int(value)


def load_dall_e(encoder_pkl: str | os.PathLike, decoder_pkl: str | os.PathLike,
                resolution: int = 256) -> "ImageTokenizer":
    """OpenAI's dVAE (encoder.pkl + decoder.pkl, whole pickled `dall_e` modules) -> ImageTokenizer(kind="dvae").

    Weights are read with a restricted unpickler (see unpickling.py): dall_e classes become inert
    nn.Module stand-ins, so neither the dall_e package nor any code from the files is needed/run.
    Loading is strict; hyper-parameters come from the pickled attributes (group_count is a dall_e
    class constant, 4). `resolution` only sets config.resolution/grid_size (the paper: 256 -> 32).
    """
    from .model import ImageTokenizer, ImageTokenizerConfig

    enc, enc_sd = _read_dall_e_pickle(encoder_pkl, "Encoder")
    dec, dec_sd = _read_dall_e_pickle(decoder_pkl, "Decoder")
    enc_h = {k: _hparam(enc, k, encoder_pkl) for k in ("n_hid", "n_blk_per_group", "input_channels", "vocab_size")}
    dec_h = {k: _hparam(dec, k, decoder_pkl) for k in ("n_hid", "n_blk_per_group", "output_channels",
                                                       "vocab_size", "n_init")}
    for key in ("n_hid", "n_blk_per_group", "vocab_size"):
        if enc_h[key] != dec_h[key]:
            raise ValueError(f"dVAE encoder/decoder disagree on {key}: {encoder_pkl} has {enc_h[key]}, "
                             f"{decoder_pkl} has {dec_h[key]}")
    for obj, path in ((enc, encoder_pkl), (dec, decoder_pkl)):
        group_count = _hparam(obj, "group_count", path, default=4)
        if group_count != 4:
            raise ValueError(f"{path}: group_count {group_count} is not supported (dall_e uses 4)")
    config = ImageTokenizerConfig(
        kind="dvae", resolution=resolution, in_channels=enc_h["input_channels"],
        out_ch=dec_h["output_channels"], n_embed=enc_h["vocab_size"], embed_dim=enc_h["vocab_size"],
        n_hid=enc_h["n_hid"], n_init=dec_h["n_init"], n_blk_per_group=enc_h["n_blk_per_group"])
    model = ImageTokenizer(config)
    load_state_dict_strict(model.encoder, enc_sd, source=str(encoder_pkl))
    load_state_dict_strict(model.decoder, dec_sd, source=str(decoder_pkl))
    return model.eval()
