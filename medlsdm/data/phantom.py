"""Procedural 3D abdominal phantoms: the built-in data set for the demo, the tests and the benchmarks.

One seed gives one subject: a label map with the six classes of :data:`PHANTOM_LABELS` and a CT
(Hounsfield units) or MR (T1-like, arbitrary positive units) image. The image holds structure that
the label map does not describe (kidney cortex, medulla and sinus, liver vessels, subcutaneous and
visceral fat, aorta and vena cava, bowel gas, spinal canal, discs, a cortical shell on the bone),
textured tissue, noise, partial-volume blur and, for MR, a smooth multiplicative bias field.

Axes: arrays are (D, H, W) with D -> superior, H -> anterior and W -> the patient's right, so the
NIfTI files (stored as X, Y, Z = W, H, D) carry a plain RAS affine. The anatomy is defined in
continuous coordinates, so a seed gives the same label map for CT and MR and, up to resolution, at every
shape. By default the grid covers the nominal field of view (:data:`FOV_MM`, the whole abdomen) and the
voxel spacing follows from the shape; with ``spacing`` (and ``centre``) it is a region of that size at that
voxel size, e.g. :data:`PAPER_SPACING` (the paper's AutoPET voxels) around :data:`ROI_CENTRE_MM`: the paper's
scale of structures at a fraction of its volume size (the demo and the benchmarks use that).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter
from tqdm import tqdm

from medlsdm.data.phantom_anatomy import UNIT_MM, Anatomy, NoiseField
from medlsdm.errors import UserError
from medlsdm.io import atomic_path, atomic_write_text

PHANTOM_LABELS = ["background", "body", "liver", "kidney", "spine", "lesion"]
BACKGROUND, BODY, LIVER, KIDNEY, SPINE, LESION = range(6)
MODALITIES = ("ct", "mr")
LESIONS = ("mixed", "hypo", "hyper")  # lesion appearance: per subject at random, or always hypo- / hyperdense
FOV_MM = (96.0, 384.0, 384.0)  # nominal field of view (D, H, W); a volume of shape s has spacing FOV_MM / s
PAPER_SPACING = (3.0, 2.0, 2.0)  # (D, H, W) mm: AutoPET's voxel size (paper Table 1)
# (D, H, W) = (superior, anterior, patient's right) mm: a region around the right kidney, the spine, the great
# vessels and the liver with its lesions, so that a 16 x 64 x 64 volume at PAPER_SPACING holds every class
ROI_CENTRE_MM = (0.0, -10.0, 20.0)

# tissue: (CT mean range in HU, CT texture std), (MR mean range, MR texture std); MR is T1-like
_TISSUES = {
    "air": ((-1000, -1000), 0, (0, 0), 0),
    "fat": ((-115, -85), 12, (780, 880), 35),
    "soft": ((30, 50), 10, (260, 330), 20),
    "gas": ((-900, -800), 30, (5, 15), 3),
    "liver": ((55, 70), 7, (430, 520), 20),
    "vessel": ((140, 190), 10, (60, 110), 10),  # contrast-enhanced in CT, flow void in MR
    "aorta": ((160, 220), 10, (40, 80), 8),
    "ivc": ((110, 150), 10, (70, 110), 8),
    "csf": ((5, 20), 5, (100, 140), 8),
    "disc": ((70, 95), 8, (200, 250), 12),
    "cortex": ((120, 160), 10, (400, 450), 20),
    "medulla": ((25, 45), 8, (210, 260), 15),
    "sinus": ((-80, -40), 12, (700, 800), 30),
    "marrow": ((350, 500), 40, (560, 650), 35),
    "bone_shell": ((700, 950), 40, (50, 90), 10),
    "lesion_hypo": ((10, 35), 8, (170, 260), 20),
    "lesion_hyper": ((90, 120), 8, (650, 750), 30),
}
_T = {name: i for i, name in enumerate(_TISSUES)}


def phantom_spacing(
    seed: int, shape: tuple[int, int, int] = (16, 64, 64), spacing: tuple[float, float, float] | None = None
) -> tuple[float, float, float]:
    """Voxel size (D, H, W) in mm of subject ``seed``: the field of view over the shape, +-5% per subject; or
    exactly ``spacing`` when given (a scanner protocol's fixed voxel size: a model preset that resamples to it,
    such as ``tiny``, then neither interpolates nor pads the region)."""
    if spacing is not None:
        if len(spacing) != 3 or min(spacing) <= 0:
            raise UserError(f"phantom: spacing must be three positive sizes (D, H, W) in mm, got {tuple(spacing)}")
        return tuple(float(s) for s in spacing)
    rng = np.random.default_rng(_streams(seed)[3])
    return tuple(float(f / s * rng.uniform(0.95, 1.05)) for f, s in zip(FOV_MM, shape))


def _streams(seed: int) -> list[np.random.SeedSequence]:
    """Independent random streams: anatomy, appearance, voxel noise, geometry."""
    if int(seed) < 0:
        raise ValueError(f"phantom seed must be >= 0, got {seed}")
    return np.random.SeedSequence(int(seed)).spawn(4)


def _check(shape, modality: str) -> tuple[int, int, int]:
    if modality not in MODALITIES:
        raise UserError(f"phantom: modality must be one of {MODALITIES}, got {modality!r}")
    if len(shape) != 3 or min(int(s) for s in shape) < 4:
        raise UserError(f"phantom: shape must be three sizes (D, H, W) of at least 4, got {tuple(shape)}")
    return tuple(int(s) for s in shape)


@contextlib.contextmanager
def _single_thread():
    """Run torch ops on one thread: each op here is small, so thread hand-offs would dominate."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of a (D, H, W) tensor; sigma in voxels."""
    return GaussianFilter(3, sigma)(x[None, None])[0, 0]


def _unit_noise(rng: np.random.Generator, shape: tuple[int, int, int], sigma: float) -> torch.Tensor:
    """Smoothed white noise scaled to unit standard deviation, (D, H, W)."""
    n = _blur(torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)), sigma)
    return n / n.std().clamp_min(1e-6)


def _grid(
    shape: tuple[int, int, int], spacing: tuple[float, ...], centre: tuple[float, ...] = (0.0, 0.0, 0.0)
) -> tuple[torch.Tensor, ...]:
    """Voxel-centre coordinates in UNIT_MM units around ``centre`` (mm): z (D, 1, 1), y (1, H, 1), x (1, 1, W)."""
    views = [(-1, 1, 1), (1, -1, 1), (1, 1, -1)]
    axes = (((torch.arange(n) + 0.5 - n / 2) * s + c) / UNIT_MM for n, s, c in zip(shape, spacing, centre))
    return tuple(a.float().view(v) for a, v in zip(axes, views))


def _segment(
    a: Anatomy, z: torch.Tensor, y: torch.Tensor, x: torch.Tensor, lesion_kind: str
) -> tuple[torch.Tensor, ...]:
    """Label map (classes 0..5) and tissue map (indices into _TISSUES), both uint8 (D, H, W)."""
    shape = (z.numel(), y.numel(), x.numel())
    rho = a.body_rho(x, y, z).expand(shape)
    body = rho < 1
    inner = body & a.inner(x, y, z, rho)
    spine = {k: v.expand(shape) for k, v in a.spine(x, y, z).items()}
    bone = spine["bone"] & (rho < 0.96)  # the spinous process stays under the skin
    great = a.great_vessels(x, y, z).expand(shape)
    kidneys = [(k, *a.kidney(k, x, y, z)) for k in a.kidneys]
    kidney = inner & torch.stack([m.expand(shape) for _, m, _, _ in kidneys]).any(0)
    liver = a.liver_shape(x, y, z) & inner & ~kidney & ~bone & (great == 0)
    lesion = liver & a.lesions_mask(x, y, z)
    label = torch.zeros(shape, dtype=torch.uint8)
    for cls, mask in ((BODY, body), (LIVER, liver), (KIDNEY, kidney), (SPINE, bone), (LESION, lesion)):
        label.masked_fill_(mask, cls)

    tissue = torch.zeros(shape, dtype=torch.uint8)

    def paint(mask: torch.Tensor, name: str) -> None:
        tissue.masked_fill_(mask, _T[name])

    soft = (label == BODY) & inner
    paint(body, "fat")
    paint(soft, "soft")
    paint(soft & (a.visceral(x, y, z) > a.visceral_thr), "fat")
    paint(soft & a.gas_mask(x, y, z), "gas")
    paint((label == BODY) & (great == 1), "aorta")
    paint((label == BODY) & (great == 2), "ivc")
    paint((label == BODY) & spine["disc"], "disc")
    paint((label == BODY) & spine["canal"], "csf")
    paint(label == LIVER, "liver")
    paint((label == LIVER) & a.vessels_mask(x, y, z), "vessel")
    for k, mask, r, theta in kidneys:
        mask = mask & (label == KIDNEY)
        pyramid = (r > 0.3) & (r < 0.75) & (torch.cos(k["lobes"] * theta + k["phase"]) > -0.3)
        paint(mask, "cortex")
        paint(mask & pyramid, "medulla")
        paint(mask & (r <= 0.3), "sinus")
    paint(bone, "marrow")
    eroded = -F.max_pool3d(-bone.float()[None, None], (1, 3, 3), 1, (0, 1, 1))[0, 0]
    paint(bone & (eroded < 0.5), "bone_shell")
    paint(lesion, lesion_kind)
    return label, tissue


def generate_phantom(
    seed: int, shape: tuple[int, int, int] = (16, 64, 64), modality: str = "ct", *, mr_bias: float = 0.3,
    spacing: tuple[float, float, float] | None = None, centre: tuple[float, float, float] = (0.0, 0.0, 0.0),
    lesions: str = "mixed",
) -> tuple[np.ndarray, np.ndarray]:
    """One phantom subject.

    Args:
        seed: subject seed (>= 0); the same seed always gives the same arrays, and the same label map
            for CT and MR.
        shape: (D, H, W) of the output.
        modality: ``"ct"`` (Hounsfield units) or ``"mr"`` (T1-like, positive arbitrary units).
        mr_bias: log-amplitude of the smooth multiplicative MR bias field (0 disables it).
        spacing: voxel size (D, H, W) in mm; None: the field of view over ``shape`` (+-5% per subject).
        centre: (D, H, W) = (superior, anterior, right) position in mm of the volume's centre.
        lesions: "mixed" (each subject's lesions hypodense, p = 0.6, or hyperdense; the label map does not say
            which), "hypo" or "hyper" (every subject's); everything else is the same for the same seed.

    Returns:
        image: float32 (D, H, W); label: uint8 (D, H, W) with values in 0..5 (:data:`PHANTOM_LABELS`).
    """
    shape = _check(shape, modality)
    if lesions not in LESIONS:
        raise UserError(f"phantom: lesions must be one of {', '.join(LESIONS)}, got {lesions!r}")
    with _single_thread():
        return _generate(seed, shape, modality, mr_bias, phantom_spacing(seed, shape, spacing), centre, lesions)


def _generate(seed: int, shape: tuple[int, int, int], modality: str, mr_bias: float, spacing: tuple[float, ...],
              centre: tuple[float, ...], lesions: str = "mixed") -> tuple[np.ndarray, np.ndarray]:
    anat, look, noise = (np.random.default_rng(s) for s in _streams(seed)[:3])
    z, y, x = _grid(shape, spacing, centre)
    a = Anatomy(anat)
    col = 0 if modality == "ct" else 2
    hyper = look.random() < 0.4  # drawn in every mode, so the other draws do not depend on ``lesions``
    lesion_kind = "lesion_hyper" if (hyper if lesions == "mixed" else lesions == "hyper") else "lesion_hypo"
    label, tissue = _segment(a, z, y, x, lesion_kind)

    # appearance: per-subject tissue means, textured with smoothed noise
    mean = torch.tensor([look.uniform(*v[col]) for v in _TISSUES.values()], dtype=torch.float32)
    amp = torch.tensor([float(v[col + 1]) for v in _TISSUES.values()])
    texture = 0.7 * _unit_noise(look, shape, 0.8) + 0.7 * _unit_noise(look, shape, 2.0)
    idx = tissue.long()
    image = mean[idx] + amp[idx] * texture

    # acquisition: bias field and Rician noise (MR) or Gaussian noise (CT), then partial-volume blur
    if modality == "mr":
        image = image * torch.exp(mr_bias * NoiseField(look, 0.5)(x, y, z))
        sigma = noise.uniform(0.04, 0.07) * float(mean[_T["soft"]])
        n1, n2 = (sigma * torch.from_numpy(noise.standard_normal(shape, dtype=np.float32)) for _ in range(2))
        image = torch.sqrt((image + n1) ** 2 + n2**2)
    else:
        image = image + noise.uniform(20, 35) * torch.from_numpy(noise.standard_normal(shape, dtype=np.float32))
    image = _blur(image, 0.7)
    return image.numpy().astype(np.float32), label.numpy()


def phantom_affine(
    spacing: tuple[float, float, float], shape: tuple[int, int, int], centre: tuple[float, float, float] = (0, 0, 0)
) -> np.ndarray:
    """RAS affine for an array stored as (X, Y, Z) = (W, H, D), centred on ``centre`` ((D, H, W) mm)."""
    sd, sh, sw = spacing
    affine = np.diag([sw, sh, sd, 1.0])
    affine[:3, 3] = [c - (n - 1) / 2 * s for n, s, c in zip(shape[::-1], (sw, sh, sd), centre[::-1])]
    return affine


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write a (D, H, W) array as a gzipped NIfTI stored (W, H, D), atomically and byte-reproducibly."""
    img = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


def write_phantom_dataset(
    out: str | Path,
    n: int,
    modality: str = "ct",
    shape: tuple[int, int, int] = (16, 64, 64),
    seed: int = 0,
    test_fraction: float = 0.2,
    progress: bool = True,
    overwrite: bool = False,
    spacing: tuple[float, float, float] | None = None,
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0),
    lesions: str = "mixed",
) -> Path:
    """Write ``n`` phantom subjects in the nnU-Net v2 raw layout and return the data set folder.

    ``imagesTr/phantom_NNN_0000.nii.gz`` + ``labelsTr/phantom_NNN.nii.gz`` for training and the last
    ``round(n * test_fraction)`` cases (at least 1 when ``n >= 2`` and ``test_fraction > 0``) in
    ``imagesTs`` / ``labelsTs``, plus ``dataset.json``. Case ``i`` uses subject seed ``seed * 100003 + i``.
    ``spacing`` / ``centre``: as in :func:`generate_phantom` (a region at that voxel size); ``lesions`` too.
    A folder that already holds files is refused unless ``overwrite`` (then its phantom files are replaced).
    The data set is built in a hidden sibling folder and moved into place when complete, so an
    interrupted run leaves no half-written data set behind.
    """
    out = Path(out)
    shape = _check(shape, modality)
    if n < 1:
        raise UserError(f"{out}: the number of phantom cases must be at least 1, got {n}")
    if lesions not in LESIONS:
        raise UserError(f"{out}: lesions must be one of {', '.join(LESIONS)}, got {lesions!r}")
    if not 0 <= test_fraction < 1:
        raise UserError(f"{out}: test_fraction must be in [0, 1), got {test_fraction}")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out}: folder is not empty; write the phantoms to a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the data set is an ordinary folder
    try:
        _write_cases(tmp, n, modality, shape, seed, test_fraction, progress, spacing, tuple(centre), lesions)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_cases(
    out: Path, n: int, modality: str, shape: tuple[int, int, int], seed: int, test_fraction: float, progress: bool,
    spacing: tuple[float, float, float] | None, centre: tuple[float, float, float], lesions: str = "mixed",
) -> None:
    n_test = min(max(round(n * test_fraction), 1 if n >= 2 and test_fraction > 0 else 0), n - 1)
    for i in tqdm(range(n), desc=f"phantoms ({modality})", disable=not progress):
        case_seed = seed * 100003 + i
        image, label = generate_phantom(case_seed, shape, modality, spacing=spacing, centre=centre, lesions=lesions)
        affine = phantom_affine(phantom_spacing(case_seed, shape, spacing), shape, centre)
        split = "Ts" if i >= n - n_test else "Tr"
        if modality == "ct":  # CT is stored as integer HU, as scanners do
            image = np.round(image).astype(np.int16)
        _save_nifti(out / f"images{split}" / f"phantom_{i:03d}_0000.nii.gz", image, affine)
        _save_nifti(out / f"labels{split}" / f"phantom_{i:03d}.nii.gz", label, affine)
    meta = {
        "name": "medlsdm-phantom",
        "description": f"medlsdm procedural abdominal phantom (synthetic, no patient data); generator seed {seed}, "
        f"{modality.upper()}, shape (D, H, W) {list(shape)}",
        "channel_names": {"0": modality.upper()},
        "labels": {name: i for i, name in enumerate(PHANTOM_LABELS)},
        "numTraining": n - n_test,
        "numTest": n_test,
        "file_ending": ".nii.gz",
        "medlsdm_phantom": {"seed": seed, "case_seed": "seed * 100003 + case index", "shape_dhw": list(shape),
                            "spacing_dhw_mm": list(spacing) if spacing is not None else "field of view / shape",
                            "centre_dhw_mm": list(centre)},
    }
    atomic_write_text(out / "dataset.json", json.dumps(meta, indent=2) + "\n")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished data set ``tmp`` to ``out`` (absent, empty, or replacing its phantom files)."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(tmp, out)
        return
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        for old in (out / sub).glob("phantom_*.nii.gz"):
            old.unlink()
    for item in sorted(tmp.rglob("*")):
        if item.is_file():
            dest = out / item.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(item, dest)

