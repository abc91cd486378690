"""Stage 1 from the application config: the one place where ``VQGANConfig`` maps onto the typed arguments
of :class:`VQGAN`, :func:`perceptual_network` and :class:`VQGANLoss` (the discriminators take
``vqgan.disc_channels`` / ``disc_layers`` directly). Every caller builds them through these functions.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from medlsdm.autoencoder.losses import VQGANLoss
from medlsdm.autoencoder.perceptual import NO_PERCEPTUAL, PerceptualLoss, perceptual_network
from medlsdm.autoencoder.vqgan import VQGAN
from medlsdm.config import VQGANConfig


def build_vqgan(cfg: VQGANConfig, in_channels: int = 1) -> VQGAN:
    """The VQ-GAN of ``cfg`` (``load_config(...).vqgan``), untrained."""
    return VQGAN(
        in_channels=in_channels,
        channels=cfg.channels,
        downsample=tuple(cfg.downsample),
        embedding_dim=cfg.embedding_dim,
        n_codes=cfg.n_codes,
        num_res_blocks=cfg.num_res_blocks,
        upsample=cfg.upsample,
        decoder_tanh=cfg.decoder_tanh,
        commitment_beta=cfg.commitment_beta,
        codebook_update=cfg.codebook_update,
        ema_decay=cfg.ema_decay,
        dead_code_threshold=cfg.dead_code_threshold,
        quantize_chunk=cfg.quantize_chunk,
    )


def build_perceptual(cfg: VQGANConfig) -> tuple[PerceptualLoss | None, str]:
    """The perceptual network of the VQ-GAN loss (``vqgan.perceptual_*``), or None when the backbone is "none"
    or ``perceptual_weight`` is 0, and its one-line description."""
    if cfg.perceptual_weight == 0:
        return None, NO_PERCEPTUAL
    return perceptual_network(cfg.perceptual_backbone, cfg.perceptual_weights, cfg.perceptual_lpips_weights,
                              n_slices=cfg.perceptual_slices)


def build_vqgan_loss(cfg: VQGANConfig, perceptual: nn.Module | None = None,
                     window: Callable[[torch.Tensor], tuple[float, float]] | None = None) -> VQGANLoss:
    """The stage-1 objective of ``cfg``; ``perceptual`` from :func:`build_perceptual`, ``window(x) -> (lo, hi)``
    the display window (needed when ``window_l1_weight`` > 0)."""
    return VQGANLoss(
        perceptual,
        window,
        l1_weight=cfg.l1_weight,
        window_l1_weight=cfg.window_l1_weight,
        perceptual_weight=cfg.perceptual_weight,
        disc_start_step=cfg.disc_start_step,
        gan_loss=cfg.gan_loss,
        image_gan_weight=cfg.image_gan_weight,
        volume_gan_weight=cfg.volume_gan_weight,
        feature_match_weight=cfg.feature_match_weight,
        feature_match_reduction=cfg.feature_match_reduction,
        adaptive_weight_max=cfg.adaptive_weight_max,
    )
