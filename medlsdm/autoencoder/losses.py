"""VQ-GAN objectives (paper eqs. 3-7): reconstruction, perceptual, commitment, GAN with adaptive weight.

The generator (autoencoder) loss is
    l1_weight * L1 + perceptual_weight * LPIPS + commitment (+ codebook)
    + [step >= disc_start_step] * (lambda * (image_gan_weight * G_2d + volume_gan_weight * G_3d)
                                   + feature_match_weight * feature matching),
with lambda the adaptive weight of eq. 7, measured at the decoder's last layer. The 2D discriminator
sees one random slice per volume (the same index for real and reconstruction), the 3D one whole volumes.

Gradients of the generator loss also reach the discriminators' parameters; the trainer zeroes them
(``zero_grad`` of the discriminator optimiser) before the discriminator step.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from medlsdm.autoencoder.discriminators import sample_slices
from medlsdm.autoencoder.quantizer import QuantizerOutput
from medlsdm.config import VQGANConfig


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def vanilla_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


def _feature_matching(fake: list[torch.Tensor], real: list[torch.Tensor]) -> torch.Tensor:
    """Mean L1 distance between the discriminator's intermediate features of fake and (detached) real."""
    return torch.stack([F.l1_loss(f, r.detach()) for f, r in zip(fake, real)]).mean()


class VQGANLoss(nn.Module):
    """Generator and discriminator losses for stage 1; ``perceptual`` comes from ``build_perceptual``."""

    def __init__(self, cfg: VQGANConfig, perceptual: Optional[nn.Module] = None):
        super().__init__()
        if cfg.gan_loss not in ("hinge", "vanilla"):
            raise ValueError(f"gan_loss must be 'hinge' or 'vanilla', got {cfg.gan_loss!r}")
        self.cfg = cfg
        self.perceptual = perceptual

    def gan_active(self, step: int) -> bool:
        return step >= self.cfg.disc_start_step

    def _g_term(self, logits: torch.Tensor) -> torch.Tensor:
        """Generator adversarial term: -E[D(fake)] (hinge) or non-saturating softplus(-D(fake))."""
        return -logits.mean() if self.cfg.gan_loss == "hinge" else F.softplus(-logits).mean()

    def adaptive_weight(
        self,
        rec_loss: torch.Tensor,
        gan_loss: torch.Tensor,
        last_layer: torch.Tensor,
        delta: float = 1e-4,
        max_weight: Optional[float] = None,
    ) -> torch.Tensor:
        """Eq. 7: ||grad rec_loss|| / (||grad gan_loss|| + delta) at ``last_layer``, clamped to [0, max], detached.

        Uses ``torch.autograd.grad`` (graphs retained, no ``.grad`` written). Without a graph (e.g. under
        ``torch.no_grad`` in validation) it returns 0.
        """
        max_weight = self.cfg.adaptive_weight_max if max_weight is None else max_weight
        if not (torch.is_grad_enabled() and rec_loss.requires_grad and gan_loss.requires_grad):
            return rec_loss.new_zeros((), dtype=torch.float32)
        g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
        g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
        weight = g_rec.float().norm() / (g_gan.float().norm() + delta)
        return weight.clamp(0.0, max_weight).detach()

    def generator_loss(
        self,
        x: torch.Tensor,
        x_rec: torch.Tensor,
        vq_out: QuantizerOutput,
        disc2d: nn.Module,
        disc3d: nn.Module,
        step: int,
        last_layer: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Autoencoder loss for x, x_rec (B, 1, D, H, W); returns (scalar loss, logs of python floats)."""
        cfg = self.cfg
        l1 = (x_rec - x).abs().mean()
        perceptual = x.new_zeros((), dtype=torch.float32)
        if self.perceptual is not None and cfg.perceptual_weight > 0:
            perceptual = self.perceptual(x, x_rec)
        rec_loss = cfg.l1_weight * l1 + cfg.perceptual_weight * perceptual
        loss = rec_loss + vq_out.commitment_loss + vq_out.codebook_loss
        zero = x.new_zeros((), dtype=torch.float32)
        g2d = g3d = g_gan = fm = weight = zero
        if self.gan_active(step):
            real2d, fake2d = sample_slices(x, x_rec)
            logits2d, feats_fake2d = disc2d(fake2d)
            logits3d, feats_fake3d = disc3d(x_rec)
            g2d, g3d = self._g_term(logits2d), self._g_term(logits3d)
            g_gan = cfg.image_gan_weight * g2d + cfg.volume_gan_weight * g3d
            weight = self.adaptive_weight(rec_loss, g_gan, last_layer)
            loss = loss + weight * g_gan
            if cfg.feature_match_weight > 0:
                with torch.no_grad():
                    feats_real2d = disc2d(real2d)[1]
                    feats_real3d = disc3d(x)[1]
                fm = cfg.image_gan_weight * _feature_matching(feats_fake2d, feats_real2d)
                fm = fm + cfg.volume_gan_weight * _feature_matching(feats_fake3d, feats_real3d)
                loss = loss + cfg.feature_match_weight * fm
        logs = {
            "loss": loss,
            "l1": l1,
            "perceptual": perceptual,
            "rec_loss": rec_loss,
            "commitment": vq_out.commitment_loss,
            "codebook": vq_out.codebook_loss,
            "perplexity": vq_out.perplexity,
            "usage": vq_out.usage,
            "g_gan": g_gan,
            "g_gan_2d": g2d,
            "g_gan_3d": g3d,
            "feature_match": fm,
            "adaptive_weight": weight,
        }
        return loss, {k: float(v.detach()) for k, v in logs.items()}

    def discriminator_loss(
        self,
        x: torch.Tensor,
        x_rec: torch.Tensor,
        disc2d: nn.Module,
        disc3d: nn.Module,
        step: int,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Discriminator loss for real x and (detached) x_rec (B, 1, D, H, W).

        Before ``disc_start_step`` it is a zero leaf tensor (``backward`` works and touches nothing) and
        the discriminators are not run; ``logs["d_active"]`` says which case applies.
        """
        if not self.gan_active(step):
            zero = torch.zeros((), device=x.device, requires_grad=True)
            return zero, {"d_loss": 0.0, "d_loss_2d": 0.0, "d_loss_3d": 0.0, "d_active": 0.0}
        cfg = self.cfg
        x_rec = x_rec.detach()
        d_fn = hinge_d_loss if cfg.gan_loss == "hinge" else vanilla_d_loss
        real2d, fake2d = sample_slices(x, x_rec)
        real_logits2d, fake_logits2d = disc2d(real2d)[0], disc2d(fake2d)[0]
        real_logits3d, fake_logits3d = disc3d(x)[0], disc3d(x_rec)[0]
        d2d, d3d = d_fn(real_logits2d, fake_logits2d), d_fn(real_logits3d, fake_logits3d)
        loss = cfg.image_gan_weight * d2d + cfg.volume_gan_weight * d3d
        logs = {
            "d_loss": loss,
            "d_loss_2d": d2d,
            "d_loss_3d": d3d,
            "logits_real_2d": real_logits2d.mean(),
            "logits_fake_2d": fake_logits2d.mean(),
            "logits_real_3d": real_logits3d.mean(),
            "logits_fake_3d": fake_logits3d.mean(),
        }
        return loss, {**{k: float(v.detach()) for k, v in logs.items()}, "d_active": 1.0}
