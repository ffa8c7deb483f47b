"""Quantizers: continuous latents (B, D, h, w) -> discrete ids (B, h, w) and back.

Every quantizer has the same three-method interface, so `ImageTokenizer` never branches on kind:
- `forward(z) -> (z_q, ids, aux)`: training path; `z_q` carries gradients to `z` (straight-through
  or Gumbel-softmax) and `aux` holds scalar losses/statistics, always with `commit_loss`,
  `codebook_loss` and `quant_loss` (the term to add to the reconstruction loss).
- `ids_from_latents(z) -> ids`: deterministic tokens (nearest code / argmax of logits, no noise).
- `embed_ids(ids) -> z_q`: the latent the decoder sees for given tokens.

Parameter names follow taming-transformers (`embedding.weight`; `proj` + `embed.weight`) so taming
checkpoints load strictly. Usage counters are non-persistent buffers: they never enter a state dict.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _zeros_like_loss(z: torch.Tensor) -> torch.Tensor:
    return z.new_zeros((), dtype=torch.float32)


def code_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code histogram: n_embed when usage is uniform, 1 when one code is used."""
    p = counts.float() / counts.sum().clamp(min=1)
    return torch.exp(-(p * torch.log(p + 1e-10)).sum())


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook (taming's VectorQuantizer2 layout: `embedding.weight` [n_embed, D]).

    Losses are reported separately: `codebook_loss` = |sg[z] - e|^2 moves the codes, `commit_loss` =
    |z - sg[e]|^2 moves the encoder; `quant_loss` = codebook_loss + beta * commit_loss (VQ-VAE's
    weighting; taming's default "legacy" mode applies beta to the other term).

    `l2norm=True` is LlamaGen's recipe for keeping the codebook in use: latents and codes are
    L2-normalised and looked up by cosine similarity (best with a small embed_dim such as 8).
    Dead codes can also be restarted from recent encoder outputs with `restart_dead_codes`.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, l2norm: bool = False):
        super().__init__()
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.beta = beta
        self.l2norm = l2norm
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)
        if l2norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)
        # How often each code was picked in training forwards since the last restart/reset.
        self.register_buffer("code_usage", torch.zeros(n_embed), persistent=False)

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight  # (N, D)
        return F.normalize(w, dim=-1) if self.l2norm else w

    def _prepare(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=1) if self.l2norm else z

    def _nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Ids of the nearest codes for already-prepared latents z (B, D, h, w) -> (B, h, w)."""
        b, d, h, w = z.shape
        if d != self.embed_dim:
            raise ValueError(f"quantizer expects latents with {self.embed_dim} channels, got shape {tuple(z.shape)}")
        # Distances in fp32 with autocast off: bf16 rounding flips argmins between close codes.
        with torch.autocast(device_type=z.device.type, enabled=False):
            z_flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()  # (BHW, D)
            codes = self.codebook().float()  # (N, D)
            if self.l2norm:
                ids = (z_flat @ codes.t()).argmax(dim=1)  # cosine similarity, (BHW,)
            else:
                dist = (z_flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1)
                        - 2 * z_flat @ codes.t())  # (BHW, N)
                ids = dist.argmin(dim=1)  # (BHW,)
        return ids.view(b, h, w)

    def ids_from_latents(self, z: torch.Tensor) -> torch.Tensor:
        return self._nearest(self._prepare(z))

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.codebook()).permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        z = self._prepare(z)  # (B, D, h, w)
        ids = self._nearest(z)  # (B, h, w)
        z_q = self.embed_ids(ids).to(z.dtype)  # (B, D, h, w)
        codebook_loss = F.mse_loss(z_q.float(), z.detach().float())
        commit_loss = F.mse_loss(z.float(), z_q.detach().float())
        z_q = z + (z_q - z).detach()  # straight-through: decoder gradients reach the encoder
        counts = torch.bincount(ids.flatten(), minlength=self.n_embed)
        if self.training:
            self.code_usage += counts.to(self.code_usage.dtype)
        aux = {
            "codebook_loss": codebook_loss,
            "commit_loss": commit_loss,
            "quant_loss": codebook_loss + self.beta * commit_loss,
            "perplexity": code_perplexity(counts).detach(),
            "codes_used": (counts > 0).sum().float().detach(),  # distinct codes in this batch
        }
        return z_q, ids, aux

    @torch.no_grad()
    def restart_dead_codes(self, z_flat: torch.Tensor, usage_counts: torch.Tensor | None = None,
                           min_usage: float = 1.0, generator: torch.Generator | None = None) -> int:
        """Re-initialise codes used fewer than `min_usage` times to random rows of `z_flat`.

        z_flat: recent pre-quantisation latents, (N, embed_dim), e.g.
        `model.encode_latents(x).permute(0, 2, 3, 1).reshape(-1, embed_dim)`.
        usage_counts: (n_embed,) counts; defaults to this module's `code_usage` (training forwards
        since the last call), which is reset afterwards. Returns the number of codes restarted.
        Under DDP call it with all-reduced counts and all-gathered latents (or broadcast the codebook
        from rank 0 afterwards) so every rank keeps the same codebook; note DDP's default
        broadcast_buffers=True overwrites each rank's `code_usage` with rank 0's every forward.
        Optimiser moments of the restarted rows are left as they are.
        """
        counts = self.code_usage if usage_counts is None else usage_counts.to(self.code_usage.device)
        if counts.shape != (self.n_embed,):
            raise ValueError(f"usage_counts must have shape ({self.n_embed},), got {tuple(counts.shape)}")
        if z_flat.ndim != 2 or z_flat.shape[1] != self.embed_dim or z_flat.shape[0] == 0:
            raise ValueError(f"z_flat must have shape (N>0, {self.embed_dim}), got {tuple(z_flat.shape)}")
        dead = (counts < min_usage).nonzero().flatten()  # (n_dead,)
        if dead.numel() > 0:
            # Indices drawn on the CPU so a CPU `generator` makes restarts reproducible anywhere.
            rows = torch.randint(0, z_flat.shape[0], (dead.numel(),), generator=generator)
            new = self._prepare(z_flat[rows.to(z_flat.device)].float()[:, :, None, None])[:, :, 0, 0]
            self.embedding.weight.data[dead] = new.to(self.embedding.weight)
        self.code_usage.zero_()
        return int(dead.numel())


class GumbelQuantizer(nn.Module):
    """taming's GumbelQuantize layout: `proj` (1x1 conv to n_embed logits) + `embed.weight` [n_embed, D].

    Training: Gumbel-softmax over the logits at `self.temperature` (set it from a schedule),
    `straight_through=True` gives hard one-hots with soft gradients (taming's default). Tokens
    (`ids_from_latents`, and eval-mode forward) are the plain argmax of the logits: no noise, the
    DALL·E paper's rule (taming itself still samples Gumbel noise in eval).
    aux["kl_loss"] is KL(q || uniform) per position; quant_loss = kl_weight * kl_loss.
    """

    def __init__(self, in_channels: int, n_embed: int, embed_dim: int, kl_weight: float = 1e-8,
                 straight_through: bool = True, temperature: float = 1.0):
        super().__init__()
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.kl_weight = kl_weight
        self.straight_through = straight_through
        self.temperature = temperature
        self.proj = nn.Conv2d(in_channels, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embed_dim)
        self.register_buffer("code_usage", torch.zeros(n_embed), persistent=False)

    def ids_from_latents(self, z: torch.Tensor) -> torch.Tensor:
        return self.proj(z).argmax(dim=1)  # (B, h, w)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embed.weight).permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.proj(z)  # (B, N, h, w)
        if self.training:
            one_hot = F.gumbel_softmax(logits.float(), tau=self.temperature, dim=1,
                                       hard=self.straight_through)  # (B, N, h, w)
        else:
            one_hot = F.one_hot(logits.argmax(dim=1), self.n_embed).permute(0, 3, 1, 2).float()
        ids = one_hot.argmax(dim=1)  # (B, h, w)
        z_q = torch.einsum("bnhw,nd->bdhw", one_hot.to(self.embed.weight.dtype), self.embed.weight)
        q = F.softmax(logits.float(), dim=1)
        kl = (q * torch.log(q * self.n_embed + 1e-10)).sum(dim=1).mean()
        counts = torch.bincount(ids.flatten(), minlength=self.n_embed)
        if self.training:
            self.code_usage += counts.to(self.code_usage.dtype)
        zero = _zeros_like_loss(z)
        aux = {"codebook_loss": zero, "commit_loss": zero, "kl_loss": kl,
               "quant_loss": self.kl_weight * kl, "perplexity": code_perplexity(counts).detach(),
               "codes_used": (counts > 0).sum().float().detach()}
        return z_q, ids, aux


class OneHotQuantizer(nn.Module):
    """The OpenAI dVAE's bottleneck: latents ARE logits over the vocabulary; the decoder eats one-hots.

    No parameters. Training: relaxed Gumbel-softmax at `self.temperature` (the paper anneals 1 ->
    1/16); tokens and eval: argmax one-hot. aux["kl_loss"] is KL(q || uniform) per position.
    """

    def __init__(self, n_embed: int, temperature: float = 1.0, straight_through: bool = False):
        super().__init__()
        self.n_embed = n_embed
        self.temperature = temperature
        self.straight_through = straight_through
        self.register_buffer("code_usage", torch.zeros(n_embed), persistent=False)

    def ids_from_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z.argmax(dim=1)  # (B, h, w)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return F.one_hot(ids, self.n_embed).permute(0, 3, 1, 2).float()  # (B, N, h, w)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        if self.training:
            z_q = F.gumbel_softmax(z.float(), tau=self.temperature, dim=1, hard=self.straight_through)
        else:
            z_q = self.embed_ids(z.argmax(dim=1))  # (B, N, h, w)
        ids = z_q.argmax(dim=1)  # (B, h, w)
        q = F.softmax(z.float(), dim=1)
        kl = (q * torch.log(q * self.n_embed + 1e-10)).sum(dim=1).mean()
        counts = torch.bincount(ids.flatten(), minlength=self.n_embed)
        if self.training:
            self.code_usage += counts.to(self.code_usage.dtype)
        zero = _zeros_like_loss(z)
        aux = {"codebook_loss": zero, "commit_loss": zero, "kl_loss": kl, "quant_loss": kl,
               "perplexity": code_perplexity(counts).detach(),
               "codes_used": (counts > 0).sum().float().detach()}
        return z_q, ids, aux
