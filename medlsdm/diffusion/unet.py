"""The semantic U-Net of Med-LSDM (paper section 3.3, Fig. 4).

Encoder: :class:`EncoderResBlock` s (timestep scale/shift, eq. 14) with cross-slice + spatial
attention at ``attention_levels``; ``keep_depth`` down-samples in-plane only (cross-slice attention sees
every latent slice) and ``depth_positions`` gives that attention relative depth positions. Middle and
decoder: :class:`DecoderResBlock` s whose norms are
SPADE (eq. 15) fed by :class:`SemanticEncoder` features of the matching level, with skip connections
from the encoder. The label map enters only through SPADE (never concatenated to the input).

``conditioning="concat"`` (the baselines, Med-DDPM / SegGuidedDiff style) is the same network without
the semantic encoder: the one-hot label map, at the input's resolution, is concatenated to the noisy
input and the decoder norms are plain GroupNorms; the null condition is an all-zero label block.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from medlsdm.config import LDMConfig
from medlsdm.diffusion.blocks import (
    AttentionBlock,
    DecoderResBlock,
    Downsample,
    EncoderResBlock,
    TimestepEmbedding,
    Upsample,
    level_shapes,
    norm_groups,
    zero_module,
)
from medlsdm.diffusion.semantic_encoder import SemanticEncoder

CONDITIONING = ("spade", "concat")


class SemanticUNet(nn.Module):
    """Noise-prediction network ``f(x_t, t, labels) -> (B, in_channels, d, h, w)``.

    Args:
        in_channels: latent channels (the VQ-GAN ``embedding_dim``).
        num_classes: classes C of the one-hot label map, background included.
        image_down: per-axis factor (D, H, W) between the label map and the latent.
        model_channels: width of the first level; level ``l`` has ``model_channels * channel_mult[l]``.
        channel_mult: one width multiplier per U-Net level.
        num_res_blocks: encoder res-blocks per level (the decoder has one more).
        attention_levels: levels (0 = full latent resolution) with cross-slice + spatial attention.
        num_heads: attention heads.
        semantic_channels: width of the semantic encoder's features (SPADE input).
        dropout: dropout in the res-blocks.
        keep_depth: down-sample in-plane only (cross-slice attention sees every latent slice).
        depth_positions: "none" or "relative" (learned per-head bias per slice offset in cross-slice attention).
        use_checkpoint: gradient checkpointing of every block while training.
        conditioning: "spade" (Med-LSDM) or "concat" (label map concatenated to the input, no SPADE).

    :meth:`from_config` maps an :class:`~medlsdm.config.LDMConfig` onto these arguments.
    """

    def __init__(
        self,
        in_channels: int = 8,
        num_classes: int = 6,
        image_down: tuple[int, int, int] = (4, 4, 4),
        model_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 4),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (1, 2),
        num_heads: int = 4,
        semantic_channels: int = 32,
        dropout: float = 0.0,
        keep_depth: bool = False,
        depth_positions: str = "none",
        use_checkpoint: bool = False,
        conditioning: str = "spade",
    ) -> None:
        super().__init__()
        if conditioning not in CONDITIONING:
            raise ValueError(f"conditioning must be one of {CONDITIONING}, got {conditioning!r}")
        self.conditioning = conditioning
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.image_down = tuple(image_down)
        self.use_checkpoint = use_checkpoint
        mc, levels, sem = model_channels, len(channel_mult), semantic_channels
        emb = 4 * mc
        attn = set(attention_levels)
        self.keep_depth = keep_depth
        pos = depth_positions

        self.time_embed = TimestepEmbedding(mc, emb)
        if conditioning == "spade":
            self.semantic = SemanticEncoder(num_classes, sem, self.image_down, levels, keep_depth)
            self.input_conv = nn.Conv3d(in_channels, mc, 3, padding=1)
        else:  # concat: no semantic encoder, the label map is extra input channels, decoder norms are plain
            self.semantic, sem = None, None
            self.input_conv = nn.Conv3d(in_channels + num_classes, mc, 3, padding=1)

        # encoder: per level, res-blocks (+ attention), then a down-sampling except at the deepest level
        self.down_blocks = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        skip_channels, ch = [mc], mc
        for level, mult in enumerate(channel_mult):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(EncoderResBlock(ch, mc * mult, emb, dropout))
                ch = mc * mult
                attns.append(AttentionBlock(ch, num_heads, pos) if level in attn else nn.Identity())
                skip_channels.append(ch)
            self.down_blocks.append(blocks)
            self.down_attn.append(attns)
            if level < levels - 1:
                self.downsamples.append(Downsample(ch, keep_depth))
                skip_channels.append(ch)

        self.mid_block1 = DecoderResBlock(ch, ch, emb, sem, dropout)
        self.mid_attn = AttentionBlock(ch, num_heads, pos)
        self.mid_block2 = DecoderResBlock(ch, ch, emb, sem, dropout)

        # decoder: per level (deepest first), num_res_blocks + 1 SPADE res-blocks eating the skips
        self.up_blocks = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(DecoderResBlock(ch + skip_channels.pop(), mc * mult, emb, sem, dropout))
                ch = mc * mult
                attns.append(AttentionBlock(ch, num_heads, pos) if level in attn else nn.Identity())
            self.up_blocks.append(blocks)
            self.up_attn.append(attns)
            if level > 0:
                self.upsamples.append(Upsample(ch))

        self.out = nn.Sequential(
            nn.GroupNorm(norm_groups(ch), ch), nn.SiLU(), zero_module(nn.Conv3d(ch, in_channels, 3, padding=1))
        )

    @classmethod
    def from_config(
        cls,
        cfg: LDMConfig,
        in_channels: int = 8,
        num_classes: int = 6,
        image_down: tuple[int, int, int] = (4, 4, 4),
        use_checkpoint: bool | None = None,
        conditioning: str = "spade",
    ) -> "SemanticUNet":
        """The U-Net an ``ldm`` config section describes (widths, levels, attention, ``use_checkpoint`` unless
        given); the data-dependent sizes come from the caller (see :func:`medlsdm.pipeline.build_diffusion`)."""
        return cls(
            in_channels=in_channels,
            num_classes=num_classes,
            image_down=image_down,
            model_channels=cfg.model_channels,
            channel_mult=cfg.channel_mult,
            num_res_blocks=cfg.num_res_blocks,
            attention_levels=cfg.attention_levels,
            num_heads=cfg.num_heads,
            semantic_channels=cfg.semantic_channels,
            dropout=cfg.dropout,
            keep_depth=cfg.keep_depth,
            depth_positions=cfg.depth_positions,
            use_checkpoint=cfg.use_checkpoint if use_checkpoint is None else use_checkpoint,
            conditioning=conditioning,
        )

    def concat_labels(
        self, labels_onehot: torch.Tensor | None, x: torch.Tensor, drop: torch.Tensor | None
    ) -> torch.Tensor:
        """Concat mode: the label map (B, C, D, H, W) as input channels (B, C, d, h, w) (class fractions when
        ``image_down`` > 1); all zeros (the null condition) for ``drop``-ped samples or ``labels_onehot`` None."""
        b, size = x.shape[0], tuple(x.shape[2:])
        if labels_onehot is None:
            return x.new_zeros(b, self.num_classes, *size)
        expected = (b, self.num_classes, *(s * f for s, f in zip(size, self.image_down)))
        if tuple(labels_onehot.shape) != expected:
            raise ValueError(f"label map has shape {tuple(labels_onehot.shape)}, expected one-hot {expected}")
        labels = labels_onehot.to(x.dtype)
        if tuple(labels.shape[2:]) != size:
            labels = F.adaptive_avg_pool3d(labels, size)
        if drop is not None:
            labels = labels * (~drop.to(labels.device).bool()).to(labels.dtype).view(-1, 1, 1, 1, 1)
        return labels

    def _run(self, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        labels_onehot: torch.Tensor | None,
        drop: torch.Tensor | None = None,
        cond: list | None = None,
    ) -> torch.Tensor:
        """``x`` (B, in_channels, d, h, w), ``t`` (B,) long or float, ``labels_onehot`` (B, C, D, H, W)
        or ``None`` (null condition for all samples), ``drop`` (B,) bool: use the null condition for
        these samples. ``cond``: :meth:`condition` of these labels (the semantic encoder and the SPADE
        convolutions are then skipped). Returns (B, in_channels, d, h, w)."""
        b = x.shape[0]
        t = t.expand(b) if t.ndim == 0 else t
        emb = self.time_embed(t.to(x.device))
        if self.semantic is None:  # concat conditioning
            seg: list = [None] * len(self.up_blocks)
            h = self.input_conv(torch.cat([x, self.concat_labels(labels_onehot, x, drop)], dim=1))
        elif cond is not None:  # cached SPADE modulations, one entry per decoder block
            seg, h = None, self.input_conv(x)
        else:
            seg = self.semantic(labels_onehot, b, tuple(x.shape[2:]), drop)
            seg = [s.to(x.dtype) for s in seg]
            h = self.input_conv(x)
        hs = [h]
        for level, (blocks, attns) in enumerate(zip(self.down_blocks, self.down_attn)):
            for block, attn in zip(blocks, attns):
                h = self._run(attn, self._run(block, h, emb))
                hs.append(h)
            if level < len(self.downsamples):
                h = self._run(self.downsamples[level], h)
                hs.append(h)

        cached = iter(cond) if seg is None else None  # cond holds the decoder blocks' entries in call order

        def seg_for(block: nn.Module, level: int):
            return next(cached) if cached is not None else seg[level]

        h = self._run(self.mid_block1, h, emb, seg_for(self.mid_block1, -1))
        h = self._run(self.mid_attn, h)
        h = self._run(self.mid_block2, h, emb, seg_for(self.mid_block2, -1))

        levels = len(self.up_blocks)
        for i, (blocks, attns) in enumerate(zip(self.up_blocks, self.up_attn)):
            level = levels - 1 - i
            for block, attn in zip(blocks, attns):
                h = self._run(attn, self._run(block, torch.cat([h, hs.pop()], dim=1), emb, seg_for(block, level)))
            if level > 0:
                h = self.upsamples[i](h, tuple(hs[-1].shape[2:]))
        return self.out(h)

    def condition(self, labels_onehot: torch.Tensor | None, batch: int, latent_shape: tuple[int, int, int],
                  drop: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> list | None:
        """The SPADE modulations ``(1 + gamma, beta)`` of every decoder block for one batch of label maps
        (B, C, D, H, W) (or None: the null condition) at latent ``(d, h, w)``, to pass as ``forward(cond=)``.
        They depend on the label map only, never on ``x_t`` or ``t``, so reusing them at every sampling
        step gives exactly the same outputs. None in concat mode (nothing to cache)."""
        if self.semantic is None:
            return None
        seg = [s.to(dtype) for s in self.semantic(labels_onehot, batch, tuple(latent_shape), drop)]
        shapes = level_shapes(tuple(latent_shape), len(seg), self.keep_depth)
        blocks = [(self.mid_block1, len(seg) - 1), (self.mid_block2, len(seg) - 1)]
        blocks += [(block, len(seg) - 1 - i) for i, up in enumerate(self.up_blocks) for block in up]
        return [block.modulations(seg[level], shapes[level]) for block, level in blocks]


def cached_condition(unet: SemanticUNet, net: Callable | None = None) -> Callable[..., torch.Tensor]:
    """``f(x, t, labels_onehot, drop=None)`` returning what ``unet(x, t, labels_onehot, drop)`` returns, but
    computing each label map's :meth:`SemanticUNet.condition` only at its first call and reusing it after
    (keyed by the identity of the label and drop tensors, which are kept alive, and by batch, latent shape,
    dtype and autocast state). ``net`` runs the network (e.g. a ``torch.compile`` d ``unet``; default ``unet``)."""
    net = unet if net is None else net
    store: dict[tuple, tuple] = {}

    def forward(x: torch.Tensor, t: torch.Tensor, labels_onehot: torch.Tensor | None,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        if unet.semantic is None:
            return net(x, t, labels_onehot, drop)
        key = (id(labels_onehot), id(drop), x.shape[0], tuple(x.shape[2:]), x.dtype,
               torch.is_autocast_enabled(x.device.type))
        if key not in store:
            store[key] = (labels_onehot, drop,
                          unet.condition(labels_onehot, x.shape[0], tuple(x.shape[2:]), drop, x.dtype))
        return net(x, t, labels_onehot, drop, cond=store[key][2])

    return forward
