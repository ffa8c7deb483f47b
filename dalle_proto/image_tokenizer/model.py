"""ImageTokenizer: images (B, 3, H, W) in [-1, 1] <-> image token ids (B, h, w), raster order.

One nn.Module for three kinds of discrete autoencoder, all with taming-transformers' attribute names
(`encoder`, `quant_conv`, `quantize`, `post_quant_conv`, `decoder`), so `state_dict()` keys equal a
taming VQModel's / GumbelVQ's checkpoint keys minus `loss.*`:
- "vqgan":  VQGAN + nearest-neighbour codebook (optionally L2-normalised codes, LlamaGen-style);
- "gumbel": VQGAN + Gumbel-softmax codebook (taming's vqgan_gumbel_f8 layout);
- "dvae":   OpenAI's DALL·E dVAE (encoder logits -> one-hot -> decoder); quant convs are identities.

Data flow: encode_latents -> quantize_latents -> decode_latents; `encode`/`decode` are the
token-level, no-grad inference API. Loaders: `from_pretrained` (our folder format), `from_taming`
(taming yaml + Lightning .ckpt), `from_dall_e` (OpenAI's encoder.pkl + decoder.pkl).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from dalle_proto.pretrained import PretrainedMixin

from .dvae import DVAEDecoder, DVAEEncoder, logits_to_image, map_pixels
from .quantizers import GumbelQuantizer, OneHotQuantizer, VectorQuantizer
from .vqgan import Decoder, Encoder, make_cell_local, make_local

KINDS = ("vqgan", "gumbel", "dvae")
RANGE_TOLERANCE = 1e-3


@dataclass
class ImageTokenizerConfig:
    kind: str = "vqgan"  # "vqgan" | "gumbel" | "dvae"
    resolution: int = 64  # training side; attention levels are chosen from it
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 64
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    attn_resolutions: list[int] = field(default_factory=list)
    z_channels: int = 64
    embed_dim: int = 8
    n_embed: int = 1024
    dropout: float = 0.0
    l2norm_codes: bool = False  # vqgan: cosine lookup of L2-normalised codes (LlamaGen)
    # vqgan/gumbel: an encoder without whole-image mixing (per-position channel norm instead of
    # GroupNorm, no attention), so a token's code sees only its receptive field; taming's layout: False
    local_encoder: bool = False
    # implies local_encoder, and every encoder conv is 1x1 or a 2x2 stride-2 downsampling: a code
    # sees only its own f x f pixel cell, so a scene's objects are decided at their own tokens
    cell_local_encoder: bool = False
    beta: float = 0.25  # vqgan: commitment weight inside quant_loss
    kl_weight: float = 1e-8  # gumbel: weight of KL(q || uniform) inside quant_loss (taming default)
    # dvae only (OpenAI's names): hidden width, decoder's first width, blocks per group, groups.
    n_hid: int = 256
    n_init: int = 128
    n_blk_per_group: int = 2
    group_count: int = 4

    def __post_init__(self) -> None:
        self.ch_mult = [int(m) for m in self.ch_mult]
        self.attn_resolutions = [int(r) for r in self.attn_resolutions]
        if self.kind not in KINDS:
            raise ValueError(f"ImageTokenizerConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.n_embed < 2:
            raise ValueError(f"ImageTokenizerConfig.n_embed must be >= 2, got {self.n_embed}")
        if self.kind == "dvae" and (self.local_encoder or self.cell_local_encoder):
            raise ValueError("ImageTokenizerConfig.local_encoder / cell_local_encoder apply to the vqgan and "
                             "gumbel encoders, not dvae")
        if self.kind == "dvae":
            if self.group_count != 4:
                raise ValueError(f"dvae: only OpenAI's 4-group layout is supported, "
                                 f"got group_count={self.group_count}")
            if self.n_hid % 4 or self.n_init < 1:
                raise ValueError(f"dvae: n_hid must be a multiple of 4 (got {self.n_hid}) "
                                 f"and n_init >= 1 (got {self.n_init})")
        else:
            if not self.ch_mult:
                raise ValueError("ImageTokenizerConfig.ch_mult must not be empty")
            bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % 32]
            if bad:
                raise ValueError(f"GroupNorm(32) needs every width ch*ch_mult divisible by 32; "
                                 f"ch={self.ch}, ch_mult={self.ch_mult} gives {bad}")
            if self.kind == "gumbel" and self.embed_dim != self.z_channels:
                # taming's GumbelVQ feeds quant_conv's embed_dim output to a proj built for z_channels.
                raise ValueError(f"gumbel: embed_dim ({self.embed_dim}) must equal z_channels ({self.z_channels}) "
                                 "as in taming's GumbelVQ")
        if self.resolution % self.downsample_factor:
            raise ValueError(f"resolution {self.resolution} is not a multiple of the downsampling factor "
                             f"{self.downsample_factor}")

    @property
    def downsample_factor(self) -> int:
        return 8 if self.kind == "dvae" else 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.resolution // self.downsample_factor


class ImageTokenizer(PretrainedMixin, nn.Module):
    """Discrete image autoencoder.

    Images are float tensors (B, 3, H, W) with values in [-1, 1] (taming's range; checked, with a
    tolerance of 1e-3, and a ValueError names the observed min/max). H and W must be multiples of
    the downsampling factor (`config.downsample_factor`); `config.resolution` is the size it was
    built/trained for. Tokens are LongTensors (B, h, w) in raster order, values in [0, codebook_size).
    For kind "dvae" the [-1, 1] input is converted to the dVAE's [0, 1] + map_pixels (eps 0.1) inside.
    """

    config_class = ImageTokenizerConfig

    def __init__(self, config: ImageTokenizerConfig):
        super().__init__()
        self.config = config
        c = config
        if c.kind == "dvae":
            self.encoder = DVAEEncoder(c.in_channels, c.n_hid, c.n_blk_per_group, c.n_embed)
            self.decoder = DVAEDecoder(c.out_ch, c.n_init, c.n_hid, c.n_blk_per_group, c.n_embed)
            self.quant_conv = nn.Identity()  # the dVAE's latents are already the logits
            self.post_quant_conv = nn.Identity()
            self.quantize = OneHotQuantizer(c.n_embed)
            return
        arch = dict(ch=c.ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks,
                    attn_resolutions=c.attn_resolutions, resolution=c.resolution,
                    z_channels=c.z_channels, dropout=c.dropout)
        self.encoder = Encoder(in_channels=c.in_channels, **arch)
        if c.local_encoder or c.cell_local_encoder:
            make_local(self.encoder)
        if c.cell_local_encoder:
            make_cell_local(self.encoder)
        self.decoder = Decoder(out_ch=c.out_ch, **arch)
        self.quant_conv = nn.Conv2d(c.z_channels, c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)
        if c.kind == "gumbel":
            self.quantize = GumbelQuantizer(c.z_channels, c.n_embed, c.embed_dim, kl_weight=c.kl_weight)
        else:
            self.quantize = VectorQuantizer(c.n_embed, c.embed_dim, beta=c.beta, l2norm=c.l2norm_codes)

    # ---- sizes ---------------------------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self.config.n_embed

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    # ---- validation ----------------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        f = self.config.downsample_factor
        if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.ndim != 4:
            got = f"{type(images).__name__} {getattr(images, 'dtype', '')} {tuple(getattr(images, 'shape', ()))}"
            raise ValueError(f"ImageTokenizer expects a float tensor (B, {self.config.in_channels}, H, W) "
                             f"with values in [-1, 1]; got {got}")
        b, c, h, w = images.shape
        if c != self.config.in_channels or h % f or w % f or h == 0 or w == 0:
            raise ValueError(f"ImageTokenizer expects images (B, {self.config.in_channels}, H, W) with H and W "
                             f"multiples of {f} (built for {self.config.resolution}x{self.config.resolution}); "
                             f"got shape {tuple(images.shape)}")
        lo, hi = torch.aminmax(images.detach())
        lo, hi = float(lo), float(hi)
        if lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE or lo != lo or hi != hi:
            raise ValueError(f"ImageTokenizer expects pixel values in [-1, 1] (e.g. x / 127.5 - 1 for uint8); "
                             f"observed min {lo:.4f}, max {hi:.4f}")

    def _check_ids(self, ids: torch.Tensor) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.ndim != 3:
            got = f"{type(ids).__name__} {getattr(ids, 'dtype', '')} {tuple(getattr(ids, 'shape', ()))}"
            raise ValueError(f"ImageTokenizer.decode expects a LongTensor (B, h, w) of token ids; got {got}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise ValueError(f"token ids must be in [0, {self.codebook_size}); observed min {int(ids.min())}, "
                             f"max {int(ids.max())}")

    # ---- training-facing path ------------------------------------------------------------------
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> pre-quantisation latents (B, embed_dim, h, w).

        For "dvae" the latents are the encoder's vocabulary logits (B, n_embed, h, w).
        """
        self._check_images(images)
        if self.config.kind == "dvae":
            images = map_pixels((images.clamp(-1, 1) + 1) / 2)  # dVAE's input convention
        return self.quant_conv(self.encoder(images))  # (B, D, h, w)

    def quantize_latents(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Latents -> (z_q with gradients to z, ids (B, h, w), aux losses/statistics).

        aux always has scalar `commit_loss`, `codebook_loss`, `quant_loss` (add this to the
        reconstruction loss), `perplexity` and `codes_used`; gumbel/dvae also `kl_loss`.
        """
        return self.quantize(z)

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantised latents -> images (B, 3, H, W); not clamped (dvae: already within [-1, 1])."""
        h = self.decoder(self.post_quant_conv(z_q))
        if self.config.kind == "dvae":
            return logits_to_image(h) * 2 - 1  # decoder stats -> [0, 1] -> [-1, 1]
        return h

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Images -> (reconstruction (B, 3, H, W), ids (B, h, w), aux) with gradients everywhere."""
        z_q, ids, aux = self.quantize_latents(self.encode_latents(images))
        return self.decode_latents(z_q), ids, aux

    # ---- token-level inference -----------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> token ids (B, h, w): nearest code / argmax, no noise."""
        return self.quantize.ids_from_latents(self.encode_latents(images))

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, h, w) -> images (B, 3, h*f, w*f) clamped to [-1, 1]."""
        self._check_ids(ids)
        z_q = self.quantize.embed_ids(ids).to(self._decoder_dtype())  # (B, D, h, w)
        return self.decode_latents(z_q).clamp(-1, 1)

    @torch.no_grad()
    def code_pixels(self, grids: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """What each code looks like in these token grids (M, h, w): (codebook_size, 3 * f * f) float32,
        the mean of its cells' decoded pixels (zeros for a code the grids never hold). Decoded in
        context, as the decoder's normalisation layers need real pictures (the transformer's
        `code_pixels` option)."""
        f, v = self.config.downsample_factor, self.codebook_size
        sums = torch.zeros(v, 3 * f * f, dtype=torch.float64)
        counts = torch.zeros(v, dtype=torch.float64)
        for start in range(0, len(grids), batch_size):
            ids = grids[start:start + batch_size].to(self._device())  # (b, h, w)
            images = self.decode(ids).float()  # (b, 3, h*f, w*f)
            cells = images.unfold(2, f, f).unfold(3, f, f)  # (b, 3, h, w, f, f)
            cells = cells.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * f * f).cpu().double()  # (b*h*w, 3*f*f)
            sums.index_add_(0, ids.flatten().cpu(), cells)
            counts.index_add_(0, ids.flatten().cpu(), torch.ones(len(cells), dtype=torch.float64))
        return (sums / counts.clamp(min=1)[:, None]).float()

    def _device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    def _decoder_dtype(self) -> torch.dtype:
        return next(self.decoder.parameters()).dtype

    # ---- loading other formats (save_pretrained / from_pretrained: PretrainedMixin) ----------------
    @classmethod
    def from_taming(cls, config_yaml: str | os.PathLike, ckpt_path: str | os.PathLike) -> "ImageTokenizer":
        """Load a taming-transformers VQModel / GumbelVQ (yaml + Lightning .ckpt), strictly."""
        from .taming_loading import load_taming
        return load_taming(config_yaml, ckpt_path)

    @classmethod
    def from_dall_e(cls, encoder_pkl: str | os.PathLike, decoder_pkl: str | os.PathLike) -> "ImageTokenizer":
        """Load OpenAI's dVAE from its pickled encoder.pkl + decoder.pkl without the dall_e package."""
        from .dvae import load_dall_e
        return load_dall_e(encoder_pkl, decoder_pkl)
