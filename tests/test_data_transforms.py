"""Preprocessing and its inverse: axes, orientation, spacing, crop/pad, resize, intensities, remap, cache."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import torch
from data_helpers import AFFINE, SHAPE_XYZ, image_array, label_array, write_nifti

import medlsdm.data.dataset as dataset_module
from medlsdm.config import DataConfig
from medlsdm.data import (
    Case,
    VolumeDataset,
    load_case,
    load_image,
    load_label_map,
    one_hot,
    save_label,
    save_volume,
)
from medlsdm.errors import UserError


def _cfg(**kw) -> DataConfig:
    base = dict(shape=(8, 16, 32), num_classes=4, orientation="RAS", resize_mode="crop_pad")
    return DataConfig(**{**base, **kw})


def test_axes_become_dhw_and_orientation_flips(tmp_path):
    """A voxel at file index (x, y, z) of a RAS file lands at (z, y, x); an L/P file is flipped to RAS."""
    arr = np.zeros(SHAPE_XYZ, np.int16)
    arr[3, 5, 7] = 1
    ras = np.diag([0.8, 1.2, 2.5, 1.0])
    cfg = _cfg(shape=(10, 24, 20), num_classes=2)  # same as the file: no crop / pad
    label, geom = load_label_map(write_nifti(tmp_path / "ras.nii.gz", arr, ras), cfg)
    assert label.shape == (1, 10, 24, 20) and label.dtype == torch.long
    assert torch.nonzero(label[0]).tolist() == [[7, 5, 3]]
    assert geom.spacing == pytest.approx((2.5, 1.2, 0.8), abs=1e-6)
    # AFFINE runs x right->left and y anterior->posterior: RAS orientation flips both axes
    label, _ = load_label_map(write_nifti(tmp_path / "lps.nii.gz", arr, AFFINE), cfg)
    assert torch.nonzero(label[0]).tolist() == [[7, 24 - 1 - 5, 20 - 1 - 3]]


@pytest.mark.parametrize("orientation", ["RAS", "PIL"])
@pytest.mark.parametrize("spacing", [None, (3.0, 1.0, 1.1)])
def test_crop_pad_round_trip_is_exact_in_kept_region(tmp_path, orientation, spacing):
    lab = label_array()
    path = write_nifti(tmp_path / "lab.nii.gz", lab)
    src = nib.load(path)
    cfg = _cfg(orientation=orientation, spacing=spacing)
    label, geom = load_label_map(path, cfg)
    assert label.shape == (1, *cfg.shape)
    save_label(label, geom, tmp_path / "out.nii.gz", cfg)
    save_volume(torch.rand(1, *cfg.shape) * 2 - 1, geom, tmp_path / "vol.nii.gz", cfg)
    for name in ("out.nii.gz", "vol.nii.gz"):
        out = nib.load(tmp_path / name)
        assert out.shape == src.shape
        np.testing.assert_array_equal(out.affine, src.affine)
    assert nib.load(tmp_path / "vol.nii.gz").get_data_dtype() == np.float32
    if spacing is None:  # without resampling the kept voxels come back unchanged
        kept_path = tmp_path / "kept.nii.gz"
        save_label(torch.ones_like(label), geom, kept_path, cfg)
        kept = np.asarray(nib.load(kept_path).dataobj) == 1
        assert kept.sum() == np.prod([min(n, m) for n, m in zip(geom.oriented_shape, cfg.shape[::-1])])
        out = np.asarray(nib.load(tmp_path / "out.nii.gz").dataobj)
        np.testing.assert_array_equal(out[kept], lab[kept])
        assert (out[~kept] == 0).all()


def test_ct_image_round_trip_recovers_hu(tmp_path):
    img = image_array()
    path = write_nifti(tmp_path / "ct.nii.gz", img)
    cfg = _cfg(shape=(16, 16, 16), ct_window=(-1000.0, 1000.0))
    x, geom = load_image(path, cfg)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert (x[0, 13:] == -1).all()  # Z = 10 padded to 16 with air (3 before, 3 after)
    save_volume(x[0], geom, tmp_path / "back.nii", cfg)  # (D, H, W) is accepted too
    back = np.asarray(nib.load(tmp_path / "back.nii").dataobj)
    kept = back != -1000.0  # outside the crop: lowest HU
    assert kept.sum() == 16 * 16 * 10  # x 20 -> 16, y 24 -> 16, z all 10 kept
    np.testing.assert_allclose(back[kept], img[kept], atol=1e-3)


@pytest.mark.parametrize("orientation", ["RAS", "SLP"])
def test_resize_round_trip(tmp_path, orientation):
    """Nearest resize to exactly 2x and back is lossless; a trilinear volume lands on the label grid."""
    lab = label_array()
    path = write_nifti(tmp_path / "lab.nii.gz", lab)
    _, geom = load_label_map(path, _cfg(orientation=orientation))
    double = tuple(2 * s for s in geom.oriented_shape_dhw)
    cfg = _cfg(resize_mode="resize", orientation=orientation, shape=double)
    label, geom = load_label_map(path, cfg)
    assert label.shape == (1, *double)
    save_label(label, geom, tmp_path / "out.nii.gz", cfg)
    out = nib.load(tmp_path / "out.nii.gz")
    np.testing.assert_array_equal(np.asarray(out.dataobj), lab)
    small = _cfg(resize_mode="resize", orientation=orientation, shape=(4, 8, 8), spacing=(2.0, 1.0, 1.0))
    _, geom = load_label_map(path, small)
    save_volume(torch.zeros(1, 4, 8, 8), geom, tmp_path / "vol.nii.gz", small)
    vol = nib.load(tmp_path / "vol.nii.gz")
    assert vol.shape == SHAPE_XYZ
    np.testing.assert_array_equal(vol.affine, nib.load(path).affine)
    np.testing.assert_allclose(np.asarray(vol.dataobj), 0.0, atol=1e-4)  # 0 in [-1, 1] = 0 HU


def test_spacing_resamples_in_dhw_order(tmp_path):
    path = write_nifti(tmp_path / "lab.nii.gz", label_array())
    cfg = _cfg(spacing=(5.0, 1.2, 0.8))  # source (D, H, W) spacing is (2.5, 1.2, 0.8): only slices halve
    _, geom = load_label_map(path, cfg)
    assert geom.spaced_shape == (20, 24, 6)  # (X, Y, Z); Z: (10 - 1) * 2.5 / 5 + 1 = 5.5 -> 6 voxel centres


def test_mr_percentile_scaling_and_output_range(tmp_path):
    img = np.random.default_rng(0).gamma(2.0, 100.0, size=SHAPE_XYZ).astype(np.float32)
    path = write_nifti(tmp_path / "mr.nii.gz", img)
    cfg = _cfg(modality="mr", mr_percentiles=(1.0, 99.0), shape=(10, 24, 20))
    x, geom = load_image(path, cfg)
    assert x.min() == -1 and x.max() == 1
    assert 0.005 < (x == 1).float().mean() < 0.02  # top 1 % clipped
    save_volume(x, geom, tmp_path / "out.nii.gz", cfg)
    out = np.asarray(nib.load(tmp_path / "out.nii.gz").dataobj)
    assert out.min() == 0.0 and out.max() == 1.0


def test_output_header_has_no_source_text(tmp_path):
    path = write_nifti(tmp_path / "lab.nii.gz", label_array(), descrip="Patient Doe^Jane DOB 1970")
    header = nib.load(path).header
    assert b"Doe" in header["descrip"].tobytes()  # the source really carries it
    cfg = _cfg()
    label, geom = load_label_map(path, cfg)
    save_volume(torch.zeros(1, *cfg.shape), geom, tmp_path / "vol.nii", cfg)
    out = nib.load(tmp_path / "vol.nii").header
    for key in ("descrip", "db_name", "aux_file", "intent_name"):
        assert out[key].tobytes().strip(b"\x00") == b"", key
    assert b"Doe" not in (tmp_path / "vol.nii").read_bytes()


def test_label_remap_and_bad_values(tmp_path):
    raw = label_array(values=(0, 10, 20, 30)).astype(np.int16)
    path = write_nifti(tmp_path / "lab.nii.gz", raw)
    cfg = _cfg(shape=(10, 24, 20), num_classes=3, label_remap={0: 0, 10: 1, 20: 2, 30: 2})
    label, _ = load_label_map(path, cfg)
    expected = np.select([raw == 10, raw >= 20], [1, 2], 0)[:, ::-1, :]  # y flipped to RAS (x too)
    np.testing.assert_array_equal(label[0].numpy(), expected[::-1].transpose(2, 1, 0))
    bad = write_nifti(tmp_path / "bad.nii.gz", np.where(raw == 30, 40, raw).astype(np.int16))
    with pytest.raises(UserError, match=r"bad\.nii\.gz: label value\(s\) 40 not in the label table"):
        load_label_map(bad, cfg)
    with pytest.raises(UserError, match="label_remap maps to class"):
        load_label_map(path, _cfg(num_classes=2, label_remap={0: 0, 10: 1, 20: 2, 30: 2}))


def test_one_hot():
    label = torch.tensor([0, 2, 1, 2]).reshape(1, 1, 1, 2, 2)
    oh = one_hot(label, 3)
    assert oh.shape == (1, 3, 1, 2, 2) and oh.dtype == torch.float32
    assert torch.equal(oh.argmax(1, keepdim=True), label) and torch.equal(oh.sum(1), torch.ones(1, 1, 2, 2))


def test_load_case_image_and_label_share_the_grid(tmp_path):
    img = write_nifti(tmp_path / "img.nii.gz", image_array())
    lab = write_nifti(tmp_path / "lab.nii.gz", label_array())
    cfg = _cfg(spacing=(2.0, 1.0, 1.0))
    sample = load_case(Case("a", img, lab), cfg)
    assert sample["id"] == "a" and sample["image"].shape == sample["label"].shape == (1, *cfg.shape)
    assert sample["image"].dtype == torch.float32 and sample["label"].dtype == torch.long
    only_image = load_case(Case("b", img, None), cfg)
    assert only_image["label"] is None and torch.equal(only_image["image"], sample["image"])


def test_cache_is_written_once_and_read_back(tmp_path, monkeypatch):
    img = write_nifti(tmp_path / "img.nii.gz", image_array())
    lab = write_nifti(tmp_path / "lab.nii.gz", label_array())
    cfg = _cfg()
    ds = VolumeDataset([Case("a", img, lab)], cfg, cache_dir=tmp_path / "cache")
    first = ds[0]
    files = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 1

    def fail(*args, **kwargs):
        raise AssertionError("source was read again")

    monkeypatch.setattr(dataset_module, "load_case", fail)
    second = ds[0]
    assert (second["id"] == "a" and torch.equal(second["image"], first["image"])
            and torch.equal(second["label"], first["label"]))
    assert set(VolumeDataset(ds.cases, cfg, with_labels=False, cache_dir=tmp_path / "cache")[0]) == {"id", "image"}
    os.utime(img, ns=(1, 1))  # a changed source (mtime) misses the cache
    with pytest.raises(AssertionError, match="read again"):
        ds[0]
    with pytest.raises(AssertionError, match="read again"):  # so does another preprocessing setting
        VolumeDataset(ds.cases, _cfg(ct_window=(-500.0, 500.0)), cache_dir=tmp_path / "cache")[0]
