"""Image tokenizer: images (B, 3, H, W) in [-1, 1] <-> discrete image tokens (B, h, w).

`ImageTokenizer` covers a taming-layout VQGAN ("vqgan"), taming's Gumbel VQGAN ("gumbel") and
OpenAI's dVAE ("dvae"); see model.py. Loaders: `ImageTokenizer.from_pretrained` (our folder),
`ImageTokenizer.from_taming` / `load_taming`, `ImageTokenizer.from_dall_e` / `load_dall_e`.
"""
from .dvae import DVAEDecoder, DVAEEncoder, load_dall_e
from .model import ImageTokenizer, ImageTokenizerConfig
from .quantizers import GumbelQuantizer, OneHotQuantizer, VectorQuantizer
from .taming_loading import load_taming
from .vqgan import AttnBlock, Decoder, Downsample, Encoder, ResnetBlock, Upsample

__all__ = [
    "ImageTokenizer", "ImageTokenizerConfig",
    "Encoder", "Decoder", "ResnetBlock", "AttnBlock", "Downsample", "Upsample",
    "VectorQuantizer", "GumbelQuantizer", "OneHotQuantizer",
    "DVAEEncoder", "DVAEDecoder", "load_dall_e", "load_taming",
]
