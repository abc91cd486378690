"""A lazy torch ``Dataset`` over cases, with an optional on-disk cache of preprocessed samples.

Each ``__getitem__`` loads one case (nothing else is held in memory). With a cache folder, the
preprocessed tensors of a case (image and label map, whichever it has) are written once as one
safetensors file named by a hash of the source files (path, mtime, size) and of the preprocessing
settings, and read from there afterwards; changing a source file or a setting misses the cache.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Sequence

from torch.utils.data import Dataset

from medlsdm.config import DataConfig
from medlsdm.data.layouts import Case
from medlsdm.data.transforms import load_case
from medlsdm.errors import UserError
from medlsdm.io import load_weights, save_weights

CACHE_VERSION = 1
# DataConfig fields that change the preprocessed tensors (label_names, cache_dir, num_workers do not)
PREPROCESSING_FIELDS = (
    "shape", "modality", "ct_window", "mr_percentiles", "orientation", "spacing", "resize_mode",
    "num_classes", "label_remap",
)  # fmt: skip


def _source_stamp(path: Path | None) -> list | None:
    """(absolute path, mtime_ns, size) of a file, or of every file in a DICOM folder."""
    if path is None:
        return None
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [str(path)] + [[p.name, p.stat().st_mtime_ns, p.stat().st_size] for p in files]


def cache_key(case: Case, cfg: DataConfig) -> str:
    """Hex digest identifying one preprocessed case."""
    settings = {k: getattr(cfg, k) for k in PREPROCESSING_FIELDS}
    if settings["label_remap"] is not None:
        settings["label_remap"] = sorted(settings["label_remap"].items())
    blob = {
        "version": CACHE_VERSION,
        "image": _source_stamp(case.image),
        "label": _source_stamp(case.label),
        "cfg": settings,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=list).encode()).hexdigest()[:32]


class VolumeDataset(Dataset):
    """Cases -> samples ``{"id": str, "image": (1, D, H, W) float, "label": (1, D, H, W) long}``.

    Only the requested parts are present (``with_images`` / ``with_labels``), so the default collate
    works; a requested label map that a case does not have is a UserError naming the case.
    ``cache_dir`` defaults to ``cfg.cache_dir``.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        cfg: DataConfig,
        with_images: bool = True,
        with_labels: bool = True,
        cache_dir: str | Path | None = None,
    ) -> None:
        if not (with_images or with_labels):
            raise ValueError("VolumeDataset needs with_images or with_labels")
        self.cases = list(cases)
        self.cfg = cfg
        self.with_images = with_images
        self.with_labels = with_labels
        cache_dir = cache_dir if cache_dir is not None else cfg.cache_dir
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        for case in self.cases:
            if with_labels and case.label is None:
                raise UserError(f"{case.image}: case '{case.id}' has no label map (needed here)")
            if with_images and case.image is None:
                raise UserError(f"{case.label}: case '{case.id}' has no image (needed here)")

    def __len__(self) -> int:
        return len(self.cases)

    def cache_path(self, case: Case) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{cache_key(case, self.cfg)}.safetensors"

    def load(self, index: int, return_geometry: bool = False) -> dict:
        """Preprocess every part of case ``index`` from its source files and store it when caching."""
        case = self.cases[index]
        sample = load_case(case, self.cfg, return_geometry=return_geometry)
        sample = {k: v for k, v in sample.items() if v is not None}
        path = self.cache_path(case)
        if path is not None:
            tensors = {k: sample[k] for k in ("image", "label") if k in sample}
            save_weights(tensors, path, metadata={"medlsdm_cache": str(CACHE_VERSION)})
        return sample

    def _read_cache(self, case: Case) -> dict | None:
        path = self.cache_path(case)
        if path is None or not path.is_file():
            return None
        try:
            return {"id": case.id, **load_weights(path)}
        except UserError:  # a damaged cache file is rebuilt from the source
            return None

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        sample = self._read_cache(case)
        if sample is None:
            sample = self.load(index)
        wanted = {"id"} | ({"image"} if self.with_images else set()) | ({"label"} if self.with_labels else set())
        return {k: v for k, v in sample.items() if k in wanted}


def split_cases(cases: Sequence[Case], val_fraction: float, seed: int = 0) -> tuple[list[Case], list[Case]]:
    """Deterministic train / validation split (by case id, independent of the input order).

    At least one validation case when ``val_fraction > 0`` and there are 2+ cases; never an empty
    training set.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"config: val_fraction must be in [0, 1), got {val_fraction}")
    ordered = sorted(cases, key=lambda c: c.id)
    random.Random(seed).shuffle(ordered)
    n_val = round(len(ordered) * val_fraction)
    if val_fraction > 0 and len(ordered) > 1:
        n_val = min(max(n_val, 1), len(ordered) - 1)
    val_ids = {c.id for c in ordered[:n_val]}
    return [c for c in cases if c.id not in val_ids], [c for c in cases if c.id in val_ids]
