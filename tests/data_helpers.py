"""Tiny NIfTI / DICOM files for the data-layer tests (no phantom generator, no downloads)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

# A non-RAS (L, P, S-ish), anisotropic, translated affine: axis 0 runs right->left, axis 1 anterior->posterior.
AFFINE = np.array(
    [
        [-0.8, 0.0, 0.0, 30.0],
        [0.0, -1.2, 0.0, -12.5],
        [0.0, 0.0, 2.5, 7.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
SHAPE_XYZ = (20, 24, 10)
PATIENT_NAME = "Doe^Jane^Secret"


def label_array(shape=SHAPE_XYZ, values=(0, 1, 2, 3), seed: int = 0) -> np.ndarray:
    """Blocky integer label map: random class per 2x2x2 block, so nearest resampling is testable."""
    rng = np.random.default_rng(seed)
    blocks = rng.choice(np.array(values), size=tuple((s + 1) // 2 for s in shape))
    full = blocks.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    return full[: shape[0], : shape[1], : shape[2]].astype(np.int16)


def image_array(shape=SHAPE_XYZ, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1000, 1000, size=shape).astype(np.float32)


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE, descrip: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, affine)
    if descrip:
        img.header["descrip"] = descrip.encode()
        img.header["db_name"] = descrip[:17].encode()
        img.header["aux_file"] = descrip[:23].encode()
    nib.save(img, str(path))
    return path


def write_pair(root: Path, name: str, seed: int = 0, image_suffix: str = "") -> tuple[Path, Path]:
    img = write_nifti(root / "images" / f"{name}{image_suffix}.nii.gz", image_array(seed=seed))
    lab = write_nifti(root / "labels" / f"{name}.nii.gz", label_array(seed=seed))
    return img, lab


def write_dicom_series(folder: Path, n_slices: int = 4, rows: int = 12, cols: int = 10,
                       sagittal: bool = False) -> np.ndarray:
    """A CT series with RescaleSlope/Intercept and PatientName; returns the stored HU values (Z, rows, cols).
    Axial slices, or with ``sagittal`` slices stacked left -> right whose rows run posterior and columns inferior."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 2000, size=(n_slices, rows, cols)).astype(np.uint16)
    slope, intercept = 1.0, -1024.0
    for k in range(n_slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality = "CT"
        ds.PatientName = PATIENT_NAME
        ds.PatientID = "ID-12345"
        ds.InstanceNumber = k + 1
        if sagittal:
            ds.ImagePositionPatient = [5.0 + 3.0 * k, -20.0, 10.0]
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        else:
            ds.ImagePositionPatient = [-10.0, -20.0, 5.0 + 3.0 * k]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.9, 0.7]  # row spacing, column spacing
        ds.SliceThickness = 3.0
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = raw[k].tobytes()
        ds.save_as(str(folder / f"slice{k:03d}.dcm"), enforce_file_format=True)
    return raw.astype(np.float32) * slope + intercept
