"""Patch discriminator and GAN losses for image tokenizer (VQGAN) training.

The discriminator is the PatchGAN of pix2pix / taming-transformers: a small stack of stride-2
convolutions whose output is one real/fake logit per image patch (an (N, 1, h, w) map), so the
adversarial loss judges local texture — sharp edges — rather than global layout, which the
reconstruction loss already gets right. It is trained with the hinge loss; the generator's
adversarial term is `-D(fake)` scaled by a weight that is either fixed or taming's adaptive weight
(the ratio of reconstruction-loss and GAN-loss gradient norms at the decoder's last layer), which
keeps the GAN term from swamping reconstruction when it switches on.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchDiscriminator(nn.Module):
    """`n_layers` stride-2 4x4 convolutions, then two stride-1 4x4 convolutions down to 1 channel.

    GroupNorm instead of taming's BatchNorm: the output of one image never depends on the rest of
    the batch, and there are no running statistics to keep in step on resume.
    """

    def __init__(self, in_channels: int = 3, ch: int = 64, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"PatchDiscriminator: n_layers must be >= 1, got {n_layers}")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = ch
        for i in range(1, n_layers + 1):
            out = ch * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1  # the last hidden layer keeps the resolution
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                       nn.GroupNorm(min(32, out // 4), out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images)  # (B, 3, H, W) -> (B, 1, h, w) patch logits


def _init_weights(module: nn.Module) -> None:
    # DCGAN init, as taming does: small normal conv weights, norm gains around 1.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: push real logits above +1 and fake logits below -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator binary cross-entropy (the non-saturating GAN's discriminator loss)."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_adv_loss(logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """The generator's adversarial term for a discriminator trained with `kind` ("hinge" or "bce")."""
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "bce":
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"unknown GAN loss kind {kind!r}; expected 'hinge' or 'bce'")


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    if kind == "hinge":
        return hinge_d_loss(logits_real, logits_fake)
    if kind == "bce":
        return non_saturating_d_loss(logits_real, logits_fake)
    raise ValueError(f"unknown GAN loss kind {kind!r}; expected 'hinge' or 'bce'")


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """taming's adaptive GAN weight: ||d rec / d W_last|| / ||d adv / d W_last||, detached.

    Both gradients are taken w.r.t. the decoder's last weight, so the adversarial term starts with
    the same gradient scale at the output as reconstruction, whatever the loss magnitudes are.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (adv_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
