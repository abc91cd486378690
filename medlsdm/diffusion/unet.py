"""The semantic U-Net of Med-LSDM (paper section 3.3, Fig. 4).

Encoder: :class:`EncoderResBlock` s (timestep scale/shift, eq. 14) with cross-slice + spatial
attention at ``cfg.attention_levels``. Middle and decoder: :class:`DecoderResBlock` s whose norms are
SPADE (eq. 15) fed by :class:`SemanticEncoder` features of the matching level, with skip connections
from the encoder. The label map enters only through SPADE (never concatenated to the input).
"""

from __future__ import annotations

import torch
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
    norm_groups,
    zero_module,
)
from medlsdm.diffusion.semantic_encoder import SemanticEncoder


class SemanticUNet(nn.Module):
    """Noise-prediction network ``f(x_t, t, labels) -> (B, in_channels, d, h, w)``.

    Args:
        cfg: widths (``model_channels * channel_mult``), ``num_res_blocks``, ``attention_levels``,
            ``num_heads``, ``semantic_channels``, ``dropout``, ``use_checkpoint``.
        in_channels: latent channels (the VQ-GAN ``embedding_dim``).
        num_classes: classes C of the one-hot label map, background included.
        image_down: per-axis factor (D, H, W) between the label map and the latent.
        use_checkpoint: gradient checkpointing of every block while training (``None``: from ``cfg``).
    """

    def __init__(
        self,
        cfg: LDMConfig,
        in_channels: int = 8,
        num_classes: int = 6,
        image_down: tuple[int, int, int] = (4, 4, 4),
        use_checkpoint: bool | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.image_down = tuple(image_down)
        self.use_checkpoint = cfg.use_checkpoint if use_checkpoint is None else use_checkpoint
        mc, levels, sem = cfg.model_channels, len(cfg.channel_mult), cfg.semantic_channels
        emb = 4 * mc
        attn = set(cfg.attention_levels)

        self.time_embed = TimestepEmbedding(mc, emb)
        self.semantic = SemanticEncoder(num_classes, sem, self.image_down, levels)
        self.input_conv = nn.Conv3d(in_channels, mc, 3, padding=1)

        # encoder: per level, res-blocks (+ attention), then a down-sampling except at the deepest level
        self.down_blocks = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        skip_channels, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(EncoderResBlock(ch, mc * mult, emb, cfg.dropout))
                ch = mc * mult
                attns.append(AttentionBlock(ch, cfg.num_heads) if level in attn else nn.Identity())
                skip_channels.append(ch)
            self.down_blocks.append(blocks)
            self.down_attn.append(attns)
            if level < levels - 1:
                self.downsamples.append(Downsample(ch))
                skip_channels.append(ch)

        self.mid_block1 = DecoderResBlock(ch, ch, emb, sem, cfg.dropout)
        self.mid_attn = AttentionBlock(ch, cfg.num_heads)
        self.mid_block2 = DecoderResBlock(ch, ch, emb, sem, cfg.dropout)

        # decoder: per level (deepest first), num_res_blocks + 1 SPADE res-blocks eating the skips
        self.up_blocks = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(DecoderResBlock(ch + skip_channels.pop(), mc * mult, emb, sem, cfg.dropout))
                ch = mc * mult
                attns.append(AttentionBlock(ch, cfg.num_heads) if level in attn else nn.Identity())
            self.up_blocks.append(blocks)
            self.up_attn.append(attns)
            if level > 0:
                self.upsamples.append(Upsample(ch))

        self.out = nn.Sequential(
            nn.GroupNorm(norm_groups(ch), ch), nn.SiLU(), zero_module(nn.Conv3d(ch, in_channels, 3, padding=1))
        )

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
    ) -> torch.Tensor:
        """``x`` (B, in_channels, d, h, w), ``t`` (B,) long or float, ``labels_onehot`` (B, C, D, H, W)
        or ``None`` (null condition for all samples), ``drop`` (B,) bool: use the null condition for
        these samples. Returns (B, in_channels, d, h, w)."""
        b = x.shape[0]
        t = t.expand(b) if t.ndim == 0 else t
        emb = self.time_embed(t.to(x.device))
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

        h = self._run(self.mid_block1, h, emb, seg[-1])
        h = self._run(self.mid_attn, h)
        h = self._run(self.mid_block2, h, emb, seg[-1])

        levels = len(self.up_blocks)
        for i, (blocks, attns) in enumerate(zip(self.up_blocks, self.up_attn)):
            level = levels - 1 - i
            for block, attn in zip(blocks, attns):
                h = self._run(attn, self._run(block, torch.cat([h, hs.pop()], dim=1), emb, seg[level]))
            if level > 0:
                h = self.upsamples[i](h, tuple(hs[-1].shape[2:]))
        return self.out(h)
