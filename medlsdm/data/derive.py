"""New label maps from the ones in hand (``medlsdm derive-labels``): seeded random elastic + affine deformations.

Each derived map is its source label map warped by MONAI's ``Rand3DElastic`` (smooth displacement field plus a
small rotation and scaling, nearest-neighbour so class values stay values) and kept only if its anatomy stays
sane (:func:`check_topology`): every class of the source is still there, its volume within ``volume_range`` of
the source's and it does not split into more than ``extra_components`` further connected pieces. A draw that
fails is redrawn (from the same seeded stream), up to ``max_tries``. With ``mix_prob`` a map may first take
``mix_classes`` organs from another map of its folder and grid (:func:`mix_label_maps`); the warp then applies to that.

Arrays here are raw file arrays (X, Y, Z) with their affine: a derived map has its source's voxel grid.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medlsdm.errors import UserError

__all__ = ["DeformConfig", "derive_label_map", "check_topology", "count_components", "derive_folder",
           "mix_label_maps"]


@dataclass(frozen=True)
class DeformConfig:
    """How far a derived map may move from its source (voxel units; angles in degrees)."""

    sigma: tuple[float, float] = (6.0, 8.0)  # smoothness of the displacement field (Gaussian sigma, voxels)
    magnitude: tuple[float, float] = (40.0, 80.0)  # displacement magnitude before smoothing (MONAI's units)
    rotate_deg: float = 8.0  # +- in-plane (about the slice axis); a quarter of it about the other two
    scale: float = 0.08  # +- relative size change per axis
    volume_range: tuple[float, float] = (0.6, 1.6)  # each class's volume vs its source's
    extra_components: int = 1  # connected pieces a class may gain (6-connectivity)
    max_tries: int = 20
    mix_prob: float = 0.0  # probability that a derived map takes organs from another label map of the folder
    mix_classes: int = 1  # how many non-body classes a mixed map takes from its donor
    # the class that holds the others (a labelled body outline): never mixed, and pasted organs stay inside it;
    # None for label maps without one (organs on background): organs may then be pasted over background
    body_class: int | None = None

    def __post_init__(self) -> None:
        lo, hi = self.volume_range
        if not (0 < lo <= 1 <= hi) or self.extra_components < 0 or self.max_tries < 1:
            raise UserError(f"derive-labels: volume_range must straddle 1, got {self.volume_range}; "
                            "extra_components >= 0; max_tries >= 1")
        if self.rotate_deg < 0 or not 0 <= self.scale < 1 or min(self.sigma) <= 0 or min(self.magnitude) < 0:
            raise UserError("derive-labels: rotation >= 0, scale in [0, 1), sigma > 0 and magnitude >= 0")
        if not 0 <= self.mix_prob <= 1 or self.mix_classes < 1 or (self.body_class is not None
                                                                   and self.body_class < 1):
            raise UserError(f"derive-labels: mix_prob must be in [0, 1], got {self.mix_prob}; "
                            f"mix_classes >= 1, got {self.mix_classes}; body_class >= 1, got {self.body_class}")


def count_components(mask: torch.Tensor, max_iter: int = 10_000) -> int:
    """Connected components (6-connectivity) of a boolean (X, Y, Z) mask by label propagation with max-pooling
    (written here because MONAI's connected-component helpers need scipy / scikit-image / cuCIM, none of which
    medlsdm depends on)."""
    mask = mask.bool()
    if not bool(mask.any()):
        return 0
    lab = torch.where(mask, torch.arange(1, mask.numel() + 1, dtype=torch.float64).reshape(mask.shape), 0.0)
    for _ in range(max_iter):  # every voxel takes the largest id among itself and its 6 neighbours in the mask
        pad = F.pad(lab[None, None], (1, 1, 1, 1, 1, 1))[0, 0]
        x, y, z = lab.shape
        best = torch.stack([lab, pad[:-2, 1:-1, 1:-1], pad[2:, 1:-1, 1:-1], pad[1:-1, :-2, 1:-1],
                            pad[1:-1, 2:, 1:-1], pad[1:-1, 1:-1, :-2], pad[1:-1, 1:-1, 2:]]).amax(0)
        new = torch.where(mask, best, lab)
        if torch.equal(new, lab):
            break
        lab = new
    return int(torch.unique(lab[mask]).numel())


def check_topology(source: np.ndarray, derived: np.ndarray, cfg: DeformConfig) -> str | None:
    """None when ``derived`` keeps the source's anatomy (see module docstring), else why not (one line)."""
    for c in (int(v) for v in np.unique(source) if v != 0):
        a, b = int((source == c).sum()), int((derived == c).sum())
        if b == 0:
            return f"class {c} vanished"
        if not cfg.volume_range[0] <= b / a <= cfg.volume_range[1]:
            return f"class {c} volume x{b / a:.2f}"
        ca, cb = count_components(torch.from_numpy(source == c)), count_components(torch.from_numpy(derived == c))
        if cb > ca + cfg.extra_components:
            return f"class {c} split into {cb} pieces (source {ca})"
    return None


def _ring(mask: np.ndarray) -> np.ndarray:
    """The voxels outside ``mask`` with a 6-neighbour inside it."""
    p = np.pad(mask, 1)
    return (p[:-2, 1:-1, 1:-1] | p[2:, 1:-1, 1:-1] | p[1:-1, :-2, 1:-1] | p[1:-1, 2:, 1:-1] | p[1:-1, 1:-1, :-2]
            | p[1:-1, 1:-1, 2:]) & ~mask


def _surrounding(base: np.ndarray, mask: np.ndarray, listed: np.ndarray, foreground_first: bool = True) -> int:
    """The most frequent class of ``base`` among the 6-neighbours of ``mask`` that are not ``listed`` (with
    ``foreground_first``: background only when nothing else borders it)."""
    values, counts = np.unique(base[_ring(mask) & ~listed], return_counts=True)
    if foreground_first and (values != 0).any():
        values, counts = values[values != 0], counts[values != 0]
    return int(values[np.argmax(counts)]) if values.size else 0


def mix_label_maps(base: np.ndarray, donor: np.ndarray, classes: Sequence[int], fill: int | None = None,
                   body: int | None = None) -> np.ndarray:
    """``base`` with the structures of ``classes`` taken from ``donor`` (raw (X, Y, Z) int arrays, one shape).

    The listed classes' voxels in ``base`` first become ``fill`` (default: the most frequent non-listed class
    bordering them all, 6-neighbourhood: the tissue around the organ, also for a lesion inside it); then the
    donor's voxels of the listed classes are written where ``base`` holds that tissue or a listed class, never
    over a kept organ: with a ``body`` class (a labelled body outline) that tissue is the body (nothing goes into
    air, and the fill prefers foreground so no hole of air opens inside the body), without one (organs on
    background) it is background."""
    if base.shape != donor.shape:
        raise UserError(f"derive-labels: cannot mix label maps of shapes {base.shape} and {donor.shape}")
    listed = sorted({int(c) for c in classes})
    if 0 in listed or (fill is not None and fill in listed):
        raise UserError(f"derive-labels: mixed classes must be foreground and not the fill, got {listed}, {fill}")
    is_listed = np.isin(base, listed)
    out = base.copy()
    if is_listed.any():
        out[is_listed] = fill if fill is not None else _surrounding(base, is_listed, is_listed, body is not None)
    tissue = body if body is not None else 0
    paste = np.isin(donor, listed) & (is_listed | (base == tissue))
    out[paste] = donor[paste]
    return out


NESTED = 10  # a nested structure is at most 1/NESTED of the size of the class it lies in


def _container(arr: np.ndarray, d: int, body: int | None = None) -> int | None:
    """The class that class ``d`` of ``arr`` lies in, e.g. the liver around a lesion: its most frequent
    6-neighbour other than ``body``, when ``d`` never touches background and is at most 1/``NESTED`` of that
    class's size; None for a top-level structure (an organ in the body or on background)."""
    values, counts = np.unique(arr[_ring(arr == d)], return_counts=True)
    keep = values != (body if body is not None else -1)
    if not values.size or 0 in values or not keep.any():
        return None
    top = int(values[keep][np.argmax(counts[keep])])
    return top if NESTED * int((arr == d).sum()) <= int((arr == top).sum()) else None


def _with_contents(classes: list[int], *maps: np.ndarray, body: int | None = None) -> list[int]:
    """``classes`` plus every class lying inside one of them (:func:`_container`) in any of ``maps``, so that a
    nested structure (a lesion in the liver) moves with its organ."""
    out = set(classes)
    for arr in maps:
        for d in (int(v) for v in np.unique(arr) if v != 0 and v not in out):
            if _container(arr, d, body) in classes:
                out.add(d)
    return sorted(out)


def _check_mix(base: np.ndarray, donor: np.ndarray, mixed: np.ndarray, classes: list[int],
               cfg: DeformConfig) -> str | None:
    """:func:`check_topology` of a mixed map: the classes kept against ``base``, the mixed ones against ``donor``."""
    kept = [int(c) for c in np.unique(base) if c != 0 and c not in classes]
    for source, cs in ((base, kept), (donor, classes)):
        why = check_topology(np.where(np.isin(source, cs), source, 0), np.where(np.isin(mixed, cs), mixed, 0), cfg)
        if why is not None:
            return why
    return None


def _mix(base: np.ndarray, mates: list[Path], rng: np.random.Generator, cfg: DeformConfig,
         read: Callable[[Path], np.ndarray]) -> tuple[np.ndarray, str | None, list[int]]:
    """``base`` mixed with a donor from ``mates`` (same grid; tried in a seeded order, at most ``cfg.max_tries``)
    and the donor's name and classes, or ``base`` unchanged when no donor keeps the anatomy."""
    values, body = np.unique(base[base != 0]), cfg.body_class  # the body: never mixed
    for i in rng.permutation(len(mates))[: cfg.max_tries]:
        donor = read(mates[i])  # same shape: mates share the base's grid (_same_grid)
        shared = sorted(set(values.tolist()) & set(np.unique(donor).tolist()) - {0, body})
        # organs only: a nested structure (a lesion) is never drawn alone, it comes with its container
        top = [c for c in shared if _container(base, c, body) is None and _container(donor, c, body) is None]
        if not top:
            continue
        classes = sorted(int(c) for c in rng.choice(top, size=min(cfg.mix_classes, len(top)), replace=False))
        classes = _with_contents(classes, base, donor, body=body)  # a lesion moves with its liver
        if not set(classes) <= set(shared):
            continue
        mixed = mix_label_maps(base, donor, classes, body=body)
        if _check_mix(base, donor, mixed, classes, cfg) is None:
            return mixed, mates[i].name, classes
    return base, None, []


def _grid(path: Path) -> tuple | None:
    """A NIfTI file's voxel grid from its header: (shape, axis codes, voxel sizes) with trailing singleton dims
    dropped; None when unreadable."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(d) for d in img.shape)
        codes, zooms = nib.aff2axcodes(img.affine), tuple(float(z) for z in img.header.get_zooms()[:3])
    except Exception:  # read_volume says why when the file itself comes up
        return None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape, codes, zooms


def _same_grid(a: tuple | None, b: tuple | None, tol: float = 0.1) -> bool:
    """Two :func:`_grid` s a donor may be pasted across voxel by voxel: same shape and orientation, voxel sizes
    within ``tol`` (positions may differ: patients lie at different table positions)."""
    return (a is not None and b is not None and a[:2] == b[:2]
            and all(abs(x - y) <= tol * max(x, y) for x, y in zip(a[2], b[2])))


def _deform(label: np.ndarray, cfg: DeformConfig, rng: np.random.Generator) -> np.ndarray:
    from monai.transforms import Rand3DElastic

    rot = math.radians(cfg.rotate_deg)
    # full rotation in-plane (about the file's third, slice axis), a quarter of it out of plane: thick slices
    # would turn small tilts into steps
    warp = Rand3DElastic(sigma_range=cfg.sigma, magnitude_range=cfg.magnitude, prob=1.0,
                         rotate_range=(rot / 4, rot / 4, rot), scale_range=(cfg.scale,) * 3, mode="nearest",
                         padding_mode="border")  # a cropped field of view continues past its edge
    warp.set_random_state(seed=int(rng.integers(0, 2**31 - 1)))
    out = warp(torch.from_numpy(label.astype(np.float32))[None])
    return np.asarray(out[0]).round().astype(label.dtype)


def derive_label_map(label: np.ndarray, seed: int, cfg: DeformConfig = DeformConfig()) -> tuple[np.ndarray, int]:
    """A derived (X, Y, Z) label map of ``label`` and the number of draws it took; the same seed gives the same
    map. A UserError when no draw keeps the anatomy within ``cfg.max_tries``."""
    rng = np.random.default_rng(seed)
    why = ""
    for attempt in range(1, cfg.max_tries + 1):
        derived = _deform(label, cfg, rng)
        why = check_topology(label, derived, cfg)
        if why is None:
            return derived, attempt
    raise UserError(f"derive-labels: no deformation kept the anatomy in {cfg.max_tries} draws (last: {why}); "
                    "lower the magnitude / rotation / scale")


def derive_folder(labels: Path, out: Path, n_per_label: int = 1, seed: int = 0,
                  cfg: DeformConfig = DeformConfig()) -> list[Path]:
    """``<stem>_d<k>.nii.gz`` for every label map in ``labels`` (a file or folder): the source's affine and grid,
    a fresh header, int16 values. ``out/derive_info.json`` records the settings and each map's source and seed,
    and its donor and mixed classes (``cfg.mix_prob``: donors are other maps of the folder with the same shape;
    the draw comes from the map's own seed, so it does not depend on the order)."""
    import json

    from medlsdm.data.checks import check_exists
    from medlsdm.data.transforms import read_volume, write_nifti
    from medlsdm.io import atomic_write_text, folder_lock

    labels, out = check_exists(labels), Path(out)
    files = sorted(labels.glob("*.nii*")) if labels.is_dir() else [labels]
    if not files:
        raise UserError(f"{labels}: no NIfTI label maps (.nii / .nii.gz)")
    if not 1 <= n_per_label <= 10_000:
        raise UserError(f"--n-per-label must be 1..10000, got {n_per_label}")
    if labels.is_dir() and out.resolve() == labels.resolve():
        raise UserError(f"{out}: --out is the --labels folder; write derived maps elsewhere")
    written, record = [], []
    grids = {f: _grid(f) for f in files} if cfg.mix_prob > 0 and len(files) > 1 else {}

    @lru_cache(maxsize=4)
    def read(path: Path) -> np.ndarray:
        return read_volume(path)[0].round().numpy().astype(np.int16)

    with folder_lock(out):
        out.mkdir(parents=True, exist_ok=True)
        for f in files:
            array, affine = read_volume(f)  # header checks, 3D, finite
            source = array.round().numpy().astype(np.int16)
            stem = f.name.split(".nii")[0]
            mates = [g for g, grid in grids.items() if g != f and _same_grid(grid, grids[f])]  # donors: same grid
            for k in range(n_per_label):
                s = zlib.crc32(f"{seed}:{f.name}:{k}".encode()) & 0x7FFFFFFF  # per map, whatever the order
                ref, donor, mixed = source, None, []
                mix_rng = np.random.default_rng([s, 1])  # apart from the warp's stream: mix_prob 0 changes nothing
                if mates and mix_rng.random() < cfg.mix_prob:
                    ref, donor, mixed = _mix(source, mates, mix_rng, cfg, read)
                derived, tries = derive_label_map(ref, s, cfg)  # checked against the mixed map
                target = out / f"{stem}_d{k}.nii.gz"
                write_nifti(derived, affine, target)
                written.append(target)
                record.append(dict(file=target.name, source=f.name, seed=s, draws=tries, donor=donor,
                                   mixed_classes=mixed))
        atomic_write_text(out / "derive_info.json", json.dumps(dict(settings=asdict(cfg), seed=seed, maps=record),
                                                               indent=2) + "\n")
    return written
