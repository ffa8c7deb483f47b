"""A small CLIP (Radford et al. 2021): images and captions in one L2-normalised embedding space.

DALL·E reranks its samples with CLIP: draw N images per caption, keep the one whose embedding is
closest to the caption's. This model is trained from scratch on the project's own pairs
(clip_training.py) and is small enough for a CPU:

    clip = load_clip("runs/shapes/clip")  # a ClipModel, or a ClipEnsemble of several
    scores = clip.score(images, text_tokenizer.encode(captions))  # (B,) cosine similarities

- image encoder: a conv net on pixels in [-1, 1] (B, 3, S, S) with two coordinate channels
  appended (so that "in the top left" is visible to the convolutions), `image_stages` stride-2
  stages, then the whole final feature map flattened into a Linear: no global pooling, because
  positions and relations are what the captions talk about.
- text encoder: token + position embeddings, `text_layers` pre-norm transformer layers whose
  attention ignores the per-position pads (ids >= text_vocab_size - text_len), mean pooling over
  the non-pad positions (the empty caption, all pads, pools over every position).
- both project to `embed_dim` and are L2-normalised; `logit_scale` (log of the inverse
  temperature, learned, clamped at log 100 as in CLIP) scales the cosine similarities in the loss.

`ClipEnsemble`: several CLIPs trained alike from different seeds (`clip_training.members`), scored
by their mean cosine. Where one small CLIP's best-of-32 pick is wrong, the right candidate often
scores within 0.01 of it; members err on different candidates, and averaging them picks right
more often (BENCHMARKS.md, "An ensemble of CLIPs").
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dalle_proto.pretrained import (CONFIG_NAME, WEIGHTS_NAME, BadSavedFileError, PretrainedMixin,
                                    atomic_write_bytes, read_json_object)

RANGE_TOLERANCE = 1e-3
MAX_LOGIT_SCALE = math.log(100.0)
ENSEMBLE_NAME = "ensemble.json"  # marks a folder that holds a ClipEnsemble


@dataclass
class ClipArchitecture:
    """The sizes a run config's `clip` section sets (vocabulary, text length and image size come
    from the text tokenizer and the data)."""

    embed_dim: int = 128  # the shared embedding space
    image_width: int = 16  # channels of the stem; doubled at every stage up to 8 x image_width
    image_stages: int = 4  # stride-2 stages: a 64 px image ends as a 4x4 feature map
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    init_temperature: float = 0.07  # CLIP's initial softmax temperature


@dataclass
class ClipConfig(ClipArchitecture):
    text_vocab_size: int = 16384 + 256  # the text tokenizer's total_vocab_size: BPE ids + per-position pads
    text_len: int = 256
    image_size: int = 64

    def __post_init__(self) -> None:
        checks = [
            (self.text_len >= 1 and self.text_vocab_size > self.text_len,
             "text_vocab_size (BPE ids + pads) must exceed text_len >= 1"),
            (self.image_stages >= 1 and self.image_size % 2 ** self.image_stages == 0,
             "image_size must be a multiple of 2 ** image_stages"),
            (min(self.embed_dim, self.image_width, self.text_width, self.text_layers, self.text_heads) >= 1,
             "embed_dim, image_width, text_width, text_layers and text_heads must be >= 1"),
            (self.text_width % self.text_heads == 0, "text_width must be a multiple of text_heads"),
            (self.image_width % 4 == 0, "image_width must be a multiple of 4 (GroupNorm of 8 groups)"),
            (0 < self.init_temperature <= 1, "init_temperature must be in (0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"ClipConfig: {message}; got {self}")

    @classmethod
    def from_architecture(cls, architecture: ClipArchitecture, text_vocab_size: int, text_len: int,
                          image_size: int) -> "ClipConfig":
        values = {k: v for k, v in asdict(architecture).items() if k in ClipArchitecture.__dataclass_fields__}
        return cls(**values, text_vocab_size=text_vocab_size, text_len=text_len, image_size=image_size)

    @property
    def bpe_vocab_size(self) -> int:
        """Ids below this are BPE tokens; from here on they are per-position pads."""
        return self.text_vocab_size - self.text_len


class ImageEncoder(nn.Module):
    def __init__(self, c: ClipConfig):
        super().__init__()
        width = c.image_width
        layers: list[nn.Module] = [nn.Conv2d(3 + 2, width, 3, padding=1), nn.GELU()]
        for stage in range(c.image_stages):
            out = c.image_width * min(2 ** (stage + 1), 8)
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.GroupNorm(8, out), nn.GELU(),
                       nn.Conv2d(out, out, 3, padding=1), nn.GroupNorm(8, out), nn.GELU()]
            width = out
        self.convs = nn.Sequential(*layers)
        side = c.image_size // 2 ** c.image_stages
        self.features_dim = width * side * side
        self.proj = nn.Linear(self.features_dim, c.embed_dim)
        ramp = torch.linspace(-1, 1, c.image_size)
        self.register_buffer("coords", torch.stack(torch.meshgrid(ramp, ramp, indexing="xy")), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        coords = self.coords.to(images.dtype).expand(images.shape[0], -1, -1, -1)  # (B, 2, S, S)
        h = self.convs(torch.cat([images, coords], dim=1))  # (B, C, s, s)
        return self.proj(h.flatten(1))  # (B, E)


class TextEncoder(nn.Module):
    def __init__(self, c: ClipConfig):
        super().__init__()
        self.bpe_vocab_size = c.bpe_vocab_size
        self.token_embedding = nn.Embedding(c.text_vocab_size, c.text_width)
        self.position_embedding = nn.Parameter(torch.randn(c.text_len, c.text_width) * 0.02)
        # Tokens at std 0.02 too: with nn.Embedding's default N(0, 1) they drowned the positions 50:1
        # and the mean-pooled text embedding was a bag of words ("a red circle to the left of a blue
        # square" and its swapped caption at cosine 0.9999), so reranking could not read relations.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(c.text_width, c.text_heads, 4 * c.text_width, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(c.text_layers))
        self.norm = nn.LayerNorm(c.text_width)
        self.proj = nn.Linear(c.text_width, c.embed_dim)

    def forward(self, text_ids: torch.Tensor) -> torch.Tensor:
        real = text_ids < self.bpe_vocab_size  # (B, T)
        real = real | ~real.any(dim=1, keepdim=True)  # the empty caption attends to (and pools) its pads
        h = self.token_embedding(text_ids) + self.position_embedding  # (B, T, W)
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=~real)  # (B, T, W)
        h = self.norm(h)
        weights = real.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
        pooled = (h * weights).sum(1) / weights.sum(1)  # (B, W)
        return self.proj(pooled)  # (B, E)


class ClipModel(PretrainedMixin, nn.Module):
    config_class = ClipConfig

    def __init__(self, config: ClipConfig):
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config)
        self.text_encoder = TextEncoder(config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))

    member_count = 1  # ClipEnsemble has the same two attributes: callers need not tell them apart

    @property
    def embedding_size(self) -> int:
        """Width of encode_image / encode_text's output."""
        return self.config.embed_dim

    def save_pretrained(self, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        (Path(folder) / ENSEMBLE_NAME).unlink(missing_ok=True)  # else load_clip would read a stale ensemble
        return super().save_pretrained(folder, dtype=dtype)

    # ---- input checks ------------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        s = self.config.image_size
        if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.ndim != 4 \
                or tuple(images.shape[1:]) != (3, s, s):
            got = f"{type(images).__name__} {getattr(images, 'dtype', '')} {tuple(getattr(images, 'shape', ()))}"
            raise ValueError(f"ClipModel expects a float tensor (B, 3, {s}, {s}) with values in [-1, 1] "
                             f"(its config.image_size is {s}); got {got}")
        if images.numel():
            lo, hi = (float(v) for v in torch.aminmax(images.detach()))
            if lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE or lo != lo or hi != hi:
                raise ValueError(f"ClipModel expects pixel values in [-1, 1] (e.g. x / 127.5 - 1 for uint8); "
                                 f"observed min {lo:.4f}, max {hi:.4f}")

    def _check_text(self, text_ids: torch.Tensor) -> None:
        c = self.config
        if not isinstance(text_ids, torch.Tensor) or text_ids.dtype != torch.long or text_ids.ndim != 2 \
                or text_ids.shape[1] != c.text_len:
            got = f"{type(text_ids).__name__} {getattr(text_ids, 'dtype', '')} {tuple(getattr(text_ids, 'shape', ()))}"
            raise ValueError(f"ClipModel expects text ids as a LongTensor (B, {c.text_len}) from the text "
                             f"tokenizer it was trained with; got {got}")
        if text_ids.numel() and (int(text_ids.min()) < 0 or int(text_ids.max()) >= c.text_vocab_size):
            raise ValueError(f"text ids must be in [0, {c.text_vocab_size}) (BPE ids + per-position pads); "
                             f"observed min {int(text_ids.min())}, max {int(text_ids.max())}")

    # ---- embeddings --------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [-1, 1] -> unit-norm embeddings (B, E)."""
        self._check_images(images)
        return F.normalize(self.image_encoder(images), dim=-1)  # (B, E)

    def encode_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """Text ids (B, T) (BPE ids + per-position pads) -> unit-norm embeddings (B, E)."""
        self._check_text(text_ids)
        return F.normalize(self.text_encoder(text_ids), dim=-1)  # (B, E)

    def score(self, images: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of image i and caption i, (B,) in [-1, 1]: the reranking score."""
        if len(images) != len(text_ids):
            raise ValueError(f"ClipModel.score pairs image i with caption i; got {len(images)} images "
                             f"and {len(text_ids)} captions")
        return (self.encode_image(images) * self.encode_text(text_ids)).sum(-1)  # (B,)

    def temperature_scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at 100: multiplies cosine similarities into logits."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def forward(self, images: torch.Tensor, text_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image embeddings (B, E), text embeddings (B', E)), both unit norm."""
        return self.encode_image(images), self.encode_text(text_ids)


class ClipEnsemble(nn.Module):
    """Several ClipModels of one config, used as one: `score` is the members' mean cosine, and the
    embeddings are the members' unit embeddings concatenated and scaled by 1/sqrt(n), so they keep
    unit norm and their dot product is that same mean cosine (CLIP score, R-precision and FID
    computed from the embeddings agree with `score`)."""

    def __init__(self, members: list[ClipModel]):
        super().__init__()
        if not members:
            raise ValueError("ClipEnsemble needs at least one ClipModel")
        others = [m.config for m in members if m.config != members[0].config]
        if others:
            raise ValueError(f"ClipEnsemble members must share one ClipConfig; got {members[0].config} and {others[0]}")
        self.members = nn.ModuleList(members)
        self.config = members[0].config

    @property
    def member_count(self) -> int:
        return len(self.members)

    @property
    def embedding_size(self) -> int:
        """Width of encode_image / encode_text's output: the members' embeddings joined."""
        return self.member_count * self.config.embed_dim

    def _joined(self, embeddings: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(embeddings, dim=-1) / math.sqrt(len(embeddings))  # (B, n*E), unit norm

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [-1, 1] -> unit-norm embeddings (B, n*E)."""
        return self._joined([m.encode_image(images) for m in self.members])

    def encode_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """Text ids (B, T) -> unit-norm embeddings (B, n*E)."""
        return self._joined([m.encode_text(text_ids) for m in self.members])

    def score(self, images: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """The members' mean cosine similarity of image i and caption i, (B,)."""
        return torch.stack([m.score(images, text_ids) for m in self.members]).mean(0)  # (B,)

    def save_pretrained(self, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """`folder/ensemble.json` (the member count) + one ClipModel folder per member, `member_0/` ..."""
        folder = Path(folder)
        for i, member in enumerate(self.members):
            member.save_pretrained(folder / f"member_{i}", dtype=dtype)
        for stale in (CONFIG_NAME, WEIGHTS_NAME):  # a single CLIP saved here before
            (folder / stale).unlink(missing_ok=True)
        atomic_write_bytes(folder / ENSEMBLE_NAME, (json.dumps({"members": len(self.members)}) + "\n").encode())
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "ClipEnsemble":
        folder = Path(folder)
        path = folder / ENSEMBLE_NAME
        count = read_json_object(path, 'the ensemble.json written by ClipEnsemble.save_pretrained: {"members": N}'
                                 ).get("members")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise BadSavedFileError(path, f'members must be an integer >= 1; got {count!r}; expected {{"members": N}}')
        return cls([ClipModel.from_pretrained(folder / f"member_{i}") for i in range(count)]).eval()


def load_clip(folder: str | os.PathLike) -> ClipModel | ClipEnsemble:
    """The CLIP saved in `folder`: a ClipEnsemble when it holds ensemble.json, else one ClipModel."""
    folder = Path(folder)
    if (folder / ENSEMBLE_NAME).is_file():
        return ClipEnsemble.from_pretrained(folder)
    return ClipModel.from_pretrained(folder)
