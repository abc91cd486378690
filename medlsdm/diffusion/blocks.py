"""Building blocks of the semantic U-Net: timestep embedding, encoder/decoder res-blocks, SPADE,
cross-slice and spatial attention, and shape-aware down/up-sampling.

All tensors are ``(B, C, D, H, W)``. Equation numbers refer to the Med-LSDM paper (section 3.3).

Down-sampling rule (shared by the U-Net and the semantic encoder): at each level an axis is halved
if and only if its current size is even and greater than 1; other axes keep their size (stride 1).
So (4, 16, 16) -> (2, 8, 8) -> (1, 4, 4) -> (1, 2, 2), and (2, 8, 12) -> (1, 4, 6) -> (1, 2, 3) -> (1, 1, 3).
With ``keep_depth`` (the authors' code) depth is never halved: (8, 64, 64) -> (8, 32, 32) -> (8, 16, 16), so
cross-slice attention sees every latent slice at every level.
Up-sampling always returns to the exact size of the matching skip connection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

DEPTH_POSITIONS = ("none", "relative")


def norm_groups(channels: int) -> int:
    """Number of GroupNorm groups for ``channels`` (32 when possible, else the largest divisor of 32)."""
    return math.gcd(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module`` so a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def halving_strides(shape: tuple[int, ...], keep_depth: bool = False) -> tuple[int, ...]:
    """Per-axis stride of one down-sampling step: 2 where the size is even and > 1, else 1 (and 1 along the
    first axis, depth, when ``keep_depth``)."""
    return tuple(1 if (keep_depth and i == 0) else 2 if (s > 1 and s % 2 == 0) else 1 for i, s in enumerate(shape))


def level_shapes(shape: tuple[int, int, int], levels: int, keep_depth: bool = False) -> list[tuple[int, int, int]]:
    """Spatial shape ``(d, h, w)`` at each of ``levels`` U-Net levels (level 0 = ``shape``)."""
    shapes = [tuple(shape)]
    for _ in range(levels - 1):
        shapes.append(tuple(s // k for s, k in zip(shapes[-1], halving_strides(shapes[-1], keep_depth))))
    return shapes


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of ``t`` followed by an MLP: ``(B,)`` -> ``(B, emb_channels)``."""

    def __init__(self, channels: int, emb_channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.mlp = nn.Sequential(nn.Linear(channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = get_timestep_embedding(t.float().reshape(-1), self.channels)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class TimestepScaleShift(nn.Module):
    """Eq. 14: ``h * (1 + scale) + shift`` with ``(scale, shift)`` projected from the timestep embedding."""

    def __init__(self, emb_channels: int, channels: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * channels))

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.proj(emb)[:, :, None, None, None].chunk(2, dim=1)
        return h * (1 + scale) + shift


class SPADE(nn.Module):
    """Eq. 15: parameter-free GroupNorm, then ``norm(x) * (1 + gamma) + beta`` with spatially varying
    ``gamma, beta`` computed by small convs from the semantic features ``seg`` (B, S, d', h', w'),
    which are resized to the resolution of ``x`` (B, C, d, h, w) first if they differ."""

    def __init__(self, channels: int, semantic_channels: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or semantic_channels
        self.norm = nn.GroupNorm(norm_groups(channels), channels, affine=False)
        self.shared = nn.Sequential(nn.Conv3d(semantic_channels, hidden, 3, padding=1), nn.SiLU())
        self.gamma = nn.Conv3d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv3d(hidden, channels, 3, padding=1)

    def modulation(self, seg: torch.Tensor, size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1 + gamma, beta)``, each (B, channels, *size): they depend on the label map only, so a sampler
        may compute them once per label map and pass them to :meth:`forward` in place of ``seg``."""
        if tuple(seg.shape[2:]) != tuple(size):
            seg = F.interpolate(seg, size=tuple(size), mode="nearest")
        actv = self.shared(seg)
        return 1 + self.gamma(actv), self.beta(actv)

    def forward(self, x: torch.Tensor, seg: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        scale, shift = seg if isinstance(seg, tuple) else self.modulation(seg, tuple(x.shape[2:]))
        return self.norm(x) * scale + shift


class PlainNorm(nn.Module):
    """Affine GroupNorm with SPADE's call signature: ``(x, seg, ...) -> norm(x)``, ``seg`` ignored. The norm of
    the decoder blocks of concat-conditioned U-Nets (the baselines), whose label map enters at the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups(channels), channels)

    def forward(self, x: torch.Tensor, *_: object) -> torch.Tensor:
        return self.norm(x)


class EncoderResBlock(nn.Module):
    """GroupNorm-SiLU-Conv, timestep scale/shift (eq. 14) on the second norm, SiLU-Dropout-Conv, residual.

    ``forward(x (B, C_in, d, h, w), emb (B, E)) -> (B, C_out, d, h, w)``.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(norm_groups(in_channels), in_channels),
            nn.SiLU(),
            nn.Conv3d(in_channels, out_channels, 3, padding=1),
        )
        self.out_norm = nn.GroupNorm(norm_groups(out_channels), out_channels)
        self.time = TimestepScaleShift(emb_channels, out_channels)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_module(nn.Conv3d(out_channels, out_channels, 3, padding=1))
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = self.out_layers(self.time(self.out_norm(h), emb))
        return self.skip(x) + h


class DecoderResBlock(nn.Module):
    """As :class:`EncoderResBlock` but both norms are :class:`SPADE` driven by the semantic features
    (``semantic_channels`` None: :class:`PlainNorm` instead, and ``seg`` may be None).

    ``forward(x (B, C_in, d, h, w), emb (B, E), seg (B, S, d, h, w)) -> (B, C_out, d, h, w)``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, emb_channels: int, semantic_channels: int | None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        norm = PlainNorm if semantic_channels is None else (lambda c: SPADE(c, semantic_channels))
        self.in_norm = norm(in_channels)
        self.in_conv = nn.Sequential(nn.SiLU(), nn.Conv3d(in_channels, out_channels, 3, padding=1))
        self.out_norm = norm(out_channels)
        self.time = TimestepScaleShift(emb_channels, out_channels)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_module(nn.Conv3d(out_channels, out_channels, 3, padding=1))
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1)

    def modulations(self, seg: torch.Tensor, size: tuple[int, ...]) -> tuple | None:
        """Both SPADEs' ``(1 + gamma, beta)`` for features ``seg`` at spatial ``size``; pass the result to
        :meth:`forward` as ``seg`` to skip recomputing them (None for plain norms: nothing to cache)."""
        if not isinstance(self.in_norm, SPADE):
            return None
        return self.in_norm.modulation(seg, size), self.out_norm.modulation(seg, size)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, seg: torch.Tensor | tuple | None) -> torch.Tensor:
        seg_in, seg_out = seg if isinstance(seg, tuple) and isinstance(seg[0], tuple) else (seg, seg)
        h = self.in_conv(self.in_norm(x, seg_in))
        h = self.out_layers(self.time(self.out_norm(h, seg_out), emb))
        return self.skip(x) + h


class _AxisAttention(nn.Module):
    """Multi-head self-attention over token sequences ``(N, L, C)`` with a per-token LayerNorm
    (so no statistic mixes positions that do not attend to each other) and a zero-initialised output
    projection (the block starts as the identity)."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.proj = zero_module(nn.Linear(channels, channels))

    def attend(self, tokens: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens`` (N, L, C); ``bias`` (heads, L, L) added to the attention logits, or None."""
        n, length, c = tokens.shape
        q, k, v = self.qkv(self.norm(tokens)).reshape(n, length, 3, self.num_heads, c // self.num_heads).unbind(2)
        mask = None if bias is None else bias.to(q.dtype)[None]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return tokens + self.proj(out.transpose(1, 2).reshape(n, length, c))


class RelativeDepthBias(nn.Module):
    """A learned attention bias per head and slice offset j - i (clipped to +-``max_distance``): position
    information along depth that means the same in every depth window, since only offsets enter (the authors'
    code uses a bucketed form of the same idea). Starts at zero: a new block attends as without it.

    ``forward(length) -> (heads, length, length)``.
    """

    def __init__(self, num_heads: int, max_distance: int = 16) -> None:
        super().__init__()
        self.max_distance = max_distance
        self.bias = nn.Embedding(2 * max_distance + 1, num_heads)
        nn.init.zeros_(self.bias.weight)

    def forward(self, length: int) -> torch.Tensor:
        pos = torch.arange(length, device=self.bias.weight.device)
        offset = (pos[None, :] - pos[:, None]).clamp(-self.max_distance, self.max_distance) + self.max_distance
        return self.bias(offset).permute(2, 0, 1)


class CrossSliceAttention(_AxisAttention):
    """Attention along depth D: for every (h, w) position the D slices attend to each other, with a
    :class:`RelativeDepthBias` when ``depth_positions == "relative"`` (without: order-blind, "none").

    ``(B, C, D, H, W) -> (B, C, D, H, W)``; (h, w) columns never exchange information here.
    """

    def __init__(self, channels: int, num_heads: int, depth_positions: str = "none") -> None:
        super().__init__(channels, num_heads)
        if depth_positions not in DEPTH_POSITIONS:
            raise ValueError(f"depth_positions must be one of {DEPTH_POSITIONS}, got {depth_positions!r}")
        self.positions = RelativeDepthBias(num_heads) if depth_positions == "relative" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        tokens = x.permute(0, 3, 4, 2, 1).reshape(b * h * w, d, c)
        bias = None if self.positions is None else self.positions(d)
        return self.attend(tokens, bias).reshape(b, h, w, d, c).permute(0, 4, 3, 1, 2)


class SpatialAttention(_AxisAttention):
    """Attention within each slice: the h*w positions of one slice attend to each other.

    ``(B, C, D, H, W) -> (B, C, D, H, W)``; slices never exchange information here.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        tokens = x.permute(0, 2, 3, 4, 1).reshape(b * d, h * w, c)
        return self.attend(tokens).reshape(b, d, h, w, c).permute(0, 4, 1, 2, 3)


class AttentionBlock(nn.Sequential):
    """Cross-slice attention followed by spatial attention (the paper's pair), ``(B,C,D,H,W)`` in and out."""

    def __init__(self, channels: int, num_heads: int, depth_positions: str = "none") -> None:
        super().__init__(CrossSliceAttention(channels, num_heads, depth_positions),
                         SpatialAttention(channels, num_heads))


class Downsample(nn.Module):
    """3x3x3 conv whose stride follows :func:`halving_strides` of the input's spatial shape."""

    def __init__(self, channels: int, keep_depth: bool = False) -> None:
        super().__init__()
        self.keep_depth = keep_depth
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride = halving_strides(tuple(x.shape[2:]), self.keep_depth)
        return F.conv3d(x, self.conv.weight, self.conv.bias, stride=stride, padding=1)


class Upsample(nn.Module):
    """Nearest-neighbour resize to ``size`` (the matching skip's spatial shape), then a 3x3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        if tuple(x.shape[2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)
