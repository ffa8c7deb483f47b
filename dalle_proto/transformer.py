"""The DALL·E transformer: one decoder-only GPT over text tokens followed by image tokens.

Sequence layout (no BOS token). With T = text_len and N = image_grid**2:

    input  = text[0 .. T-1] + image[0 .. N-2]           (T + N - 1 positions)
    target = text[1 .. T-1] + image[0 .. N-1]

Text positions 0..T-2 predict the next text id (text head, V + T classes: BPE ids and the
per-position pads), text position T-1 predicts image token 0, and image position j predicts image
token j + 1 (image head, image vocabulary only). So forward returns text logits (B, T-1, V+T) and
image logits (B, N, Vi). The first text token is never predicted; the null text used for
classifier-free guidance is all pads, ids V + arange(T) (`null_text_ids`).

Attention: text -> text causal, every image token sees all text, image -> image per layer by the
paper's sparse masks (`attention_masks.py`). Pre-LayerNorm blocks (optionally CogView's sandwich
LN), GELU MLP, GPT-2 init. The KV-cache entry points used by `sampling.py` are `prefill_text` and
`decode_image_token`; they share every weight and mask with `forward`. With `text_encoder_depth` > 0
(prefix-LM text only) the caption first passes through that many unmasked blocks of its own.

Two options express minDALL-E's stage-2 GPT (`mindalle.py` converts its weights; with
`attention="full"` it is the same network): `text_pad_id` (its text tokenizer pads with one [PAD]
id inside the BPE vocabulary, so the text vocabulary is V, not V + T, and the null text is T
[PAD]s) and `image_position="raster"` (one learned embedding per raster position instead of a
row plus a column embedding). Its layout is already ours: text position T-1 predicts image token 0.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle_proto.attention_masks import (additive_mask, block_layout, cache_slot_mask,
                                         cache_window, layer_attention_kinds, sequence_mask, text_mask)
from dalle_proto.pretrained import (WEIGHTS_NAME, load_component, load_state_dict_strict, no_random_init,
                                    save_component)
from dalle_proto.sparse_attention import block_sparse_attention
from dalle_proto.transformer_config import SIZES, TransformerConfig  # noqa: F401  (re-exported)


class SelfAttention(nn.Module):
    """Multi-head self-attention under one layer's mask kind (fused QKV projection)."""

    def __init__(self, config: TransformerConfig, kind: str):
        super().__init__()
        self.kind, self.heads, self.head_dim = kind, config.heads, config.head_dim
        inner = config.heads * config.head_dim
        self.qkv = nn.Linear(config.dim, 3 * inner)
        self.out = nn.Linear(inner, config.dim)
        self.dropout = config.dropout
        self.causal = not config.bidirectional_text

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, L, 3, H, dh)
        b, n, _ = x.shape
        return self.qkv(x).view(b, n, 3, self.heads, self.head_dim)

    def _split(self, x: torch.Tensor):  # (B, L, D) -> 3 x (B, H, L, dh)
        return self._qkv(x).permute(2, 0, 3, 1, 4)

    def _merge(self, o: torch.Tensor) -> torch.Tensor:  # (B, H, L, dh) -> (B, L, D)
        b, h, n, d = o.shape
        return self.out(o.transpose(1, 2).reshape(b, n, h * d))

    def forward(self, x: torch.Tensor, masks: dict) -> torch.Tensor:  # (B, T+N, D), or (B, T, D) for "text"
        p = self.dropout if self.training else 0.0
        if self.kind == "text":  # a text encoder layer: the caption alone, every token sees every other
            return self._merge(F.scaled_dot_product_attention(*self._split(x), dropout_p=p))
        if self.kind != "full" and not masks["dense"]:
            return self.out(block_sparse_attention(self._qkv(x), masks["text_bias"], masks[f"{self.kind}_image_bias"],
                                                   transposed=self.kind == "column", dropout_p=p))
        q, k, v = self._split(x)  # (B, H, T+N, dh)
        if self.kind == "full" and self.causal:  # the sequence mask of "full" is then plain causal attention
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[self.kind], dropout_p=p)
        return self._merge(o)

    def step(self, x: torch.Tensor, cache, slot: int, filled: int, bias: torch.Tensor) -> torch.Tensor:
        """KV-cache forward of n new positions (the text prefill, then one image token at a time):
        their K/V go to cache slots slot .. slot + n - 1, then they attend to slots 0 .. filled - 1
        under `bias` (n, filled), an additive mask in the cache's dtype (see
        `DalleTransformer._cached_step`). The attention runs in the cache's dtype outside autocast
        (see `DalleTransformer.new_cache`); scale, mask and QK^T are one baddbmm."""
        q, k, v = self._split(x)  # (B, H, n, dh)
        k_cache, v_cache = cache
        b, h, n, d = q.shape
        k_cache[:, :, slot:slot + n] = k
        v_cache[:, :, slot:slot + n] = v
        # entering an autocast context costs more than this whole attention: only when it is on
        with torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) \
                else contextlib.nullcontext():
            scores = torch.baddbmm(bias, q.reshape(b * h, n, d).to(k_cache.dtype),
                                   k_cache[:, :, :filled].view(b * h, filled, d).transpose(1, 2),
                                   alpha=d ** -0.5)  # (BH, n, filled)
            o = torch.bmm(scores.softmax(dim=2), v_cache[:, :, :filled].view(b * h, filled, d))  # (BH, n, dh)
        return self._merge(o.view(b, h, n, d).to(x.dtype))


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        hidden = int(config.dim * config.mlp_ratio)
        self.fc = nn.Linear(config.dim, hidden)
        self.proj = nn.Linear(hidden, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))  # exact GELU: on CPU in bf16 several times faster than tanh


class Block(nn.Module):
    def __init__(self, config: TransformerConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.norm_attn = nn.LayerNorm(config.dim)
        self.attn = SelfAttention(config, kind)
        self.norm_mlp = nn.LayerNorm(config.dim)
        self.mlp = MLP(config)
        self.post_attn = nn.LayerNorm(config.dim) if config.sandwich_norm else nn.Identity()
        self.post_mlp = nn.LayerNorm(config.dim) if config.sandwich_norm else nn.Identity()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, masks: dict) -> torch.Tensor:  # (B, L, D)
        x = x + self.dropout(self.post_attn(self.attn(self.norm_attn(x), masks)))
        return x + self.dropout(self.post_mlp(self.mlp(self.norm_mlp(x))))

    def step(self, x: torch.Tensor, cache, slot: int, filled: int, bias: torch.Tensor) -> torch.Tensor:
        """KV-cache forward of x's positions (no dropout: inference); see SelfAttention.step."""
        x = x + self.post_attn(self.attn.step(self.norm_attn(x), cache, slot, filled, bias))
        return x + self.post_mlp(self.mlp(self.norm_mlp(x)))


def _code_pixel_mlp(c: TransformerConfig) -> nn.Sequential:  # (Vi, P) decoded pixels -> (Vi, D)
    return nn.Sequential(nn.Linear(c.code_pixels, c.dim), nn.GELU(), nn.Linear(c.dim, c.dim))


class DalleTransformer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = c = config
        self.text_embedding = nn.Embedding(c.text_total_vocab, c.dim)
        self.text_position = nn.Parameter(torch.zeros(c.text_len, c.dim))
        self.image_embedding = nn.Embedding(c.image_vocab_size, c.dim)
        if c.image_position == "raster":
            self.image_position = nn.Parameter(torch.zeros(c.image_len, c.dim))
            positions = (self.image_position,)
        else:
            self.image_row = nn.Parameter(torch.zeros(c.image_grid, c.dim))
            self.image_column = nn.Parameter(torch.zeros(c.image_grid, c.dim))
            positions = (self.image_row, self.image_column)
        self.embed_dropout = nn.Dropout(c.dropout)
        self.text_encoder = nn.ModuleList(Block(c, "text") for _ in range(c.text_encoder_depth))
        self.kinds = layer_attention_kinds(c.depth, c.attention)
        self.blocks = nn.ModuleList(Block(c, kind) for kind in self.kinds)
        self.final_norm = nn.LayerNorm(c.dim)
        self.text_head = nn.Linear(c.dim, c.text_total_vocab, bias=False)
        self.image_head = nn.Linear(c.dim, c.image_vocab_size, bias=False)
        if c.tie_embeddings:
            self.text_head.weight = self.text_embedding.weight
            self.image_head.weight = self.image_embedding.weight
        if c.code_pixels:  # see TransformerConfig.code_pixels; zeros until set_code_pixels
            self.register_buffer("code_pixel_values", torch.zeros(c.image_vocab_size, c.code_pixels))
            self.code_pixel_in = _code_pixel_mlp(c)
            self.code_pixel_out = _code_pixel_mlp(c) if c.code_pixels_head and not c.tie_embeddings else None
        # masks and block layouts per kind in use, built once; not saved (pure functions of config)
        self._dense = False
        self._frozen_tables: tuple | None = None  # see frozen_image_tables
        self._mask_biases: dict = {}  # (kind, dtype, device) -> additive mask, see _mask_bias
        self.register_buffer("mask_text_bias", additive_mask(text_mask(c.text_len, c.bidirectional_text)),
                             persistent=False)
        for kind in sorted(set(self.kinds)):
            self.register_buffer(f"mask_{kind}", sequence_mask(kind, c.text_len, c.image_grid, c.conv_kernel,
                                                               c.bidirectional_text), persistent=False)
            layout = block_layout(kind, c.text_len, c.image_grid, c.conv_kernel)
            if layout is not None:  # block-sparse fast path: each block's image window, (g, g, W)
                self.register_buffer(f"mask_{kind}_image_bias", additive_mask(layout[2][:, :, c.text_len:]),
                                     persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("attn.out.weight", "mlp.proj.weight")):  # GPT-2: scale residual writes
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.depth))
        for p in (self.text_position, *positions):
            nn.init.normal_(p, mean=0.0, std=0.02)
        for block in self.text_encoder:  # each encoder block starts as the identity (DiT's adaLN-zero
            # idea): a trained model given an encoder (training.init_from) computes what it did before
            nn.init.zeros_(block.attn.out.weight), nn.init.zeros_(block.mlp.proj.weight)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # ---- helpers -----------------------------------------------------------------------------
    def masks(self) -> dict:
        """Mask buffers by name ("row", "row_image_bias", "text_bias", ...), plus the "dense" switch."""
        found = {name[len("mask_"):]: buf for name, buf in self.named_buffers() if name.startswith("mask_")}
        return {**found, "dense": self._dense}

    @contextlib.contextmanager
    def dense_attention(self):
        """Within this block, attention uses plain masked SDPA over the whole sequence instead of
        the block-sparse fast path (same result; a reference for tests)."""
        previous, self._dense = self._dense, True
        try:
            yield self
        finally:
            self._dense = previous

    @contextlib.contextmanager
    def frozen_image_tables(self):
        """Within this block (no gradients: sampling) a code_pixels model computes its image input
        table and head rows once instead of at every call, i.e. at every decoded token."""
        if not self.config.code_pixels or self._frozen_tables is not None:
            yield self
            return
        with torch.no_grad():
            self._frozen_tables = (self._image_input_table(), self._image_head_weight())
        try:
            yield self
        finally:
            self._frozen_tables = None

    def null_text_ids(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """(B, T) all-pad text (ids V + i, or text_pad_id everywhere): the empty caption, the null
        condition for guidance."""
        c = self.config
        if c.text_pad_id is not None:
            return torch.full((batch, c.text_len), c.text_pad_id, dtype=torch.long, device=device)
        ids = torch.arange(c.text_vocab_size, c.text_total_vocab, device=device)
        return ids.unsqueeze(0).expand(batch, -1).clone()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_ids(self, text_ids: torch.Tensor, image_ids: torch.Tensor | None) -> None:
        c = self.config
        if text_ids.dim() != 2 or text_ids.shape[1] != c.text_len:
            raise ValueError(f"text_ids must have shape (B, {c.text_len}), got {tuple(text_ids.shape)}")
        if image_ids is not None and (image_ids.dim() != 2 or image_ids.shape[1] != c.image_len
                                      or image_ids.shape[0] != text_ids.shape[0]):
            raise ValueError(f"image_ids must have shape ({text_ids.shape[0]}, {c.image_len}) "
                             f"(image_grid {c.image_grid}**2), got {tuple(image_ids.shape)}")

    def _embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, D)
        x = self.text_embedding(text_ids) + self.text_position  # (B, T, D)
        for block in self.text_encoder:  # empty unless text_encoder_depth > 0
            x = block(x, {})
        return x

    def _image_position(self) -> torch.Tensor:  # (N, D): row embedding + column embedding, or raster
        if self.config.image_position == "raster":
            return self.image_position
        g = self.config.image_grid
        return (self.image_row[:, None, :] + self.image_column[None, :, :]).reshape(g * g, -1)

    def set_code_pixels(self, values: torch.Tensor) -> None:
        """Store each image code's decoded pixels, (image_vocab_size, code_pixels), e.g.
        `ImageTokenizer.code_pixels(training_grids)`; saved with the weights."""
        if not self.config.code_pixels:
            raise ValueError("this transformer takes no code pixels (TransformerConfig.code_pixels=0)")
        expected = (self.config.image_vocab_size, self.config.code_pixels)
        if tuple(values.shape) != expected:
            raise ValueError(f"code pixel values must have shape {expected} (TransformerConfig.code_pixels="
                             f"{self.config.code_pixels}), got {tuple(values.shape)}")
        with torch.no_grad():
            self.code_pixel_values.copy_(values)

    def _image_input_table(self) -> torch.Tensor:  # (Vi, D): learned rows + their codes' pixel term
        if self._frozen_tables is not None:
            return self._frozen_tables[0]
        pixels = self.code_pixel_values.to(self.image_embedding.weight.dtype)  # (Vi, P)
        return self.image_embedding.weight + self.code_pixel_in(pixels)

    def _image_head_weight(self) -> torch.Tensor:  # (Vi, D)
        if self._frozen_tables is not None:
            return self._frozen_tables[1]
        if self.config.tie_embeddings:
            return self._image_input_table()
        if self.code_pixel_out is None:  # code_pixels_head=False: free rows
            return self.image_head.weight
        pixels = self.code_pixel_values.to(self.image_head.weight.dtype)  # (Vi, P)
        rows = self.code_pixel_out(pixels)  # (Vi, D)
        # Centred over codes: a part shared by all rows shifts every logit alike, so no gradient holds it
        # and it drifted to logits of ~200, where bf16 (training, sampling) resolves only ~1 nat.
        return self.image_head.weight + rows - rows.mean(dim=0)

    def _embed_image(self, image_ids: torch.Tensor) -> torch.Tensor:  # (B, n) -> (B, n, D)
        if not self.config.code_pixels:
            return self.image_embedding(image_ids)
        return F.embedding(image_ids, self._image_input_table())

    def _image_logits(self, x: torch.Tensor) -> torch.Tensor:  # (B, n, D) -> (B, n, Vi)
        if not self.config.code_pixels:
            return self.image_head(x)
        return F.linear(x, self._image_head_weight())

    # ---- training / scoring ------------------------------------------------------------------
    def forward(self, text_ids: torch.Tensor, image_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text_ids (B, T), image_ids (B, N) -> text logits (B, T-1, V+T), image logits (B, N, Vi)."""
        self._check_ids(text_ids, image_ids)
        c = self.config
        # The last image token is only a target, but running it through too (its output is dropped,
        # attention is causal) keeps every image row/column block complete for block-sparse attention.
        x = torch.cat([self._embed_text(text_ids),
                       self._embed_image(image_ids) + self._image_position()], dim=1)  # (B, T+N, D)
        x = self.embed_dropout(x)
        masks = self.masks()
        for block in self.blocks:
            x = block(x, masks)
        x = self.final_norm(x)
        text_logits = self.text_head(x[:, : c.text_len - 1])  # (B, T-1, V+T)
        image_logits = self._image_logits(x[:, c.text_len - 1: -1])  # (B, N, Vi)
        return text_logits, image_logits

    def loss(self, text_ids: torch.Tensor, image_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Weighted text + image cross-entropy; each averaged over its own tokens (paper: 1/8, 7/8)."""
        text_logits, image_logits = self(text_ids, image_ids)
        if self.config.text_loss_weight > 0:
            text_loss = F.cross_entropy(text_logits.float().flatten(0, 1), text_ids[:, 1:].flatten())
        else:  # e.g. bidirectional text, where predicting the next text token would be copying it
            text_loss = image_logits.new_zeros((), dtype=torch.float32)
        image_loss = F.cross_entropy(image_logits.float().flatten(0, 1), image_ids.flatten())
        c = self.config
        loss = c.text_loss_weight * text_loss + c.image_loss_weight * image_loss
        return loss, {"text_loss": text_loss.detach(), "image_loss": image_loss.detach()}

    # ---- KV-cache generation (see sampling.py) -----------------------------------------------
    def new_cache(self, batch: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Preallocated per-layer (K, V) tensors (B, H, T + W, head_dim), written in place: the text,
        then a ring of the last W image positions, W = `attention_masks.cache_window` of the layer's
        mask kind (grid + 1 for a row layer, all N for "full").

        dtype defaults to float32 on the CPU, whatever the weights' dtype: single-query attention is
        a few tiny batched matmuls, which CPU kernels run faster in fp32 than in bf16 (measured,
        benchmarks/transformer.py), and the cache is small. Elsewhere: the autocast dtype when
        autocast is on, else the weights' dtype."""
        c = self.config
        ref = self.image_head.weight
        device = torch.device(device) if device is not None else ref.device
        if dtype is None:
            if device.type == "cpu":
                dtype = torch.float32
            elif torch.is_autocast_enabled(device.type):
                dtype = torch.get_autocast_dtype(device.type)
            else:
                dtype = ref.dtype
        caches = []
        for kind in self.kinds:  # each layer holds only the image keys its mask can reach
            shape = (batch, c.heads, c.text_len + cache_window(kind, c.image_grid, c.conv_kernel), c.head_dim)
            caches.append((torch.zeros(shape, dtype=dtype, device=device),
                           torch.zeros(shape, dtype=dtype, device=device)))
        return caches

    def prefill_text(self, text_ids: torch.Tensor, cache) -> torch.Tensor:
        """Run the text through every layer, filling the cache; -> logits (B, Vi) for image token 0."""
        self._check_ids(text_ids, None)
        return self._cached_step(self._embed_text(text_ids), 0, cache)  # (B, Vi)

    def decode_image_token(self, image_token: torch.Tensor, index: int, cache) -> torch.Tensor:
        """Feed image token `index` (B,) after the cached prefix; -> logits (B, Vi) for index + 1."""
        c = self.config
        if c.image_position == "raster":
            pos_emb = self.image_position[index]  # (D,)
        else:
            pos_emb = self.image_row[index // c.image_grid] + self.image_column[index % c.image_grid]  # (D,)
        x = (self._embed_image(image_token) + pos_emb).unsqueeze(1)  # (B, 1, D)
        return self._cached_step(x, c.text_len + index, cache)  # (B, Vi)

    def _cached_step(self, x: torch.Tensor, pos: int, cache) -> torch.Tensor:  # (B, n, D) -> (B, Vi)
        """Positions pos .. pos + n - 1 through every layer. Text position p is cache slot p; image
        index j is slot T + j % W of a layer whose cache holds W image positions."""
        t, n = self.config.text_len, x.shape[1]
        biases = {kind: self._mask_bias(kind, cache[0][0].dtype) for kind in set(self.kinds)}
        for block, layer_cache in zip(self.blocks, cache):
            size = layer_cache[0].shape[2]
            slot = pos if pos < t else t + (pos - t) % (size - t)
            filled = min(size, pos + n)
            x = block.step(x, layer_cache, slot, filled, biases[block.kind][pos:pos + n, :filled])
        return self._image_logits(self.final_norm(x[:, -1]))

    def _mask_bias(self, kind: str, dtype: torch.dtype) -> torch.Tensor:
        """(T+N, T+W) additive mask over a layer's cache slots (`attention_masks.cache_slot_mask`;
        0 allowed, -inf not), built once per kind, dtype and device."""
        device = self.image_head.weight.device
        key = (kind, dtype, device)
        if key not in self._mask_biases:
            c = self.config
            mask = cache_slot_mask(kind, c.text_len, c.image_grid, c.conv_kernel, c.bidirectional_text).to(device)
            self._mask_biases[key] = additive_mask(mask, dtype)
        return self._mask_biases[key]

    # ---- save / load ---------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike, dtype: torch.dtype | None = None):
        state = {k: v for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:  # safetensors refuses shared storage; heads are re-tied on load
            state.pop("text_head.weight"), state.pop("image_head.weight")
        return save_component(folder, self.config, state, dtype=dtype)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> "DalleTransformer":
        """The saved model in eval mode. `dtype` (e.g. torch.bfloat16) builds it in that dtype and casts
        the weights as they are read: the same model as `.to(dtype)` after an fp32 load, with at most
        one fp32 tensor in memory (a 1.3B fp32 folder: peak resident memory 8.1 GB instead of 10.6,
        the file's memory-mapped pages included)."""
        config, state = load_component(folder, TransformerConfig, dtype)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype or previous)  # parameters and masks are created in it
        try:
            with no_random_init():  # the strict load below overwrites every parameter
                model = cls(config)
        finally:
            torch.set_default_dtype(previous)
        if config.tie_embeddings:  # the heads are the tables; one missing from the file fails the strict load
            ties = {"text_head.weight": "text_embedding.weight", "image_head.weight": "image_embedding.weight"}
            state = {**state, **{head: state[table] for head, table in ties.items() if table in state}}
        load_state_dict_strict(model, state, source=os.path.join(str(folder), WEIGHTS_NAME))
        return model if dtype is None else model.to(dtype)  # the float buffers, as .to(dtype) casts them
