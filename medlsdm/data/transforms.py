"""Preprocessing (file -> tensor) and its exact inverse (tensor -> NIfTI on the label map's grid).

Forward, per volume, with MONAI: load (nibabel for NIfTI, pydicom for a DICOM series folder) ->
label remap -> ``Orientation`` to ``cfg.orientation`` -> optional ``Spacing`` -> intensity scaling to
[-1, 1] (images) -> centre crop/pad or ``Resize`` to ``cfg.shape``. Every step is recorded in a
:class:`LabelGeometry` so that :func:`save_volume` / :func:`save_label` can undo it and write a NIfTI
with exactly the source affine and shape.

This is the only module that knows NIfTI axes: files are (X, Y, Z); the rest of medlsdm sees
(D, H, W) = (Z, Y, X). Written files get a fresh NIfTI header: no text field or DICOM tag of the
source survives, only the geometry.
"""

from __future__ import annotations

import functools
import gzip
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor, NibabelReader, PydicomReader
from monai.networks.utils import one_hot as _monai_one_hot
from monai.transforms import (
    BorderPad,
    LoadImage,
    Orientation,
    Resize,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    Spacing,
    SpatialCrop,
    SpatialResample,
)

from medlsdm.config import DataConfig
from medlsdm.data.checks import (
    check_exists,
    check_finite,
    check_label_values,
    check_nifti_header,
    check_same_geometry,
    squeeze_to_3d,
)
from medlsdm.data.layouts import Case
from medlsdm.errors import UserError
from medlsdm.io import atomic_path

RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
Borders = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class LabelGeometry:
    """How one source volume became a (1, D, H, W) tensor; enough to invert it exactly.

    All shapes here are in file axis order (X, Y, Z); affines are 4x4 voxel -> world (mm, RAS).
    """

    affine: np.ndarray  # source affine, written unchanged into every output file
    shape: tuple[int, int, int]  # source shape
    oriented_affine: np.ndarray  # after Orientation
    oriented_shape: tuple[int, int, int]
    spaced_affine: np.ndarray | None  # after Spacing; None when no resampling was asked for
    spaced_shape: tuple[int, int, int]  # input of crop/pad or resize
    resize_mode: str  # "crop_pad" or "resize"
    crop: Borders  # voxels removed (before, after) per axis (crop_pad mode)
    pad: Borders  # voxels added (before, after) per axis (crop_pad mode)
    target_shape: tuple[int, int, int]  # (D, H, W) of the tensor

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (D, H, W) in mm after orientation, before resampling."""
        zooms = np.sqrt((self.oriented_affine[:3, :3] ** 2).sum(axis=0))
        return tuple(float(z) for z in zooms[::-1])

    @property
    def oriented_shape_dhw(self) -> tuple[int, int, int]:
        return tuple(self.oriented_shape[::-1])


def _plain(x: torch.Tensor) -> torch.Tensor:
    """Drop MONAI metadata (a plain tensor; nothing from the source header travels further)."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


# ----------------------------------------------------------------------------------------- reading


# MONAI logs a GPU-decoder notice each time a DICOM reader is built; it is noise for CPU users
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)


@functools.lru_cache(maxsize=None)
def _loader() -> LoadImage:
    """One LoadImage per process (building one instantiates every MONAI reader)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom decoder-plugin chatter
        return LoadImage(image_only=True, dtype=np.float32)


@functools.lru_cache(maxsize=None)
def _reader(dicom: bool) -> NibabelReader | PydicomReader:
    return PydicomReader() if dicom else NibabelReader()


def read_volume(path: str | Path) -> tuple[torch.Tensor, np.ndarray]:
    """Read a NIfTI file or a DICOM series folder -> (array (X, Y, Z) float32, affine (4, 4)).

    Unreadable / truncated files, non-3D arrays and NaN/Inf voxels raise a one-line UserError.
    """
    path = check_exists(path)
    if not path.is_dir():
        check_nifti_header(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = _loader()(str(path), reader=_reader(path.is_dir()))  # that reader only, no fallback
    except Exception as exc:  # nibabel / gzip / zlib / pydicom / MONAI all raise their own types
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        kind = "DICOM series" if path.is_dir() else "NIfTI file"
        raise UserError(f"{path}: cannot read as a {kind} ({detail})") from None
    affine = np.asarray(img.affine, dtype=np.float64)
    array = squeeze_to_3d(_plain(img), path)
    check_finite(array, path)
    return array.float(), affine


def remap_labels(array: torch.Tensor, cfg: DataConfig, path: str | Path) -> torch.Tensor:
    """Raw label values -> class indices 0..C-1 via ``cfg.label_remap`` (identity when None)."""
    values = torch.unique(array).tolist()
    if cfg.label_remap is None:
        check_label_values(values, range(cfg.num_classes), path)
        return array.round().long()
    bad_targets = sorted(v for v in set(cfg.label_remap.values()) if not 0 <= v < cfg.num_classes)
    if bad_targets:
        raise UserError(f"config: label_remap maps to class(es) {bad_targets} outside 0..{cfg.num_classes - 1}")
    check_label_values(values, cfg.label_remap.keys(), path)
    out = torch.zeros(array.shape, dtype=torch.long)
    for value in values:
        out[array == value] = cfg.label_remap[int(value)]
    return out


# ------------------------------------------------------------------------------------ forward path


def _crop_pad_borders(shape: tuple[int, ...], target: tuple[int, ...]) -> tuple[Borders, Borders]:
    """Centre crop / pad amounts (before, after) per axis taking ``shape`` to ``target``."""
    crop, pad = [], []
    for n, m in zip(shape, target):
        extra = abs(n - m)
        split = (extra // 2, extra - extra // 2)
        crop.append(split if n > m else (0, 0))
        pad.append(split if n < m else (0, 0))
    return tuple(crop), tuple(pad)


def _crop_then_pad(x: torch.Tensor, crop: Borders, pad: Borders, value: float) -> torch.Tensor:
    """Crop ``crop`` voxels then pad ``pad`` voxels (constant ``value``) per axis of (1, X, Y, Z)."""
    if any(sum(c) for c in crop):
        slices = [slice(b, n - a) for (b, a), n in zip(crop, x.shape[1:])]
        x = SpatialCrop(roi_slices=slices)(x)
    if any(sum(p) for p in pad):
        x = BorderPad(spatial_border=[v for p in pad for v in p], value=value)(x)
    return x


def _scale_intensity(x: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    if cfg.modality == "ct":
        lo, hi = cfg.ct_window
        return ScaleIntensityRange(a_min=lo, a_max=hi, b_min=-1.0, b_max=1.0, clip=True)(x)
    if cfg.modality == "mr":
        lo, hi = cfg.mr_percentiles
        return ScaleIntensityRangePercentiles(lower=lo, upper=hi, b_min=-1.0, b_max=1.0, clip=True)(x)
    raise UserError(f"config: data.modality must be 'ct' or 'mr', got {cfg.modality!r}")


def preprocess(
    array: torch.Tensor, affine: np.ndarray, cfg: DataConfig, is_label: bool,
    keep_larger: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, LabelGeometry]:
    """(X, Y, Z) array + affine -> ((1, D, H, W) tensor, geometry). Labels must already be class indices.

    ``keep_larger`` (a (D, H, W) multiple, e.g. the VQ-GAN's down-sampling; crop_pad mode only): axes longer
    than ``cfg.shape`` are not cropped but padded up to that multiple, so a full-length volume keeps all of
    its slices (sampling); shorter axes are padded to ``cfg.shape`` as usual.
    """
    if cfg.resize_mode not in ("crop_pad", "resize"):
        raise UserError(f"config: data.resize_mode must be 'crop_pad' or 'resize', got {cfg.resize_mode!r}")
    x = MetaTensor(array[None].float(), affine=torch.as_tensor(affine, dtype=torch.float64))
    try:
        x = Orientation(axcodes=cfg.orientation, labels=RAS_LABELS)(x)
    except ValueError:
        raise UserError(f"config: data.orientation {cfg.orientation!r} is not an axis code like RAS or LPS") from None
    oriented_affine, oriented_shape = x.affine.numpy().copy(), tuple(x.shape[1:])
    spaced_affine = None
    if cfg.spacing is not None:
        x = Spacing(pixdim=tuple(cfg.spacing[::-1]), mode="nearest" if is_label else "bilinear")(x)
        spaced_affine = x.affine.numpy().copy()
    spaced_shape = tuple(x.shape[1:])
    if not is_label:
        x = _scale_intensity(x, cfg)
    target = tuple(cfg.shape[::-1])
    if keep_larger is not None and cfg.resize_mode == "crop_pad":
        target = tuple(max(t, -(-n // m) * m) for t, n, m in zip(target, spaced_shape, tuple(keep_larger)[::-1]))
    crop, pad = _crop_pad_borders(spaced_shape, target)
    if cfg.resize_mode == "crop_pad":
        x = _crop_then_pad(x, crop, pad, value=0.0 if is_label else -1.0)
    else:
        crop = pad = ((0, 0),) * 3
        x = Resize(spatial_size=target, mode="nearest" if is_label else "trilinear", anti_aliasing=not is_label)(x)
    out = _plain(x).permute(0, 3, 2, 1).contiguous()
    out = out.round().long() if is_label else out.float()
    geometry = LabelGeometry(
        affine=np.asarray(affine, dtype=np.float64), shape=tuple(array.shape),
        oriented_affine=oriented_affine, oriented_shape=oriented_shape,
        spaced_affine=spaced_affine, spaced_shape=spaced_shape,
        resize_mode=cfg.resize_mode, crop=crop, pad=pad, target_shape=tuple(target[::-1]),
    )  # fmt: skip
    return out, geometry


def load_image(
    path: str | Path, cfg: DataConfig, keep_larger: tuple[int, int, int] | None = None
) -> tuple[torch.Tensor, LabelGeometry]:
    """Image file/folder -> (FloatTensor (1, D, H, W) in [-1, 1], geometry); ``keep_larger``: see :func:`preprocess`."""
    array, affine = read_volume(path)
    return preprocess(array, affine, cfg, is_label=False, keep_larger=keep_larger)


def load_label_map(
    path: str | Path, cfg: DataConfig, keep_larger: tuple[int, int, int] | None = None
) -> tuple[torch.Tensor, LabelGeometry]:
    """Label map file -> (LongTensor (1, D, H, W) of class indices, geometry to write results onto).
    ``keep_larger``: see :func:`preprocess` (sampling full-length volumes)."""
    array, affine = read_volume(path)
    return preprocess(remap_labels(array, cfg, path), affine, cfg, is_label=True, keep_larger=keep_larger)


def load_case(
    case: Case, cfg: DataConfig, with_image: bool = True, with_label: bool = True, return_geometry: bool = False,
    keep_larger: tuple[int, int, int] | None = None,
) -> dict:
    """One case -> ``dict(image=(1, D, H, W) float or None, label=(1, D, H, W) long or None, id=str)``.

    Image and label map must share the voxel grid. With ``return_geometry`` the dict also holds
    ``geometry`` (the image's, or the label map's when there is no image). ``keep_larger``: see
    :func:`preprocess` (evaluation keeps whole volumes).
    """
    sample: dict = {"id": case.id, "image": None, "label": None}
    image = label = None
    if with_image and case.image is not None:
        image = read_volume(case.image)
    if with_label and case.label is not None:
        label = read_volume(case.label)
        label = (remap_labels(label[0], cfg, case.label), label[1])
    if image is not None and label is not None:
        check_same_geometry(image[0].shape, image[1], label[0].shape, label[1], case.image, case.label)
        label = (label[0], image[1])  # one grid for both, so resampling gives identical shapes
    if image is not None:
        sample["image"], geometry = preprocess(*image, cfg, is_label=False, keep_larger=keep_larger)
        sample["geometry"] = geometry
    if label is not None:
        sample["label"], geometry = preprocess(*label, cfg, is_label=True, keep_larger=keep_larger)
        sample.setdefault("geometry", geometry)
    if not return_geometry:
        sample.pop("geometry", None)
    return sample


def one_hot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, 1, D, H, W) class indices -> (B, C, D, H, W) float one-hot."""
    return _monai_one_hot(label.long(), num_classes=num_classes, dim=1, dtype=torch.float32)


# ------------------------------------------------------------------------------------ inverse path


def _to_source_grid(x: torch.Tensor, geometry: LabelGeometry, is_label: bool, fill: float) -> np.ndarray:
    """(1, D, H, W) tensor -> (X, Y, Z) array on the source voxel grid (undo every spatial step)."""
    if tuple(x.shape[1:]) != tuple(geometry.target_shape):
        raise ValueError(f"volume shape {tuple(x.shape[1:])} != geometry target {geometry.target_shape}")
    x = x.detach().float().cpu().permute(0, 3, 2, 1)
    if geometry.resize_mode == "crop_pad":
        x = _crop_then_pad(x, crop=geometry.pad, pad=geometry.crop, value=fill)
    else:
        x = Resize(spatial_size=geometry.spaced_shape, mode="nearest" if is_label else "trilinear")(x)
    x = _plain(x)
    if geometry.spaced_affine is not None:
        x = MetaTensor(x, affine=torch.as_tensor(geometry.spaced_affine))
        resample = SpatialResample(mode="nearest" if is_label else "bilinear", padding_mode="border")
        x = resample(x, dst_affine=torch.as_tensor(geometry.oriented_affine), spatial_size=geometry.oriented_shape)
    x = MetaTensor(_plain(x), affine=torch.as_tensor(geometry.oriented_affine))
    codes = "".join(nib.aff2axcodes(geometry.affine))
    x = Orientation(axcodes=codes, labels=RAS_LABELS)(x)
    out = _plain(x)[0].numpy()
    if out.shape != tuple(geometry.shape):
        raise RuntimeError(f"inverse transform gave shape {out.shape}, expected {geometry.shape}")
    return out


def denormalize(volume: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """[-1, 1] -> output intensities: CT to HU over ``cfg.ct_window``; MR to [0, 1].

    MR intensities have no absolute scale (the forward path maps per-volume percentiles to [-1, 1]),
    so synthetic MR is written as 0..1, where 0 / 1 correspond to the low / high training percentile.
    """
    v = volume.clamp(-1.0, 1.0)
    if cfg.modality == "ct":
        lo, hi = cfg.ct_window
        return (v + 1.0) / 2.0 * (hi - lo) + lo
    return (v + 1.0) / 2.0


def write_nifti(array: np.ndarray, affine: np.ndarray, path: str | Path) -> None:
    """Write ``array`` (X, Y, Z) with a fresh header carrying only the geometry, atomically."""
    path = Path(path)
    img = nib.Nifti1Image(array, affine)  # new header: no descrip / db_name / aux_file / intent_name
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    data = img.to_bytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    elif not path.name.endswith(".nii"):
        raise UserError(f"{path}: output must end in .nii or .nii.gz")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _as_channel_first(x: torch.Tensor) -> torch.Tensor:
    return x[None] if x.ndim == 3 else x


def save_volume(volume: torch.Tensor, geometry: LabelGeometry, path: str | Path, cfg: DataConfig) -> None:
    """Write a (1, D, H, W) or (D, H, W) volume in [-1, 1] as float32 NIfTI on the source grid.

    The file has exactly ``geometry.affine`` and ``geometry.shape``; voxels outside the region the
    model saw (cropped away in the forward path) get the lowest intensity (air / 0).
    """
    x = denormalize(_as_channel_first(volume).detach().float().cpu(), cfg)
    fill = float(denormalize(torch.tensor(-1.0), cfg))
    array = _to_source_grid(x, geometry, is_label=False, fill=fill).astype(np.float32)
    write_nifti(array, geometry.affine, path)


def save_label(label: torch.Tensor, geometry: LabelGeometry, path: str | Path, cfg: DataConfig) -> None:
    """Write a (1, D, H, W) or (D, H, W) class-index map on the source grid (nearest; class indices)."""
    array = np.rint(_to_source_grid(_as_channel_first(label), geometry, is_label=True, fill=0.0))
    dtype = np.uint8 if cfg.num_classes <= 256 else np.int16
    write_nifti(array.astype(dtype), geometry.affine, path)
