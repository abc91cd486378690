"""Semantic U-Net, its blocks and the semantic encoder (medlsdm.diffusion.{unet,blocks,semantic_encoder})."""

import pytest
import torch
import torch.nn.functional as F

from medlsdm.config import LDMConfig
from medlsdm.diffusion import SemanticEncoder, SemanticUNet
from medlsdm.diffusion.blocks import SPADE, CrossSliceAttention, SpatialAttention, level_shapes

DOWN = (4, 4, 4)


def small_cfg(**kw) -> LDMConfig:
    base = dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
                semantic_channels=8, num_timesteps=100)
    return LDMConfig(**{**base, **kw})


def onehot(index: torch.Tensor, num_classes: int = 6) -> torch.Tensor:
    """(B, D, H, W) class indices -> (B, C, D, H, W) float one-hot."""
    return F.one_hot(index, num_classes).permute(0, 4, 1, 2, 3).float()


def random_labels(b: int, latent: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return onehot(torch.randint(0, 6, (b, *(s * f for s, f in zip(latent, DOWN))), generator=g))


def randomise_(module: torch.nn.Module, std: float = 0.2) -> None:
    """Give every parameter random values (undoes the zero-initialised output projections)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("latent", [(4, 16, 16), (8, 16, 16), (2, 8, 12), (3, 5, 7), (8, 64, 64)])
def test_unet_output_shape_equals_input(latent):
    torch.manual_seed(0)
    unet = SemanticUNet.from_config(small_cfg(), in_channels=8, num_classes=6, image_down=DOWN)
    b = 1 if latent == (8, 64, 64) else 2
    x = torch.randn(b, 8, *latent)
    with torch.no_grad():
        out = unet(x, torch.randint(0, 100, (b,)), random_labels(b, latent))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_level_shapes_follow_halving_rule():
    assert level_shapes((4, 16, 16), 3) == [(4, 16, 16), (2, 8, 8), (1, 4, 4)]
    assert level_shapes((2, 8, 12), 4) == [(2, 8, 12), (1, 4, 6), (1, 2, 3), (1, 1, 3)]
    assert level_shapes((3, 5, 8), 2) == [(3, 5, 8), (3, 5, 4)]


def test_spade_formula_and_label_dependence():
    torch.manual_seed(0)
    spade = SPADE(channels=8, semantic_channels=4)
    x = torch.randn(2, 8, 2, 4, 4)
    seg_a, seg_b = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 4, 2, 4, 4)
    actv = spade.shared(seg_a)
    expected = F.group_norm(x, spade.norm.num_groups) * (1 + spade.gamma(actv)) + spade.beta(actv)
    torch.testing.assert_close(spade(x, seg_a), expected)
    assert not torch.allclose(spade(x, seg_a), spade(x, seg_b))
    # features at another resolution are resized to the feature map's resolution
    assert spade(x, torch.randn(2, 4, 1, 2, 2)).shape == x.shape


def test_unet_uses_label_map_and_null_condition():
    """With non-zero weights everywhere (as after training; the output convs start at zero) the output
    depends on the label map, the dropped (null) condition differs from a real one, and gradients reach
    the semantic encoder and SPADE convs."""
    torch.manual_seed(0)
    latent = (2, 8, 8)
    unet = SemanticUNet.from_config(small_cfg(), 8, 6, DOWN)
    randomise_(unet, std=0.1)
    x_t, t = torch.randn(2, 8, *latent), torch.tensor([10, 50])
    labels = random_labels(2, latent, seed=0)
    with torch.no_grad():
        out_a = unet(x_t, t, labels)
        out_b = unet(x_t, t, random_labels(2, latent, seed=1))
        out_null = unet(x_t, t, labels, drop=torch.tensor([True, True]))
        out_none = unet(x_t, t, None)
        out_mixed = unet(x_t, t, labels, drop=torch.tensor([True, False]))
    scale = out_a.abs().max()
    assert (out_a - out_b).abs().max() > 1e-2 * scale
    assert (out_a - out_null).abs().max() > 1e-2 * scale
    torch.testing.assert_close(out_null, out_none)  # labels=None is the null condition
    torch.testing.assert_close(out_mixed[0], out_null[0])  # drop is per sample
    torch.testing.assert_close(out_mixed[1], out_a[1])

    unet(x_t, t, labels, drop=torch.tensor([True, False])).square().mean().backward()
    spade = unet.up_blocks[0][0].in_norm
    for p in (unet.semantic.to_latent[0].weight, unet.semantic.null, spade.gamma.weight, spade.beta.weight):
        assert p.grad is not None and p.grad.abs().max() > 0


def test_semantic_encoder_keeps_thin_structures():
    """A one-voxel-thick structure at a voxel that nearest downsampling by 4 would skip (index 1)
    still changes the latent-resolution features."""
    torch.manual_seed(0)
    enc = SemanticEncoder(num_classes=3, channels=8, image_down=(2, 4, 4), levels=2)
    index = torch.zeros(1, 4, 16, 16, dtype=torch.long)
    thin = index.clone()
    thin[0, :, 5, :] = 2  # a plane one voxel thick in H, at h = 5 (not a multiple of 4)
    assert torch.equal(onehot(thin, 3)[..., ::2, ::4, ::4], onehot(index, 3)[..., ::2, ::4, ::4])
    with torch.no_grad():
        feats = enc(onehot(index, 3), 1, (2, 4, 4))
        feats_thin = enc(onehot(thin, 3), 1, (2, 4, 4))
    assert [tuple(f.shape) for f in feats] == [(1, 8, 2, 4, 4), (1, 8, 1, 2, 2)]
    assert (feats[0] - feats_thin[0]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="expected one-hot"):
        enc(onehot(index, 3), 1, (2, 8, 8))


def test_cross_slice_attention_mixes_along_depth_only():
    torch.manual_seed(0)
    attn = CrossSliceAttention(8, num_heads=2)
    randomise_(attn)
    x = torch.randn(1, 8, 4, 3, 3)
    x2 = x.clone()
    x2[:, :, 1, 0, 0] += torch.randn(8)  # perturb slice 1 at column (0, 0)
    with torch.no_grad():
        diff = (attn(x2) - attn(x)).abs().amax(dim=1)[0]  # (D, H, W)
    assert (diff[[0, 2, 3], 0, 0] > 1e-5).all()  # other slices of the same column change
    diff[:, 0, 0] = 0
    assert diff.max() == 0  # no other column is affected


def test_spatial_attention_mixes_within_slice_only():
    torch.manual_seed(0)
    attn = SpatialAttention(8, num_heads=2)
    randomise_(attn)
    x = torch.randn(1, 8, 3, 4, 4)
    x2 = x.clone()
    x2[:, :, 1, 2, 2] += torch.randn(8)  # perturb one position of slice 1
    with torch.no_grad():
        diff = (attn(x2) - attn(x)).abs().amax(dim=1)[0]
    assert (diff[1] > 1e-5).sum() == 16  # every position of slice 1 changes
    assert diff[[0, 2]].max() == 0  # other slices are untouched


def test_attention_blocks_start_as_identity():
    x = torch.randn(1, 8, 3, 4, 4)
    for attn in (CrossSliceAttention(8, 2), SpatialAttention(8, 2)):
        torch.testing.assert_close(attn(x), x)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    latent = (2, 8, 8)
    unet = SemanticUNet.from_config(small_cfg(), 8, 6, DOWN)
    randomise_(unet, std=0.05)
    x, t, labels = torch.randn(1, 8, *latent), torch.tensor([5]), random_labels(1, latent)
    grads = []
    for flag in (False, True):
        unet.use_checkpoint = flag
        unet.zero_grad()
        unet(x, t, labels).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1])
