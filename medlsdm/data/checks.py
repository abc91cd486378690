"""Bad-input checks for the data layer: each raises a one-line :class:`UserError` naming the file.

They are small and side-effect free so that loaders (``transforms``), finders (``layouts``) and
``prepare`` can share them. Arrays here are raw file arrays, before any reordering to (D, H, W).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from medlsdm.errors import UserError

AFFINE_TOL_MM = 1e-3


def check_exists(path: str | Path, what: str = "file") -> Path:
    """``path`` must exist (file or folder); returns it as a Path."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: {what} not found")
    return path


def check_nonempty_dir(path: str | Path) -> Path:
    """``path`` must be an existing folder with at least one entry."""
    path = check_exists(path, "folder")
    if not path.is_dir():
        raise UserError(f"{path}: expected a folder")
    if not any(path.iterdir()):
        raise UserError(f"{path}: folder is empty")
    return path


def squeeze_to_3d(array: torch.Tensor, path: str | Path) -> torch.Tensor:
    """Return a 3D spatial array; trailing singleton dims (e.g. a 4D file with one frame) are dropped.

    Anything else (2D images, single-slice volumes, real 4D/5D data) is an error.
    """
    shape = tuple(array.shape)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise UserError(f"{path}: expected a 3D volume, got an array of shape {shape}")
    if min(array.shape) < 2:
        raise UserError(f"{path}: expected a 3D volume, got a single slice of shape {shape}")
    return array


def check_finite(array: torch.Tensor, path: str | Path) -> None:
    """No NaN or Inf voxels."""
    if array.is_floating_point():
        bad = ~torch.isfinite(array)
        if bool(bad.any()):
            raise UserError(f"{path}: {int(bad.sum())} voxel(s) are NaN or Inf")


def check_same_geometry(
    image_shape: Sequence[int],
    image_affine: np.ndarray,
    label_shape: Sequence[int],
    label_affine: np.ndarray,
    image_path: str | Path,
    label_path: str | Path,
    tol: float = AFFINE_TOL_MM,
) -> None:
    """An image and its label map must share the voxel grid: same shape, affines equal within ``tol`` mm."""
    if tuple(image_shape) != tuple(label_shape):
        raise UserError(
            f"{label_path}: label map shape {tuple(label_shape)} differs from image shape "
            f"{tuple(image_shape)} ({image_path})"
        )
    diff = float(np.abs(np.asarray(image_affine, float) - np.asarray(label_affine, float)).max())
    if diff > tol:
        raise UserError(
            f"{label_path}: label map affine differs from the image's ({image_path}) by up to {diff:.4g} mm"
        )


def check_label_values(values: Iterable[float], allowed: Iterable[int], path: str | Path) -> None:
    """Every label value must be an integer listed in the label table (``allowed``)."""
    allowed = set(int(a) for a in allowed)
    bad = sorted(float(v) for v in values if float(v) != int(v) or int(v) not in allowed)
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
        raise UserError(
            f"{path}: label value(s) {shown} not in the label table (expected one of {sorted(allowed)}; "
            "set data.label_remap / data.num_classes)"
        )


def check_target_shape(shape: Sequence[int], multiple: tuple[int, int, int], where: str) -> None:
    """Each target (D, H, W) dimension must be a positive multiple of the model's total downsampling."""
    if len(shape) != 3 or len(multiple) != 3:
        raise UserError(f"{where}: target shape must have 3 values (D, H, W), got {tuple(shape)}")
    for axis, size, m in zip("DHW", shape, multiple):
        if int(size) <= 0 or int(size) % int(m) != 0:
            raise UserError(
                f"{where}: target shape {tuple(shape)} is not a positive multiple of the model's "
                f"downsampling {tuple(multiple)} (axis {axis})"
            )


GZIP_MAX_RATIO = 1032  # deflate cannot expand data more than ~1032:1, so a .gz file bounds what it can hold


def check_nifti_header(path: str | Path) -> None:
    """Read only the header of NIfTI file ``path`` and refuse, before any voxel is allocated, a header that claims
    more voxel bytes than the file can hold (a truncated or forged file would otherwise allocate gigabytes before
    failing) or whose sform / qform in use is singular or not finite (no voxel-to-world mapping to write
    results onto)."""
    import nibabel as nib

    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):  # e.g. .hdr/.img pairs keep the voxels elsewhere
        return
    try:
        header = nib.load(str(path)).header
        claimed = int(np.prod(header.get_data_shape(), dtype=np.float64)) * header.get_data_dtype().itemsize
        offset = int(header.get("vox_offset", 0)) if "vox_offset" in header else 0
    except Exception:  # unreadable headers are reported by the full reader, with its own message
        return
    size = path.stat().st_size
    room = size * GZIP_MAX_RATIO if path.name.endswith(".gz") else size - offset
    if claimed > room:
        raise UserError(f"{path}: cannot read: the header claims {claimed / 2**20:.0f} MiB of voxels, more than the "
                        f"{size / 2**20:.1f} MiB file can hold (truncated file or wrong header)")
    for name in ("sform", "qform"):
        matrix, code = getattr(header, f"get_{name}")(coded=True)
        if code and matrix is not None:
            if not np.isfinite(matrix).all() or abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
                raise UserError(f"{path}: the header's {name} (code {int(code)}) is singular or not finite: no "
                                "voxel-to-world mapping; fix the header (e.g. set a valid sform) and retry")
            break
