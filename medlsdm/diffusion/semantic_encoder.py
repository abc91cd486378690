"""Semantic map encoder: one-hot label map at image resolution -> one feature map per U-Net level.

The label map is brought to latent resolution by learned stride-2 convolutions (one per factor of 2
per axis), so that thin structures leave a trace in the features instead of being lost by
nearest-neighbour downsampling (paper section 3.3, last paragraph). Deeper levels are reached by
further down-sampling with the U-Net's rule (:func:`medlsdm.diffusion.blocks.halving_strides`, ``keep_depth``
included).

For classifier-free guidance the encoder also holds a learned *null* embedding: where ``drop`` is
True (or no label map is given) the latent-resolution features are replaced by it.
"""

from __future__ import annotations

import torch
from torch import nn

from medlsdm.diffusion.blocks import Downsample


def _log2(factor: int) -> int:
    if factor < 1 or factor & (factor - 1):
        raise ValueError(f"image_down factors must be powers of two, got {factor}")
    return factor.bit_length() - 1


class SemanticEncoder(nn.Module):
    """``forward(labels (B, num_classes, D, H, W) | None, batch, latent_shape (d, h, w), drop (B,) | None)``
    -> list of ``levels`` tensors ``(B, channels, d_l, h_l, w_l)`` where ``(D, H, W) = (d, h, w) * image_down``.
    """

    def __init__(self, num_classes: int, channels: int, image_down: tuple[int, int, int], levels: int,
                 keep_depth: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.image_down = tuple(int(f) for f in image_down)
        steps = max(_log2(f) for f in self.image_down)
        strides = [tuple(2 if f >= 2 ** (k + 1) else 1 for f in self.image_down) for k in range(steps)] or [(1, 1, 1)]
        layers: list[nn.Module] = []
        for k, stride in enumerate(strides):
            layers += [nn.Conv3d(num_classes if k == 0 else channels, channels, 3, stride=stride, padding=1), nn.SiLU()]
        self.to_latent = nn.Sequential(*layers)
        self.null = nn.Parameter(torch.randn(1, channels, 1, 1, 1))
        self.down = nn.ModuleList([nn.Sequential(Downsample(channels, keep_depth), nn.SiLU())
                                   for _ in range(levels - 1)])
        self.heads = nn.ModuleList([nn.Conv3d(channels, channels, 3, padding=1) for _ in range(levels)])

    def forward(
        self,
        labels: torch.Tensor | None,
        batch: int,
        latent_shape: tuple[int, int, int],
        drop: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        null = self.null.expand(batch, -1, *latent_shape)
        if labels is None:
            h = null
        else:
            self._check(labels, batch, latent_shape)
            h = self.to_latent(labels.to(self.null.dtype))
            if drop is not None:  # label path runs even for dropped samples: every parameter gets a grad (DDP)
                h = torch.where(drop.to(h.device).view(-1, 1, 1, 1, 1), null, h)
        feats = [self.heads[0](h)]
        for down, head in zip(self.down, self.heads[1:]):
            h = down(h)
            feats.append(head(h))
        return feats

    def _check(self, labels: torch.Tensor, batch: int, latent_shape: tuple[int, int, int]) -> None:
        expected = (batch, self.num_classes, *(s * f for s, f in zip(latent_shape, self.image_down)))
        if tuple(labels.shape) != expected:
            raise ValueError(
                f"label map has shape {tuple(labels.shape)}, expected one-hot {expected} "
                f"(latent {tuple(latent_shape)} x image_down {self.image_down})"
            )
