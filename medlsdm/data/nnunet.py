"""Synthetic training sets in nnU-Net's raw dataset format (``medlsdm sample ... --dataset OUT``).

    OUT/dataset.json                  channel_names, labels (name -> 0..C-1), numTraining, file_ending
    OUT/imagesTr/<case>_0000.nii.gz   synthetic volumes (and, with ``with_real``, the real training images)
    OUT/labelsTr/<case>.nii.gz        their label maps as class indices 0..C-1, on the image's voxel grid
    OUT/cases.csv                     which case is synthetic or real, its source label map / case and sample

Every file gets a fresh header (geometry only). Label values are written as the model's class indices, so a
data set with ``label_remap`` becomes the consecutive labels nnU-Net requires. Checked against nnU-Net's own
``verify_dataset_integrity`` in ``bench/nnunet_check.py``.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np

from medlsdm.config import DataConfig
from medlsdm.data.layouts import find_cases, nifti_stem
from medlsdm.data.transforms import read_volume, remap_labels, write_nifti
from medlsdm.errors import UserError
from medlsdm.io import atomic_dir, atomic_write_text, folder_lock

__all__ = ["write_nnunet_dataset", "channel_name"]


def channel_name(cfg: DataConfig, real: Path | None = None) -> str:
    """The first channel's name: the real data set's own (dataset.json) when given, else CT / MR."""
    from medlsdm.data.plan import dataset_channel

    if real is not None:
        name = dataset_channel(real if real.is_dir() else real.parent)
        if name:
            return name
    return "CT" if cfg.modality == "ct" else "MR"


def _write_label(path: Path, source: Path, cfg: DataConfig) -> None:
    array, affine = read_volume(source)  # the header checks of every medlsdm read
    classes = remap_labels(array.round().long(), cfg, source)
    write_nifti(classes.numpy().astype(np.uint8 if cfg.num_classes < 256 else np.int16), affine, path)


def write_nnunet_dataset(synthetic: Path, label_maps: list[Path], out: Path, cfg: DataConfig,
                         with_real: Path | None = None, layout: str = "auto", overwrite: bool = False) -> Path:
    """Collect the volumes ``synthetic/<label>_s<k>.nii.gz`` made from ``label_maps`` (and, with ``with_real``, the
    labelled training cases of that data set) into an nnU-Net raw dataset at ``out``, built aside and moved into
    place whole. ``out`` must be new or empty (or an earlier such dataset with ``overwrite``)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (overwrite and (out / "cases.csv").is_file()):
        raise UserError(f"{out}: exists and is not empty; write the dataset into a new folder (--overwrite replaces "
                        "an earlier medlsdm dataset)")
    cases: list[dict] = []
    for f in label_maps:
        for vol in sorted(Path(synthetic).glob(f"{nifti_stem(f)}_s*.nii.gz")):
            k = vol.name[len(nifti_stem(f)) + 2:-7]
            if k.isdigit():
                cases.append(dict(case=f"syn_{nifti_stem(f)}_s{k}", kind="synthetic", image=vol, label=f,
                                  source=f.name, sample=int(k)))
    if not cases:
        raise UserError(f"{synthetic}: no synthetic volumes (<label>_s<k>.nii.gz) for the given label maps")
    if with_real is not None:
        for c in find_cases(Path(with_real), layout, split="train"):
            if c.label is None:
                raise UserError(f"{c.image}: no label map; --with-real needs labelled cases")
            cases.append(dict(case=f"real_{c.id}", kind="real", image=c.image, label=c.label, source=c.id,
                              sample=""))
    info_path = Path(synthetic) / "sample_info.json"
    model = json.loads(info_path.read_text()).get("model_weights_sha256", "") if info_path.is_file() else ""
    with folder_lock(out), atomic_dir(out) as tmp:
        for c in cases:
            image = tmp / "imagesTr" / f"{c['case']}_0000.nii.gz"
            if c["kind"] == "synthetic":
                image.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(c["image"], image)  # written by medlsdm: a fresh header already
            else:  # the user's file may carry patient fields in its header: rewrite with geometry only
                array, affine = read_volume(c["image"])
                write_nifti(array.numpy().astype(np.float32), affine, image)
            _write_label(tmp / "labelsTr" / f"{c['case']}.nii.gz", Path(c["label"]), cfg)
        meta = {"channel_names": {"0": channel_name(cfg, with_real)},
                "labels": {name: i for i, name in enumerate(cfg.label_names)},
                "numTraining": len(cases), "file_ending": ".nii.gz",
                "description": "medlsdm synthetic training set; cases.csv says which cases are synthetic"}
        atomic_write_text(tmp / "dataset.json", json.dumps(meta, indent=2) + "\n")
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["case", "kind", "source", "sample", "model_weights_sha256"])
        for c in cases:
            writer.writerow([c["case"], c["kind"], c["source"], c["sample"], model if c["kind"] == "synthetic"
                             else ""])
        atomic_write_text(tmp / "cases.csv", text.getvalue())
    return out
