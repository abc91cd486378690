"""Cross-slice attention over every latent slice (``ldm.keep_depth``) with relative depth positions
(``ldm.depth_positions``): shapes, order awareness, offset-only positions, exact SPADE cache, config checks."""

from __future__ import annotations

import pytest
import torch
from test_diffusion_unet import DOWN, random_labels, randomise_, small_cfg

from medlsdm.config import LDMConfig, load_config
from medlsdm.diffusion import SemanticUNet
from medlsdm.diffusion.blocks import CrossSliceAttention, RelativeDepthBias, level_shapes
from medlsdm.diffusion.unet import cached_condition
from medlsdm.errors import UserError


def test_keep_depth_halves_in_plane_only():
    assert level_shapes((8, 64, 64), 4, keep_depth=True) == [(8, 64, 64), (8, 32, 32), (8, 16, 16), (8, 8, 8)]
    assert level_shapes((8, 64, 64), 4) == [(8, 64, 64), (4, 32, 32), (2, 16, 16), (1, 8, 8)]


@pytest.mark.parametrize("keep_depth", [False, True])
def test_cross_slice_attention_sees_every_latent_slice_only_with_keep_depth(keep_depth):
    torch.manual_seed(0)
    unet = SemanticUNet.from_config(small_cfg(keep_depth=keep_depth, depth_positions="relative"), 8, 6, DOWN)
    seen = []
    for m in unet.modules():
        if isinstance(m, CrossSliceAttention):
            m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[2]))
    x = torch.randn(1, 8, 4, 16, 16)
    with torch.no_grad():
        out = unet(x, torch.tensor([3]), random_labels(1, (4, 16, 16)))
    assert out.shape == x.shape
    assert seen and set(seen) == ({4} if keep_depth else {2})  # level 1 and the middle


def test_relative_bias_depends_on_offset_only_and_makes_attention_order_aware():
    torch.manual_seed(0)
    bias = RelativeDepthBias(num_heads=2, max_distance=3)
    assert bias(5).abs().max() == 0  # starts at zero: as without positions
    with torch.no_grad():
        bias.bias.weight.normal_()
    b = bias(6)
    assert b.shape == (2, 6, 6)
    for i in range(5):
        for j in range(5):
            torch.testing.assert_close(b[:, i + 1, j + 1], b[:, i, j])  # same offset, same bias: any window
    torch.testing.assert_close(b[:, 0, 5], b[:, 0, 4])  # clipped beyond max_distance
    assert not torch.allclose(b[:, 0, 1], b[:, 1, 0])  # before and after differ

    # order-blind attention is permutation-equivariant along depth; with positions it is not
    x = torch.randn(1, 8, 5, 2, 2)
    perm = torch.tensor([4, 2, 0, 3, 1])
    for positions, equivariant in (("none", True), ("relative", False)):
        attn = CrossSliceAttention(8, 2, positions)
        randomise_(attn)
        with torch.no_grad():
            a, b_ = attn(x)[:, :, perm], attn(x[:, :, perm])
        assert torch.allclose(a, b_, atol=1e-5) == equivariant


def test_spade_cache_exact_with_keep_depth():
    torch.manual_seed(0)
    unet = SemanticUNet.from_config(small_cfg(keep_depth=True, depth_positions="relative"), 8, 6, DOWN).eval()
    randomise_(unet, 0.05)
    x, lab = torch.randn(2, 8, 4, 8, 8), random_labels(2, (4, 8, 8))
    t = torch.tensor([5, 50])
    with torch.no_grad():
        torch.testing.assert_close(cached_condition(unet)(x, t, lab), unet(x, t, lab))


def test_depth_positions_typo_stops_at_load(tmp_path):
    with pytest.raises(UserError, match="depth_positions"):
        LDMConfig(depth_positions="relatve")
    cfg = load_config("tiny", {"ldm": {"keep_depth": True, "depth_positions": "relative"}})
    assert cfg.ldm.keep_depth and cfg.ldm.depth_positions == "relative"
