"""Image-quality metrics: paired SSIM/PSNR/RMSE/LPIPS, the Fréchet distance, inter-slice consistency.

Volumes are (B, 1, D, H, W) tensors (or sequences of (1, D, H, W) / (D, H, W) tensors or arrays) with
intensities in the data layer's normalised range [-1, 1], so the data range is 2. Planes name the slice
axis: ``axial`` = slices along D, ``coronal`` = along H, ``sagittal`` = along W.

The Fréchet distance is computed here and nowhere else. MONAI's ``monai.metrics.fid`` was checked
(MONAI 1.6.1): ``get_fid_score`` takes the means before ``_cov`` centres its input, and ``_cov`` centres
out of place (``x = x - mean``), so it does not have the in-place-centring bug; but its ``_sqrtm`` calls
``scipy.linalg.sqrtm`` and scipy is not a dependency. So the matrix square root is written here with
``torch.linalg.eigh`` in float64: tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)), where both
square roots are of symmetric positive semi-definite matrices (negative round-off eigenvalues -> 0).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import PSNRMetric, RMSEMetric, SSIMMetric

from medlsdm.autoencoder.perceptual import PerceptualLoss, perceptual_network
from medlsdm.errors import UserError

DATA_RANGE = 2.0  # intensities live in [-1, 1]
PLANES = {"axial": 2, "coronal": 3, "sagittal": 4}  # plane -> the slice axis of a (B, C, D, H, W) tensor
Volumes = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]


def as_batch(volumes: Volumes) -> torch.Tensor:
    """(B, 1, D, H, W) float32 from a tensor/array of that shape, of (B, D, H, W) or of (D, H, W), or from
    a sequence of (1, D, H, W) / (D, H, W) volumes of one shape."""
    if isinstance(volumes, (torch.Tensor, np.ndarray)):
        x = torch.as_tensor(volumes)
        x = x[None, None] if x.dim() == 3 else (x.unsqueeze(1) if x.dim() == 4 else x)
    else:
        x = torch.stack([torch.as_tensor(v).reshape(1, *torch.as_tensor(v).shape[-3:]) for v in volumes])
    if x.dim() != 5 or x.shape[1] != 1:
        raise ValueError(f"expected volumes (B, 1, D, H, W), got shape {tuple(x.shape)}")
    return x.float()


def shape_batches(volumes: Volumes, batch_size: int) -> list[torch.Tensor]:
    """(b, 1, D, H, W) batches of at most ``batch_size`` consecutive volumes of one shape, in order (evaluation
    keeps volumes whole, so a set may hold several shapes)."""
    items = list(volumes) if not isinstance(volumes, torch.Tensor) else volumes
    groups: list[list] = []
    for v in items:
        if groups and len(groups[-1]) < batch_size and tuple(v.shape[-3:]) == tuple(groups[-1][0].shape[-3:]):
            groups[-1].append(v)
        else:
            groups.append([v])
    return [as_batch(g) for g in groups]


def slices_of(volumes: torch.Tensor, plane: str) -> torch.Tensor:
    """(B, 1, D, H, W) -> (B * S, 1, h, w): every slice of ``plane`` (S = D, H or W)."""
    if plane not in PLANES:
        raise UserError(f"config: plane must be one of {sorted(PLANES)}, got {plane!r}")
    x = volumes.movedim(PLANES[plane], 1)  # (B, S, 1, h, w)
    return x.reshape(-1, 1, *x.shape[-2:])


def _ssim_window(x: torch.Tensor) -> int:
    """MONAI's SSIM needs every spatial side >= the window: 11, or the largest odd size that fits."""
    side = min(x.shape[2:])
    return min(11, side if side % 2 else side - 1)


def ssim(a: Volumes, b: Volumes, data_range: float = DATA_RANGE) -> float:
    """Mean 3D SSIM over the batch (MONAI, Gaussian window 11 or smaller for tiny volumes; data range 2 for
    the [-1, 1] scale, 1 for a display window scaled to [0, 1])."""
    a, b = as_batch(a), as_batch(b)
    metric = SSIMMetric(spatial_dims=3, data_range=data_range, win_size=_ssim_window(a))
    return float(metric(a, b).mean())


def psnr(a: Volumes, b: Volumes, data_range: float = DATA_RANGE) -> float:
    """Mean PSNR in dB over the batch with peak value ``data_range`` (2: the [-1, 1] range); identical
    volumes give inf."""
    return float(PSNRMetric(max_val=data_range)(as_batch(a), as_batch(b)).mean())


def rmse(a: Volumes, b: Volumes) -> float:
    """Mean over the batch of the per-volume RMSE, in normalised units (range [-1, 1], so at most 2)."""
    return float(RMSEMetric()(as_batch(a), as_batch(b)).mean())


RANDOM_NETWORK_SEED = 0


@lru_cache(maxsize=2)
def _perceptual(backbone: str, weights: str | None, lpips_weights: str | None) -> tuple[PerceptualLoss, str]:
    # a random network is the same one in every run, whatever ran before
    module, description = perceptual_network(backbone, weights, lpips_weights, n_slices=1, seed=RANDOM_NETWORK_SEED)
    if module is None:
        raise UserError(f"config: LPIPS needs a perceptual backbone ('vgg16' or 'random-vgg16'), got {backbone!r}")
    return module, description


def lpips(
    a: Volumes,
    b: Volumes,
    backbone: str = "random-vgg16",
    planes: Sequence[str] = ("axial", "coronal", "sagittal"),
    chunk: int = 16,
    *,
    weights: str | None = None,
    lpips_weights: str | None = None,
) -> tuple[float, str]:
    """LPIPS-style distance between paired volumes on every 2D slice of each plane -> (mean, backbone).

    a, b: (B, 1, D, H, W) in [-1, 1]. The network is ``medlsdm.autoencoder.perceptual``'s (VGG16 taps,
    channel-unit-normalised features, LPIPS linear weights when given), built by its ``perceptual_network``:
    ``backbone`` "vgg16" (torchvision's file ``weights``, by default from the torch hub cache) or "random-vgg16"
    (NOT pretrained); ``lpips_weights`` LPIPS's linear-layer file. The description returned names the network,
    its weights files and whether it is pretrained.
    Slices with a side under 32 pixels are bilinearly enlarged so that VGG's four poolings fit.
    The result is the mean over planes of the mean over that plane's slices.
    """
    module, description = _perceptual(backbone, None if weights is None else str(weights),
                                       None if lpips_weights is None else str(lpips_weights))
    a, b = as_batch(a), as_batch(b)
    module.to(a.device)
    if a.shape != b.shape:
        raise ValueError(f"lpips: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    per_plane = []
    for plane in planes:
        sa, sb = slices_of(a, plane), slices_of(b, plane)
        h, w = sa.shape[-2:]
        if min(h, w) < 32:
            size = (32 * h // min(h, w), 32 * w // min(h, w))
            sa, sb = (F.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in (sa, sb))
        total = 0.0
        with torch.no_grad():
            for i in range(0, len(sa), chunk):
                xa, xb = sa[i : i + chunk].unsqueeze(2), sb[i : i + chunk].unsqueeze(2)  # (n, 1, 1, h, w)
                total += float(module(xa, xb)) * len(xa)
        per_plane.append(total / len(sa))
    return float(np.mean(per_plane)), description


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64 (see the module docstring).

    mu: (F,), sigma: (F, F) symmetric PSD (tensors or arrays). Round-off below zero is returned as 0.
    """
    mu1, mu2, s1, s2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    evals, evecs = torch.linalg.eigh((s1 + s1.T) / 2)
    s1_half = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    middle = s1_half @ s2 @ s1_half
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    value = diff.dot(diff) + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean
    return max(float(value), 0.0)


def frechet_from_features(f1, f2) -> float:
    """Fréchet distance between Gaussians fitted to features f1 (N, F) and f2 (M, F), N, M >= 2."""
    f1, f2 = (torch.as_tensor(f, dtype=torch.float64) for f in (f1, f2))
    if f1.dim() != 2 or f2.dim() != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"features must be (N, F) and (M, F), got {tuple(f1.shape)} and {tuple(f2.shape)}")
    if min(len(f1), len(f2)) < 2:
        raise UserError(f"FID: needs at least 2 samples per set, got {len(f1)} and {len(f2)}")
    return frechet_distance(f1.mean(0), torch.cov(f1.T).reshape(f1.shape[1], -1),
                            f2.mean(0), torch.cov(f2.T).reshape(f2.shape[1], -1))


def adjacent_slice_changes(volumes: Volumes, eps: float = 1e-6) -> torch.Tensor:
    """(B, 1, D, H, W) -> (B, D - 1): mean |x[d+1] - x[d]| of each adjacent slice pair, divided by the
    volume's intensity standard deviation (so a global contrast change does not count). A sequence of volumes
    of several shapes gives (B, max D - 1), NaN past each volume's own last pair."""
    if not isinstance(volumes, (torch.Tensor, np.ndarray)) and len({tuple(v.shape[-3:]) for v in volumes}) > 1:
        rows = [adjacent_slice_changes([v], eps)[0] for v in volumes]
        out = torch.full((len(rows), max(len(r) for r in rows)), float("nan"), dtype=torch.float64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out
    x = as_batch(volumes).double()[:, 0]
    if x.shape[1] < 2:
        raise UserError(f"inter-slice consistency: volumes need at least 2 slices, got D={x.shape[1]}")
    std = x.flatten(1).std(dim=1).clamp_min(eps)
    return (x[:, 1:] - x[:, :-1]).abs().mean(dim=(2, 3)) / std[:, None]


def wasserstein_1d(u: torch.Tensor, v: torch.Tensor) -> float:
    """1D Wasserstein-1 distance between two empirical distributions: integral of |F_u - F_v|."""
    u, v = u.flatten().double().sort().values, v.flatten().double().sort().values
    grid = torch.cat([u, v]).sort().values
    cdf_u = torch.searchsorted(u, grid[:-1], right=True).double() / len(u)
    cdf_v = torch.searchsorted(v, grid[:-1], right=True).double() / len(v)
    return float(((cdf_u - cdf_v).abs() * grid.diff()).sum())


def inter_slice_consistency(real_volumes: Volumes, synthetic_volumes: Volumes) -> dict[str, float]:
    """How adjacent slices change along depth, real vs synthetic.

    For every volume, each adjacent slice pair (d, d+1) gives mean |x[d+1] - x[d]| / std(volume). The
    values of all pairs of all volumes are pooled per set; the result holds the 1D Wasserstein distance
    between the two pools (``wasserstein``, lower = synthetic slices change like real ones; a generator
    of independent 2D slices scores clearly higher) and each pool's mean (``real_mean``,
    ``synthetic_mean``; a synthetic mean well above the real one means jumpy slices).
    """
    real, synth = adjacent_slice_changes(real_volumes), adjacent_slice_changes(synthetic_volumes)
    real, synth = real[~real.isnan()], synth[~synth.isnan()]  # volumes of several depths
    return {
        "wasserstein": wasserstein_1d(real, synth),
        "real_mean": float(real.mean()),
        "synthetic_mean": float(synth.mean()),
    }


def seam_ratio(volume: torch.Tensor, borders: Sequence[int], period: int = 1) -> float:
    """Seam metric of a volume generated in depth windows: mean |x[b] - x[b - 1]| over the window
    ``borders`` b (slice indices, e.g. ``DepthWindows.borders(scale)``) divided by the mean adjacent-slice
    difference everywhere else; ~1 means no visible seam (target <= 1.1), > 1 a discontinuity.

    ``volume``: (D, H, W) (or (1, D, H, W)). ``period`` > 1 compares only with the pairs at the same phase
    as the borders (``d % period == borders[0] % period``), e.g. the VQ-GAN's depth factor, since every
    window border falls between two latent slices.
    """
    x = torch.as_tensor(volume).double().reshape(-1, *torch.as_tensor(volume).shape[-2:])
    diffs = (x[1:] - x[:-1]).abs().mean(dim=(1, 2))  # diffs[d - 1] = |x[d] - x[d - 1]|
    at = sorted({int(b) for b in borders})
    if not at or at[0] < 1 or at[-1] >= x.shape[0]:
        raise ValueError(f"borders must be slice indices in [1, {x.shape[0] - 1}], got {list(borders)}")
    inside = torch.ones(len(diffs), dtype=torch.bool)
    inside[[b - 1 for b in at]] = False
    if period > 1:
        phase = torch.arange(1, x.shape[0]) % period == at[0] % period
        inside &= phase
    if not bool(inside.any()):
        raise ValueError("no adjacent-slice pairs inside the windows to compare the borders with")
    return float(diffs[[b - 1 for b in at]].mean() / diffs[inside].mean().clamp_min(1e-12))


def class_medians(volume: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Median intensity of each class of ``label`` (D, H, W) in ``volume`` (D, H, W); NaN where absent."""
    v, lab = volume.flatten().float(), label.flatten().long()
    return torch.stack([v[lab == c].median() if bool((lab == c).any()) else v.new_tensor(float("nan"))
                        for c in range(num_classes)])


def class_median_errors(synthetic: torch.Tensor, real: torch.Tensor, label: torch.Tensor, num_classes: int,
                        region: torch.Tensor | None = None, min_voxels: int = 20) -> torch.Tensor:
    """(C,) |median_syn - median_real| of each class of ``label`` (in the volumes' units), NaN for a class
    absent (or, within ``region``, with fewer than ``min_voxels`` voxels there)."""
    if region is not None:
        label = torch.where(region.reshape(label.shape).bool(), label.long(), torch.full_like(label.long(), -1))
    counts = torch.bincount(label.flatten().long().clamp_min(-1) + 1, minlength=num_classes + 1)[1:]
    ms, mr = class_medians(synthetic, label, num_classes), class_medians(real, label, num_classes)
    err = (ms - mr).abs()
    err[counts < (min_voxels if region is not None else 1)] = float("nan")
    return err


def class_intensity_error(synthetic: torch.Tensor, real: torch.Tensor, label: torch.Tensor,
                          num_classes: int, region: torch.Tensor | None = None, min_voxels: int = 20) -> float:
    """Label-following score: mean over the classes present of |median_syn - median_real| divided by the
    spread (std) of the real class medians, i.e. 0 = every class has its real intensity, ~1 = errors as
    large as the differences between classes. Medians are taken inside ``label``'s masks in both volumes.

    ``region`` (bool, (D, H, W)): take the medians only inside ``label``'s masks within it (classes with fewer
    than ``min_voxels`` voxels there are skipped); the spread stays that of the whole label map, so scores
    with and without a region share one unit. NaN when no class is left."""
    return _in_spread_units(class_median_errors(synthetic, real, label, num_classes, region, min_voxels),
                            real, label, num_classes)


def _in_spread_units(err: torch.Tensor, real: torch.Tensor, label: torch.Tensor, num_classes: int) -> float:
    """Mean of the (C,) class errors present, divided by the std of ``real``'s class medians; NaN if none."""
    spread_medians = class_medians(real, label, num_classes)
    spread = spread_medians[~torch.isnan(spread_medians)].std().clamp_min(1e-6)
    present = ~torch.isnan(err)
    return float((err[present] / spread).mean()) if bool(present.any()) else float("nan")


def label_following(synthetic: Sequence[torch.Tensor], real: Sequence[torch.Tensor], labels: Sequence[torch.Tensor],
                    num_classes: int) -> dict[str, float]:
    """Does each synthetic volume follow *its* label map? ``synthetic[i]`` was generated from ``labels[i]``,
    ``real[i]`` is the real volume of that label map; all (D, H, W).

    For each case i and the next case j, only the voxels where the two label maps *disagree* are scored
    (elsewhere any volume of the right anatomy would match): ``matched`` is the class error of synthetic i
    against real i there, ``mismatched`` that of synthetic j (made for the other label map) against real i
    there. A model that ignores its label map scores the same on both; one that follows it is far better
    on ``matched``. ``overall`` is the plain class error of synthetic i against real i on all voxels.

    ``per_class``: ``{"matched": [C], "mismatched": [C]}``, each class's |median difference| in the volumes'
    own units (pass HU volumes to read HU) where the maps disagree, averaged over the cases where that class
    has >= 20 voxels there (NaN if none): small classes are not averaged away into the mean."""
    n = len(synthetic)
    if n < 2:
        raise ValueError("label_following needs at least two cases")
    overall, matched, mismatched = [], [], []
    per_class: dict[str, list[torch.Tensor]] = {"matched": [], "mismatched": []}
    for i in range(n):
        j = (i + 1) % n
        region = labels[i] != labels[j]
        overall.append(class_intensity_error(synthetic[i], real[i], labels[i], num_classes))
        for key, source, scores in (("matched", synthetic[i], matched), ("mismatched", synthetic[j], mismatched)):
            err = class_median_errors(source, real[i], labels[i], num_classes, region)
            per_class[key].append(err)
            scores.append(_in_spread_units(err, real[i], labels[i], num_classes))

    def mean(values: list[float]) -> float:
        kept = [v for v in values if v == v]
        return sum(kept) / len(kept) if kept else float("nan")

    return {"overall": mean(overall), "matched": mean(matched), "mismatched": mean(mismatched),
            "per_class": {k: torch.stack(v).nanmean(0).tolist() for k, v in per_class.items()}}
