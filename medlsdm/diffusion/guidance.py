"""Classifier-free guidance: turn the U-Net + a label map into the ``model_fn(x_t, t)`` samplers call.

``out = out_uncond + scale * (out_cond - out_uncond)``, applied to the raw model output. At fixed
``(x_t, t)`` eps, x0 and v are affine functions of each other and the weights ``(1 - scale, scale)`` sum
to one, so guiding any objective's output gives the same update. ``scale == 1`` runs
only the conditional branch, ``scale == 0`` only the unconditional (null-label) branch. The two
branches run as two calls rather than one doubled batch, which keeps peak memory at one batch.
"""

from __future__ import annotations

import torch
from torch import nn

from medlsdm.diffusion.samplers.base import ModelFn


def guided_model_fn(unet: nn.Module, labels_onehot: torch.Tensor, scale: float = 1.0) -> ModelFn:
    """``unet(x_t, t, labels, drop=None)`` with ``labels_onehot`` (B, C, D, H, W) -> ``model_fn(x_t, t)``."""

    def conditional(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x_t, t, labels_onehot)

    def unconditional(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x_t, t, None)

    if scale == 1.0:
        return conditional
    if scale == 0.0:
        return unconditional

    def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uncond = unconditional(x_t, t)
        return uncond + scale * (conditional(x_t, t) - uncond)

    return guided
