"""PatchGAN discriminators: one on random 2D slices, one on whole 3D volumes (paper section 3.2).

Both are MONAI's ``PatchDiscriminator`` (Pix2PixHD layout: a stride-2 input conv, ``num_layers - 1``
stride-2 conv + BatchNorm + LeakyReLU layers, one stride-1 layer, a 1-channel output conv; kernel 4)
with biases and padding 2 as in the paper's code, so the ``paper`` preset (64 channels, 3 layers)
has 2,764,481 (2D) and 11,049,665 (3D) parameters (Appendix A: 2.8M and 11.0M). Padding 2 also keeps
small inputs (e.g. 16 slices) from shrinking to nothing. ``forward`` returns ``(logits, features)``
where ``features`` are the intermediate activations, for feature matching.
"""

from __future__ import annotations

import torch
from monai.networks.nets import PatchDiscriminator


class _PatchGAN(PatchDiscriminator):
    def __init__(self, spatial_dims: int, channels: int = 64, num_layers: int = 3, in_channels: int = 1):
        super().__init__(
            spatial_dims=spatial_dims,
            channels=channels,
            in_channels=in_channels,
            num_layers_d=num_layers,
            kernel_size=4,
            norm="BATCH",
            bias=True,
            padding=2,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:  # type: ignore[override]
        outs = super().forward(x)
        return outs[-1], outs[:-1]


class SliceDiscriminator2D(_PatchGAN):
    """2D PatchGAN on slices: (B, 1, H, W) -> (logits (B, 1, h', w'), intermediate features)."""

    def __init__(self, channels: int = 64, num_layers: int = 3, in_channels: int = 1):
        super().__init__(2, channels, num_layers, in_channels)


class PatchDiscriminator3D(_PatchGAN):
    """3D PatchGAN on volumes: (B, 1, D, H, W) -> (logits (B, 1, d', h', w'), intermediate features)."""

    def __init__(self, channels: int = 64, num_layers: int = 3, in_channels: int = 1):
        super().__init__(3, channels, num_layers, in_channels)


def sample_slices(
    real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random slice along D per volume, the same index for ``real`` and ``fake``.

    real, fake: (B, C, D, H, W) -> (real slices (B, C, H, W), fake slices (B, C, H, W)).
    """
    b, _, d = real.shape[:3]
    idx = torch.randint(d, (b,), generator=generator).to(real.device)
    rows = torch.arange(b, device=real.device)
    return real[rows, :, idx], fake[rows, :, idx]
