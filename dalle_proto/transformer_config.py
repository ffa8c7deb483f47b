"""The transformer's typed config and the registry of named sizes (`transformer.size` in a run config).

`TransformerConfig` holds every architecture option of `DalleTransformer` (`transformer.py`); a saved
transformer's `config.json` is this dataclass. `SIZES` names the shapes used by the tests, the peer
benchmark, the larger presets and the paper's 12B model.
"""
from __future__ import annotations

from dataclasses import dataclass

from dalle_proto.attention_masks import ATTENTION_MODES


@dataclass
class TransformerConfig:
    text_vocab_size: int = 1024  # BPE vocabulary V, without the per-position pads
    text_len: int = 64  # T
    image_vocab_size: int = 512
    image_grid: int = 16  # image tokens form an image_grid x image_grid raster
    dim: int = 256
    depth: int = 8
    heads: int = 8
    head_dim: int = 32
    mlp_ratio: float = 4.0
    attention: str = "sparse"  # "sparse": the paper's row/column/conv layers; "sparse_full": column
    # layers widened to full causal attention; "full": causal;
    # "row" / "column" / "conv": that mask in every layer
    conv_kernel: int = 11
    dropout: float = 0.0
    # "causal" (the paper): text tokens see the caption up to themselves; "bidirectional": every
    # text token sees the whole caption (a prefix LM, so a colour word can see the shape word after
    # it); the text is then an input, not a target, so text_loss_weight must be 0
    text_attention: str = "causal"
    text_loss_weight: float = 1 / 8
    image_loss_weight: float = 7 / 8
    tie_embeddings: bool = False  # output heads share the input embedding tables
    sandwich_norm: bool = False  # CogView: LayerNorm also on each sublayer's output
    # None (the paper): position i of a short caption is padded with its own id V + i; an id < V:
    # the tokenizer pads every position with this one id of its vocabulary (minDALL-E's [PAD])
    text_pad_id: int | None = None
    # "row_column": a row embedding plus a column embedding; "raster": one per position (minDALL-E)
    image_position: str = "row_column"
    # bidirectional blocks over the caption alone, run before the main stack (0: none, the paper). With
    # prefix-LM text, layer l's image queries read text states mixed by only l layers; an encoder gives
    # every layer's image queries text whose colour words have already met their shape words.
    text_encoder_depth: int = 0
    # > 0: the number of pixel values of one image code (3 * f * f for an f-times downsampling
    # tokenizer). Each code's look (buffer `code_pixel_values`: its mean decoded cell in 2048 training
    # pictures, computed when training starts) passes through a small MLP shared by all codes, added to that
    # code's input embedding and output-head row: codes that look alike start alike, so what the
    # model learns about a stroke in one colour can carry over to a colour it never saw drawn that way.
    code_pixels: int = 0
    # False: the pixel term joins the input embeddings only and the head keeps free rows (untied heads);
    # measured worse on shapes (BENCHMARKS.md, "What costs `code_pixels` its counts")
    code_pixels_head: bool = True

    def __post_init__(self):
        for name in ("text_vocab_size", "text_len", "image_vocab_size", "image_grid", "dim", "depth",
                     "heads", "head_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TransformerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"TransformerConfig.attention must be one of {ATTENTION_MODES}, "
                             f"got {self.attention!r}")
        if self.text_attention not in ("causal", "bidirectional"):
            raise ValueError(f"TransformerConfig.text_attention must be 'causal' or 'bidirectional', "
                             f"got {self.text_attention!r}")
        if self.bidirectional_text and self.text_loss_weight != 0:
            raise ValueError(f"TransformerConfig.text_attention='bidirectional' lets each text token see the "
                             f"next one, so it cannot be a target: set text_loss_weight=0 (got "
                             f"{self.text_loss_weight})")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"TransformerConfig.conv_kernel must be odd and >= 1, got {self.conv_kernel}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TransformerConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.text_pad_id is not None and not 0 <= self.text_pad_id < self.text_vocab_size:
            raise ValueError(f"TransformerConfig.text_pad_id must be None or in [0, text_vocab_size="
                             f"{self.text_vocab_size}), got {self.text_pad_id}")
        if not isinstance(self.text_encoder_depth, int) or isinstance(self.text_encoder_depth, bool) \
                or self.text_encoder_depth < 0:
            raise ValueError(f"TransformerConfig.text_encoder_depth must be an int >= 0, got {self.text_encoder_depth!r}")
        if self.text_encoder_depth > 0 and not self.bidirectional_text:
            raise ValueError(f"TransformerConfig.text_encoder_depth={self.text_encoder_depth} encodes the caption "
                             "bidirectionally, so the text cannot be a next-token target: set "
                             "text_attention='bidirectional' and text_loss_weight=0")
        if not isinstance(self.code_pixels, int) or isinstance(self.code_pixels, bool) or self.code_pixels < 0:
            raise ValueError(f"TransformerConfig.code_pixels must be an int >= 0 (3 * f * f), got {self.code_pixels!r}")
        if not self.code_pixels_head and (not self.code_pixels or self.tie_embeddings):
            raise ValueError("TransformerConfig.code_pixels_head=False has no effect unless code_pixels > 0 and "
                             f"tie_embeddings=False (got code_pixels={self.code_pixels}, "
                             f"tie_embeddings={self.tie_embeddings})")
        if self.image_position not in ("row_column", "raster"):
            raise ValueError(f"TransformerConfig.image_position must be 'row_column' or 'raster', "
                             f"got {self.image_position!r}")

    @property
    def bidirectional_text(self) -> bool:
        return self.text_attention == "bidirectional"

    @property
    def text_total_vocab(self) -> int:
        """Text classes: V BPE ids + one pad id per text position (V when text_pad_id is set)."""
        return self.text_vocab_size + (self.text_len if self.text_pad_id is None else 0)

    @property
    def image_len(self) -> int:
        return self.image_grid * self.image_grid

    @classmethod
    def from_size(cls, name: str, **overrides) -> "TransformerConfig":
        if name not in SIZES:
            raise ValueError(f"unknown transformer size {name!r}; valid sizes: {sorted(SIZES)}")
        return cls(**{**SIZES[name], **overrides})


SIZES: dict[str, dict] = {
    # unit tests and notebooks: seconds on a CPU
    "tiny": dict(dim=64, depth=2, heads=2, head_dim=32, text_len=16, text_vocab_size=256,
                 image_grid=8, image_vocab_size=256),
    # the peer benchmark configuration (dalle-pytorch / peer/README.md)
    "peer": dict(dim=256, depth=8, heads=8, head_dim=32, text_len=64, text_vocab_size=1024,
                 image_grid=16, image_vocab_size=512),
    "small": dict(dim=512, depth=12, heads=8, head_dim=64, text_len=64, text_vocab_size=4096,
                  image_grid=16, image_vocab_size=1024),
    "base": dict(dim=1024, depth=24, heads=16, head_dim=64, text_len=128, text_vocab_size=16384,
                 image_grid=32, image_vocab_size=8192),
    # the paper: 64 layers, 62 heads x 64, d_model 3968, 256 text tokens over 16384 BPE ids,
    # 32x32 image tokens over 8192 codes. The paper does not say whether its output heads share the
    # input embeddings; tied, the count is 12.20B ("about 12B"), untied 12.29B.
    "paper-12b": dict(dim=3968, depth=64, heads=62, head_dim=64, text_len=256, text_vocab_size=16384,
                      image_grid=32, image_vocab_size=8192, tie_embeddings=True),
}
