"""The DALL·E attention masks, as pure functions of the geometry (no model state).

One sequence holds `text_len` text tokens, then `grid * grid` image tokens in raster order. Every
layer shares the same rules for text: text -> text is causal (or, with `bidirectional_text`, every
text token sees the whole caption: a prefix LM), every image token sees all text, text never sees
image. Layers differ only in which earlier *image* tokens an image token sees:

- "row":    the previous grid + 1 image tokens in raster order, itself included (paper, fig. 11b).
- "column": the same rule on the transposed grid (column-major order): the previous grid + 1 tokens
            in column-major order, intersected with raster causality, because tokens are still
            generated in raster order and a mask may never look ahead. What survives is every token
            above in the same column, itself, and its left neighbour (r, c-1) — the transposed
            twin of row attention seeing the token straight above it.
- "conv":   a kernel x kernel neighbourhood centred on the token, causal part only (rows above
            within kernel // 2, and tokens to the left in the same row within kernel // 2).
- "full":   every earlier image token (plain causal attention).

Masks are boolean, True = "may attend", indexed [query, key]. Every query may attend to itself, so
no softmax row is ever empty. They are always built on the CPU (also under a `torch.device("meta")`
context); the model registers them as buffers, which move with `.to(device)`.
"""
from __future__ import annotations

import torch

MASK_KINDS = ("row", "column", "conv", "full")
# "sparse": the paper's layer pattern; "sparse_full": that pattern with its column layers widened to
# full causal attention; a mask kind name: that mask in every layer (ablations, tests)
ATTENTION_MODES = ("sparse", "sparse_full") + MASK_KINDS


def layer_attention_kinds(depth: int, attention: str = "sparse") -> list[str]:
    """Image->image mask kind for each of `depth` layers (index 0 = first layer).

    The paper's rule, with layers numbered i = 1..depth: layer i < depth is "column" when
    (i - 2) % 4 == 0 and "row" otherwise (row, column, row, row, row, column, ...); the last layer is
    "conv". attention="sparse_full" keeps that pattern but makes the column layers "full": a full
    layer sees every earlier image token (a column layer's keys included), so an object drawn late
    in raster order can see one drawn anywhere before it in one hop instead of several.
    attention="full" (or "row", "column", "conv") uses that one mask in every layer.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if attention in MASK_KINDS:
        return [attention] * depth
    if attention not in ("sparse", "sparse_full"):
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    wide = "column" if attention == "sparse" else "full"
    kinds = [wide if (i - 2) % 4 == 0 else "row" for i in range(1, depth)]
    return kinds + ["conv"]


def _check(kind: str, grid: int, conv_kernel: int) -> None:
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown attention mask kind {kind!r}; expected one of {MASK_KINDS}")
    if grid < 1:
        raise ValueError(f"image grid side must be >= 1, got {grid}")
    if conv_kernel < 1 or conv_kernel % 2 == 0:
        raise ValueError(f"conv_kernel must be a positive odd number, got {conv_kernel}")


def image_mask(kind: str, grid: int, conv_kernel: int = 11) -> torch.Tensor:
    """(N, N) bool, N = grid**2: which image tokens (raster order) each image token may attend to."""
    _check(kind, grid, conv_kernel)
    idx = torch.arange(grid * grid, device="cpu")
    q, k = idx[:, None], idx[None, :]  # (N, 1), (1, N)
    causal = k <= q  # (N, N)
    if kind == "full":
        return causal
    if kind == "row":
        return causal & (q - k <= grid)
    row_q, col_q, row_k, col_k = q // grid, q % grid, k // grid, k % grid
    if kind == "column":
        tq, tk = col_q * grid + row_q, col_k * grid + row_k  # positions on the transposed grid
        return causal & (tq - tk >= 0) & (tq - tk <= grid)
    r = conv_kernel // 2  # "conv"
    return causal & ((row_q - row_k).abs() <= r) & ((col_q - col_k).abs() <= r)


def text_mask(text_len: int, bidirectional_text: bool = False) -> torch.Tensor:
    """(T, T) bool: which text tokens a text token sees (causal, or all of them)."""
    mask = torch.ones(text_len, text_len, dtype=torch.bool, device="cpu")
    return mask if bidirectional_text else mask.tril()


def sequence_mask(kind: str, text_len: int, grid: int, conv_kernel: int = 11,
                  bidirectional_text: bool = False) -> torch.Tensor:
    """(T + N, T + N) bool over the whole text + image sequence for one layer kind."""
    if text_len < 1:
        raise ValueError(f"text_len must be >= 1, got {text_len}")
    n = grid * grid
    total = text_len + n
    mask = torch.zeros(total, total, dtype=torch.bool, device="cpu")
    mask[:text_len, :text_len] = text_mask(text_len, bidirectional_text)
    mask[text_len:, :text_len] = True
    mask[text_len:, text_len:] = image_mask(kind, grid, conv_kernel)
    return mask


def image_lookback(kind: str, grid: int, conv_kernel: int = 11) -> int:
    """How many image positions back (in raster order) the farthest visible image token can lie.

    An image token at raster index n sees no image token before n - image_lookback(...), so a KV
    cache step only needs keys [n - lookback, n] (plus the text).
    """
    _check(kind, grid, conv_kernel)
    if kind == "row":
        return grid
    if kind == "conv":
        r = min(conv_kernel // 2, grid - 1)
        return r * grid + r
    if kind == "column":
        return (grid - 1) * grid  # the top of its own column
    return grid * grid - 1  # "full"


def block_layout(kind: str, text_len: int, grid: int, conv_kernel: int = 11):
    """Block-sparse layout of the image queries of one mask kind, for fast training attention.

    Image queries are cut into `grid` blocks of `grid` tokens: image rows for "row"/"conv", image
    columns for "column" (so the block's visible tokens form a short contiguous run on the
    transposed grid). Each block attends to the whole text plus a fixed-size window of image keys.

    Returns (query_order (N,), key_index (grid, K), key_mask (grid, grid, K)):
    - query_order: the image raster indices, reordered so block b is query_order[b*grid:(b+1)*grid];
    - key_index: per block, K indices into the full sequence (text first, then the image window;
      out-of-range window slots are clamped to a valid index and masked off);
    - key_mask: bool [block, query in block, key slot], exactly `sequence_mask` gathered.
    Returns None for "full", which is dense causal attention and needs no layout.
    """
    _check(kind, grid, conv_kernel)
    if kind == "full":
        return None
    n = grid * grid
    if kind == "column":
        query_order = torch.arange(n, device="cpu").view(grid, grid).t().reshape(n)  # column-major
        window_blocks = 1  # the previous column holds the left neighbour
    elif kind == "row":
        query_order = torch.arange(n, device="cpu")
        window_blocks = 1  # the previous row holds the tokens up to straight above
    else:
        query_order = torch.arange(n, device="cpu")
        window_blocks = min(conv_kernel // 2, grid - 1)
    blocks = query_order.view(grid, grid)  # (blocks, grid)
    window = (window_blocks + 1) * grid
    # image keys of block b: blocks b - window_blocks .. b, in the block ordering
    slot = torch.arange(window, device="cpu") + (torch.arange(grid, device="cpu")[:, None] - window_blocks) * grid  # (blocks, W)
    valid_slot = slot >= 0
    image_keys = query_order[slot.clamp(min=0)]  # (blocks, W) raster indices
    text_keys = torch.arange(text_len, device="cpu").expand(grid, text_len)
    key_index = torch.cat([text_keys, image_keys + text_len], dim=1)  # (blocks, K)
    full = sequence_mask(kind, text_len, grid, conv_kernel)
    rows = blocks + text_len  # (blocks, grid) sequence positions of the queries
    key_mask = full[rows[:, :, None], key_index[:, None, :]]  # (blocks, grid, K)
    key_mask[:, :, text_len:] &= valid_slot[:, None, :]
    # sanity: the window must hold every key the full mask allows (else the layout is wrong)
    allowed = full[rows.reshape(-1)].sum(1).view(grid, grid)
    if not torch.equal(key_mask.sum(2), allowed):
        raise AssertionError(f"block layout for {kind!r} misses keys of the full mask")
    return query_order, key_index, key_mask


def additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bool mask (True = may attend) -> additive mask in `dtype`: 0 where allowed, -inf elsewhere.
    Added to attention scores, it spares the kernels any boolean-mask handling."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def cache_window(kind: str, grid: int, conv_kernel: int = 11) -> int:
    """How many image positions a KV cache of this mask kind must hold: the lookback plus the
    query itself, at most the whole image. Image index j lives in slot j % window (a ring), so a
    "row" layer caches grid + 1 image tokens instead of grid**2."""
    return min(grid * grid, image_lookback(kind, grid, conv_kernel) + 1)


def cache_slot_mask(kind: str, text_len: int, grid: int, conv_kernel: int = 11,
                    bidirectional_text: bool = False) -> torch.Tensor:
    """(T + N, T + W) bool, W = cache_window(...): which cache slots the query at each sequence
    position may attend to, once that query's own K/V has been written. Slots 0..T-1 hold the text;
    slot T + s holds the latest image index j <= i with j % W == s. Equal to `sequence_mask` with
    its key columns mapped onto the ring (keys that fell out of the ring are never visible)."""
    window = cache_window(kind, grid, conv_kernel)
    full = sequence_mask(kind, text_len, grid, conv_kernel, bidirectional_text)  # (T+N, T+N)
    n = grid * grid
    slots = torch.zeros(text_len + n, text_len + window, dtype=torch.bool, device="cpu")
    slots[:, :text_len] = full[:, :text_len]
    i = torch.arange(n, device="cpu")[:, None]  # image query index
    s = torch.arange(window, device="cpu")[None, :]  # ring slot
    j = i - (i - s) % window  # (N, W) image index held in slot s when query i runs
    visible = (j >= 0) & full[text_len + i, text_len + j.clamp(min=0)]
    slots[text_len:, text_len:] = visible
    return slots
