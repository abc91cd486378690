"""The procedural phantom: determinism, classes, variation, unlabelled structure, texture, MR bias, files, speed."""

from __future__ import annotations

import json
import sys

import nibabel as nib
import numpy as np
import pytest

from medlsdm.data.phantom import (
    BODY,
    KIDNEY,
    LESION,
    LIVER,
    PAPER_SPACING,
    PHANTOM_LABELS,
    ROI_CENTRE_MM,
    SPINE,
    _single_thread,
    generate_phantom,
    phantom_spacing,
    write_phantom_dataset,
)
from medlsdm.data.phantom_anatomy import Anatomy
from medlsdm.errors import UserError

SHAPE = (16, 64, 64)


@pytest.fixture(scope="module")
def ct_subjects():
    return [generate_phantom(s, SHAPE, "ct") for s in range(8)]


def test_labels_match_config_defaults():
    from medlsdm.config import DataConfig

    assert PHANTOM_LABELS == ["background", "body", "liver", "kidney", "spine", "lesion"]
    assert DataConfig().label_names == PHANTOM_LABELS


def test_deterministic_by_seed():
    a_img, a_lab = generate_phantom(7, SHAPE, "ct")
    b_img, b_lab = generate_phantom(7, SHAPE, "ct")
    c_img, c_lab = generate_phantom(8, SHAPE, "ct")
    assert a_img.dtype == np.float32 and a_lab.dtype == np.uint8
    assert a_img.shape == a_lab.shape == SHAPE
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert (a_lab != c_lab).mean() > 0.01
    assert np.abs(a_img - c_img).mean() > 10
    # the same subject in MR has the same label map
    mr_img, mr_lab = generate_phantom(7, SHAPE, "mr")
    np.testing.assert_array_equal(mr_lab, a_lab)
    assert mr_img.min() >= 0


def test_classes_present_and_in_range(ct_subjects):
    all_six = 0
    for _, lab in ct_subjects:
        assert lab.max() <= 5
        present = set(np.unique(lab).tolist())
        assert {0, BODY, LIVER, KIDNEY, SPINE} <= present
        all_six += present == set(range(6))
    assert all_six >= 5  # lesions are absent in a minority of subjects only


def test_organs_inside_body(ct_subjects):
    for _, lab in ct_subjects:
        # every organ voxel has no background voxel as in-plane neighbour (organs are surrounded by body)
        organ = lab >= LIVER
        bg = lab == 0
        near_bg = np.zeros_like(bg)
        near_bg[:, 1:] |= bg[:, :-1]
        near_bg[:, :-1] |= bg[:, 1:]
        near_bg[:, :, 1:] |= bg[:, :, :-1]
        near_bg[:, :, :-1] |= bg[:, :, 1:]
        assert not (organ & near_bg).any()


def test_subjects_vary(ct_subjects):
    volumes = np.array([(lab == LIVER).sum() for _, lab in ct_subjects[:5]])
    centroids = np.array([np.argwhere(lab == LIVER).mean(0) for _, lab in ct_subjects[:5]])
    body = np.array([(lab > 0).sum() for _, lab in ct_subjects[:5]])
    assert volumes.std() / volumes.mean() > 0.08
    assert centroids[:, 2].max() - centroids[:, 2].min() > 2.0  # voxels, left-right
    assert body.std() / body.mean() > 0.05
    # the number of organs varies too: sometimes a single kidney, 0-3 lesions
    with _single_thread():
        anatomies = [Anatomy(np.random.default_rng(s)) for s in range(40)]
    assert {len(a.kidneys) for a in anatomies} == {1, 2}
    assert {len(a.lesions) for a in anatomies} == {0, 1, 2, 3}


def test_texture_and_ct_intensity_order(ct_subjects):
    for img, lab in ct_subjects:
        med = {c: np.median(img[lab == c]) for c in range(6) if (lab == c).any()}
        for c in med:
            assert img[lab == c].std() > 1.0  # textured, not flat colours
        assert med[0] < -900
        assert med[0] < med[BODY] < med[LIVER] < med[KIDNEY] < med[SPINE]
        assert med[SPINE] > 300
        if LESION in med:
            assert abs(med[LESION] - med[LIVER]) > 10


def _interior(mask: np.ndarray, steps: int = 2) -> np.ndarray:
    """In-plane erosion: drops the boundary voxels, where partial volume mixes classes."""
    for _ in range(steps):
        m = mask.copy()
        mask[:, 1:] &= m[:, :-1]
        mask[:, :-1] &= m[:, 1:]
        mask[:, :, 1:] &= m[:, :, :-1]
        mask[:, :, :-1] &= m[:, :, 1:]
    return mask


def test_unlabelled_structure():
    """Kidney cortex / medulla / sinus and liver vessels are in the image but not in the label map."""
    bright = []
    for seed in (3, 4, 5):
        img, lab = generate_phantom(seed, (16, 128, 128), "ct")
        liver = img[_interior(lab == LIVER)]
        med = np.median(liver)
        sigma = 1.4826 * np.median(np.abs(liver - med))  # texture + noise of a homogeneous tissue
        # a flat kidney would vary like the liver parenchyma (ratio ~1.3); cortex vs medulla gives ~4
        assert img[_interior(lab == KIDNEY)].std() > 2.5 * sigma
        bright.append((liver > med + 5 * sigma).mean())
        body = img[lab == BODY]
        assert (body < -60).mean() > 0.05 and (body > 0).mean() > 0.3  # fat and soft tissue, both "body"
    assert np.mean(bright) > 0.003  # enhancing vessels: a bright tail that Gaussian texture (~1e-4) lacks


def test_mr_bias_field_is_smooth_and_strong():
    for seed in (0, 1):
        biased, lab = generate_phantom(seed, SHAPE, "mr")
        flat, _ = generate_phantom(seed, SHAPE, "mr", mr_bias=0.0)
        tissue = (lab > 0) & (flat > 150)
        ratio = biased / np.maximum(flat, 1.0)
        lo, hi = np.percentile(ratio[tissue], [5, 95])
        assert hi / lo > 1.25  # a strong multiplicative field ...
        pairs = tissue[:, :, 1:] & tissue[:, :, :-1]
        assert np.abs(np.diff(ratio, axis=2))[pairs].mean() < 0.04  # ... that varies slowly


def test_bad_arguments():
    with pytest.raises(UserError, match="modality"):
        generate_phantom(0, SHAPE, "pet")
    with pytest.raises(UserError, match="shape"):
        generate_phantom(0, (2, 64, 64))


def test_write_dataset(tmp_path):
    out = write_phantom_dataset(tmp_path / "ds", n=5, modality="ct", shape=SHAPE, seed=3, progress=False)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {name: i for i, name in enumerate(PHANTOM_LABELS)}
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["numTraining"] == 4 and meta["file_ending"] == ".nii.gz"
    assert "phantom" in meta["description"] and "seed 3" in meta["description"]
    train = sorted(p.name for p in (out / "imagesTr").iterdir())
    assert train == [f"phantom_{i:03d}_0000.nii.gz" for i in range(4)]
    assert sorted(p.name for p in (out / "labelsTs").iterdir()) == ["phantom_004.nii.gz"]
    assert (out / "imagesTs" / "phantom_004_0000.nii.gz").is_file()
    assert not list(out.rglob("*.tmp"))

    img = nib.load(out / "imagesTr" / "phantom_001_0000.nii.gz")
    lab = nib.load(out / "labelsTr" / "phantom_001.nii.gz")
    assert img.shape == lab.shape == (SHAPE[2], SHAPE[1], SHAPE[0])  # (W, H, D) on disk
    case_seed = 3 * 100003 + 1
    sd, sh, sw = phantom_spacing(case_seed, SHAPE)
    np.testing.assert_allclose(np.diag(img.affine)[:3], [sw, sh, sd], rtol=1e-5)
    np.testing.assert_allclose(img.header.get_zooms(), [sw, sh, sd], rtol=1e-5)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    ref_img, ref_lab = generate_phantom(case_seed, SHAPE, "ct")
    np.testing.assert_array_equal(np.asarray(lab.dataobj).transpose(2, 1, 0), ref_lab)
    assert img.get_data_dtype() == np.int16  # CT in integer HU
    np.testing.assert_allclose(img.get_fdata().transpose(2, 1, 0), ref_img, atol=0.5)

    with pytest.raises(UserError, match="not empty"):
        write_phantom_dataset(out, n=2, shape=SHAPE, progress=False)
    write_phantom_dataset(out, n=2, modality="mr", shape=SHAPE, progress=False, overwrite=True)
    assert len(list((out / "imagesTr").iterdir())) == 1 and len(list((out / "imagesTs").iterdir())) == 1
    assert json.loads((out / "dataset.json").read_text())["channel_names"] == {"0": "MR"}


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    import medlsdm.data.phantom as phantom

    real = phantom.generate_phantom

    def failing(seed, *args, **kwargs):
        if seed == 2:
            raise KeyboardInterrupt
        return real(seed, *args, **kwargs)

    monkeypatch.setattr(phantom, "generate_phantom", failing)
    with pytest.raises(KeyboardInterrupt):
        write_phantom_dataset(tmp_path / "ds", n=4, shape=(8, 32, 32), progress=False)
    assert list(tmp_path.iterdir()) == []  # neither a partial data set nor its temporary folder
    monkeypatch.setattr(phantom, "generate_phantom", real)
    out = write_phantom_dataset(tmp_path / "ds", n=4, shape=(8, 32, 32), progress=False)  # a rerun just works
    assert (out / "dataset.json").is_file() and oct(out.stat().st_mode & 0o777) == "0o755"


def _python_calls(fn, *args) -> int:
    """Python and builtin function calls made while ``fn(*args)`` runs (the same on every machine and load)."""
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        fn(*args)
    finally:
        sys.setprofile(None)
    return calls


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_generation_is_vectorised(modality):
    """Phantoms are cheap because every voxel is computed in array operations: the Python work of one subject
    does not grow with its size (a per-voxel or per-slice Python loop would add calls for each of the 24 extra
    slices / 130k extra voxels here). This replaces a wall-clock limit, which failed under load; how long
    generation takes is a benchmark question (bench/), not a unit test's."""
    generate_phantom(3, (8, 32, 32), modality)  # imports and caches warm
    small = _python_calls(generate_phantom, 3, (8, 32, 32), modality)
    large = _python_calls(generate_phantom, 3, (32, 128, 128), modality)  # 4x the slices, 64x the voxels
    assert 0 < small and large - small <= 50, (small, large)  # equal today; the slack is for library versions


def test_region_at_a_given_spacing_is_a_window_onto_the_same_anatomy():
    """With ``spacing`` and ``centre`` the grid is a region of the same continuous anatomy: a 64 x 64 region is
    the centre of a 128 x 128 one around the same centre, voxel for voxel; the affine says where it is."""
    from medlsdm.data.phantom import PAPER_SPACING, ROI_CENTRE_MM, phantom_affine

    _, small = generate_phantom(4, (8, 64, 64), "ct", spacing=PAPER_SPACING, centre=ROI_CENTRE_MM)
    _, large = generate_phantom(4, (8, 128, 128), "ct", spacing=PAPER_SPACING, centre=ROI_CENTRE_MM)
    assert np.array_equal(small, large[:, 32:96, 32:96])
    assert {1, 2, 3, 4} <= set(np.unique(small).tolist())  # body, liver, kidney and spine in view
    sd, sh, sw = phantom_spacing(4, (8, 64, 64), PAPER_SPACING)
    assert (sd, sh, sw) == PAPER_SPACING  # exact: a preset resampling to it neither interpolates nor pads
    affine = phantom_affine((sd, sh, sw), (8, 64, 64), ROI_CENTRE_MM)
    centre_voxel = affine @ np.array([31.5, 31.5, 3.5, 1.0])  # (x, y, z) = (W, H, D) voxel -> RAS mm
    assert np.allclose(centre_voxel[:3], ROI_CENTRE_MM[::-1])


def test_lesion_appearance_switch_changes_only_the_lesions():
    """lesions="hypo" / "hyper": the same subject, label map and every voxel away from the lesions (the partial-volume
    blur spreads them by a voxel or two); only the lesions' intensity is fixed below / above the liver (mixed draws it
    per subject, and the label map cannot tell which)."""
    import torch
    import torch.nn.functional as F

    kw = dict(shape=(16, 64, 64), spacing=PAPER_SPACING, centre=ROI_CENTRE_MM)
    found = 0
    for seed in range(12):
        img, lab = generate_phantom(seed, **kw)
        lesion, liver = lab == LESION, lab == LIVER
        if lesion.sum() < 20:
            continue
        found += 1
        for kind, sign in (("hypo", -1), ("hyper", 1)):
            img2, lab2 = generate_phantom(seed, lesions=kind, **kw)
            np.testing.assert_array_equal(lab2, lab)
            away = F.max_pool3d(torch.from_numpy(lesion).float()[None, None], 7, 1, 3)[0, 0].numpy() == 0
            np.testing.assert_array_equal(img2[away], img[away])
            assert sign * (np.median(img2[lesion]) - np.median(img2[liver])) > 20  # HU
    assert found >= 3
    with pytest.raises(UserError, match="lesions"):
        generate_phantom(0, lesions="both")
