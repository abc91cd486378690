"""Latent normalisation for the diffusion model: the paper's codebook min-max and per-channel standardisation."""

from __future__ import annotations

import pytest
import torch

from medlsdm.autoencoder.normalize import ChannelStats, LatentNormalizer
from medlsdm.errors import UserError


def test_codebook_minmax_maps_the_codebook_range_to_unit_interval() -> None:
    n = LatentNormalizer(-3.0, 1.0, "codebook")
    z = torch.tensor([-3.0, -1.0, 1.0]).view(1, 3, 1, 1, 1)
    assert torch.allclose(n.normalize(z).flatten(), torch.tensor([-1.0, 0.0, 1.0]))
    assert n.clip == 1.0


def test_standardize_uses_channel_statistics_and_inverts() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 3, 2, 4, 4, generator=g) * torch.tensor([0.2, 1.0, 3.0]).view(1, 3, 1, 1, 1) + torch.tensor(
        [0.5, -1.0, 2.0]).view(1, 3, 1, 1, 1)
    stats = ChannelStats()
    for part in z.split(2):  # streamed in batches
        stats.add(part)
    mean, std = stats.result()
    ref = z.movedim(1, 0).reshape(3, -1)
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), ref.mean(1).double(), atol=1e-5)
    assert torch.allclose(torch.tensor(std, dtype=torch.float64), ref.std(1, unbiased=False).double(), atol=1e-5)
    n = LatentNormalizer(-10.0, 10.0, "standardize", mean, std)
    x = n.normalize(z)
    assert torch.allclose(x.mean((0, 2, 3, 4)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std((0, 2, 3, 4), unbiased=False), torch.ones(3), atol=1e-4)
    assert torch.allclose(n.denormalize(x), z, atol=1e-5)
    # the clip bound is the codebook range seen in the normalised space (largest over channels)
    expected = max(max(abs(-10 - m), abs(10 - m)) / s for m, s in zip(mean, std))
    assert n.clip == pytest.approx(expected)


def test_bad_statistics_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="latent_norm"):
        LatentNormalizer(0.0, 1.0, "zscore")
    with pytest.raises(UserError, match="mean and std"):
        LatentNormalizer(0.0, 1.0, "standardize")
    with pytest.raises(UserError, match="empty"):
        LatentNormalizer(1.0, 1.0)
    path = tmp_path / "stats.json"
    LatentNormalizer(0.0, 2.0, "codebook", [0.5], [0.1]).save(path, note="x")
    assert LatentNormalizer.load(path, "standardize").normalize(torch.ones(1, 1, 1, 1, 1)).item() == pytest.approx(5.0)
