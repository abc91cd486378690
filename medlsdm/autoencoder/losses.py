"""VQ-GAN objectives (paper eqs. 3-7): reconstruction, perceptual, commitment, GAN with adaptive weight.

The generator (autoencoder) loss is
    l1_weight * L1 + perceptual_weight * LPIPS + commitment (+ codebook)
    + [step >= disc_start_step] * (lambda * (image_gan_weight * G_2d + volume_gan_weight * G_3d)
                                   + feature_match_weight * feature matching),
feature matching being the L1 between the discriminators' features of real and reconstruction, averaged
(``feature_match_reduction: mean``) or summed (``sum``, the authors' code) over the layers; the paper's text
has no feature matching (``feature_match_weight: 0``).
with lambda the adaptive weight of eq. 7, measured at the decoder's last layer. The 2D discriminator
sees one random slice per volume (the same index for real and reconstruction), the 3D one whole volumes.

Gradients of the generator loss also reach the discriminators' parameters; the trainer zeroes them
(``zero_grad`` of the discriminator optimiser) before the discriminator step.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from medlsdm.autoencoder.discriminators import sample_slices
from medlsdm.autoencoder.quantizer import QuantizerOutput


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def vanilla_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


def feature_matching(fake: list[torch.Tensor], real: list[torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """L1 distance between a discriminator's intermediate features (each (B, C_l, ...)) of fake and (detached)
    real, averaged within each layer, then the ``mean`` (this project's default) or ``sum`` (the authors'
    code) over the layers."""
    per_layer = torch.stack([F.l1_loss(f, r.detach()) for f, r in zip(fake, real)])
    if reduction == "mean":
        return per_layer.mean()
    if reduction == "sum":
        return per_layer.sum()
    raise ValueError(f"feature matching reduction must be 'mean' or 'sum', got {reduction!r}")


class VQGANLoss(nn.Module):
    """Generator and discriminator losses for stage 1; ``perceptual`` comes from
    ``medlsdm.autoencoder.perceptual.perceptual_network``; :func:`medlsdm.autoencoder.build.build_vqgan_loss`
    maps a ``VQGANConfig`` onto the arguments (whose defaults are the config's)."""

    def __init__(
        self,
        perceptual: nn.Module | None = None,
        window: Callable[[torch.Tensor], tuple[float, float]] | None = None,
        *,
        l1_weight: float = 4.0,
        window_l1_weight: float = 0.0,
        perceptual_weight: float = 1.0,
        disc_start_step: int = 2000,
        gan_loss: str = "hinge",
        image_gan_weight: float = 1.0,
        volume_gan_weight: float = 1.0,
        feature_match_weight: float = 4.0,
        feature_match_reduction: str = "mean",
        adaptive_weight_max: float = 1e4,
    ):
        """``perceptual(x, x_rec) -> scalar`` (frozen) or None. ``window(x) -> (lo, hi)``: the display window
        of a batch (normalised units) for the window L1 term (``window_l1_weight``), e.g.
        ``lambda x: medlsdm.data.display.display_window(data_cfg, x)``. The weights and the rest are those of
        the module docstring's formula; ``gan_loss`` "hinge" or "vanilla", ``feature_match_reduction`` "mean"
        or "sum", ``adaptive_weight_max`` the clamp of eq. 7's weight."""
        super().__init__()
        if perceptual is not None and not isinstance(perceptual, nn.Module):  # the former VQGANLoss(cfg) call
            raise TypeError("VQGANLoss takes typed arguments; build it from a VQGANConfig with "
                            "medlsdm.autoencoder.build_vqgan_loss(cfg, perceptual, window)")
        if gan_loss not in ("hinge", "vanilla"):
            raise ValueError(f"gan_loss must be 'hinge' or 'vanilla', got {gan_loss!r}")
        if feature_match_reduction not in ("mean", "sum"):
            raise ValueError(f"feature matching reduction must be 'mean' or 'sum', got {feature_match_reduction!r}")
        if window_l1_weight > 0 and window is None:
            raise ValueError("vqgan.window_l1_weight > 0 needs the display window")
        self.l1_weight = l1_weight
        self.window_l1_weight = window_l1_weight
        self.perceptual_weight = perceptual_weight
        self.disc_start_step = disc_start_step
        self.gan_loss = gan_loss
        self.image_gan_weight = image_gan_weight
        self.volume_gan_weight = volume_gan_weight
        self.feature_match_weight = feature_match_weight
        self.feature_match_reduction = feature_match_reduction
        self.adaptive_weight_max = adaptive_weight_max
        self.perceptual = perceptual
        self.window = window

    def window_l1(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        """L1 between x and x_rec (B, 1, D, H, W) both clamped to the display window and scaled so that the
        window spans 2 units (as [-1, 1] does): soft tissue weighs as much as the air/body edge. Where x_rec
        has left the window the term has no gradient; the full-range L1 pulls it back."""
        lo, hi = self.window(x)
        return (x_rec.clamp(lo, hi) - x.clamp(lo, hi)).abs().mean() * (2.0 / (hi - lo))

    def gan_active(self, step: int) -> bool:
        return step >= self.disc_start_step

    def _g_term(self, logits: torch.Tensor) -> torch.Tensor:
        """Generator adversarial term: -E[D(fake)] (hinge) or non-saturating softplus(-D(fake))."""
        return -logits.mean() if self.gan_loss == "hinge" else F.softplus(-logits).mean()

    def adaptive_weight(
        self,
        rec_loss: torch.Tensor,
        gan_loss: torch.Tensor,
        last_layer: torch.Tensor,
        delta: float = 1e-4,
        max_weight: float | None = None,
    ) -> torch.Tensor:
        """Eq. 7: ||grad rec_loss|| / (||grad gan_loss|| + delta) at ``last_layer``, clamped to [0, max], detached.

        Uses ``torch.autograd.grad`` (graphs retained, no ``.grad`` written). Without a graph (e.g. under
        ``torch.no_grad`` in validation) it returns 0.
        """
        max_weight = self.adaptive_weight_max if max_weight is None else max_weight
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
        l1 = (x_rec - x).abs().mean()
        perceptual = x.new_zeros((), dtype=torch.float32)
        if self.perceptual is not None and self.perceptual_weight > 0:
            perceptual = self.perceptual(x, x_rec)
        l1_win = self.window_l1(x, x_rec) if self.window_l1_weight > 0 else x.new_zeros((), dtype=torch.float32)
        rec_loss = self.l1_weight * l1 + self.window_l1_weight * l1_win + self.perceptual_weight * perceptual
        loss = rec_loss + vq_out.commitment_loss + vq_out.codebook_loss
        zero = x.new_zeros((), dtype=torch.float32)
        g2d = g3d = g_gan = fm = weight = zero
        if self.gan_active(step):
            real2d, fake2d = sample_slices(x, x_rec)
            logits2d, feats_fake2d = disc2d(fake2d)
            logits3d, feats_fake3d = disc3d(x_rec)
            g2d, g3d = self._g_term(logits2d), self._g_term(logits3d)
            g_gan = self.image_gan_weight * g2d + self.volume_gan_weight * g3d
            weight = self.adaptive_weight(rec_loss, g_gan, last_layer)
            loss = loss + weight * g_gan
            if self.feature_match_weight > 0:
                with torch.no_grad():
                    feats_real2d = disc2d(real2d)[1]
                    feats_real3d = disc3d(x)[1]
                red = self.feature_match_reduction
                fm = self.image_gan_weight * feature_matching(feats_fake2d, feats_real2d, red)
                fm = fm + self.volume_gan_weight * feature_matching(feats_fake3d, feats_real3d, red)
                loss = loss + self.feature_match_weight * fm
        logs = {
            "loss": loss,
            "l1": l1,
            "l1_window": l1_win,
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
        x_rec = x_rec.detach()
        d_fn = hinge_d_loss if self.gan_loss == "hinge" else vanilla_d_loss
        real2d, fake2d = sample_slices(x, x_rec)
        real_logits2d, fake_logits2d = disc2d(real2d)[0], disc2d(fake2d)[0]
        real_logits3d, fake_logits3d = disc3d(x)[0], disc3d(x_rec)[0]
        d2d, d3d = d_fn(real_logits2d, fake_logits2d), d_fn(real_logits3d, fake_logits3d)
        loss = self.image_gan_weight * d2d + self.volume_gan_weight * d3d
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
