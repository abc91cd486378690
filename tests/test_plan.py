"""medlsdm plan: a config from the data set itself, used whenever --config is absent; contradictions stop."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from data_helpers import write_nifti

from medlsdm.cli import _config_for, _model_config, main
from medlsdm.config import load_config
from medlsdm.data.plan import check_config_against_data, fingerprint, plan_config
from medlsdm.errors import UserError

MR_AFFINE = np.diag([1.5, 1.5, 4.0, 1.0])  # RAS: (x, y, z) voxels of 1.5 x 1.5 x 4 mm -> (D, H, W) = (4, 1.5, 1.5) mm


def _mr_dataset(root: Path, n: int = 3, values=(0, 1, 2, 3), names=None, channel="T1") -> Path:
    """nnU-Net layout, MR: images of 40 x 40 x 8 voxels (60 x 60 x 32 mm), label values ``values``."""
    rng = np.random.default_rng(0)
    for k in range(n):
        img = rng.uniform(0, 800, size=(40, 40, 8)).astype(np.float32)
        lab = rng.choice(np.array(values), size=(40, 40, 8)).astype(np.int16)
        write_nifti(root / "imagesTr" / f"mr_{k:03d}_0000.nii.gz", img, MR_AFFINE)
        write_nifti(root / "labelsTr" / f"mr_{k:03d}.nii.gz", lab, MR_AFFINE)
    names = names or ["background", "tumour", "oedema", "necrosis"]
    meta = {"channel_names": {"0": channel}, "labels": {name: i for i, name in enumerate(names)},
            "numTraining": n, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_plan_reads_modality_classes_names_spacing_and_shape(tmp_path: Path, phantoms: Path, capsys) -> None:
    mr = _mr_dataset(tmp_path / "mr")
    assert main(["plan", "--data", str(mr), "--out", str(tmp_path / "mr.yaml")]) == 0
    printed = capsys.readouterr().out
    assert "channel 'T1' is not CT" in printed
    cfg = load_config(tmp_path / "mr.yaml")  # a plan is a config file
    assert cfg.data.modality == "mr" and cfg.data.num_classes == 4
    assert cfg.data.label_names == ["background", "tumour", "oedema", "necrosis"]
    assert cfg.data.spacing is None  # every case shares one spacing: no resampling
    assert cfg.data.shape == (8, 40, 40)  # 32 x 60 x 60 mm at 4 x 1.5 x 1.5 mm, multiples of 8: (8, 40, 40)
    ct, why = plan_config(fingerprint(phantoms))
    assert ct.data.modality == "ct" and ct.data.num_classes == 6
    assert ct.data.label_names == ["background", "body", "liver", "kidney", "spine", "lesion"]
    assert any("channel 'CT' is CT" in line for line in why)


def test_plan_remaps_gappy_labels_resamples_mixed_spacing_and_fits_memory(tmp_path: Path) -> None:
    mr = _mr_dataset(tmp_path / "mr", values=(0, 2, 7), names=["background", "a", "b", "c", "d", "e", "f", "g"])
    write_nifti(mr / "imagesTr" / "mr_009_0000.nii.gz", np.zeros((20, 20, 8), np.float32), np.diag([3, 3, 4, 1.0]))
    write_nifti(mr / "labelsTr" / "mr_009.nii.gz", np.zeros((20, 20, 8), np.int16), np.diag([3, 3, 4, 1.0]))
    cfg, _ = plan_config(fingerprint(mr))
    assert cfg.data.label_remap == {0: 0, 2: 1, 7: 2} and cfg.data.num_classes == 3
    assert cfg.data.label_names == ["background", "b", "g"]  # names by label value from dataset.json
    assert cfg.data.spacing == (4.0, 1.5, 1.5)  # median of 1.5, 1.5, 1.5, 3 mm in-plane
    roomy, _ = plan_config(fingerprint(mr), base="paper", gpu_memory_gb=80)
    assert roomy.data.shape == (16, 32, 32)  # the median case, axes multiples of the paper model's 16
    small, why = plan_config(fingerprint(mr), base="paper", gpu_memory_gb=0.06)
    assert np.prod(small.data.shape) * 11.8 / (32 * 256 * 256) <= 0.06 and np.prod(small.data.shape) < 16 * 32 * 32
    assert all(s % 16 == 0 for s in small.data.shape) and "0.06 GB" in why[-1]
    with pytest.raises(UserError, match="even the smallest shape"):
        plan_config(fingerprint(mr), base="paper", gpu_memory_gb=0.01)


def test_ct_without_dataset_json_is_recognised_by_its_air(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for k in range(2):
        img = rng.uniform(-1000, 400, size=(16, 16, 8)).astype(np.float32)
        write_nifti(tmp_path / "d" / "images" / f"c{k}.nii.gz", img, np.eye(4))
        write_nifti(tmp_path / "d" / "labels" / f"c{k}.nii.gz", (img > 0).astype(np.int16), np.eye(4))
    fp = fingerprint(tmp_path / "d")
    assert fp.modality == "ct" and "air in HU" in fp.modality_reason and fp.label_values == [0, 1]
    assert plan_config(fp)[0].data.label_names == ["background", "class_1"]


def test_dicom_geometry_is_ras_dhw_like_nifti_and_preprocessing(tmp_path: Path) -> None:
    """A sagittal DICOM series (file axes P, I, R) is planned in the RAS (D, H, W) order that preprocessing uses, as
    the same volume written as NIfTI is."""
    from data_helpers import write_dicom_series

    from medlsdm.config import DataConfig
    from medlsdm.data.plan import _volume_geometry
    from medlsdm.data.transforms import preprocess, read_volume

    series = tmp_path / "dicom" / "patient1" / "sag"
    write_dicom_series(series, sagittal=True)
    array, affine = read_volume(series)
    nifti = write_nifti(tmp_path / "sag.nii.gz", array.numpy(), affine)
    shape, spacing = _volume_geometry(series)
    assert shape == (12, 10, 4) and spacing == pytest.approx((0.9, 0.7, 3.0))  # S-I rows, P-A columns, L-R slices
    nifti_shape, nifti_spacing = _volume_geometry(nifti)
    assert shape == nifti_shape and spacing == pytest.approx(nifti_spacing)
    _, geometry = preprocess(array, affine, DataConfig(shape=(4, 4, 4), num_classes=2), is_label=False)
    assert shape == geometry.oriented_shape_dhw and spacing == pytest.approx(geometry.spacing)
    fp = fingerprint(tmp_path / "dicom")
    assert fp.layout == "dicom" and fp.shapes == [shape] and fp.spacings == [pytest.approx(spacing)]


def test_commands_without_config_use_the_plan_and_contradictions_stop(tmp_path: Path, capsys) -> None:
    mr = _mr_dataset(tmp_path / "mr")
    run = tmp_path / "vq"
    assert main(["train-vqgan", "--data", str(mr), "--out", str(run), "--max-steps", "1", "--no-progress",
                 "--set", "train_vqgan.val_every=1000"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["modality"] == "mr" and saved["data"]["num_classes"] == 4
    assert saved["data"]["label_names"] == ["background", "tumour", "oedema", "necrosis"]
    assert saved["train_vqgan"]["val_every"] == 1000  # --set applied on top of the plan
    assert "no --config: planned from" in capsys.readouterr().out
    # evaluation commands resolve their config through the same function (the plan of --real)
    ns = argparse.Namespace(config=None, set=[], layout="auto", label_dir=None)
    assert _config_for(ns, mr).data.modality == "mr"
    # ... or, with --model, through the config of the run that made the volumes (its segmenter too)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["seg"]["steps"] = 7
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with_model = argparse.Namespace(config=None, set=[], layout="auto", label_dir=None, model=run)
    assert _config_for(with_model, mr, _model_config(with_model)).seg.steps == 7
    assert _config_for(argparse.Namespace(**{**vars(with_model), "set": ["seg.steps=9"]}), mr,
                       _model_config(with_model)).seg.steps == 9
    with pytest.raises(UserError, match="no config.yaml here"):
        _model_config(argparse.Namespace(model=tmp_path))
    capsys.readouterr()
    assert main(["train-vqgan", "--data", str(mr), "--config", "tiny", "--out", str(tmp_path / "x"),
                 "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "dataset.json: channel 'T1' is not CT, but the config has data.modality 'ct'" in err
    assert "\n" not in err and not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="lists 4 label classes, but the config has data.num_classes 6"):
        check_config_against_data(load_config("tiny", {"data": {"modality": "mr"}}), mr)


def test_segtest_with_model_runs_with_the_runs_config_end_to_end(tmp_path: Path, capsys) -> None:
    """``segtest --model RUN`` without --config trains the segmenter the run's config.yaml describes (2 steps on
    8^3 patches), not the plan's or the tiny preset's (1200 steps on 16 x 32 x 32); the record says so."""
    data = tmp_path / "ph"
    assert main(["phantom", "--out", str(data), "--n", "3", "--shape", "8", "16", "16", "--test-fraction", "0.34"]) == 0
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config("tiny", {"data": {"shape": [8, 16, 16], "spacing": None},
                               "seg": {"channels": [4, 8], "patch": [8, 8, 8], "steps": 2, "crop_balance": "none"}})
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["segtest", "--real", str(data), "--out", str(tmp_path / "seg"), "--model", str(run)]) == 0
    record = json.loads((tmp_path / "seg" / "segtest.json").read_text())
    assert record["segmenter"]["steps"] == 2 and record["segmenter"]["patch"] == [8, 8, 8]
    assert "planned from" not in capsys.readouterr().out
