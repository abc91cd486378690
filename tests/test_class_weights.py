"""Rare-class loss weighting of the diffusion objective (``ldm.class_weight_power``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medlsdm.config import LDMConfig
from medlsdm.diffusion.model import LatentDiffusion, class_weights
from medlsdm.errors import UserError


def onehot(index: torch.Tensor, c: int = 3) -> torch.Tensor:
    return F.one_hot(index, c).permute(0, 4, 1, 2, 3).float()


def test_class_weights_favour_the_rare_class_with_mean_one():
    lab = torch.zeros(1, 8, 16, 16, dtype=torch.long)
    lab[:, :, 8:] = 1  # half the volume
    lab[:, 0:4, 0:4, 0:4] = 2  # one latent voxel's footprint: 64 of 2048 voxels
    oh = onehot(lab)
    assert torch.equal(class_weights(oh, (2, 4, 4), 0.0), torch.ones(1, 1, 2, 4, 4))
    w = class_weights(oh, (2, 4, 4), 0.5)
    assert w.shape == (1, 1, 2, 4, 4)
    assert w.mean().item() == pytest.approx(1.0, rel=1e-5)
    # shares 15/32 (class 0), 1/2 (class 1), 1/32 (class 2): the rare class's voxel weighs sqrt(16) = 4x a
    # class-1 voxel, and a class-0 voxel sqrt(16/15) x one of class 1
    w_rare, w_1, w_0 = w[0, 0, 0, 0, 0].item(), w[0, 0, 0, 3, 3].item(), w[0, 0, 1, 0, 0].item()
    assert w_rare / w_1 == pytest.approx(4.0, rel=1e-4)
    assert w_0 / w_1 == pytest.approx((16 / 15) ** 0.5, rel=1e-4)


class Echo(torch.nn.Module):
    """A 'U-Net' returning a fixed output, so the loss is a known function of the target."""

    in_channels, image_down = 2, (2, 2, 2)

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out = out
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, labels, drop=None):
        return self.out + 0 * self.p


def test_training_loss_is_the_weighted_mean_and_unweighted_at_power_zero():
    from medlsdm.diffusion.schedule import NoiseSchedule

    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    x0 = torch.rand(1, 2, 2, 4, 4) * 2 - 1
    lab = torch.zeros(1, 4, 8, 8, dtype=torch.long)
    lab[:, :2, :2, :2] = 2
    lab[:, 2:] = 1
    oh = onehot(lab)
    out = torch.randn(1, 2, 2, 4, 4)
    sched = NoiseSchedule(50, "cosine")
    plain = LatentDiffusion(Echo(out), sched, "x0", "l2", 0.0)
    weighted = LatentDiffusion(Echo(out), sched, "x0", "l2", 0.0, True, 0.5)
    err = (out - x0).square()
    assert plain.training_loss(x0, oh, g())[0].item() == pytest.approx(err.mean().item(), rel=1e-5)
    expect = (err * class_weights(oh, (2, 4, 4), 0.5)).mean().item()
    assert weighted.training_loss(x0, oh, g())[0].item() == pytest.approx(expect, rel=1e-5)
    assert abs(expect - err.mean().item()) > 1e-3  # the weighting changes the loss here
    assert weighted.view(Echo(out)).class_weight_power == 0.5  # EMA / DDP views keep it
    with pytest.raises(UserError, match="class_weight_power"):
        LatentDiffusion.from_config(LDMConfig(class_weight_power=-1.0, model_channels=8, channel_mult=(1,),
                                              attention_levels=(), num_heads=1, semantic_channels=4), 3, (2, 2, 2), 2)
