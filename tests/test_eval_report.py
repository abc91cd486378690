"""``evaluate``: pairing by label-map name, mismatched inputs as one-line UserErrors, metrics.json and the
Markdown report with every referenced figure on disk."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medlsdm.config import load_config
from medlsdm.data.phantom import write_phantom_dataset
from medlsdm.errors import UserError
from medlsdm.evaluation.evaluate import evaluate, jsonable
from medlsdm.evaluation.features import fid_3d, load_extractor
from medlsdm.evaluation.pairing import load_cases, load_synthetic, pair_synthetic, real_cases
from medlsdm.evaluation.segmentation import TRUSTED_DICE

SHAPE = (16, 32, 32)


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny", {"data": {"shape": list(SHAPE), "spacing": None}, "seg": {"steps": 8}})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("rep") / "ph", 9, shape=SHAPE, seed=5, test_fraction=0.34,
                                 progress=False)


def _synthetic(folder: Path, data: Path, k_per_label: int = 1, noise: float = 40.0) -> Path:
    """'Synthetic' volumes: the real test images plus Gaussian noise (HU), named like ``medlsdm sample``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for f in sorted((data / "imagesTs").glob("*_0000.nii.gz")):
        img = nib.load(f)
        a = img.get_fdata().astype(np.float32)
        for k in range(k_per_label):
            noisy = a + rng.normal(0, noise, a.shape).astype(np.float32)
            nib.save(nib.Nifti1Image(noisy, img.affine), folder / f.name.replace("_0000.nii.gz", f"_s{k}.nii.gz"))
    return folder


def test_evaluate_writes_metrics_and_report(data, cfg, tmp_path):
    syn = _synthetic(tmp_path / "syn", data, k_per_label=2)
    out = tmp_path / "report"
    m = evaluate(data, syn, out, train=data, features="domain,random-medicalnet", cfg=cfg, lpips=False,
                 progress=False)
    on_disk = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert on_disk == m
    inp = m["inputs"]
    assert inp["n_real"] == 3 and inp["n_synthetic"] == 6 and inp["n_train"] == 6
    assert inp["pairs"]["phantom_006_s1"] == "phantom_006"  # paired by label-map name
    # noise-added real volumes are close to their partners
    assert 0.5 < m["paired"]["ssim"]["mean"] <= 1 and m["paired"]["psnr"]["mean"] > 20
    assert set(m["paired"]["rmse"]["per_volume"]) == set(inp["pairs"])
    assert "lpips" not in m["paired"]
    # every FID names its extractor and weights
    assert set(m["fid"]) == {"domain", "random-medicalnet"}
    for res in m["fid"].values():
        assert set(res["extractor"]) >= {"name", "weights", "sha256", "pretrained"}
        assert math.isfinite(res["3d"]) and res["3d"] > 0  # the noise shows
        # both extractors are 3D: no per-plane FID from slabs of their deepest feature map, and the result says so
        assert all(res[p] is None for p in ("axial", "coronal", "sagittal")) and "not reported" in res["note_planes"]
    # the FID reported per plane is the Fréchet distance of the real test set and the synthetic set (recomputed
    # here), and it orders by distance: identical sets ~0 < the 40 HU noise of the synthetic set < 300 HU noise
    cases = real_cases(data)
    real_set = load_cases(cases, cfg.data)
    synth_set, _ = load_synthetic(syn, cases, real_set, cfg.data)
    extractor = load_extractor("random-medicalnet")
    g = torch.Generator().manual_seed(0)
    noisier = [(x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1) for x in real_set.images]

    reported = m["fid"]["random-medicalnet"]["3d"]
    assert reported == pytest.approx(fid_3d(real_set.images, synth_set.images, extractor), rel=1e-6)
    same, far = fid_3d(real_set.images, real_set.images, extractor), fid_3d(real_set.images, noisier, extractor)
    assert same == pytest.approx(0.0, abs=1e-9)
    assert 0 < 10 * reported < far, (reported, far)
    assert m["fid"]["random-medicalnet"]["extractor"]["pretrained"] is False
    assert m["fid"]["domain"]["extractor"]["sha256"] == m["dice"]["segmenter"]["sha256"]
    assert (out / "segmenter.safetensors").is_file()
    assert set(m["dice"]["table"]) == {"real train", "real test", "synthetic"}
    assert all(0 <= row["mean"] <= 1 for row in m["dice"]["table"].values())
    assert m["privacy"]["n_synthetic"] == 6 and m["privacy"]["n_heldout"] == 3
    assert m["inter_slice"]["synthetic_mean"] > m["inter_slice"]["real_mean"]  # the added noise shows
    # the report references figures that exist, and every figure written is referenced
    report = (out / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {Path(p).name for p in linked} == {p.name for p in (out / "figures").glob("*.png")}
    for name in ("montage.png", "histograms.png", "fid.png", "dice.png", "paired_metrics.png", "inter_slice.png",
                 "privacy_closest_pairs.png"):
        assert f"figures/{name}" in linked and (out / "figures" / name).stat().st_size > 1000
    assert "Dice protocol" in report and "Privacy audit" in report and "**no**" in report
    # a saved segmenter is reused (no retraining) and gives the same domain FID and Dice
    again = evaluate(data, syn, tmp_path / "again", train=data, features="domain", lpips=False, privacy=False,
                     feature_weights=str(out / "segmenter.safetensors"), cfg=cfg, progress=False)
    assert again["dice"]["segmenter"]["sha256"] == m["dice"]["segmenter"]["sha256"]
    assert again["fid"]["domain"]["3d"] == pytest.approx(m["fid"]["domain"]["3d"], rel=1e-5)
    assert not (tmp_path / "again" / "segmenter.safetensors").exists()
    assert "loaded from" in (tmp_path / "again" / "report.md").read_text()


def test_evaluate_without_training_set(data, cfg, tmp_path):
    syn = _synthetic(tmp_path / "syn", data)
    (syn / "phantom_006_s0.png").write_bytes(b"preview")  # medlsdm sample writes previews beside the volumes
    m = evaluate(data, syn, tmp_path / "out", cfg=cfg, lpips=False, progress=False)
    assert m["inputs"]["n_synthetic"] == 3
    assert list(m["fid"]) == ["random-medicalnet"]  # auto without --train
    assert "dice" not in m and "privacy" not in m
    with pytest.raises(UserError, match="--train"):
        evaluate(data, syn, tmp_path / "out2", features="domain", cfg=cfg, lpips=False, progress=False)
    with pytest.raises(UserError, match="unknown extractor"):
        evaluate(data, syn, tmp_path / "out3", features="vgg", cfg=cfg, lpips=False, progress=False)


def test_mismatched_inputs_are_one_line_user_errors(data, cfg, tmp_path):
    cases = real_cases(data, "test")
    full = _synthetic(tmp_path / "full", data)
    assert len(pair_synthetic(full, cases)) == 3

    missing = tmp_path / "missing"  # one real case has no synthetic partner: counts differ
    shutil.copytree(full, missing)
    (missing / "phantom_007_s0.nii.gz").unlink()
    with pytest.raises(UserError,
                       match=r"imagesTs/phantom_007_0000\.nii\.gz: real case 'phantom_007' has no synthetic"):
        evaluate(data, missing, tmp_path / "o1", cfg=cfg, lpips=False, progress=False)

    stray = tmp_path / "stray"  # a synthetic volume without a real partner
    shutil.copytree(full, stray)
    shutil.copy(full / "phantom_006_s0.nii.gz", stray / "phantom_999_s0.nii.gz")
    with pytest.raises(UserError, match=r"phantom_999_s0\.nii\.gz: no real volume for label map 'phantom_999'"):
        pair_synthetic(stray, cases)

    shape = tmp_path / "shape"  # a synthetic volume on another voxel grid
    shutil.copytree(full, shape)
    img = nib.load(full / "phantom_008_s0.nii.gz")
    nib.save(nib.Nifti1Image(img.get_fdata()[:, :, :8].astype(np.float32), img.affine), shape / "phantom_008_s0.nii.gz")
    with pytest.raises(UserError, match=r"phantom_008_s0\.nii\.gz: shape \(32, 32, 8\) differs"):
        evaluate(data, shape, tmp_path / "o2", cfg=cfg, lpips=False, progress=False)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="empty"):
        evaluate(data, empty, tmp_path / "o3", cfg=cfg, lpips=False, progress=False)
    (empty / "notes.txt").write_text("no volumes here")
    with pytest.raises(UserError, match="no synthetic"):
        pair_synthetic(empty, cases)


def test_jsonable_is_strict_json():
    out = jsonable({"psnr": math.inf, "x": math.nan, "t": (1, np.float32(2.5)), "p": Path("a/b")})
    assert out == {"psnr": "inf", "x": None, "t": [1, 2.5], "p": "a/b"}
    json.dumps(out, allow_nan=False)


def test_volumes_larger_than_the_config_are_evaluated_whole_never_cropped(cfg, tmp_path):
    """24-slice volumes under a 16-slice config: the synthetic volumes differ from their partners only in the 4
    slices at each end that a centre crop to 16 would drop, so a cropping evaluation would score them identical."""
    data = write_phantom_dataset(tmp_path / "big", 5, shape=(24, 32, 32), seed=7, test_fraction=0.4, progress=False)
    # the second test case 4 slices shorter: a set of two depths (24, 20), as real data sets are
    last = sorted((data / "imagesTs").glob("*_0000.nii.gz"))[-1]
    for f in (last, data / "labelsTs" / last.name.replace("_0000", "")):
        img = nib.load(f)
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:, :, 2:22], img.affine), f)
    syn = tmp_path / "syn"
    syn.mkdir()
    for f in sorted((data / "imagesTs").glob("*_0000.nii.gz")):
        img = nib.load(f)
        a = img.get_fdata().astype(np.float32)
        assert a.shape[2] == (20 if f == last else 24)  # file axes (X, Y, Z): Z is depth
        a[:, :, :4] += 300.0
        a[:, :, -4:] -= 300.0
        nib.save(nib.Nifti1Image(a, img.affine), syn / f.name.replace("_0000.nii.gz", "_s0.nii.gz"))
    m = evaluate(data, syn, tmp_path / "out", train=data, features="random-medicalnet", cfg=cfg, lpips=False,
                 progress=False)
    assert m["inputs"]["n_real"] == 2 and m["inputs"]["n_train"] == 3
    assert all(v < 0.999 for v in m["paired"]["ssim"]["per_volume"].values())  # the end slices count
    assert all(v != "inf" and v < 60 for v in m["paired"]["psnr"]["per_volume"].values())
    assert any("evaluated whole, not cropped" in n for n in m["notes"])
    assert "evaluated whole" in (tmp_path / "out" / "report.md").read_text()
    assert m["dice"]["table"]["real test"]["n"] == 2
    weak = [n for n, v in m["dice"]["table"]["real test"]["per_class"].items() if v is not None and v < TRUSTED_DICE]
    assert weak and any("cannot judge" in n and all(c in n for c in weak) for n in m["notes"])
    assert math.isfinite(m["fidelity"]["grid"]["max"]) and math.isfinite(m["inter_slice"]["wasserstein"])
    # the loaders: whole by default in evaluation, the training crop only when asked for
    cases = real_cases(data)
    assert [x.shape[1] for x in load_cases(cases, cfg.data).images] == [24, 20]
    assert load_cases(cases, cfg.data, keep_larger=None).images[0].shape == (1, 16, 32, 32)
    real_set = load_cases(cases, cfg.data)
    assert real_set.larger_than((16, 32, 32)) == real_set.ids and real_set.larger_than((24, 32, 32)) == []
