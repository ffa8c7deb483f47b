"""Image-token generation with a KV cache, temperature / top-k / top-p, guidance and reranking.

The text is run through the transformer once (`prefill_text`, which fills each layer's
preallocated K/V tensors), then each image token costs one single-position step
(`decode_image_token`). Only the image head is evaluated, so sampling is restricted to the image
vocabulary by construction.

Classifier-free guidance (cfg_scale != 1): the conditional rows and the same number of null-text
rows (all pads, `model.null_text_ids`) run as one batch of 2B; each step samples from
    logits = uncond + cfg_scale * (cond - uncond)
and feeds the chosen token to both halves. cfg_scale == 1 skips the null rows entirely.
`cfg_schedule="linear"` ramps the scale over the image tokens instead, from 1 at token 0 to
cfg_scale at the last (MAR and Muse ramp theirs so): early tokens, which set the layout, are drawn
from the model's own distribution, and later ones get the full push (`guidance_scales`).

Reranking: with `num_images_per_text = k` every caption gets k candidates. Without `rerank` all
B * k candidates are returned, grouped per caption (rows i*k .. i*k+k-1 belong to caption i). With
`rerank(text_ids (B*k, T), image_ids (B*k, h, w)) -> scores (B*k,)` (higher is better, e.g. a CLIP
similarity), only the best candidate per caption is returned: shape (B, h, w).
"""
from __future__ import annotations

from typing import Callable

import torch

from dalle_proto.transformer import DalleTransformer


CFG_SCHEDULES = ("constant", "linear")


def guidance_scales(cfg_scale: float, schedule: str, length: int) -> list[float]:
    """The guidance scale of each of `length` image tokens: cfg_scale everywhere ("constant") or a
    linear ramp from 1 at token 0 to cfg_scale at the last ("linear")."""
    if schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {schedule!r}")
    if schedule == "constant" or length == 1:
        return [cfg_scale] * length
    return [1.0 + (cfg_scale - 1.0) * i / (length - 1) for i in range(length)]


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf. logits: (B, V) float."""
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            # drop a token when the tokens ranked above it already reach top_p; the best always stays
            drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                 generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. temperature 0 means greedy argmax."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits.float()
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    if top_k is not None and top_k < logits.shape[-1] and top_p is None:
        # top-k alone: draw among the k best directly, (B, k) instead of (B, V) per token
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        values, ids = logits.topk(top_k, dim=-1)  # (B, k)
        choice = torch.multinomial((values / temperature).softmax(-1), 1, generator=generator)  # (B, 1)
        return ids.gather(1, choice).squeeze(1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def generate_image_tokens_with_logits(
    model: DalleTransformer, text_ids: torch.Tensor, *, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, cfg_scale: float = 1.0, cfg_schedule: str = "constant",
    generator: torch.Generator | None = None, seed: int | None = None, num_images_per_text: int = 1,
    keep_logits: bool = True, progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Like `generate_image_tokens` without reranking; also returns the (guided) logits each token
    was sampled from: (B*k, N, Vi) float32, or None when keep_logits is False."""
    c = model.config
    if text_ids.dim() != 2 or text_ids.shape[1] != c.text_len:
        raise ValueError(f"text_ids must have shape (B, {c.text_len}), got {tuple(text_ids.shape)}")
    if num_images_per_text < 1:
        raise ValueError(f"num_images_per_text must be >= 1, got {num_images_per_text}")
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    device = model.image_head.weight.device
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    text = text_ids.to(device).repeat_interleave(num_images_per_text, dim=0)  # (Bk, T)
    rows = text.shape[0]
    scales = guidance_scales(cfg_scale, cfg_schedule, c.image_len)
    guided = any(scale != 1.0 for scale in scales)
    if guided:
        text = torch.cat([text, model.null_text_ids(rows, device=device)])  # (2Bk, T)

    was_training = model.training
    model.eval()
    try:
        with model.frozen_image_tables():
            tokens, kept = _decode(model, text, rows, scales, temperature, top_k, top_p, generator,
                                   keep_logits, progress)
    finally:
        model.train(was_training)
    # clone outside inference mode so callers may feed the tokens to a model that tracks gradients
    tokens = tokens.clone().view(rows, c.image_grid, c.image_grid)
    return tokens, (kept.clone() if kept is not None else None)


@torch.inference_mode()
def _decode(model: DalleTransformer, text: torch.Tensor, rows: int, scales: list[float],
            temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator | None, keep_logits: bool, progress: bool):
    """The token loop: text (rows or 2*rows when guided, T) -> tokens (rows, N), logits or None."""
    c = model.config
    guided = text.shape[0] != rows
    cache = model.new_cache(text.shape[0])
    logits = model.prefill_text(text, cache)  # (rows or 2 rows, Vi)
    tokens = torch.empty(rows, c.image_len, dtype=torch.long, device=text.device)
    kept = torch.empty(rows, c.image_len, c.image_vocab_size, device=text.device) if keep_logits else None
    steps = range(c.image_len)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="image tokens")
    for i in steps:
        logits = logits.float()
        if guided:
            cond, uncond = logits[:rows], logits[rows:]
            logits = uncond + scales[i] * (cond - uncond)  # (rows, Vi)
        if kept is not None:
            kept[:, i] = logits
        token = sample_token(logits, temperature, top_k, top_p, generator)  # (rows,)
        tokens[:, i] = token
        if i + 1 < c.image_len:
            logits = model.decode_image_token(torch.cat([token, token]) if guided else token, i, cache)
    return tokens, kept


def generate_image_tokens(
    model: DalleTransformer, text_ids: torch.Tensor, *, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None, cfg_scale: float = 1.0, cfg_schedule: str = "constant",
    generator: torch.Generator | None = None, seed: int | None = None, num_images_per_text: int = 1,
    rerank: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, progress: bool = False,
) -> torch.Tensor:
    """Sample image tokens for each caption. text_ids (B, T) -> (B*k, h, w) LongTensor, or (B, h, w)
    when `rerank` picks the best of the k = num_images_per_text candidates per caption.

    The same `seed` (or an identically seeded `generator`) gives identical tokens."""
    tokens, _ = generate_image_tokens_with_logits(
        model, text_ids, temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
        cfg_schedule=cfg_schedule, generator=generator, seed=seed, num_images_per_text=num_images_per_text,
        keep_logits=False, progress=progress)
    if rerank is None:
        return tokens
    k = num_images_per_text
    text = text_ids.to(tokens.device).repeat_interleave(k, dim=0)
    with torch.inference_mode():
        scores = torch.as_tensor(rerank(text, tokens), device=tokens.device).float()
    if scores.shape != (tokens.shape[0],):
        raise ValueError(f"rerank must return one score per candidate, shape ({tokens.shape[0]},), "
                         f"got {tuple(scores.shape)}")
    best = scores.view(-1, k).argmax(1) + torch.arange(0, tokens.shape[0], k, device=tokens.device)
    return tokens[best]  # (B, h, w)
