"""The transformer's training loss: the image tokens' likelihood, plus an optional caption contrast.

    loss, parts = TransformerLoss(transformer, contrast_weight=1.0)(text_ids, image_ids,
                                                                   contrast_text_ids, contrast_index)
    # CCA's form: each likelihood against a frozen reference (the starting weights)
    loss, parts = TransformerLoss(transformer, contrast_weight=1.0, reference=frozen_copy)(...)

The negatives (`contrast_text_ids`) come from the data pipeline (transformer_data.py,
caption_perturbations.py); `parts` holds the detached pieces the trainer logs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dalle_proto.transformer import DalleTransformer


class TransformerLoss(torch.nn.Module):
    """`forward` = DalleTransformer.loss, so that a wrapper (FSDP) that acts in forward sees the loss.

    With contrast captions (`contrast_text_ids` (M, T) for rows `contrast_index` (M,)) and
    `contrast_weight` w > 0, adds w * mean softplus(-beta * delta), delta = log p(x | caption) -
    log p(x | perturbed caption), each the sum over the image's tokens: the image must be likelier
    under its own caption than under one with, say, its two colours exchanged, which the plain
    likelihood barely asks of a model that reads captions as a bag of words. Like Condition
    Contrastive Alignment (arXiv 2410.09347), without its frozen reference model: the cross-entropy
    keeps p(x | caption) a likelihood while the contrast sharpens the conditioning. The perturbed
    rows ride in the same forward pass (batch B + M).

    That pair form only asks for a gap, which a model can also open by lowering both likelihoods:
    fine-tuned on cell-local shapes codes it drew blank canvases for pairs (BENCHMARKS.md, "Caption
    contrast on cell-local codes"). With a `reference` (a frozen DalleTransformer, normally the
    starting weights) the contrast is CCA's: softplus(-beta * (log p(x|c) - log p_ref(x|c))) +
    softplus(beta * (log p(x|c') - log p_ref(x|c'))), so p(x | caption) is held up on its own and
    only p(x | perturbed) is pushed down. The reference is kept out of the module tree (no
    parameters, state_dict or EMA of it); it is run without gradients, in eval mode."""

    def __init__(self, transformer: DalleTransformer, contrast_weight: float = 0.0, contrast_beta: float = 0.1,
                 reference: DalleTransformer | None = None):
        super().__init__()
        self.transformer = transformer
        self.contrast_weight, self.contrast_beta = contrast_weight, contrast_beta
        self._reference = (reference.eval().requires_grad_(False),) if reference is not None else ()

    def forward(self, text_ids: torch.Tensor, image_ids: torch.Tensor, contrast_text_ids: torch.Tensor | None = None,
                contrast_index: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        if contrast_text_ids is None or len(contrast_text_ids) == 0:
            return self.transformer.loss(text_ids, image_ids)
        b, c = len(text_ids), self.transformer.config
        text_logits, image_logits = self.transformer(torch.cat([text_ids, contrast_text_ids]),
                                                     torch.cat([image_ids, image_ids[contrast_index]]))
        nll = _token_nll(image_logits, torch.cat([image_ids, image_ids[contrast_index]]))  # (B + M, N)
        image_loss = nll[:b].mean()
        if c.text_loss_weight > 0:
            text_loss = F.cross_entropy(text_logits[:b].float().flatten(0, 1), text_ids[:, 1:].flatten())
        else:
            text_loss = image_loss.new_zeros(())
        positive, negative = -nll[:b][contrast_index].sum(1), -nll[b:].sum(1)  # (M,) log p(x|c), log p(x|c')
        delta = positive - negative  # (M,)
        extra = {}
        if self._reference:
            ref_positive, ref_negative = self._reference_log_likelihoods(text_ids, image_ids, contrast_text_ids,
                                                                         contrast_index)
            positive, negative = positive - ref_positive, negative - ref_negative  # (M,) log-ratios to the reference
            contrast = (F.softplus(-self.contrast_beta * positive) + F.softplus(self.contrast_beta * negative)).mean()
            extra = {"contrast_positive": positive.mean().detach(), "contrast_negative": negative.mean().detach()}
        else:
            contrast = F.softplus(-self.contrast_beta * delta).mean()
        loss = c.text_loss_weight * text_loss + c.image_loss_weight * image_loss + self.contrast_weight * contrast
        return loss, {"text_loss": text_loss.detach(), "image_loss": image_loss.detach(),
                      "contrast_loss": contrast.detach(), "contrast_acc": (delta > 0).float().mean().detach(),
                      "contrast_delta": delta.mean().detach(), **extra}

    @torch.no_grad()
    def _reference_log_likelihoods(self, text_ids: torch.Tensor, image_ids: torch.Tensor,
                                   contrast_text_ids: torch.Tensor, contrast_index: torch.Tensor
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's log p(x | caption) and log p(x | perturbed), summed over the image, (M,) each."""
        reference = self._reference[0]
        if next(reference.parameters()).device != image_ids.device:  # not moved with the module tree
            reference.to(image_ids.device)
        texts = torch.cat([text_ids[contrast_index], contrast_text_ids])  # (2M, T)
        images = image_ids[contrast_index].repeat(2, 1)  # (2M, N)
        log_likelihood = -_token_nll(reference(texts, images)[1], images).sum(1)  # (2M,)
        return log_likelihood[:len(contrast_index)], log_likelihood[len(contrast_index):]


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy, in fp32: logits (R, N, V), targets (R, N) -> (R, N)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
