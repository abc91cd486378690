"""Three-plane previews and montages: slice geometry, PNG layout, label overlay colours, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from medlsdm.viz import montage, save_preview, three_plane

D, H, W = 8, 12, 16


def _volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(D, H, W)).astype(np.float32)


def test_three_plane_central_slices():
    v = _volume()
    axial, coronal, sagittal = three_plane(v)
    np.testing.assert_array_equal(axial, v[D // 2])
    np.testing.assert_array_equal(coronal, v[:, H // 2, :])
    np.testing.assert_array_equal(sagittal, v[:, :, W // 2])
    # tensors with batch / channel axes work too
    t_axial, _, _ = three_plane(torch.from_numpy(v)[None, None])
    np.testing.assert_array_equal(t_axial, axial)


def test_three_plane_aspect_from_spacing():
    v = _volume()
    axial, coronal, sagittal = three_plane(v, spacing=(3.0, 1.0, 1.5))  # (D, H, W) mm
    assert axial.shape == (round(H * 1.0 / 1.0), round(W * 1.5 / 1.0))  # square 1 mm pixels
    assert coronal.shape == (D * 2, W)  # 3 mm slices over 1.5 mm columns
    assert sagittal.shape == (D * 3, H)
    lab = np.arange(D * H * W).reshape(D, H, W) % 6
    _, cor_lab, _ = three_plane(lab, spacing=(3.0, 1.0, 1.5), nearest=True)
    assert set(np.unique(cor_lab)) <= set(range(6))  # nearest keeps label values


def _is_grey(rgb: np.ndarray) -> np.ndarray:
    return (np.abs(rgb[..., 0] - rgb[..., 1]) < 0.02) & (np.abs(rgb[..., 1] - rgb[..., 2]) < 0.02)


def test_save_preview_layout_and_overlay(tmp_path):
    labels = np.zeros((D, H, W), dtype=np.uint8)
    labels[2:6, 3:9, 4:12] = 2
    volumes = {"input": _volume(0), "reconstruction": torch.from_numpy(_volume(1))}
    path = save_preview(tmp_path / "p.png", volumes, labels=labels)
    img = imread(path)
    assert img.shape[:2] == (3 * 200, 3 * 200)  # 3 rows (2 volumes + labels) x 3 planes, 2 in panels at 100 dpi
    assert img[..., :3].std() > 0.05
    assert _is_grey(img[:400, :, :3]).all()  # volume rows are greyscale
    assert (~_is_grey(img[400:, :, :3])).mean() > 0.01  # the label row is coloured
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]  # nothing temporary left behind


def test_save_preview_title_window_and_errors(tmp_path):
    v = 500 * _volume()
    fixed = imread(save_preview(tmp_path / "a.png", {"ct": v}, title="x"))
    auto = imread(save_preview(tmp_path / "b.png", {"ct": v}, title="x", vmin=None, vmax=None))
    assert fixed.shape[:2] == auto.shape[:2] == (200 + 30, 600)
    # with the fixed [-1, 1] window almost every voxel of a +-500 volume saturates; the automatic one does not
    assert np.abs(fixed - auto).max() > 0.2
    with pytest.raises(ValueError, match="labels shape"):
        save_preview(tmp_path / "c.png", {"ct": v}, labels=np.zeros((D, H, W + 1)))
    with pytest.raises(ValueError, match="D, H, W"):
        save_preview(tmp_path / "c.png", {"ct": np.zeros((H, W))})


def test_montage_layout(tmp_path):
    pairs = [("case0", _volume(0), _volume(1)), ("case1", _volume(2), torch.from_numpy(_volume(3)))]
    img = imread(montage(tmp_path / "m.png", pairs))
    assert img.shape[:2] == (2 * 200, 6 * 200)  # rows = pairs, columns = real + synthetic planes
    left, right = img[:, :600, :3], img[:, 600:, :3]
    assert left.std() > 0.05 and right.std() > 0.05 and np.abs(left - right).mean() > 0.01
