"""Every bad input gives a one-line UserError that names the offending file."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from data_helpers import AFFINE, image_array, label_array, write_nifti

from medlsdm.config import DataConfig
from medlsdm.data import Case, check_target_shape, find_cases, load_case, load_image, load_label_map
from medlsdm.errors import UserError

CFG = DataConfig(shape=(8, 16, 16), num_classes=4)


def _raises(path_fragment: str, message: str, fn, *args):
    with pytest.raises(UserError) as info:
        fn(*args)
    text = str(info.value)
    assert "\n" not in text
    assert path_fragment in text and message in text, text
    return text


def test_missing_file(tmp_path):
    _raises("ghost.nii.gz", "not found", load_image, tmp_path / "ghost.nii.gz", CFG)


def test_empty_folder(tmp_path):
    (tmp_path / "void").mkdir()
    _raises("void", "folder is empty", find_cases, tmp_path / "void", "unlabelled")


def test_truncated_gzip_nifti(tmp_path):
    path = write_nifti(tmp_path / "cut.nii.gz", image_array())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _raises("cut.nii.gz", "cannot read", load_image, path, CFG)


def test_truncated_plain_nifti_and_garbage(tmp_path):
    path = write_nifti(tmp_path / "cut.nii", image_array())
    path.write_bytes(path.read_bytes()[:2000])
    _raises("cut.nii", "cannot read", load_image, path, CFG)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(gzip.compress(b"this is not a nifti header at all" * 20))
    _raises("junk.nii.gz", "cannot read", load_image, junk, CFG)


def test_4d_singleton_is_squeezed_but_real_4d_and_2d_fail(tmp_path):
    ok = write_nifti(tmp_path / "one_frame.nii.gz", image_array()[..., None])
    assert load_image(ok, CFG)[0].shape == (1, 8, 16, 16)
    four_d = write_nifti(tmp_path / "four_d.nii.gz", np.stack([image_array()] * 2, axis=-1))
    _raises("four_d.nii.gz", "expected a 3D volume", load_image, four_d, CFG)
    flat = write_nifti(tmp_path / "flat.nii.gz", image_array()[:, :, 0])
    _raises("flat.nii.gz", "expected a 3D volume", load_image, flat, CFG)


def test_image_label_shape_mismatch(tmp_path):
    img = write_nifti(tmp_path / "img.nii.gz", image_array())
    lab = write_nifti(tmp_path / "lab.nii.gz", label_array(shape=(20, 24, 12)))
    _raises("lab.nii.gz", "shape (20, 24, 12) differs", load_case, Case("a", img, lab), CFG)


def test_image_label_affine_mismatch(tmp_path):
    img = write_nifti(tmp_path / "img.nii.gz", image_array())
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.01  # 10 micrometres: beyond the 1e-3 mm tolerance
    lab = write_nifti(tmp_path / "lab.nii.gz", label_array(), shifted)
    _raises("lab.nii.gz", "affine differs", load_case, Case("a", img, lab), CFG)
    close = AFFINE.copy()
    close[0, 3] += 1e-4  # within tolerance: accepted
    near = write_nifti(tmp_path / "near.nii.gz", label_array(), close)
    assert load_case(Case("a", img, near), CFG)["label"].shape == (1, 8, 16, 16)


def test_label_value_outside_table(tmp_path):
    lab = write_nifti(tmp_path / "lab.nii.gz", label_array(values=(0, 1, 5)))
    _raises("lab.nii.gz", "label value(s) 5 not in the label table", load_label_map, lab, CFG)
    frac = write_nifti(tmp_path / "frac.nii.gz", label_array().astype(np.float32) + 0.5)
    _raises("frac.nii.gz", "not in the label table", load_label_map, frac, CFG)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_voxels(tmp_path, bad):
    arr = image_array()
    arr[2, 3, 4] = bad
    path = write_nifti(tmp_path / "bad.nii.gz", arr)
    _raises("bad.nii.gz", "1 voxel(s) are NaN or Inf", load_image, path, CFG)


def test_target_shape_must_divide_by_the_downsampling():
    check_target_shape((16, 64, 64), (4, 16, 16), "config")
    _raises("config", "axis H", check_target_shape, (16, 40, 64), (4, 16, 16), "config")
    _raises("config", "axis D", check_target_shape, (0, 64, 64), (4, 16, 16), "config")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_forged_header_is_refused_before_allocating(tmp_path, suffix):
    """A small file whose header claims gigabytes stops at the header, not after allocating them."""
    import nibabel as nib

    path = write_nifti(tmp_path / f"ok{suffix}", image_array())
    header = nib.load(str(path)).header.copy()
    header.set_data_shape((1024, 1024, 800))
    raw = bytearray(gzip.decompress(path.read_bytes()) if suffix == ".nii.gz" else path.read_bytes())
    raw[: len(header.binaryblock)] = header.binaryblock
    forged = tmp_path / f"forged{suffix}"
    forged.write_bytes(gzip.compress(bytes(raw)) if suffix == ".nii.gz" else bytes(raw))
    _raises(f"forged{suffix}", "the header claims 3200 MiB", load_image, forged, CFG)


def test_singular_sform_is_refused(tmp_path):
    """An all-zero sform in use (code > 0) maps no voxel anywhere; MONAI would quietly fall back to pixdim."""
    import nibabel as nib

    path = write_nifti(tmp_path / "ok.nii", label_array())
    header = nib.load(str(path)).header.copy()
    for row in ("srow_x", "srow_y", "srow_z"):
        header[row] = 0
    header["sform_code"] = 1
    raw = bytearray(path.read_bytes())
    raw[: len(header.binaryblock)] = header.binaryblock
    path.write_bytes(bytes(raw))
    _raises("ok.nii", "sform (code 1) is singular", load_label_map, path, CFG)
