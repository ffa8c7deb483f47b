"""Block-sparse attention for training: the DALL·E masks computed block by block, never densely.

For a row, column or conv layer, image queries are cut into blocks of one image row (one column for
column layers); block b sees the whole text plus a window of whole blocks b - w .. b
(`attention_masks.block_layout`). Keys are cut by slicing, never gathered, so the backward has no
scatter-add; the softmax runs once over text and window scores together. Equal to masked SDPA over
the full sequence (`DalleTransformer.dense_attention`, tests/test_transformer.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_bias: torch.Tensor,
                           image_bias: torch.Tensor, transposed: bool, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention over the whole text + image sequence that only computes what a sparse mask can
    reach (layout from `attention_masks.block_layout`). q, k, v: (B, H, T+N, dh), N = g*g.

    Text queries: causal attention over the text. Image queries come in `g` blocks of g (image
    rows, or columns when `transposed`); block b sees all text and the image blocks b - w .. b
    (W = (w + 1) * g keys), a window cut by slicing (no gather). Scores against the text are one large matmul for all
    image queries; scores inside the windows one batched matmul; a joint softmax covers both.
    text_bias: (T, T) and image_bias: (g, g, W) additive masks (0 allowed, -inf not): the causal
    text mask, and each image block's window.
    """
    b, h, length, d = q.shape
    g = image_bias.shape[0]
    t, n, w = length - g * g, g * g, image_bias.shape[2] // g - 1
    # the text block is small (T x T): a plain masked softmax beats the CPU flash kernel's backward
    # biases in the scores' dtype: under bf16 autocast the softmax then stays in bf16 (it accumulates
    # in fp32 internally) and no (B, H, g, g, T + W) probability tensor is cast back
    text_scores = q[:, :, :t] @ k[:, :, :t].transpose(2, 3) * d ** -0.5 + text_bias.to(q.dtype)  # (B, H, T, T)
    text_probs = F.dropout(text_scores.softmax(dim=3), dropout_p) if dropout_p > 0 else text_scores.softmax(dim=3)
    text_out = text_probs.to(v.dtype) @ v[:, :, :t]  # (B, H, T, dh)

    def blocks(x: torch.Tensor) -> torch.Tensor:  # image part in block order: (BH, blocks, g, dh)
        x = x[:, :, t:].reshape(b * h, g, g, d)
        return x.transpose(1, 2) if transposed else x

    def windows(x: torch.Tensor) -> torch.Tensor:  # (BH, blocks, (w + 1) * g, dh)
        padded = F.pad(blocks(x), (0, 0, 0, 0, w, 0))  # w empty blocks in front, masked off by the bias
        return torch.cat([padded[:, i:i + g] for i in range(w + 1)], dim=2)

    qi = blocks(q) * d ** -0.5  # (BH, g, g, dh)
    k_text, v_text = k[:, :, :t].reshape(b * h, t, d), v[:, :, :t].reshape(b * h, t, d)
    scores_text = (qi.reshape(b * h, n, d) @ k_text.transpose(1, 2)).view(b * h, g, g, t)  # (BH, g, g, T)
    scores_image = qi @ windows(k).transpose(2, 3) + image_bias.to(qi.dtype)  # (BH, g, g, W)
    probs = torch.cat([scores_text, scores_image], dim=3).softmax(dim=3)  # (BH, g, g, T + W)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    probs = probs.to(v.dtype)
    image_out = (probs[..., :t].reshape(b * h, n, t) @ v_text).view(b * h, g, g, d) \
        + probs[..., t:] @ windows(v)  # (BH, g, g, dh)
    if transposed:
        image_out = image_out.transpose(1, 2)
    image_out = image_out.reshape(b, h, n, d)
    return torch.cat([text_out, image_out], dim=2)  # (B, H, T+N, dh)
