"""Training losses (no model definitions, no loop).

``AutoencoderLoss`` is latent diffusion's ``LPIPSWithDiscriminator``, the loss of the official
Cheff autoencoder: L1 + LPIPS, as a Laplace negative log-likelihood with a learned (but, in the
official optimiser set-up, never updated) log-variance, + KL, + a hinge-loss patch
discriminator switched on at ``disc_start`` and weighted adaptively by the ratio of the
gradient norms at the decoder's last layer. Its submodule names (``logvar``,
``perceptual_loss``, ``discriminator``) are those of the official training checkpoints'
``loss.*`` entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cheff.config import AELossConfig
from cheff.models.autoencoder import DiagonalGaussian

ADAPTIVE_EPS = 1e-4
ADAPTIVE_MAX = 1e4


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class AutoencoderLoss(nn.Module):
    """``generator_loss`` for the autoencoder's optimiser, ``discriminator_loss`` for the
    discriminator's. Sums are over pixels and averaged over the batch, as the official code."""

    def __init__(self, config: AELossConfig, perceptual: nn.Module, in_channels: int = 3) -> None:
        super().__init__()
        from cheff.models.discriminator import NLayerDiscriminator

        self.config = config
        self.logvar = nn.Parameter(torch.full((), config.logvar_init))
        self.perceptual_loss = perceptual
        self.discriminator = NLayerDiscriminator(input_nc=in_channels, n_layers=config.disc_layers)

    def disc_factor(self, step: int) -> float:
        return self.config.disc_factor if step >= self.config.disc_start else 0.0

    def generator_loss(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        posterior: DiagonalGaussian,
        step: int,
        last_layer: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        rec = (inputs - reconstructions).abs()
        if self.config.perceptual_weight > 0:
            p_loss = self.perceptual_loss(inputs.float(), reconstructions.float())
            rec = rec + self.config.perceptual_weight * p_loss
        nll = rec / torch.exp(self.logvar) + self.logvar
        nll = nll.sum() / nll.shape[0]
        kl = posterior.kl().sum() / inputs.shape[0]
        loss = nll + self.config.kl_weight * kl
        factor = self.disc_factor(step)
        # Logged values stay on the device (the loop reads them at log steps only).
        logs = {"ae/l1": (inputs - reconstructions).abs().mean().detach(), "ae/kl": kl.detach()}
        if factor > 0:
            g_loss = -self.discriminator(reconstructions).mean()
            weight = self.adaptive_weight(nll, g_loss, last_layer) * self.config.disc_weight
            loss = loss + weight * factor * g_loss
            logs |= {"ae/g_loss": g_loss.detach(), "ae/d_weight": weight.detach()}
        logs |= {"ae/nll": nll.detach(), "ae/total": loss.detach()}
        return loss, logs

    def discriminator_loss(
        self, inputs: Tensor, reconstructions: Tensor, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        real = self.discriminator(inputs.detach())
        fake = self.discriminator(reconstructions.detach())
        loss = self.disc_factor(step) * hinge_d_loss(real, fake)
        return loss, {
            "disc/total": loss.detach(),
            "disc/logits_real": real.mean().detach(),
            "disc/logits_fake": fake.mean().detach(),
        }

    @staticmethod
    def adaptive_weight(nll: Tensor, g_loss: Tensor, last_layer: Tensor) -> Tensor:
        """||grad nll|| / ||grad g_loss|| at the decoder's last layer, clamped to [0, 1e4].
        On several ranks, of the gradients averaged over them (the global batch's)."""
        from cheff.train.distributed import average_gradient

        nll_grads = average_gradient(torch.autograd.grad(nll, last_layer, retain_graph=True)[0])
        g_grads = average_gradient(torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0])
        weight = nll_grads.norm() / (g_grads.norm() + ADAPTIVE_EPS)
        return weight.clamp(0.0, ADAPTIVE_MAX).detach()
