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
from medlsdm.data.derive import (
    DeformConfig,
    _container,
    _ring,
    _same_grid,
    _with_contents,
    check_topology,
    count_components,
    derive_folder,
    derive_label_map,
    mix_label_maps,
)
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


def _boxes(organ2: tuple[slice, slice], organ3: tuple[slice, slice], body: slice = slice(2, 22)) -> np.ndarray:
    """A 24x24x12 map: a body box (1) holding two organ boxes (2, 3), each 5 slices deep."""
    lab = np.zeros((24, 24, 12), np.int16)
    lab[body, body, :] = 1
    lab[organ2 + (slice(3, 8),)] = 2
    lab[organ3 + (slice(3, 8),)] = 3
    return lab


def test_mixing_takes_the_listed_class_from_the_donor_inside_the_body_only() -> None:
    base = _boxes((slice(4, 9), slice(4, 9)), (slice(14, 19), slice(14, 19)))
    donor = _boxes((slice(0, 5), slice(12, 17)), (slice(6, 11), slice(6, 11)), body=slice(0, 24))  # 2 pokes out
    mixed = mix_label_maps(base, donor, [2], body=1)
    expected = base.copy()
    expected[4:9, 4:9, 3:8] = 1  # the organ's old place: the body around it
    expected[2:5, 12:17, 3:8] = 2  # the donor's organ, but not its part in base's air (x 0..1)
    assert np.array_equal(mixed, expected)
    assert np.array_equal(mixed == 3, base == 3)  # not listed: untouched
    assert set(np.unique(mixed)) == set(np.unique(base)) and not mixed[base == 0].any()
    both = mix_label_maps(base, donor, [2, 3], body=1)
    assert np.array_equal(both == 3, donor == 3) and np.isin(both[base == 3], [1, 3]).all()
    assert np.array_equal(mix_label_maps(base, donor, [2], fill=3, body=1)[4:9, 4:9, 3:8], np.full((5, 5, 5), 3))
    # organs on background (no body class): the box is just another organ, never overwritten; the donor's organ
    # goes onto background (x 0..1) only, and the old place takes the class around it
    free = mix_label_maps(base, donor, [2])
    only_air = base.copy()
    only_air[4:9, 4:9, 3:8] = 1
    only_air[0:2, 12:17, 3:8] = 2
    assert np.array_equal(free, only_air)
    bare, bare_donor = np.where(base == 1, 0, base), np.where(donor == 1, 0, donor)  # no body outline at all
    moved = mix_label_maps(bare, bare_donor, [2])
    assert not moved[4:9, 4:9, 3:8].any() and np.array_equal(moved == 2, bare_donor == 2)
    with pytest.raises(UserError, match="shapes"):
        mix_label_maps(base, donor[:20], [2])


def _moved(dx: int, dy: int) -> np.ndarray:
    """_body() with its organs (not the body outline) moved by (dx, dy) voxels."""
    lab = _body()
    organs = np.roll(np.where(lab > 1, lab, 0), (dx, dy), (0, 1))
    out = (lab > 0).astype(np.int16)
    out[organs > 0] = organs[organs > 0]
    return out


def test_derive_folder_with_mixing_is_seeded_records_donors_and_keeps_every_class(tmp_path: Path) -> None:
    labels = tmp_path / "labels"
    for name, lab in [("a", _body()), ("b", _moved(3, -2)), ("c", _moved(-2, 3)), ("d", _body()[2:38])]:
        write_nifti(labels / f"{name}.nii.gz", lab, AFFINE)
    cfg = DeformConfig(mix_prob=1.0, body_class=1)

    def run(out: str, seed: int) -> tuple[dict, dict]:
        derive_folder(labels, tmp_path / out, seed=seed, cfg=cfg)
        info = json.loads((tmp_path / out / "derive_info.json").read_text())
        return info, {p.name: p.read_bytes() for p in sorted((tmp_path / out).glob("*.nii.gz"))}

    info, first = run("one", 0)
    _, again = run("two", 0)
    _, other = run("three", 1)
    assert first == again and first != other
    maps = {m["source"]: m for m in info["maps"]}
    for name in "abc":
        assert maps[f"{name}.nii.gz"]["donor"] in {"a.nii.gz", "b.nii.gz", "c.nii.gz"} - {f"{name}.nii.gz"}
        mixed = maps[f"{name}.nii.gz"]["mixed_classes"]
        assert mixed in ([2, 4], [3])  # one organ, never the body; the lesion only ever moves with organ 2
    assert maps["d.nii.gz"]["donor"] is None and maps["d.nii.gz"]["mixed_classes"] == []  # no map of its shape
    assert info["settings"]["mix_prob"] == 1.0
    for name in first:
        derived = np.asanyarray(nib.load(str(tmp_path / "one" / name)).dataobj)
        assert set(np.unique(derived)) == {0, 1, 2, 3, 4}


def test_a_structure_inside_a_mixed_organ_moves_with_it() -> None:
    body = _body()
    assert _container(body, 4, 1) == 2 and _container(body, 2, 1) is None and _container(body, 3, 1) is None
    big = body.copy()
    big[11:20, 29:33][big[11:20, 29:33] == 1] = 4  # a block against the organ, inside the body, a quarter its size
    assert not (big[_ring(big == 4)] == 0).any() and (big[_ring(big == 4)] == 2).any()
    assert _container(big, 4, 1) is None  # too large to lie inside the organ it touches: an organ of its own
    assert _with_contents([2], body, body=1) == [2, 4] and _with_contents([3], body, body=1) == [3]
    far = _moved(5, -4)  # its organ does not cover where the base's lesion was: that place must not open to air
    hole = mix_label_maps(body, far, _with_contents([2], body, far, body=1), body=1)
    assert not hole[(body != 0) & (hole == 0)].any() and not hole[body == 0].any()
    mixed = mix_label_maps(body, _moved(3, -2), _with_contents([2], body, _moved(3, -2), body=1), body=1)
    les = np.pad(mixed == 4, 1)
    ring = (les[:-2, 1:-1, 1:-1] | les[2:, 1:-1, 1:-1] | les[1:-1, :-2, 1:-1] | les[1:-1, 2:, 1:-1]
            | les[1:-1, 1:-1, :-2] | les[1:-1, 1:-1, 2:]) & (mixed != 4)
    assert (mixed == 4).sum() == 27 and (mixed[ring] == 2).all()  # whole, and still inside the (moved) organ


def test_donors_share_shape_orientation_and_voxel_size_not_position() -> None:
    g = ((40, 40, 12), ("R", "A", "S"), (1.0, 1.0, 3.0))
    assert _same_grid(g, ((40, 40, 12), ("R", "A", "S"), (1.05, 0.97, 3.1)))  # another patient, same protocol
    assert not _same_grid(g, ((40, 40, 12), ("L", "P", "S"), (1.0, 1.0, 3.0)))  # mirrored: organs would flip
    assert not _same_grid(g, ((40, 40, 12), ("R", "A", "S"), (1.0, 1.0, 5.0)))  # other slice thickness
    assert not _same_grid(g, ((40, 40, 10), ("R", "A", "S"), (1.0, 1.0, 3.0))) and not _same_grid(g, None)


def test_no_mixing_gives_the_unmixed_maps(tmp_path: Path) -> None:
    labels = tmp_path / "labels"
    for name, lab in [("a", _body()), ("b", _moved(3, -2))]:
        write_nifti(labels / f"{name}.nii.gz", lab, AFFINE)
    derive_folder(labels, tmp_path / "plain", seed=2)
    derive_folder(labels, tmp_path / "zero", seed=2, cfg=DeformConfig(mix_prob=0.0, mix_classes=3))
    for name, lab in [("a", _body()), ("b", _moved(3, -2))]:
        plain, zero = (tmp_path / "plain" / f"{name}_d0.nii.gz"), (tmp_path / "zero" / f"{name}_d0.nii.gz")
        assert plain.read_bytes() == zero.read_bytes()
        s = json.loads((tmp_path / "zero" / "derive_info.json").read_text())["maps"][0 if name == "a" else 1]
        assert s["donor"] is None and s["mixed_classes"] == []
        assert np.array_equal(np.asanyarray(nib.load(str(zero)).dataobj), derive_label_map(lab, s["seed"])[0])


def test_bad_mixing_settings_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for bad in (dict(mix_prob=1.5), dict(mix_prob=-0.1), dict(mix_classes=0), dict(body_class=0)):
        with pytest.raises(UserError, match="mix_prob must be in") as exc:
            DeformConfig(**bad)
        assert "\n" not in str(exc.value)
    assert main(["derive-labels", "--labels", str(tmp_path), "--out", str(tmp_path / "o"), "--mix-prob", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--mix-prob: must be between 0 and 1" in err and len(err.splitlines()) == 1
    assert main(["derive-labels", "--labels", str(tmp_path), "--out", str(tmp_path / "o"), "--mix-classes", "0"]) == 2
    assert "--mix-classes: must be at least 1" in capsys.readouterr().err
