"""The 3D VQ-GAN autoencoder (paper section 3.2): encoder, codebook, decoder.

Layout follows the paper's code (TATS / medicaldiffusion ``vq_gan_3d``): a 3x3x3 input conv, one level
per factor of two (a strided 4x4x4 conv followed by residual blocks, channels doubling), GroupNorm + SiLU,
then 1x1x1 convs into and out of the E-dimensional code space; the decoder mirrors it with transposed
convs (or, with ``vqgan.upsample: nearest_conv``, nearest-neighbour doubling + 3x3x3 convs) and one more
residual block per level (optionally a final tanh, ``vqgan.decoder_tanh``). An axis whose factor is already
reached is not strided at the remaining levels (kernel 3, stride 1 on that axis), so per-axis factors such as
(1, 4, 4) work.

With the ``paper`` preset (channels 16, downsample (4, 4, 4), E 8) the encoder has 441,568 parameters and
the decoder 948,417 (paper Appendix A: 441.5K and 948.6K); these counts exclude the 1x1x1 ``pre_quant``
(520) and ``post_quant`` (576) convs and the codebook, which are separate sub-modules of :class:`VQGAN`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from monai.networks.nets.autoencoderkl import AEKLResBlock
from torch import nn

from medlsdm.autoencoder.quantizer import QuantizerOutput, VectorQuantizer
from medlsdm.config import VQGAN_UPSAMPLE
from medlsdm.errors import UserError


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


def _level_strides(downsample: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Per-level (D, H, W) strides: an axis is strided (2) at its first log2(factor) levels, else 1."""
    for f in downsample:
        if f < 1 or f & (f - 1):
            raise UserError(f"config: vqgan.downsample must be powers of two, got {tuple(downsample)}")
    logs = [int(math.log2(f)) for f in downsample]
    return [tuple(2 if lvl < n else 1 for n in logs) for lvl in range(max(logs))]  # type: ignore[misc]


def _resample_conv(cin: int, cout: int, stride: tuple[int, int, int], transpose: bool, nearest: bool = False
                   ) -> nn.Module:
    """Halve (or double, when ``transpose``) the strided axes exactly; stride-1 axes keep their size.

    ``nearest`` (with ``transpose``): nearest-neighbour doubling then a 3x3x3 conv instead of a transposed
    conv, whose 4x4x4 kernels overlap unevenly at stride 2 and start training as a checkerboard."""
    if transpose and nearest:
        return nn.Sequential(nn.Upsample(scale_factor=tuple(float(s) for s in stride), mode="nearest"),
                             nn.Conv3d(cin, cout, 3, padding=1))
    kernel = tuple(4 if s == 2 else 3 for s in stride)
    conv = nn.ConvTranspose3d if transpose else nn.Conv3d
    return conv(cin, cout, kernel, stride=stride, padding=1)


class Encoder(nn.Module):
    """x (B, in_channels, D, H, W) -> features (B, channels * 2**L, D/fd, H/fh, W/fw), L = log2(max f)."""

    def __init__(self, channels: int, downsample: tuple[int, int, int], in_channels: int = 1, num_res_blocks: int = 1):
        super().__init__()
        self.conv_in = nn.Conv3d(in_channels, channels, 3, padding=1)
        self.levels = nn.ModuleList()
        ch = channels
        for stride in _level_strides(downsample):
            level = nn.Sequential(_resample_conv(ch, ch * 2, stride, transpose=False))
            ch *= 2
            for _ in range(num_res_blocks):
                level.append(AEKLResBlock(3, ch, _groups(ch), 1e-6, ch))
            self.levels.append(level)
        self.norm_out = nn.GroupNorm(_groups(ch), ch, eps=1e-6)
        self.out_channels = ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h)
        return nn.functional.silu(self.norm_out(h))


class Decoder(nn.Module):
    """features (B, channels * 2**L, d, h, w) -> x (B, out_channels, d*fd, h*fh, w*fw)."""

    def __init__(self, channels: int, downsample: tuple[int, int, int], out_channels: int = 1, num_res_blocks: int = 1,
                 upsample: str = "transpose", tanh: bool = False):
        super().__init__()
        if upsample not in VQGAN_UPSAMPLE:
            raise ValueError(f"upsample must be one of {VQGAN_UPSAMPLE}, got {upsample!r}")
        self.tanh = tanh
        strides = _level_strides(downsample)[::-1]
        ch = channels * 2 ** len(strides)
        self.in_channels = ch
        self.norm_in = nn.GroupNorm(_groups(ch), ch, eps=1e-6)
        self.levels = nn.ModuleList()
        for i, stride in enumerate(strides):
            cout = ch if i == 0 else ch // 2  # as in the paper's code: the first level keeps its width
            level = nn.Sequential(_resample_conv(ch, cout, stride, transpose=True, nearest=upsample == "nearest_conv"))
            ch = cout
            for _ in range(num_res_blocks + 1):
                level.append(AEKLResBlock(3, ch, _groups(ch), 1e-6, ch))
            self.levels.append(level)
        self.conv_out = nn.Conv3d(ch, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = nn.functional.silu(self.norm_in(z))
        for level in self.levels:
            h = level(h)
        out = self.conv_out(h)
        return torch.tanh(out) if self.tanh else out


class VQGAN(nn.Module):
    """Encoder -> pre_quant -> codebook -> post_quant -> decoder, for volumes (B, 1, D, H, W) in [-1, 1]."""

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 16,
        downsample: Sequence[int] = (4, 4, 4),
        embedding_dim: int = 8,
        n_codes: int = 16384,
        num_res_blocks: int = 1,
        upsample: str = "transpose",
        decoder_tanh: bool = False,
        commitment_beta: float = 0.25,
        codebook_update: str = "ema",
        ema_decay: float = 0.99,
        dead_code_threshold: float = 1.0,
        quantize_chunk: int = 4096,
    ):
        """Defaults are the ``paper`` preset's; build from a ``VQGANConfig`` with
        :func:`medlsdm.autoencoder.build.build_vqgan` (the one place where the config maps onto these).

        in_channels: image channels (in and out). channels: width of the first encoder level (doubled at each
        downsampling). downsample: (D, H, W) compression, powers of two. embedding_dim: code dimension E.
        n_codes: codebook size K. upsample: decoder up-sampling, "transpose" or "nearest_conv".
        decoder_tanh: a final tanh. The rest configure :class:`VectorQuantizer` (beta, update, decay,
        dead_code_threshold, chunk)."""
        super().__init__()
        if not isinstance(in_channels, int):  # the former VQGAN(cfg) call
            raise TypeError("VQGAN takes typed arguments; build it from a VQGANConfig with "
                            "medlsdm.autoencoder.build_vqgan(cfg)")
        self.downsample = tuple(int(f) for f in downsample)
        self.encoder = Encoder(channels, self.downsample, in_channels, num_res_blocks)
        self.pre_quant = nn.Conv3d(self.encoder.out_channels, embedding_dim, 1)
        self.quantizer = VectorQuantizer(
            n_codes,
            embedding_dim,
            beta=commitment_beta,
            update=codebook_update,
            decay=ema_decay,
            dead_code_threshold=dead_code_threshold,
            chunk=quantize_chunk,
        )
        self.post_quant = nn.Conv3d(embedding_dim, self.encoder.out_channels, 1)
        self.decoder = Decoder(channels, self.downsample, in_channels, num_res_blocks, upsample, decoder_tanh)

    def latent_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """Latent (d, h, w) for a volume (D, H, W); a shape the factors do not divide is a UserError."""
        if any(s % f for s, f in zip(shape, self.downsample)):
            raise UserError(
                f"config: volume shape {tuple(shape)} is not divisible by vqgan.downsample {self.downsample}"
            )
        return tuple(s // f for s, f in zip(shape, self.downsample))  # type: ignore[return-value]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latents: x (B, 1, D, H, W) -> z (B, E, D/fd, H/fh, W/fw)."""
        self.latent_shape(tuple(x.shape[2:]))
        return self.pre_quant(self.encoder(x))

    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        """Nearest codes for z (B, E, d, h, w); see :class:`QuantizerOutput` (updates the codebook in training)."""
        return self.quantizer(z)

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantised latents z_q (B, E, d, h, w) -> reconstruction (B, 1, d*fd, h*fh, w*fw)."""
        return self.decoder(self.post_quant(z_q))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, d, h, w) long -> reconstruction (B, 1, D, H, W)."""
        return self.decode(self.quantizer.lookup(indices))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """x (B, 1, D, H, W) -> (reconstruction (B, 1, D, H, W), quantiser output)."""
        vq = self.quantize(self.encode(x))
        return self.decode(vq.z_q), vq

    @torch.no_grad()
    def codebook_range(self) -> tuple[float, float]:
        """(min, max) over all codebook entries: the latent min-max normalisation range of the paper."""
        codes = self.quantizer.embedding
        return float(codes.min()), float(codes.max())

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's final conv weight (where eq. 7's adaptive GAN weight is measured)."""
        return self.decoder.conv_out.weight
