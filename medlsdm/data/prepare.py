"""Validate a whole dataset once (every check, every case loaded) and fill the preprocessing cache.

``prepare_dataset`` returns a :class:`DatasetSummary`; ``format_summary`` renders it as a text table
(per case: shape and spacing after orientation, and the voxel count of each class after
preprocessing), which is what ``medlsdm prepare`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from medlsdm.config import DataConfig
from medlsdm.data.checks import check_target_shape
from medlsdm.data.dataset import VolumeDataset
from medlsdm.data.layouts import detect_layout, find_cases, read_label_names
from medlsdm.errors import UserError

PROGRESS_MIN_CASES = 4


@dataclass
class CaseSummary:
    id: str
    shape: tuple[int, int, int]  # (D, H, W) after orientation, before resampling / crop / resize
    spacing: tuple[float, float, float]  # (D, H, W) voxel size in mm
    label_counts: list[int] | None  # voxels per class after preprocessing; None without a label map


@dataclass
class DatasetSummary:
    root: str
    layout: str
    target_shape: tuple[int, int, int]
    label_names: list[str]
    cache_dir: str | None
    cases: list[CaseSummary] = field(default_factory=list)

    @property
    def totals(self) -> list[int] | None:
        """Voxels per class summed over the labelled cases (None if no case has a label map)."""
        counts = [c.label_counts for c in self.cases if c.label_counts is not None]
        return [sum(col) for col in zip(*counts)] if counts else None


def _label_names(root: Path, cfg: DataConfig) -> list[str]:
    """dataset.json names (when labels are not remapped), else ``cfg.label_names``, else class_<i>."""
    names = read_label_names(root) if cfg.label_remap is None and Path(root).is_dir() else None
    for candidate in (names, cfg.label_names):
        if candidate is not None and len(candidate) == cfg.num_classes:
            return list(candidate)
    return [f"class_{i}" for i in range(cfg.num_classes)]


def prepare_dataset(
    root: str | Path,
    cfg: DataConfig,
    layout: str = "auto",
    cache: bool = True,
    *,
    split: str = "train",
    label_dir: str | Path | None = None,
    image_key: str = "ct",
    cache_dir: str | Path | None = None,
    multiple: tuple[int, int, int] | None = None,
) -> DatasetSummary:
    """Find, check and preprocess every case of ``root``; cache them when ``cache`` and a cache folder
    (``cache_dir`` or ``cfg.cache_dir``) is set. ``multiple``: the model's total downsampling per axis,
    which ``cfg.shape`` must divide."""
    if multiple is not None:
        check_target_shape(cfg.shape, multiple, "config: data.shape")
    layout = detect_layout(root) if layout == "auto" else layout
    cases = find_cases(root, layout, split=split, label_dir=label_dir, image_key=image_key)
    cache_dir = (cache_dir if cache_dir is not None else cfg.cache_dir) if cache else None
    dataset = VolumeDataset(
        cases, cfg,
        with_images=all(c.image is not None for c in cases),
        with_labels=all(c.label is not None for c in cases),
        cache_dir=cache_dir,
    )  # fmt: skip
    summary = DatasetSummary(str(root), layout, tuple(cfg.shape), _label_names(Path(root), cfg),
                             str(cache_dir) if cache_dir is not None else None)  # fmt: skip
    if not cases:
        raise UserError(f"{root}: no cases found")
    for i in tqdm(range(len(dataset)), desc="checking cases", unit="case", disable=len(cases) < PROGRESS_MIN_CASES):
        sample = dataset.load(i, return_geometry=True)
        geometry = sample["geometry"]
        label = sample.get("label")
        counts = torch.bincount(label.flatten(), minlength=cfg.num_classes).tolist() if label is not None else None
        summary.cases.append(CaseSummary(cases[i].id, geometry.oriented_shape_dhw, geometry.spacing, counts))
    return summary


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned first column, right-aligned numbers."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return [fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]


def format_summary(summary: DatasetSummary) -> str:
    """A plain-text table: one row per case, then the per-class totals."""
    labelled = summary.totals is not None
    header = ["case", "shape (D,H,W)", "spacing mm (D,H,W)"] + (summary.label_names if labelled else [])
    rows = []
    for c in summary.cases:
        row = [c.id, "x".join(map(str, c.shape)), "x".join(f"{s:.3g}" for s in c.spacing)]
        if labelled:
            row += [str(n) for n in c.label_counts] if c.label_counts is not None else ["-"] * len(summary.label_names)
        rows.append(row)
    if labelled:
        rows.append(["total", "", ""] + [str(n) for n in summary.totals])
    n_lab = sum(c.label_counts is not None for c in summary.cases)
    lines = [
        f"dataset {summary.root} (layout {summary.layout}): {len(summary.cases)} case(s), {n_lab} with label maps",
        f"target shape (D,H,W) {'x'.join(map(str, summary.target_shape))}; label counts are voxels after preprocessing",
        *_table(header, rows),
    ]
    lines.append(f"cache: {summary.cache_dir}" if summary.cache_dir
                 else "cache: off (set data.cache_dir to keep preprocessed cases)")
    return "\n".join(lines)
