"""Finding cases in every supported folder layout, DICOM series, splitting, and ``prepare``."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from data_helpers import PATIENT_NAME, image_array, label_array, write_dicom_series, write_nifti, write_pair

from medlsdm.config import DataConfig
from medlsdm.data import (
    Case,
    VolumeDataset,
    detect_layout,
    find_cases,
    format_summary,
    load_case,
    prepare_dataset,
    read_label_names,
    save_volume,
    split_cases,
)
from medlsdm.errors import UserError

CFG = DataConfig(shape=(8, 16, 16), num_classes=4, label_names=["bg", "a", "b", "c"])


def _ids(cases):
    return [c.id for c in cases]


def test_pairs_matched_by_name(tmp_path):
    write_pair(tmp_path, "case1", seed=1, image_suffix="_0000")
    write_pair(tmp_path, "case2", seed=2)
    assert detect_layout(tmp_path) == "pairs"
    cases = find_cases(tmp_path)
    assert _ids(cases) == ["case1", "case2"]
    assert cases[0].image.name == "case1_0000.nii.gz" and cases[0].label.name == "case1.nii.gz"


def test_pairs_unmatched_names_fail(tmp_path):
    write_pair(tmp_path, "case1")
    write_nifti(tmp_path / "images" / "case9.nii.gz", image_array())
    with pytest.raises(UserError, match=r"case9\.nii\.gz: no label map with a matching name"):
        find_cases(tmp_path, "pairs")
    (tmp_path / "images" / "case9.nii.gz").unlink()
    write_nifti(tmp_path / "labels" / "orphan.nii", label_array())
    with pytest.raises(UserError, match=r"orphan\.nii: no image with a matching name"):
        find_cases(tmp_path, "pairs")


def test_csv_and_json_manifests(tmp_path):
    write_pair(tmp_path / "d", "x", seed=1)
    write_pair(tmp_path / "d", "y", seed=2)
    csv_path = tmp_path / "d" / "list.csv"
    csv_path.write_text("id,image,label\npatA,images/x.nii.gz,labels/x.nii.gz\n,images/y.nii.gz,\n")
    assert detect_layout(csv_path) == "manifest"
    cases = find_cases(csv_path)
    assert _ids(cases) == ["patA", "y"]
    assert cases[0].label == tmp_path / "d" / "labels" / "x.nii.gz" and cases[1].label is None
    entries = [{"image": "./images/x.nii.gz", "label": "./labels/x.nii.gz"}]
    for content in (entries, {"training": entries}):
        (tmp_path / "d" / "m.json").write_text(json.dumps(content))
        (case,) = find_cases(tmp_path / "d" / "m.json")
        assert case.id == "x" and case.image.is_file() and case.label.is_file()
    (tmp_path / "d" / "m.json").write_text(json.dumps([{"image": "images/missing.nii.gz"}]))
    with pytest.raises(UserError, match=r"missing\.nii\.gz: file not found"):
        find_cases(tmp_path / "d" / "m.json")


def test_manifest_ids_that_would_escape_the_output_folder_are_refused(tmp_path):
    """A manifest id names the latents / volumes written for it: `../../escaped` would write outside --out."""
    write_pair(tmp_path / "d", "x", seed=1)
    for bad in ("../../escaped_case", "a/b", "..", ".hidden", "a\\b"):
        path = tmp_path / "d" / "m.json"
        path.write_text(json.dumps([{"id": bad, "image": "images/x.nii.gz", "label": "labels/x.nii.gz"}]))
        with pytest.raises(UserError, match="cannot name a file"):
            find_cases(path)
    path.write_text(json.dumps([{"id": "patient 7 (follow-up)", "image": "images/x.nii.gz"}]))
    assert find_cases(path)[0].id == "patient 7 (follow-up)"


def test_nnunet_splits_and_label_names(tmp_path):
    root = tmp_path / "Dataset001_Toy"
    labels = {"background": 0, "liver": 1, "tumour": 3}
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".nii.gz"}))
    for name in ("t1", "t2"):
        write_nifti(root / "imagesTr" / f"{name}_0000.nii.gz", image_array())
        write_nifti(root / "imagesTr" / f"{name}_0001.nii.gz", image_array())  # second channel: ignored
        write_nifti(root / "labelsTr" / f"{name}.nii.gz", label_array())
    write_nifti(root / "imagesTs" / "s1_0000.nii.gz", image_array())
    assert detect_layout(root) == "nnunet"
    train = find_cases(root, split="train")
    assert _ids(train) == ["t1", "t2"] and all(c.label.parent.name == "labelsTr" for c in train)
    (test_case,) = find_cases(root, "nnunet", split="test")
    assert test_case.id == "s1" and test_case.label is None
    assert read_label_names(root) == ["background", "liver", "class_2", "tumour"]
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "spleen"}}))  # v1
    assert read_label_names(root) == ["background", "spleen"]
    assert read_label_names(tmp_path) is None


def test_synthrad_with_sibling_label_folder(tmp_path):
    root, seg = tmp_path / "Task1" / "brain", tmp_path / "labels"
    for patient in ("1BA001", "1BA002"):
        for key in ("ct", "mr", "mask"):
            write_nifti(root / patient / f"{key}.nii.gz", image_array())
    write_nifti(seg / "1BA001.nii.gz", label_array())
    write_nifti(seg / "1BA002" / "seg.nii.gz", label_array())
    assert detect_layout(root) == "synthrad"
    cases = find_cases(root, label_dir=seg, image_key="mr")
    assert _ids(cases) == ["1BA001", "1BA002"]
    assert [c.image.name for c in cases] == ["mr.nii.gz"] * 2
    assert cases[0].label == seg / "1BA001.nii.gz" and cases[1].label == seg / "1BA002" / "seg.nii.gz"
    assert all(c.label is None for c in find_cases(root, "synthrad"))
    (seg / "1BA002" / "seg.nii.gz").unlink()
    with pytest.raises(UserError, match=r"1BA002.*no label map for case '1BA002'"):
        find_cases(root, label_dir=seg)


def test_unlabelled_folder(tmp_path):
    write_nifti(tmp_path / "b.nii", image_array())
    write_nifti(tmp_path / "a.nii.gz", image_array())
    (tmp_path / "notes.txt").write_text("not an image")
    assert detect_layout(tmp_path) == "unlabelled"
    cases = find_cases(tmp_path)
    assert _ids(cases) == ["a", "b"] and all(c.label is None for c in cases)


def test_dicom_series_cases_load_as_hu_without_patient_data(tmp_path):
    root = tmp_path / "dicom"
    hu = write_dicom_series(root / "patient1" / "series1")
    write_dicom_series(root / "patient2" / "ct")
    for f in (root / "patient2" / "ct").iterdir():  # no extension: found by the DICM magic
        f.rename(f.with_suffix(""))
    assert detect_layout(root) == "dicom"
    cases = find_cases(root)
    assert _ids(cases) == ["patient1_series1", "patient2_ct"] and all(c.image.is_dir() for c in cases)
    cfg = DataConfig(shape=(4, 12, 10), ct_window=(-1024.0, 1000.0), num_classes=2)
    sample = load_case(cases[0], cfg, return_geometry=True)
    geom = sample["geometry"]
    assert geom.spacing == pytest.approx((3.0, 0.9, 0.7))
    assert sample["image"].shape == (1, 4, 12, 10)
    # RAS orientation flips rows and columns of an LPS-stored series; intensities are HU scaled by the window
    expected = (np.clip(hu, -1024, 1000) + 1024) / 2024 * 2 - 1
    np.testing.assert_allclose(sample["image"][0].numpy(), expected[:, ::-1, ::-1], atol=1e-5)
    out = tmp_path / "synthetic.nii.gz"
    save_volume(sample["image"], geom, out, cfg)
    img = nib.load(out)
    assert img.shape == (10, 12, 4)
    np.testing.assert_allclose(img.affine, geom.affine, atol=1e-5)
    np.testing.assert_allclose(np.asarray(img.dataobj).transpose(2, 1, 0), np.clip(hu, -1024, 1000), atol=0.05)
    raw = nib.load(out).header.binaryblock + (tmp_path / "synthetic.nii.gz").read_bytes()
    for secret in (PATIENT_NAME, "Doe", "ID-12345"):
        assert secret.encode() not in raw
    ds = VolumeDataset(cases, cfg, with_labels=False, cache_dir=tmp_path / "cache")
    assert torch.equal(ds[0]["image"], sample["image"])
    for cached in (tmp_path / "cache").iterdir():
        assert b"Doe" not in cached.read_bytes()


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(UserError, match=r"nowhere: dataset path not found"):
        find_cases(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: folder is empty"):
        find_cases(tmp_path / "empty")
    (tmp_path / "p" / "images").mkdir(parents=True)
    (tmp_path / "p" / "labels").mkdir()
    with pytest.raises(UserError, match=r"images: folder is empty"):
        find_cases(tmp_path / "p", "pairs")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "readme.md").write_text("hi")
    with pytest.raises(UserError, match=r"odd: cannot tell the dataset layout"):
        find_cases(tmp_path / "odd")


def test_split_is_deterministic_and_disjoint():
    cases = [Case(f"c{i}", None, None) for i in range(10)]
    train, val = split_cases(cases, 0.2, seed=3)
    assert len(train) == 8 and len(val) == 2
    assert {c.id for c in train} | {c.id for c in val} == {c.id for c in cases}
    again = split_cases(list(reversed(cases)), 0.2, seed=3)
    assert {c.id for c in again[1]} == {c.id for c in val}
    other_seeds = {frozenset(c.id for c in split_cases(cases, 0.2, seed=s)[1]) for s in range(6)}
    assert len(other_seeds) > 1
    assert [len(p) for p in split_cases(cases[:2], 0.01, seed=0)] == [1, 1]


def test_prepare_validates_caches_and_summarises(tmp_path):
    for i in range(4):
        write_pair(tmp_path / "data", f"c{i}", seed=i)
    summary = prepare_dataset(tmp_path / "data", CFG, cache_dir=tmp_path / "cache")
    assert summary.layout == "pairs" and [c.id for c in summary.cases] == ["c0", "c1", "c2", "c3"]
    assert summary.cases[0].shape == (10, 24, 20) and summary.cases[0].spacing == pytest.approx((2.5, 1.2, 0.8))
    assert all(sum(c.label_counts) == 8 * 16 * 16 for c in summary.cases)
    assert summary.totals == [sum(c.label_counts[k] for c in summary.cases) for k in range(4)]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4
    text = format_summary(summary)
    assert "bg" in text and "c3" in text and "10x24x20" in text
    assert text.splitlines()[-2].split()[1:] == [str(n) for n in summary.totals]
    with pytest.raises(UserError, match="not a positive multiple"):
        prepare_dataset(tmp_path / "data", CFG, multiple=(3, 8, 8), cache=False)
