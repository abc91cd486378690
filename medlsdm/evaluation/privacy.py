"""Memorisation audit: is any synthetic volume a near copy of a training scan?

For every synthetic volume (generated from a held-out label map) the nearest training volume is found
in image space (normalised L2: each volume z-scored, then the RMS voxel difference, which equals
``sqrt(2 (1 - r))`` for Pearson correlation r) and, with an extractor, in feature space (cosine
distance). The reference is how close *real held-out* volumes come to the training set: a synthetic
volume nearer to a training scan than the 5th percentile of those real-to-training distances is
flagged. A generator that copies training scans gets flagged volumes; one that generalises does not.

Volumes are (1, D, H, W) tensors preprocessed as in evaluation (whole: shapes may differ, see ``image_distances``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from medlsdm.errors import UserError
from medlsdm.evaluation.metrics import shape_batches
from medlsdm.evaluation.pairing import VolumeSet

Named = VolumeSet | Mapping[str, Tensor]
PERCENTILE = 5.0
EXACT = 1e-3  # image-space distance below which two volumes are the same scan up to rounding


def _named(vols: Named, what: str) -> tuple[list[str], list[Tensor]]:
    ids, images = (vols.ids, vols.images) if isinstance(vols, VolumeSet) else (list(vols), list(vols.values()))
    if not ids:
        raise UserError(f"privacy audit: the {what} set is empty")
    return list(ids), [torch.as_tensor(v).float() for v in images]


def _zscore(v: Tensor) -> Tensor:
    v = v.flatten().double()
    return (v - v.mean()) / v.std().clamp_min(1e-8)


def _centre(v: Tensor, shape: Sequence[int]) -> Tensor:
    """The central ``shape`` (D, H, W) region of a (1, D, H, W) volume."""
    starts = [(n - m) // 2 for n, m in zip(v.shape[-3:], shape)]
    return v[..., starts[0]:starts[0] + shape[0], starts[1]:starts[1] + shape[1], starts[2]:starts[2] + shape[2]]


def image_distances(queries: Sequence[Tensor], train: Sequence[Tensor]) -> Tensor:
    """(Q, N) normalised-L2 distances: RMS difference of z-scored volumes (0 = same scan, sqrt(2) = unrelated).
    Two volumes of different shapes are compared on the central region they share (:func:`shared_region_note`)."""
    zt = [_zscore(t) for t in train]
    out = torch.empty(len(queries), len(train), dtype=torch.float64)
    for i, q in enumerate(queries):
        zq = _zscore(q)
        for j, t in enumerate(train):
            if q.shape == t.shape:
                out[i, j] = (zq - zt[j]).pow(2).mean().sqrt()
            else:
                common = [min(a, b) for a, b in zip(q.shape[-3:], t.shape[-3:])]
                out[i, j] = (_zscore(_centre(q, common)) - _zscore(_centre(t, common))).pow(2).mean().sqrt()
    return out


def shared_region_note(*sets: Sequence[Tensor]) -> str | None:
    """Why some image distances saw only part of a volume (None when every volume has one shape)."""
    shapes = sorted({tuple(v.shape[-3:]) for vols in sets for v in vols})
    if len(shapes) < 2:
        return None
    return (f"volumes of {len(shapes)} shapes ({', '.join('x'.join(map(str, s)) for s in shapes)}): image distances "
            "between two volumes of different shapes are computed on the central region they share; feature "
            "distances use whole volumes")


def feature_distances(queries: Tensor, train: Tensor) -> Tensor:
    """(Q, N) cosine distances 1 - cos between feature rows (Q, F) and (N, F)."""
    q = torch.nn.functional.normalize(queries.double().flatten(1), dim=1)
    t = torch.nn.functional.normalize(train.double().flatten(1), dim=1)
    return (1 - q @ t.T).clamp_min(0)


def _space(d_synth: Tensor, d_real: Tensor, synth_ids: list[str], real_ids: list[str], train_ids: list[str],
           metric: str) -> dict:
    """Nearest-training distances of the synthetic and held-out real volumes, the threshold and the flags."""
    ds, js = d_synth.min(dim=1)
    dr, jr = d_real.min(dim=1)
    threshold = float(np.percentile(dr.numpy(), PERCENTILE))
    flagged = [synth_ids[i] for i in range(len(ds)) if float(ds[i]) < threshold]
    rows = lambda ids, d, j: [dict(id=ids[i], nearest_train=train_ids[int(j[i])], distance=float(d[i]))  # noqa: E731
                              for i in range(len(ids))]
    return dict(
        metric=metric, threshold=threshold, threshold_rule=f"{PERCENTILE:g}th percentile of real held-out -> train",
        fraction_below=len(flagged) / len(ds), flagged=flagged,
        synthetic_median=float(ds.median()), heldout_median=float(dr.median()),
        synthetic=rows(synth_ids, ds, js), heldout=rows(real_ids, dr, jr),
    )


def _extract(extractor: Callable[[Tensor], Tensor], vols: list[Tensor], batch: int = 4) -> Tensor:
    with torch.no_grad():
        return torch.cat([extractor(b).flatten(1).cpu() for b in shape_batches(vols, batch)])


def privacy_audit(
    train_vols: Named, heldout_real_vols: Named, synthetic_vols: Named,
    extractor: Callable[[Tensor], Tensor] | None = None, extractor_name: str = "features",
    out_dir: Path | None = None, top_k: int = 3, spacing: Sequence[float] | None = None,
    window: tuple[float, float] = (-1.0, 1.0),
) -> dict:
    """Nearest-training-neighbour audit of synthetic volumes against real held-out ones.

    Args:
        train_vols / heldout_real_vols / synthetic_vols: a :class:`VolumeSet` or ``{id: (1, D, H, W)}``.
        extractor: optional ``(B, 1, D, H, W) -> (B, F)`` feature function; adds a feature-space audit.
        out_dir: where to save ``privacy_closest_pairs.png`` (the ``top_k`` closest synthetic/train pairs).
        window: grey window of that figure in normalised units (``medlsdm.data.display.display_window``).

    Returns a dict: ``image`` (and ``feature``) with the threshold, ``fraction_below`` (share of
    synthetic volumes nearer to a training scan than the 5th percentile of real held-out distances),
    ``flagged`` ids and every volume's nearest training scan; ``exact_copies`` (synthetic ids whose
    image distance is ~0); ``closest_pairs`` (ids, distance); ``figures``.
    """
    train_ids, train = _named(train_vols, "training")
    real_ids, real = _named(heldout_real_vols, "real held-out")
    synth_ids, synth = _named(synthetic_vols, "synthetic")
    d_synth, d_real = image_distances(synth, train), image_distances(real, train)
    out = dict(n_train=len(train), n_heldout=len(real), n_synthetic=len(synth),
               image=_space(d_synth, d_real, synth_ids, real_ids, train_ids, "normalised L2 (z-scored RMS)"))
    if extractor is not None:
        f_train, f_real, f_synth = (_extract(extractor, v) for v in (train, real, synth))
        out["feature"] = _space(feature_distances(f_synth, f_train), feature_distances(f_real, f_train),
                                synth_ids, real_ids, train_ids, f"cosine distance ({extractor_name})")
    nearest = sorted(out["image"]["synthetic"], key=lambda r: r["distance"])
    out["exact_copies"] = [r["id"] for r in nearest if r["distance"] < EXACT]
    out["closest_pairs"] = [dict(synthetic=r["id"], train=r["nearest_train"], distance=r["distance"])
                            for r in nearest[:top_k]]
    if (note := shared_region_note(train, real, synth)) is not None:
        out["note_shapes"] = note
    if len(real) < 20:
        out["note"] = (f"only {len(real)} real held-out volume(s): the {PERCENTILE:g}th-percentile threshold is "
                       "close to their minimum distance and is a rough reference")
    out["figures"] = []
    if out_dir is not None:
        out["figures"].append(str(save_closest_pairs(Path(out_dir) / "privacy_closest_pairs.png", out, train_ids,
                                                     train, synth_ids, synth, spacing, window)))
    return out


def save_closest_pairs(path: Path, audit: dict, train_ids: list[str], train: list[Tensor], synth_ids: list[str],
                       synth: list[Tensor], spacing: Sequence[float] | None = None,
                       window: tuple[float, float] = (-1.0, 1.0)) -> Path:
    """Three-plane views of each closest (training scan, synthetic volume) pair, side by side."""
    from medlsdm.viz import montage

    tr, sy = dict(zip(train_ids, train)), dict(zip(synth_ids, synth))
    threshold = audit["image"]["threshold"]
    rows = [(f"{p['synthetic']}\nvs train {p['train']}\nd={p['distance']:.3f}", tr[p["train"]], sy[p["synthetic"]])
            for p in audit["closest_pairs"]]
    title = f"nearest training scan (left) of the closest synthetic volumes (right); flag threshold d < {threshold:.3f}"
    path = montage(path, rows, spacing=spacing, title=title, vmin=window[0], vmax=window[1])
    return path
