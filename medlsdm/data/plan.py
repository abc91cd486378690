"""Configuration from the data set itself (``medlsdm plan``), in the spirit of nnU-Net's fingerprint.

:func:`fingerprint` reads a data set once: modality from ``dataset.json`` (``channel_names`` / ``modality``),
else from the intensities; label values and names; voxel spacing and shape of every case (NIfTI headers only,
no voxels except the label maps' values). :func:`plan_config` turns it into a :class:`Config` based on a preset
and says why it chose each value. :func:`check_config_against_data` stops a config that contradicts the data
set's own description (modality, number of classes).

Shapes and spacings are (D, H, W) after orientation to RAS, as everywhere in medlsdm.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from medlsdm.config import Config, load_config
from medlsdm.data.layouts import detect_layout, find_cases, read_label_names
from medlsdm.errors import UserError

__all__ = ["Fingerprint", "fingerprint", "plan_config", "write_plan", "check_config_against_data",
           "dataset_channel", "model_multiple", "BYTES_PER_VOXEL_GIB"]

# peak memory of one VQ-GAN training step per voxel of data.shape: 11.8 GiB at the paper's 32 x 256 x 256 with
# batch 2, fp32 (BENCHMARKS.md, paper_size-cpu), the heaviest step of the method; --gpu-memory budgets with it
BYTES_PER_VOXEL_GIB = 11.8 / (32 * 256 * 256)
MEMORY_MARGIN = 0.85  # share of the stated memory the plan may use (allocator, CUDA context)
CT_NAMES = ("ct",)
HU_PROBE_CASES = 3  # images read to guess CT from intensities when dataset.json does not say


@dataclass
class Fingerprint:
    """What a data set is: ``modality`` ('ct' / 'mr') and ``modality_reason``; ``label_values`` found in the label
    maps and ``label_names`` (by value); per-case ``shapes`` / ``spacings`` (D, H, W) after orientation to RAS."""

    root: str
    layout: str
    modality: str
    modality_reason: str
    channel: str | None
    label_values: list[int]
    label_names: dict[int, str]
    label_names_source: str
    shapes: list[tuple[int, int, int]] = field(default_factory=list)
    spacings: list[tuple[float, float, float]] = field(default_factory=list)

    @property
    def median_spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.median(np.array(self.spacings), axis=0))  # type: ignore[return-value]

    @property
    def median_shape_mm(self) -> tuple[float, float, float]:
        """Median extent in mm per axis (shape x spacing)."""
        mm = np.array(self.shapes, dtype=np.float64) * np.array(self.spacings)
        return tuple(float(v) for v in np.median(mm, axis=0))  # type: ignore[return-value]


def dataset_channel(root: Path) -> str | None:
    """The first channel's name in an nnU-Net ``dataset.json`` (v2 ``channel_names``, v1 ``modality``), or None."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read dataset.json ({exc})") from None
    channels = meta.get("channel_names") or meta.get("modality") if isinstance(meta, dict) else None
    if not isinstance(channels, dict) or not channels:
        return None
    return str(channels.get("0", channels.get(0, next(iter(channels.values())))))


def _ras_geometry(shape, zooms, affine: np.ndarray) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """File-axis (X, Y, Z) ``shape`` and ``zooms`` of a volume with voxel -> world ``affine`` -> (D, H, W) shape and
    spacing after orientation to RAS (the axis order :func:`medlsdm.data.transforms.preprocess` gives)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    ras_shape, ras_zooms = [0, 0, 0], [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(ornt):
        ras_shape[int(target)], ras_zooms[int(target)] = int(shape[axis]), float(zooms[axis])
    return (ras_shape[2], ras_shape[1], ras_shape[0]), (ras_zooms[2], ras_zooms[1], ras_zooms[0])


def _header_geometry(path: Path) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """(D, H, W) shape and spacing of a NIfTI file from its header, after orientation to RAS (no voxels read)."""
    import nibabel as nib

    img = nib.load(str(path))
    return _ras_geometry(img.shape[:3], img.header.get_zooms()[:3], img.affine)


def _volume_geometry(path: Path) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """(D, H, W) shape and spacing of a NIfTI file or a DICOM series folder, after orientation to RAS."""
    if path.is_dir():  # a DICOM series: read it (headers of a series are not one file)
        from medlsdm.data.transforms import read_volume

        array, affine = read_volume(path)
        return _ras_geometry(tuple(array.shape), np.linalg.norm(affine[:3, :3], axis=0), affine)
    return _header_geometry(path)


def fingerprint(root: str | Path, layout: str = "auto", label_dir: str | Path | None = None) -> Fingerprint:
    """Read the data set at ``root`` (any layout medlsdm reads) once; see :class:`Fingerprint`."""

    from medlsdm.data.transforms import read_volume

    root = Path(root)
    layout = detect_layout(root) if layout == "auto" else layout
    cases = find_cases(root, layout, split="train", label_dir=label_dir)
    fp_shapes, fp_spacings, values = [], [], set()
    for case in cases:
        shape, spacing = _volume_geometry(case.image)
        fp_shapes.append(shape)
        fp_spacings.append(spacing)
        if case.label is not None:
            values.update(int(v) for v in torch.unique(read_volume(case.label)[0].round()).tolist())
    data_dir = root if root.is_dir() else root.parent
    channel = dataset_channel(data_dir)
    if channel is not None:
        modality = "ct" if channel.strip().lower() in CT_NAMES else "mr"
        reason = (f"dataset.json channel '{channel}'" + (" is CT: HU window" if modality == "ct" else
                  " is not CT: percentile normalisation"))
    else:
        lows = [float(np.percentile(read_volume(c.image)[0].numpy(), 1)) for c in cases[:HU_PROBE_CASES]]
        modality = "ct" if lows and max(lows) < -500 else "mr"
        reason = (f"no dataset.json channel names; 1st intensity percentile {min(lows):.0f}"
                  + (" (air in HU): CT" if modality == "ct" else " (not HU): percentile normalisation"))
    names_by_index = read_label_names(data_dir) or []
    source = "dataset.json" if names_by_index else "label values (no dataset.json names)"
    names = {v: (names_by_index[v] if v < len(names_by_index) else ("background" if v == 0 else f"class_{v}"))
             for v in sorted(values)}
    return Fingerprint(str(root), layout, modality, reason, channel, sorted(values), names, source, fp_shapes,
                       fp_spacings)


def _fit_shape(extent_mm: tuple[float, ...], spacing: tuple[float, ...], multiple: tuple[int, ...],
               budget_voxels: float) -> tuple[int, int, int]:
    """The median extent at ``spacing``, each axis a multiple of ``multiple``, shrunk (largest axis first, as a
    centred field of view) until it fits ``budget_voxels``."""
    shape = [max(m, int(round(e / s / m)) * m) for e, s, m in zip(extent_mm, spacing, multiple)]
    while math.prod(shape) > budget_voxels:
        axis = max(range(3), key=lambda i: shape[i] / multiple[i])
        if shape[axis] <= multiple[axis]:
            break
        shape[axis] -= multiple[axis]
    return tuple(shape)  # type: ignore[return-value]


def model_multiple(cfg: Config) -> tuple[int, int, int]:
    """What every (D, H, W) size must divide by: the VQ-GAN's down-sampling times the U-Net's on the latent
    (2 per level below the first; in-plane only with ``ldm.keep_depth``)."""
    unet = 2 ** (len(cfg.ldm.channel_mult) - 1)
    return tuple(v * (1 if axis == 0 and cfg.ldm.keep_depth else unet)  # type: ignore[return-value]
                 for axis, v in enumerate(cfg.vqgan.downsample))


def plan_config(fp: Fingerprint, base: str = "tiny",
                gpu_memory_gb: float | None = None) -> tuple[Config, list[str]]:
    """A config for the data set ``fp`` starting from preset ``base``, and one line per choice saying why.

    ``gpu_memory_gb``: the shape's voxel budget comes from memory (:data:`BYTES_PER_VOXEL_GIB`); without it, the
    base preset's shape is the budget (``tiny``: CPU-sized). Sizes divide by :func:`model_multiple`."""
    if gpu_memory_gb is not None and not (math.isfinite(gpu_memory_gb) and gpu_memory_gb > 0):
        raise UserError(f"--gpu-memory must be a positive number of GB, got {gpu_memory_gb}")
    cfg = load_config(base)
    why: list[str] = [f"base preset: {base}"]
    d = cfg.data
    d.modality = fp.modality
    why.append(f"data.modality: {fp.modality} ({fp.modality_reason})")
    values = fp.label_values or [0]
    if values == list(range(len(values))):
        d.label_remap = None
        why.append(f"data.num_classes: {len(values)} (label values 0..{len(values) - 1} found in the label maps)")
    else:
        d.label_remap = {v: i for i, v in enumerate(values)}
        why.append(f"data.label_remap: {d.label_remap} (label values {values} are not 0..C-1)")
    d.num_classes = max(2, len(values))
    d.label_names = [fp.label_names.get(v, f"class_{v}") for v in values]
    while len(d.label_names) < d.num_classes:
        d.label_names.append(f"class_{len(d.label_names)}")
    why.append(f"data.label_names: {d.label_names} (from {fp.label_names_source})")
    spacings = np.array(fp.spacings)
    median = fp.median_spacing
    if (np.abs(spacings - np.array(median)) <= 0.01 * np.array(median)).all():
        d.spacing = None
        why.append(f"data.spacing: native (every case is {tuple(round(s, 3) for s in median)} mm; no resampling)")
    else:
        d.spacing = tuple(round(s, 4) for s in median)  # type: ignore[assignment]
        why.append(f"data.spacing: {d.spacing} mm (median of {len(fp.spacings)} cases; cases differ)")
    target = d.spacing or median
    multiple = model_multiple(cfg)
    if gpu_memory_gb is not None:
        budget = MEMORY_MARGIN * gpu_memory_gb / BYTES_PER_VOXEL_GIB
        budget_why = f"{gpu_memory_gb:g} GB at {BYTES_PER_VOXEL_GIB * 2**30 / 1e3:.1f} kB per voxel (paper_size bench)"
    else:
        budget = math.prod(cfg.data.shape)
        budget_why = f"the {base} preset's {tuple(cfg.data.shape)}"
    d.shape = _fit_shape(fp.median_shape_mm, target, multiple, budget)
    if math.prod(d.shape) > budget:
        need = math.prod(d.shape) * BYTES_PER_VOXEL_GIB / MEMORY_MARGIN
        raise UserError(f"--gpu-memory {gpu_memory_gb:g}: even the smallest shape the {base} model takes, "
                        f"{tuple(d.shape)}, needs about {need:.2f} GB")
    median_vox = tuple(int(round(e / s)) for e, s in zip(fp.median_shape_mm, target))
    why.append(f"data.shape: {d.shape} (median case {median_vox} voxels, axes multiples of {multiple}, "
               f"at most {int(budget):,} voxels: {budget_why}"
               + ("; a centred field of view" if math.prod(median_vox) > math.prod(d.shape) else "") + ")")
    cfg.name = f"plan-{Path(fp.root).name}"
    return cfg, why


def write_plan(cfg: Config, why: list[str], path: str | Path) -> Path:
    """The plan as a config YAML (loadable with ``--config``), its reasons as comments on top."""
    from medlsdm.io import atomic_write_text

    header = "# written by 'medlsdm plan'; edit freely, it is validated when loaded\n" + "".join(
        f"# {line}\n" for line in why)
    atomic_write_text(Path(path), header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return Path(path)


def check_config_against_data(cfg: Config, root: str | Path) -> None:
    """Stop (one line naming both) when ``cfg`` contradicts the data set's own ``dataset.json``: its first channel's
    modality, or the number of label classes it lists (unless the config remaps labels)."""
    root = Path(root)
    data_dir = root if root.is_dir() else root.parent
    channel = dataset_channel(data_dir)
    if channel is not None:
        modality = "ct" if channel.strip().lower() in CT_NAMES else "mr"
        if modality != cfg.data.modality:
            raise UserError(f"{data_dir / 'dataset.json'}: channel '{channel}' is "
                            f"{'CT' if modality == 'ct' else 'not CT'}, but the config has data.modality "
                            f"'{cfg.data.modality}'; fix the config, or run 'medlsdm plan --data {root}'")
    names = read_label_names(data_dir)
    if names is not None and cfg.data.label_remap is None and len(names) != cfg.data.num_classes:
        raise UserError(f"{data_dir / 'dataset.json'}: lists {len(names)} label classes, but the config has "
                        f"data.num_classes {cfg.data.num_classes}; fix the config, or run "
                        f"'medlsdm plan --data {root}'")
