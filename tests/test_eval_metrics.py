"""Paired metrics, the Fréchet distance and inter-slice consistency on small known inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medlsdm.errors import UserError
from medlsdm.evaluation.metrics import (
    adjacent_slice_changes,
    class_intensity_error,
    frechet_distance,
    frechet_from_features,
    inter_slice_consistency,
    lpips,
    psnr,
    rmse,
    shape_batches,
    slices_of,
    ssim,
    wasserstein_1d,
)


def _random_spd(n: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(n, dtype=torch.float64)


def test_frechet_matches_closed_form_for_commuting_covariances():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))  # shared eigenvectors
    ev1 = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    ev2 = torch.tensor([2.0, 0.1, 1.0, 5.0, 0.3], dtype=torch.float64)
    s1, s2 = q @ torch.diag(ev1) @ q.T, q @ torch.diag(ev2) @ q.T
    mu1, mu2 = (torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(2))
    expected = float(((mu1 - mu2) ** 2).sum() + (ev1 + ev2 - 2 * (ev1 * ev2).sqrt()).sum())
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # diagonal case, and numpy inputs
    d1, d2 = np.diag([1.0, 4.0]), np.diag([9.0, 1.0])
    assert frechet_distance(np.zeros(2), d1, np.array([3.0, 0.0]), d2) == pytest.approx(9 + (1 + 9 - 6) + (4 + 1 - 4))


def test_frechet_matches_eigenvalues_of_product_for_general_covariances():
    gen = torch.Generator().manual_seed(1)
    s1, s2 = _random_spd(6, gen), _random_spd(6, gen)
    mu1, mu2 = (torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(2))
    # tr((S1 S2)^(1/2)) = sum of square roots of the (real, positive) eigenvalues of S1 S2
    tr_sqrt = np.sqrt(np.linalg.eigvals((s1 @ s2).numpy()).real).sum()
    expected = float(((mu1 - mu2) ** 2).sum()) + float(torch.trace(s1) + torch.trace(s2)) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_from_features_self_zero_monotone_in_noise_and_mean_shift():
    gen = torch.Generator().manual_seed(2)
    f = torch.randn(400, 8, generator=gen) @ torch.randn(8, 8, generator=gen) + 3.0
    assert frechet_from_features(f, f) < 1e-8
    noise = torch.randn(400, 8, generator=gen)
    values = [frechet_from_features(f, f + s * noise) for s in (0.1, 0.3, 1.0, 3.0)]
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[0] > 0
    # a pure shift changes only the mean term: means must be taken before any centring
    assert frechet_from_features(f, f + 0.5) == pytest.approx(8 * 0.25, rel=1e-6)


def test_frechet_from_features_needs_two_samples():
    with pytest.raises(UserError, match="at least 2"):
        frechet_from_features(torch.randn(1, 4), torch.randn(5, 4))


def test_ssim_psnr_rmse_on_known_inputs():
    gen = torch.Generator().manual_seed(3)
    a = torch.rand(2, 1, 12, 12, 12, generator=gen) * 1.6 - 0.8
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-5)
    assert rmse(a, a) == 0.0
    assert math.isinf(psnr(a, a))
    b = a + 0.1  # constant offset: RMSE 0.1, PSNR 20 log10(2 / 0.1) with the [-1, 1] data range
    assert rmse(a, b) == pytest.approx(0.1, rel=1e-5)
    assert psnr(a, b) == pytest.approx(20 * math.log10(2 / 0.1), rel=1e-5)
    assert ssim(a, b) < 0.99
    # constant volumes: SSIM is only the luminance term (2 m1 m2 + C1) / (m1^2 + m2^2 + C1), C1 = (0.01 * 2)^2
    c1 = (0.01 * 2) ** 2
    const_a, const_b = torch.full((1, 1, 8, 12, 12), 0.5), torch.full((1, 1, 8, 12, 12), 0.3)  # D=8 < window 11
    assert ssim(const_a, const_b) == pytest.approx((2 * 0.15 + c1) / (0.25 + 0.09 + c1), rel=1e-4)
    # sequences of (1, D, H, W) volumes are accepted as a batch
    assert rmse(list(a), list(b)) == pytest.approx(0.1, rel=1e-5)


def test_slices_of_planes():
    x = torch.arange(2 * 3 * 4 * 5).float().reshape(2, 1, 3, 4, 5)
    assert slices_of(x, "axial").shape == (6, 1, 4, 5)
    assert slices_of(x, "coronal").shape == (8, 1, 3, 5)
    sag = slices_of(x, "sagittal")
    assert sag.shape == (10, 1, 3, 4)
    assert torch.equal(sag[1, 0], x[0, 0, :, :, 1])
    with pytest.raises(UserError):
        slices_of(x, "oblique")


def test_lpips_zero_for_identical_and_growing_with_difference():
    gen = torch.Generator().manual_seed(4)
    a = torch.rand(1, 1, 8, 8, 8, generator=gen) * 2 - 1
    same, backbone = lpips(a, a.clone())
    assert same == 0.0
    assert "NOT pretrained" in backbone
    small, _ = lpips(a, a + 0.05 * torch.randn(a.shape, generator=gen))
    large, _ = lpips(a, -a)
    assert 0 < small < large
    with pytest.raises(UserError):
        lpips(a, a, "none")


def test_random_lpips_network_is_the_same_in_every_run():
    """A 'random-vgg16' LPIPS figure may depend on nothing run before it (the Dice protocol trains first)."""
    from medlsdm.evaluation import metrics

    gen = torch.Generator().manual_seed(4)
    a = torch.rand(1, 1, 8, 8, 8, generator=gen) * 2 - 1
    b = a + 0.1 * torch.randn(a.shape, generator=gen)
    metrics._perceptual.cache_clear()
    torch.manual_seed(123)
    first, name = lpips(a, b)
    metrics._perceptual.cache_clear()
    torch.manual_seed(7)
    second, _ = lpips(a, b)
    assert first == second and "seed 0" in name


def _smooth_volumes(n: int, seed: int, shape=(16, 16, 16)) -> torch.Tensor:
    """Volumes coherent in 3D: low-pass filtered noise, scaled into [-1, 1]. (n, 1, D, H, W)"""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, *shape, generator=gen)
    for _ in range(3):
        x = F.avg_pool3d(x, 5, stride=1, padding=2, count_include_pad=False)
    return x / x.abs().amax(dim=(1, 2, 3, 4), keepdim=True)


def test_inter_slice_consistency_separates_coherent_from_slice_independent_volumes():
    real, synth = _smooth_volumes(4, seed=5), _smooth_volumes(4, seed=6)
    gen = torch.Generator().manual_seed(7)
    shuffled = synth[:, :, torch.randperm(synth.shape[2], generator=gen)]  # same slices, order lost
    offsets = 0.3 * torch.randn(4, 1, synth.shape[2], 1, 1, generator=gen)  # per-slice brightness, as 2D models do
    jumpy = (synth + offsets).clamp(-1, 1)

    good = inter_slice_consistency(real, synth)
    for bad in (inter_slice_consistency(real, shuffled), inter_slice_consistency(real, jumpy)):
        assert bad["wasserstein"] > 5 * good["wasserstein"], (good, bad)
        assert bad["synthetic_mean"] > 2 * bad["real_mean"]
    assert good["real_mean"] == pytest.approx(inter_slice_consistency(real, real)["real_mean"])
    assert inter_slice_consistency(real, real)["wasserstein"] == 0.0


def test_wasserstein_1d_known_values():
    assert wasserstein_1d(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == pytest.approx(2.0)
    assert wasserstein_1d(torch.tensor([0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(0.5)
    u = torch.randn(50, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    assert wasserstein_1d(u, u + 0.7) == pytest.approx(0.7, rel=1e-9)


def test_label_following_separates_a_label_following_model_from_one_that_ignores_labels():
    from medlsdm.data.phantom import generate_phantom
    from medlsdm.evaluation.metrics import label_following

    cases = [generate_phantom(s, (8, 32, 32)) for s in range(4)]
    real = [torch.from_numpy(im).clamp(-1000, 1000) / 1000 for im, _ in cases]
    labels = [torch.from_numpy(lb).long() for _, lb in cases]
    perfect = label_following(real, real, labels, 6)  # "synthetic" = the real volume of each label map
    assert perfect["matched"] == 0 and perfect["overall"] == 0
    # on all voxels another subject's volume scores almost as well (the anatomies overlap); where the
    # label maps disagree it is clearly worse: that is what makes the control discriminative
    whole = sum(class_intensity_error(real[(i + 1) % 4], real[i], labels[i], 6) for i in range(4)) / 4
    assert perfect["mismatched"] > 0.2 and perfect["mismatched"] > 3 * whole
    same = [real[0]] * 4  # one volume whatever the label map: no label following
    ignoring = label_following(same, real, labels, 6)
    assert ignoring["matched"] == pytest.approx(ignoring["mismatched"])
    # per class, in the volumes' units: zero for every class the perfect model scores, and the control's
    # errors show where the classes are told apart (e.g. the liver, 55-70 HU, where another map has body)
    pm, px = (torch.tensor(perfect["per_class"][k]) for k in ("matched", "mismatched"))
    assert len(pm) == 6 and bool((pm[~pm.isnan()] == 0).all()) and int((~pm.isnan()).sum()) >= 3
    assert float(px[2]) > 0.01  # liver: > 10 HU off in the other subject's volume
    with pytest.raises(ValueError):
        label_following(real[:1], real[:1], labels[:1], 6)


def test_volumes_of_several_shapes_batch_by_shape_and_pad_slice_changes_with_nan():
    """Evaluation keeps volumes whole: batches never stack two shapes, slice profiles end where each volume ends."""
    g = torch.Generator().manual_seed(0)
    vols = [torch.rand(1, d, 8, 8, generator=g) for d in (4, 4, 6, 4)]
    batches = shape_batches(vols, 4)
    assert [tuple(b.shape) for b in batches] == [(2, 1, 4, 8, 8), (1, 1, 6, 8, 8), (1, 1, 4, 8, 8)]
    assert all(torch.equal(x, v) for x, v in zip([x for b in batches for x in b], vols))  # in order, unchanged
    assert [tuple(b.shape) for b in shape_batches(vols[:2] + vols[3:], 2)] == [(2, 1, 4, 8, 8), (1, 1, 4, 8, 8)]
    ch = adjacent_slice_changes(vols)
    assert ch.shape == (4, 5)
    assert torch.isnan(ch[0, 3:]).all() and not torch.isnan(ch[2]).any()
    assert torch.allclose(ch[2], adjacent_slice_changes([vols[2]])[0])
    assert torch.allclose(ch[0, :3], adjacent_slice_changes([vols[0]])[0])
    res = inter_slice_consistency(vols, vols)
    assert res["wasserstein"] == pytest.approx(0.0) and math.isfinite(res["real_mean"])
