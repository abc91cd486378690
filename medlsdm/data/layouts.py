"""Find the cases (image / label-map pairs) of a dataset on disk, for the common folder layouts.

Layouts: ``pairs`` (images/ + labels/), ``manifest`` (.csv or .json file), ``nnunet`` (dataset.json +
imagesTr/labelsTr), ``synthrad`` (<patient>/{ct,mr,mask}.nii.gz), ``dicom`` (series folders) and
``unlabelled`` (a flat folder of NIfTI images). ``layout="auto"`` picks one from what is there.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from medlsdm.data.checks import check_exists, check_nonempty_dir
from medlsdm.errors import UserError

LAYOUTS = ("pairs", "manifest", "nnunet", "synthrad", "dicom", "unlabelled")
_NIFTI = re.compile(r"\.nii(\.gz)?$")
_CHANNEL = re.compile(r"_\d{4}$")


@dataclass
class Case:
    """One sample: an image (NIfTI file or DICOM series folder) and/or a label map (NIfTI)."""

    id: str
    image: Path | None
    label: Path | None


def case_name(path: Path) -> str:
    """File name without ``.nii``/``.nii.gz`` and without an nnU-Net channel suffix ``_0000``."""
    name = _NIFTI.sub("", path.name)
    return name[: -len("_0000")] if name.endswith("_0000") else name


def nifti_stem(path: Path) -> str:
    """File name without ``.nii.gz`` (else without its last suffix); names the volumes sampled from a label map."""
    return path.name[:-7] if path.name.endswith(".nii.gz") else path.stem


def check_case_id(case_id: str, source: Path) -> str:
    """``case_id`` if it is safe as a file name (outputs are named after it), else a one-line UserError naming
    ``source``: no path separator, no NUL, not ``.`` / ``..``, no leading dot, at most 200 characters."""
    bad = ("/" in case_id or "\\" in case_id or "\0" in case_id or case_id in (".", "..") or case_id.startswith(".")
           or not case_id or len(case_id) > 200)
    if bad:
        raise UserError(f"{source}: case id {case_id!r} cannot name a file (no '/', '\\', leading '.' or '..'; "
                        "1-200 characters)")
    return case_id


def _first_channel(path: Path) -> bool:
    stem = _NIFTI.sub("", path.name)
    return not _CHANNEL.search(stem) or stem.endswith("_0000")


def _nifti_files(folder: Path) -> list[Path]:
    check_nonempty_dir(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and _NIFTI.search(p.name) and p.name[0] != ".")
    if not files:
        raise UserError(f"{folder}: no .nii / .nii.gz files in this folder")
    return files


def _match(images: list[Path], labels: list[Path] | None) -> list[Case]:
    """Pair images and labels by :func:`case_name`; any file without a partner is an error."""
    by_name = {case_name(p): p for p in images}
    if labels is None:
        return [Case(n, p, None) for n, p in by_name.items()]
    label_by_name = {case_name(p): p for p in labels}
    for name, path in by_name.items():
        if name not in label_by_name:
            raise UserError(f"{path}: no label map with a matching name")
    for name, path in label_by_name.items():
        if name not in by_name:
            raise UserError(f"{path}: no image with a matching name")
    return [Case(n, by_name[n], label_by_name[n]) for n in sorted(by_name)]


def _label_in_dir(label_dir: Path, case_id: str) -> Path | None:
    """``label_dir/<id>.nii(.gz)`` or the first NIfTI inside ``label_dir/<id>/``."""
    for suffix in (".nii.gz", ".nii"):
        if (label_dir / f"{case_id}{suffix}").is_file():
            return label_dir / f"{case_id}{suffix}"
    sub = label_dir / case_id
    if sub.is_dir():
        found = sorted(p for p in sub.iterdir() if _NIFTI.search(p.name))
        return found[0] if found else None
    return None


def _attach_labels(cases: list[Case], label_dir: str | Path | None) -> list[Case]:
    if label_dir is None:
        return cases
    label_dir = check_nonempty_dir(label_dir)
    for case in cases:
        case.label = _label_in_dir(label_dir, case.id)
        if case.label is None:
            raise UserError(f"{case.image}: no label map for case '{case.id}' in {label_dir}")
    return cases


# --------------------------------------------------------------------------------------- layouts


def _pairs(root: Path) -> list[Case]:
    return _match(_nifti_files(root / "images"), _nifti_files(root / "labels"))


def _manifest(path: Path) -> list[Case]:
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            if rows and "image" not in rows[0]:
                raise UserError(f"{path}: manifest needs an 'image' column (and 'label', optionally 'id')")
        else:
            data = json.loads(path.read_text())
            rows = data.get("training") if isinstance(data, dict) else data
            if not isinstance(rows, list) or not all(isinstance(r, dict) and "image" in r for r in rows):
                raise UserError(f"{path}: manifest must be a list of {{image, label}} entries or {{training: [...]}}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: cannot read manifest ({exc})") from None
    if not rows:
        raise UserError(f"{path}: manifest lists no cases")
    cases, seen = [], set()
    for row in rows:
        image = check_exists(path.parent / str(row["image"]).strip())
        label = row.get("label")
        label = check_exists(path.parent / str(label).strip()) if label not in (None, "") else None
        case_id = check_case_id(str(row.get("id") or "").strip() or case_name(image), path)
        if case_id in seen:
            raise UserError(f"{path}: case id '{case_id}' appears twice")
        seen.add(case_id)
        cases.append(Case(case_id, image, label))
    return cases


def _nnunet(root: Path, split: str) -> list[Case]:
    check_exists(root / "dataset.json")
    if split not in ("train", "test"):
        raise UserError(f"{root}: split must be 'train' or 'test', got {split!r}")
    suffix = "Tr" if split == "train" else "Ts"
    images_dir, labels_dir = root / f"images{suffix}", root / f"labels{suffix}"
    # only the first channel (_0000) of multi-channel cases; single-channel files may omit the suffix
    images = [p for p in _nifti_files(images_dir) if _first_channel(p)]
    labels = _nifti_files(labels_dir) if split == "train" or labels_dir.is_dir() else None
    return _match(images, labels)


def _synthrad(root: Path, image_key: str, label_dir: str | Path | None) -> list[Case]:
    check_nonempty_dir(root)
    cases = []
    for patient in sorted(p for p in root.iterdir() if p.is_dir()):
        found = [patient / f"{image_key}{s}" for s in (".nii.gz", ".nii") if (patient / f"{image_key}{s}").is_file()]
        if not found:
            raise UserError(f"{patient / image_key}.nii.gz: image not found (synthrad layout, image_key={image_key!r})")
        image = found[0]
        cases.append(Case(patient.name, image, None))
    if not cases:
        raise UserError(f"{root}: no patient folders")
    return _attach_labels(cases, label_dir)


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _dicom_folders(root: Path) -> list[Path]:
    folders = [root] if root.is_dir() else []
    folders += sorted(p for p in root.rglob("*") if p.is_dir())
    return [d for d in folders if any(_is_dicom(f) for f in d.iterdir() if f.is_file())]


def _dicom(root: Path, label_dir: str | Path | None) -> list[Case]:
    check_nonempty_dir(root)
    folders = _dicom_folders(root)
    if not folders:
        raise UserError(f"{root}: no DICOM files found (layout 'dicom')")
    cases = [Case("_".join(d.relative_to(root).parts) or d.name, d, None) for d in folders]
    return _attach_labels(cases, label_dir)


def _unlabelled(root: Path, label_dir: str | Path | None) -> list[Case]:
    return _attach_labels(_match(_nifti_files(root), None), label_dir)


def detect_layout(root: str | Path) -> str:
    """Guess the layout of ``root`` (see the module docstring); a UserError when nothing fits."""
    root = check_exists(root, "dataset path")
    if root.is_file():
        if root.suffix.lower() in (".csv", ".json"):
            return "manifest"
        raise UserError(f"{root}: a dataset is a folder or a .csv / .json manifest")
    check_nonempty_dir(root)
    if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        return "nnunet"
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return "pairs"
    subdirs = [p for p in root.iterdir() if p.is_dir()]
    if any((d / f"{k}.nii.gz").is_file() or (d / f"{k}.nii").is_file() for d in subdirs for k in ("ct", "mr")):
        return "synthrad"
    if any(_NIFTI.search(p.name) for p in root.iterdir() if p.is_file()):
        return "unlabelled"
    if _dicom_folders(root):
        return "dicom"
    raise UserError(f"{root}: cannot tell the dataset layout (expected one of {', '.join(LAYOUTS)})")


def find_cases(
    root: str | Path,
    layout: str = "auto",
    split: str = "train",
    label_dir: str | Path | None = None,
    image_key: str = "ct",
) -> list[Case]:
    """List the cases under ``root`` (a folder, or a manifest file): sorted by id; manifests keep their order.

    ``split`` applies to nnU-Net folders; ``image_key`` (ct / mr) and ``label_dir`` to SynthRAD
    folders (``label_dir`` also attaches label maps to ``dicom`` / ``unlabelled`` cases by id).
    """
    root = check_exists(root, "dataset path")
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "pairs":
        cases = _pairs(root)
    elif layout == "manifest":
        cases = _manifest(root)
    elif layout == "nnunet":
        cases = _nnunet(root, split)
    elif layout == "synthrad":
        cases = _synthrad(root, image_key, label_dir)
    elif layout == "dicom":
        cases = _dicom(root, label_dir)
    elif layout == "unlabelled":
        cases = _unlabelled(root, label_dir)
    else:
        raise UserError(f"{root}: unknown layout {layout!r} (expected auto or one of {', '.join(LAYOUTS)})")
    return cases


def read_label_names(root: str | Path) -> list[str] | None:
    """Class names from an nnU-Net / MSD ``dataset.json`` "labels" entry, ordered by index; else None.

    Accepts v2 ``{"background": 0, "liver": 1}`` and v1 ``{"0": "background", "1": "liver"}``; missing
    indices are named ``class_<i>``. Region-based v2 entries (lists) use their first value.
    """
    root = Path(root)
    path = root if root.name == "dataset.json" else root / "dataset.json"
    if not path.is_file():
        return None
    try:
        labels = json.loads(path.read_text()).get("labels")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise UserError(f"{path}: cannot read dataset.json ({exc})") from None
    if not isinstance(labels, dict) or not labels:
        return None
    try:
        if all(str(k).lstrip("-").isdigit() for k in labels):  # v1: index -> name
            index = {int(k): str(v) for k, v in labels.items()}
        else:  # v2: name -> index (or list of indices for regions)
            index = {int(v[0] if isinstance(v, list) else v): str(k) for k, v in labels.items()}
    except (TypeError, ValueError, IndexError):
        raise UserError(f"{path}: 'labels' must map names to integers (or integers to names)") from None
    return [index.get(i, f"class_{i}") for i in range(max(index) + 1)]
