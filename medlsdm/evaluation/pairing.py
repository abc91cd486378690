"""Load real and synthetic volume sets and pair each synthetic volume with the real one of its label map.

``medlsdm sample`` writes ``<labelname>_s<k>.nii.gz``; the real partner of that file is the case whose
label map is ``<labelname>`` (nnU-Net: ``imagesTs/<labelname>_0000.nii.gz``; other layouts: the case
id). A synthetic file without the ``_s<k>`` suffix pairs by its whole name. Every volume is preprocessed
like training data (``cfg.data``) except that evaluation never crops: an axis longer than ``cfg.shape`` is
kept whole (:data:`WHOLE`), so a set may hold several shapes. Tensors are (1, D, H, W), images in [-1, 1],
labels class indices. All input problems are one-line :class:`UserError` s naming the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import torch

from medlsdm.config import DataConfig
from medlsdm.data.checks import check_nonempty_dir
from medlsdm.data.layouts import Case, detect_layout, find_cases
from medlsdm.data.transforms import load_case, load_image
from medlsdm.errors import UserError

WHOLE = (1, 1, 1)  # ``keep_larger`` of evaluation: axes longer than cfg.shape are kept whole, never cropped
_NIFTI = re.compile(r"\.nii(\.gz)?$")
_SAMPLE = re.compile(r"^(?P<name>.+)_s(?P<k>\d+)$")


@dataclass
class VolumeSet:
    """Preprocessed volumes: ``images[i]`` (1, D, H, W) float, ``labels[i]`` (1, D, H, W) long or None."""

    ids: list[str] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor | None] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)  # the image file (or DICOM folder) of each volume
    spacing: tuple[float, float, float] | None = None  # (D, H, W) mm of the tensors, for figures

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: list[int]) -> "VolumeSet":
        pick = lambda xs: [xs[i] for i in index]  # noqa: E731
        return VolumeSet(pick(self.ids), pick(self.images), pick(self.labels), pick(self.paths), self.spacing)

    def __add__(self, other: "VolumeSet") -> "VolumeSet":
        return VolumeSet(self.ids + other.ids, self.images + other.images, self.labels + other.labels,
                         self.paths + other.paths, self.spacing or other.spacing)

    @property
    def labelled(self) -> bool:
        return len(self) > 0 and all(lab is not None for lab in self.labels)

    def larger_than(self, shape: tuple[int, ...]) -> list[str]:
        """Ids of the volumes with an axis longer than ``shape`` (D, H, W): those kept whole."""
        return [i for i, x, y in zip(self.ids, self.images, self.labels)
                if any(n > m for n, m in zip((x if x is not None else y).shape[1:], shape))]


def _display_spacing(geometry, cfg: DataConfig) -> tuple[float, float, float] | None:
    if cfg.spacing is not None:
        return tuple(cfg.spacing)
    return geometry.spacing if cfg.resize_mode == "crop_pad" else None


def real_cases(root: str | Path, split: str = "test", layout: str = "auto") -> list[Case]:
    """Cases of a real data set; ``split`` picks imagesTr / imagesTs of nnU-Net folders (ignored otherwise)."""
    layout = detect_layout(root) if layout == "auto" else layout
    cases = find_cases(root, layout=layout, split=split)
    cases = [c for c in cases if c.image is not None]
    if not cases:
        raise UserError(f"{root}: no images found (split {split!r})")
    return cases


def load_cases(cases: list[Case], cfg: DataConfig, need_labels: bool = False,
               keep_larger: tuple[int, int, int] | None = WHOLE) -> VolumeSet:
    """Read and preprocess ``cases`` (whole: see :data:`WHOLE`; ``keep_larger=None`` crops to ``cfg.shape`` as
    training does); with ``need_labels`` a case without a label map is an error."""
    out = VolumeSet()
    for case in cases:
        if need_labels and case.label is None:
            raise UserError(f"{case.image}: no label map for case '{case.id}' (needed for the Dice protocol)")
        sample = load_case(case, cfg, return_geometry=True, keep_larger=keep_larger)
        out.ids.append(case.id)
        out.images.append(sample["image"])
        out.labels.append(sample["label"])
        out.paths.append(Path(case.image or case.label))
        out.spacing = out.spacing or _display_spacing(sample["geometry"], cfg)
    return out


def load_real(root: str | Path, cfg: DataConfig, split: str = "test", layout: str = "auto",
              need_labels: bool = False) -> VolumeSet:
    """A real data set (or its train / test split) as a :class:`VolumeSet`."""
    return load_cases(real_cases(root, split, layout), cfg, need_labels)


def synthetic_files(folder: str | Path) -> list[tuple[str, Path]]:
    """``(label-map name, file)`` for every NIfTI in ``folder`` (``X_s3.nii.gz`` -> ``X``), sorted."""
    folder = check_nonempty_dir(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and _NIFTI.search(p.name) and not p.name.startswith("."))
    if not files:
        raise UserError(f"{folder}: no synthetic .nii / .nii.gz volumes in this folder")
    out = []
    for path in files:
        stem = _NIFTI.sub("", path.name)
        match = _SAMPLE.match(stem)
        out.append((match["name"] if match else stem, path))
    return out


def _file_shape(path: Path) -> tuple[int, ...] | None:
    """Spatial shape from a NIfTI header (trailing singleton axes dropped); None for other inputs."""
    if not _NIFTI.search(path.name):
        return None
    try:
        shape = tuple(nib.load(str(path)).shape)
    except Exception as exc:  # nibabel raises several types for unreadable headers
        raise UserError(f"{path}: not a readable NIfTI file ({type(exc).__name__})") from None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def pair_synthetic(folder: str | Path, real: list[Case], require_all: bool = True) -> list[tuple[Path, int]]:
    """Pair every synthetic file in ``folder`` with the index of its real case in ``real``.

    Errors: a synthetic file whose label map is not among the real cases; with ``require_all`` a real
    case without any synthetic volume (the two folders hold different sets); a synthetic volume whose
    voxel grid shape differs from its real partner's.
    """
    by_id = {c.id: i for i, c in enumerate(real)}
    pairs = []
    for name, path in synthetic_files(folder):
        if name not in by_id:
            ref = (real[0].image or real[0].label) if real else None
            where = ref.parent if ref is not None else "the real data set"
            raise UserError(f"{path}: no real volume for label map '{name}' in {where}")
        pairs.append((path, by_id[name]))
    if require_all:
        covered = {i for _, i in pairs}
        missing = [c for i, c in enumerate(real) if i not in covered]
        if missing:
            c = missing[0]
            raise UserError(
                f"{c.image or c.label}: real case '{c.id}' has no synthetic volume ('{c.id}_s<k>.nii.gz') in {folder} "
                f"({len(pairs)} synthetic vs {len(real)} real; {len(missing)} real case(s) unpaired)"
            )
    for path, i in pairs:
        ref = real[i].label or real[i].image
        want, got = _file_shape(Path(ref)), _file_shape(path)
        if want is not None and got is not None and want != got:
            raise UserError(f"{path}: shape {got} differs from its real partner {ref} {want}")
    return pairs


def load_synthetic(folder: str | Path, real: list[Case], real_set: VolumeSet, cfg: DataConfig,
                   require_all: bool = True) -> tuple[VolumeSet, list[int]]:
    """Synthetic volumes (labels = their real partner's label map) and, per volume, its partner's index."""
    out, partner = VolumeSet(spacing=real_set.spacing), []
    for path, i in pair_synthetic(folder, real, require_all):
        image, _ = load_image(path, cfg, keep_larger=WHOLE)
        ref = real_set.images[i] if real_set.images[i] is not None else real_set.labels[i]  # a label map alone
        if image.shape != ref.shape:
            raise UserError(f"{path}: preprocessed shape {tuple(image.shape)} differs from its real partner's "
                            f"{tuple(ref.shape)}")
        out.ids.append(_NIFTI.sub("", path.name))
        out.images.append(image)
        out.labels.append(real_set.labels[i])
        out.paths.append(path)
        partner.append(i)
    return out, partner


def label_files(folder: str | Path) -> list[Case]:
    """A flat folder of label maps as label-only cases (id = file name without extension)."""
    folder = check_nonempty_dir(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and _NIFTI.search(p.name) and not p.name.startswith("."))
    if not files:
        raise UserError(f"{folder}: no label map .nii / .nii.gz files in this folder")
    return [Case(_NIFTI.sub("", p.name), None, p) for p in files]
