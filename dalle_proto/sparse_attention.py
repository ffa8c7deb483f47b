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


def block_sparse_attention(qkv: torch.Tensor, text_bias: torch.Tensor, image_bias: torch.Tensor,
                           transposed: bool, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention over the whole text + image sequence that only computes what a sparse mask can
    reach (layout from `attention_masks.block_layout`). qkv: the fused projection viewed as
    (B, T+N, 3, H, dh), N = g*g; returns (B, T+N, H*dh), ready for the output projection.

    Text queries: causal attention over the text. Image queries come in `g` blocks of g (image
    rows, or columns when `transposed`); block b sees all text and the image blocks b - w .. b
    (W = (w + 1) * g keys), a window cut by slicing (no gather). Scores against the text are one
    large matmul for all image queries; scores inside the windows one batched matmul; a joint
    softmax covers both. text_bias: (T, T) and image_bias: (g, g, W) additive masks (0 allowed,
    -inf not): the causal text mask, and each image block's window.

    Copies are what this costs on a CPU beyond the matmuls, so the text and image parts are each
    laid out once (one permuted copy of q, k and v together), parts are separated with `split`
    (its backward is a cat, where a slice's backward zero-fills a full-size gradient), and the
    output is assembled by a single cat in the (B, L, H, dh) layout the projection reads.
    """
    b, length, _, h, d = qkv.shape
    g = image_bias.shape[0]
    t, n, w = length - g * g, g * g, image_bias.shape[2] // g - 1
    scale = d ** -0.5
    text, image = qkv.split([t, n], dim=1)  # (B, T, 3, H, dh), (B, N, 3, H, dh)
    q_text, k_text, v_text = text.permute(2, 0, 3, 1, 4).contiguous().view(3, b * h, t, d).unbind(0)  # (BH, T, dh)
    image = image.view(b, g, g, 3, h, d)  # raster: (B, row, column, 3, H, dh)
    order = (3, 0, 4, 2, 1, 5) if transposed else (3, 0, 4, 1, 2, 5)  # blocks are columns / rows
    q_image, k_image, v_image = image.permute(order).contiguous().view(3, b * h, g, g, d).unbind(0)  # (BH, g, g, dh)

    # the text block is small (T x T): a plain masked softmax beats the CPU flash kernel's backward.
    # Biases in the scores' dtype: under bf16 autocast the softmax then stays in bf16 (it
    # accumulates in fp32 internally) and no probability tensor is cast back.
    text_scores = torch.baddbmm(text_bias.to(q_text.dtype), q_text, k_text.transpose(1, 2), alpha=scale)  # (BH, T, T)
    text_probs = text_scores.softmax(dim=2)
    if dropout_p > 0:
        text_probs = F.dropout(text_probs, dropout_p)
    text_out = text_probs.to(v_text.dtype) @ v_text  # (BH, T, dh)

    def windows(x: torch.Tensor) -> torch.Tensor:  # (BH, g, g, dh) -> (BH, blocks, W, dh)
        padded = F.pad(x, (0, 0, 0, 0, w, 0))  # w empty blocks in front, masked off by the bias
        return torch.cat([padded[:, i:i + g] for i in range(w + 1)], dim=2)

    qi = q_image * scale  # (BH, g, g, dh)
    scores_text = (qi.view(b * h, n, d) @ k_text.transpose(1, 2)).view(b * h, g, g, t)  # (BH, g, g, T)
    scores_image = qi @ windows(k_image).transpose(2, 3) + image_bias.to(qi.dtype)  # (BH, g, g, W)
    probs = torch.cat([scores_text, scores_image], dim=3).softmax(dim=3)  # (BH, g, g, T + W)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    probs_text, probs_image = probs.to(v_image.dtype).split([t, g * (w + 1)], dim=3)
    image_out = (probs_text.reshape(b * h, n, t) @ v_text).view(b * h, g, g, d) \
        + probs_image @ windows(v_image)  # (BH, blocks, g, dh)

    # back to (B, L, H, dh): text positions, then the image in raster order
    text_out = text_out.view(b, h, t, d).transpose(1, 2)  # (B, T, H, dh)
    image_out = image_out.view(b, h, g, g, d).permute((0, 3, 2, 1, 4) if transposed else (0, 2, 3, 1, 4))
    out = torch.cat([text_out, image_out.reshape(b, n, h, d)], dim=1)  # (B, T+N, H, dh)
    return out.view(b, length, h * d)
