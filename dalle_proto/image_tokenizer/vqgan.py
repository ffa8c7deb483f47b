"""VQGAN encoder and decoder with taming-transformers' module layout and math.

Parameter names and shapes match `taming/modules/diffusionmodules/model.py` (Encoder/Decoder with
`temb_channels=0`, `resamp_with_conv=True`, `double_z=False`), so a taming checkpoint's `encoder.*` /
`decoder.*` tensors load strictly. Order of ops is taming's: GroupNorm(32, eps 1e-6) -> swish -> conv;
downsampling pads (0, 1, 0, 1) and runs a stride-2 3x3 conv; upsampling is nearest x2 then a 3x3 conv;
attention is single-head over all positions with 1x1-conv q, k, v and proj_out.

Layout (`L = len(ch_mult)` levels, level 0 is full resolution):
  encoder: conv_in -> down[i].block[j] (+ attn[j] where the current side is in attn_resolutions)
           -> down[i].downsample (not on the last level) -> mid.block_1, mid.attn_1, mid.block_2
           -> norm_out -> swish -> conv_out (z_channels)
  decoder: conv_in -> mid -> up[i] for i = L-1 .. 0, each with num_res_blocks + 1 blocks and an
           upsample (not on level 0) -> norm_out -> swish -> conv_out (out_ch)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each position of a (B, C, H, W) map: unlike GroupNorm, no
    statistic is shared across positions. Parameters are named as GroupNorm's (weight, bias)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)  # (B, H, W, C)
        return x.permute(0, 3, 1, 2)


def _replace_modules(encoder: "Encoder", replacement) -> "Encoder":
    """Swap every submodule for which `replacement(module)` returns a module; None keeps it."""
    for name, module in list(encoder.named_modules()):
        new = replacement(module) if name else None
        if new is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(encoder.get_submodule(parent_name) if parent_name else encoder, child, new)
    return encoder


def make_local(encoder: "Encoder") -> "Encoder":
    """Strip the encoder of what mixes the whole image: GroupNorm -> ChannelNorm, attention blocks ->
    identity. A token's code then depends only on its convolutional receptive field; with taming's
    encoder, white background codes change when an object anywhere changes colour."""
    def replacement(module: nn.Module) -> nn.Module | None:
        if isinstance(module, nn.GroupNorm):
            return ChannelNorm(module.num_channels, module.eps)
        return nn.Identity() if isinstance(module, AttnBlock) else None

    return _replace_modules(encoder, replacement)


def make_cell_local(encoder: "Encoder") -> "Encoder":
    """Shrink a local encoder's receptive field to one token cell: every stride-1 3x3 conv becomes
    1x1 and every downsampling a 2x2 stride-2 conv, so a code is a function of its own f x f pixels
    only. `make_local`'s 3x3 convs still let a code see about 38 px at f4, so the first code that
    tells two scenes apart lies in background a token or more away from the objects."""
    def replacement(module: nn.Module) -> nn.Module | None:
        if not isinstance(module, nn.Conv2d) or module.kernel_size == (1, 1):
            return None
        if module.stride == (2, 2):  # Downsample's pad (0, 1, 0, 1) is then never read
            return nn.Conv2d(module.in_channels, module.out_channels, 2, stride=2)
        return nn.Conv2d(module.in_channels, module.out_channels, 1)

    return _replace_modules(encoder, replacement)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """norm1 -> swish -> conv1 -> norm2 -> swish -> dropout -> conv2, plus a 1x1 `nin_shortcut`
    on the skip path when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(self.dropout(swish(self.norm2(h))))  # (B, C_out, H, W)
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (scale 1/sqrt(C)), residual."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.norm = normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, 1)
        self.k = nn.Conv2d(in_channels, in_channels, 1)
        self.v = nn.Conv2d(in_channels, in_channels, 1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_norm = self.norm(x)
        # (B, 1, HW, C): one head; SDPA's default scale 1/sqrt(C) is taming's scale.
        q, k, v = (t(x_norm).reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        out = out.transpose(2, 3).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve the side: asymmetric zero pad (0, 1, 0, 1) then a 3x3 stride-2 conv (taming's choice)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double the side: nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block` and `attn` ModuleLists (+ `downsample`/`upsample`), taming names."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:  # taming: an attention after every block of an attention level
                h = self.attn[j](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Images (B, in_channels, H, W) -> latents (B, z_channels, H / 2**(L-1), W / 2**(L-1))."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], in_channels: int, resolution: int,
                 z_channels: int, dropout: float = 0.0):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(level)
        self.mid = _Mid(block_in, dropout)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for i_level, level in enumerate(self.down):
            h = level.run_blocks(h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)  # side halves
        h = self.mid(h)  # (B, ch * ch_mult[-1], h, w)
        return self.conv_out(swish(self.norm_out(h)))  # (B, z_channels, h, w)


class Decoder(nn.Module):
    """Latents (B, z_channels, h, w) -> images (B, out_ch, h * 2**(L-1), w * 2**(L-1)), unbounded."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], resolution: int, z_channels: int,
                 dropout: float = 0.0):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, dropout)
        levels: list[_Level] = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            if i_level != 0:
                level.upsample = Upsample(block_in)
                curr_res *= 2
            levels.insert(0, level)  # up[0] is the full-resolution level, as in taming
        self.up = nn.ModuleList(levels)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch * ch_mult[-1], h, w)
        for i_level in reversed(range(self.num_resolutions)):
            h = self.up[i_level].run_blocks(h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)  # side doubles
        return self.conv_out(swish(self.norm_out(h)))  # (B, out_ch, H, W)
