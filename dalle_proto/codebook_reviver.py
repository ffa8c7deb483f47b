"""Dead-code restarts for a VQ codebook: per-code usage bookkeeping that resumes exactly.

`image_tokenizer_training.py` feeds each step's code histogram to `CodebookReviver.update` and
calls `restart` every `restart_every` steps while `restart_until` of training has not passed.
"""
from __future__ import annotations

import torch

from .image_tokenizer.quantizers import code_perplexity


class CodebookReviver(torch.nn.Module):
    """Per-code usage bookkeeping and dead-code restarts for a `VectorQuantizer`.

    Buffers are persistent, so they travel in Lightning checkpoints and restart decisions resume
    exactly; the restart generator is seeded by (seed, step), so it needs no saved state.
    A code is dead when its usage EMA (tokens per step) falls below `threshold` times the uniform
    share (tokens per step / n_embed); it is moved onto a random encoder output of the current
    batch, its Adam moments are zeroed, and it gets a grace period of one uniform share.
    """

    def __init__(self, n_embed: int, decay: float = 0.99, threshold: float = 0.03, seed: int = 0):
        super().__init__()
        self.n_embed, self.decay, self.threshold, self.seed = n_embed, decay, threshold, seed
        self.register_buffer("usage_ema", torch.full((n_embed,), 1.0 / n_embed))  # tokens/step/code
        self.register_buffer("window_counts", torch.zeros(n_embed))  # since the last `window_stats`
        self.register_buffer("restarted_total", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, counts: torch.Tensor) -> None:
        """Add one step's code histogram (n_embed,) (all-reduced under DDP)."""
        self.window_counts += counts
        self.usage_ema.mul_(self.decay).add_(counts, alpha=1 - self.decay)

    def window_stats(self, reset: bool = True) -> tuple[float, float]:
        """(fraction of codes used, perplexity) over the steps since the last call."""
        used = float((self.window_counts > 0).float().mean())
        ppl = float(code_perplexity(self.window_counts))
        if reset:
            self.window_counts.zero_()
        return used, ppl

    @torch.no_grad()
    def restart(self, quantizer, z: torch.Tensor, tokens_per_step: int, step: int,
                optimizer: torch.optim.Optimizer | None = None) -> int:
        """Restart dead codes of `quantizer` from latents z (B, D, h, w); returns how many."""
        uniform_share = tokens_per_step / self.n_embed
        min_usage = self.threshold * uniform_share
        dead = (self.usage_ema < min_usage).nonzero().flatten()  # (n_dead,)
        if dead.numel() == 0:
            return 0
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, D)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        restarted = quantizer.restart_dead_codes(z_flat, usage_counts=self.usage_ema,
                                                 min_usage=min_usage, generator=generator)
        state = optimizer.state.get(quantizer.embedding.weight, {}) if optimizer is not None else {}
        for key in ("exp_avg", "exp_avg_sq"):  # stale moments would fling the new code away
            if key in state:
                state[key][dead] = 0
        self.usage_ema[dead] = uniform_share
        self.restarted_total += restarted
        return restarted
