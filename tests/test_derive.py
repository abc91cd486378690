"""Derived label maps: seeded, every class kept, the source's grid and affine, anatomy checks that can refuse."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from data_helpers import AFFINE, write_nifti

from medlsdm.cli import main
from medlsdm.data.derive import DeformConfig, check_topology, count_components, derive_label_map
from medlsdm.errors import UserError


def _body(shape=(40, 40, 12)) -> np.ndarray:
    """A body (1) with an organ (2), a bone (3) and a 3-voxel-wide lesion (4)."""
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    lab = np.zeros(shape, np.int16)
    lab[(x - 20) ** 2 + (y - 20) ** 2 < 17 ** 2] = 1
    lab[(x - 14) ** 2 + (y - 22) ** 2 < 7 ** 2] = 2
    lab[(abs(x - 27) < 3) & (abs(y - 14) < 3)] = 3
    lab[(abs(x - 13) <= 1) & (abs(y - 23) <= 1) & (abs(z - 6) <= 1)] = 4
    return lab


def test_count_components_counts_6_connected_pieces() -> None:
    m = torch.zeros(8, 8, 8, dtype=torch.bool)
    m[0:2, 0:2, 0:2] = True
    m[4:7, 4:7, 4:7] = True
    m[2, 2, 2] = True  # touches the first block only by a corner: its own piece under 6-connectivity
    assert count_components(m) == 3 and count_components(torch.zeros(3, 3, 3, dtype=torch.bool)) == 0


def test_derived_map_is_seeded_keeps_every_class_and_differs_from_its_source() -> None:
    lab = _body()
    a, _ = derive_label_map(lab, seed=3)
    b, _ = derive_label_map(lab, seed=3)
    c, _ = derive_label_map(lab, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.shape == lab.shape and a.dtype == lab.dtype
    assert set(np.unique(a)) == set(np.unique(lab))
    assert 0.02 < (a != lab).mean() < 0.5  # moved, but the same anatomy
    assert check_topology(lab, a, DeformConfig()) is None


def test_topology_check_refuses_vanished_resized_or_fragmented_classes() -> None:
    lab, cfg = _body(), DeformConfig()
    gone = lab.copy()
    gone[gone == 4] = 2
    assert check_topology(lab, gone, cfg) == "class 4 vanished"
    fat = lab.copy()
    x, y, _ = np.meshgrid(*[np.arange(s) for s in lab.shape], indexing="ij")
    fat[((x - 14) ** 2 + (y - 22) ** 2 < 11 ** 2) & (fat == 1)] = 2  # the organ 2.5 times its volume
    assert "class 2 volume" in check_topology(lab, fat, cfg)
    split = lab.copy()
    split[:, 21, :][split[:, 21, :] == 2] = 1  # a cut through the organ
    split[:, 22, :][split[:, 22, :] == 2] = 1
    split[14, :, :][split[14, :, :] == 2] = 1
    split[15, :, :][split[15, :, :] == 2] = 1
    assert "class 2 split into" in check_topology(lab, split, DeformConfig(volume_range=(0.1, 10)))
    with pytest.raises(UserError, match="no deformation kept the anatomy"):
        derive_label_map(lab, 0, DeformConfig(magnitude=(900.0, 1000.0), sigma=(1.0, 1.0), max_tries=2))


def test_derive_labels_command_writes_the_source_grid_and_a_record(tmp_path: Path) -> None:
    src = write_nifti(tmp_path / "labels" / "case_7.nii.gz", _body(), AFFINE)
    out = tmp_path / "derived"
    assert main(["derive-labels", "--labels", str(src.parent), "--out", str(out), "--n-per-label", "2",
                 "--seed", "5"]) == 0
    names = sorted(p.name for p in out.glob("*.nii.gz"))
    assert names == ["case_7_d0.nii.gz", "case_7_d1.nii.gz"]
    img = nib.load(str(out / names[0]))
    assert img.shape == _body().shape and np.allclose(img.affine, AFFINE)
    info = json.loads((out / "derive_info.json").read_text())
    assert [m["source"] for m in info["maps"]] == ["case_7.nii.gz"] * 2 and info["seed"] == 5
    again = tmp_path / "again"
    assert main(["derive-labels", "--labels", str(src.parent), "--out", str(again), "--n-per-label", "2",
                 "--seed", "5"]) == 0
    assert np.array_equal(np.asanyarray(img.dataobj), np.asanyarray(nib.load(str(again / names[0])).dataobj))
