"""``medlsdm demo --fast``: the whole chain runs and leaves volumes with their label maps' geometry."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medlsdm.cli import main


@pytest.mark.slow
def test_demo_fast_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--fast", "--device", "cpu"]) == 0
    vols = sorted((out / "samples").glob("*.nii.gz"))
    labels = sorted((out / "data" / "labelsTs").glob("*.nii.gz"))
    assert len(vols) == len(labels) == 2
    for v, lab in zip(vols, labels):
        a, b = nib.load(str(v)), nib.load(str(lab))
        assert a.shape == b.shape and np.allclose(a.affine, b.affine)
    summary = (out / "SUMMARY.md").read_text()
    assert "same geometry" in summary and "| NO |" not in summary
    assert "Can each class be seen?" in summary  # the contrast table
    # the demo's phantoms give every lesion one appearance (hypodense), so a label map says how a lesion looks
    for img_path in sorted((out / "data" / "imagesTr").glob("*.nii.gz")):
        lab = np.asarray(nib.load(str(out / "data" / "labelsTr" / img_path.name.replace("_0000", ""))).dataobj)
        img = np.asarray(nib.load(str(img_path)).dataobj)
        if (lab == 5).sum() >= 20:
            assert np.median(img[lab == 5]) < np.median(img[lab == 2]) - 15
    assert main(["demo", "--out", str(out), "--fast", "--device", "cpu"]) == 0  # a rerun resumes, finishes again
