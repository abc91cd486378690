"""``medlsdm evaluate``: score a folder of synthetic volumes against the real volumes of the same label maps.

One call computes the paired metrics (SSIM, PSNR, RMSE, LPIPS), FID per slice plane and 3D-FID with
named feature extractors, inter-slice consistency and, when the real training set is given, the
paper's Dice protocol and a memorisation audit; it writes ``metrics.json`` and ``report.md`` (with
figures) into the output folder. Every FID in ``metrics.json`` carries its extractor's ``describe()``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medlsdm.config import Config, load_config
from medlsdm.data.display import display_window
from medlsdm.devices import resolve_device
from medlsdm.errors import UserError
from medlsdm.evaluation import metrics as M
from medlsdm.evaluation.features import DomainFeatures, FeatureExtractor, fid_2d, fid_3d, load_extractor
from medlsdm.evaluation.fidelity import fidelity
from medlsdm.evaluation.pairing import VolumeSet, load_cases, load_real, load_synthetic, real_cases
from medlsdm.evaluation.privacy import privacy_audit
from medlsdm.evaluation.report import write_report
from medlsdm.evaluation.segmentation import (
    dice_protocol,
    load_segmenter,
    segmentation_encoder,
    train_segmenter,
    untrusted_classes_note,
)
from medlsdm.io import atomic_write_text

DOMAIN_NAME = "segmentation U-Net encoder (Appendix B network trained on the real training set)"
FEATURES = ("auto", "inception", "random-inception", "medicalnet", "random-medicalnet", "domain")


def as_config(cfg: Config | str | Path) -> Config:
    return cfg if isinstance(cfg, Config) else load_config(cfg)


def test_split(root: Path) -> str:
    """The split holding the held-out real volumes: nnU-Net ``imagesTs`` when present, else everything."""
    return "test" if (Path(root) / "imagesTs").is_dir() else "train"


def jsonable(obj: Any) -> Any:
    """Floats NaN -> None and +-inf -> "inf"/"-inf", tuples -> lists, Paths -> str (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if math.isnan(obj) else (("inf" if obj > 0 else "-inf") if math.isinf(obj) else float(obj))
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def whole_volumes_note(cfg: Config, *sets: VolumeSet | None) -> str | None:
    """Which volumes were larger than ``cfg.data.shape`` and were evaluated whole (evaluation never crops)."""
    big = [i for s in sets if s is not None for i in s.larger_than(tuple(cfg.data.shape))]
    if not big:
        return None
    shape = "x".join(map(str, cfg.data.shape))
    return (f"{len(big)} volume(s) larger than the configured shape {shape} were evaluated whole, not cropped "
            f"({', '.join(big[:3])}{', ...' if len(big) > 3 else ''})")


def _stats(values: dict[str, float]) -> dict:
    v = np.array([x for x in values.values() if math.isfinite(x)], dtype=float)
    return dict(mean=float(v.mean()) if v.size else float("nan"), std=float(v.std()) if v.size else float("nan"),
                per_volume=values)


def paired_metrics(real: VolumeSet, synthetic: VolumeSet, partner: Sequence[int], cfg: Config,
                   with_lpips: bool = True) -> dict:
    """SSIM / PSNR / RMSE (/ LPIPS) of every synthetic volume vs the real volume of its label map."""
    out: dict[str, dict] = {}
    pairs = [(synthetic.ids[j], real.images[i], synthetic.images[j]) for j, i in enumerate(partner)]
    for name, fn in (("ssim", M.ssim), ("psnr", M.psnr), ("rmse", M.rmse)):
        out[name] = _stats({sid: fn(r, s) for sid, r, s in pairs})
    if with_lpips:
        v = cfg.vqgan
        backbone, weights, lin = ((v.perceptual_backbone, v.perceptual_weights, v.perceptual_lpips_weights)
                                  if v.perceptual_backbone != "none" else ("random-vgg16", None, None))
        values, desc = {}, ""
        for sid, r, s in pairs:
            values[sid], desc = M.lpips(r, s, backbone, weights=weights, lpips_weights=lin)
        out["lpips"] = dict(_stats(values), backbone=desc)
    return out


def paired_fidelity(real: VolumeSet, synthetic: VolumeSet, partner: Sequence[int], cfg: Config) -> dict:
    """Window metrics, per-class table (when the real volumes are labelled) and grid ratio of every synthetic
    volume vs the real one of its label map (``medlsdm.evaluation.fidelity``)."""
    labels = [real.labels[i] for i in partner] if real.labelled else None
    return fidelity(synthetic.images, [real.images[i] for i in partner], labels, cfg.data)


def _kinds(features: str | Sequence[str], have_train: bool) -> list[str]:
    kinds = [k.strip() for k in (features.split(",") if isinstance(features, str) else features) if k.strip()]
    if kinds in ([], ["auto"]):
        kinds = ["domain"] if have_train else ["random-medicalnet"]
    bad = [k for k in kinds if k not in FEATURES or k == "auto"]
    if bad:
        raise UserError(f"--features: unknown extractor {bad[0]!r} (choose from {', '.join(FEATURES[1:])})")
    return kinds


PLANES_3D_NOTE = ("not reported for a 3D extractor: its deepest feature map has a few slabs per volume along each "
                  "axis, not one feature per slice; see 3D-FID")


def fid_scores(real: VolumeSet, synthetic: VolumeSet, extractor: FeatureExtractor) -> dict:
    """FID per plane (axial, coronal, sagittal) from per-slice features of a 2D extractor (None for a 3D one, with
    ``note_planes`` saying why) and, for a 3D extractor with >= 2 volumes a side, 3D-FID."""
    res: dict[str, Any] = {"extractor": extractor.describe()}
    for plane in M.PLANES:
        res[plane] = fid_2d(real.images, synthetic.images, extractor, plane) if extractor.spatial_dims == 2 else None
    if extractor.spatial_dims != 2:
        res["note_planes"] = PLANES_3D_NOTE
    if extractor.spatial_dims == 3 and min(len(real), len(synthetic)) >= 2:
        res["3d"] = fid_3d(real.images, synthetic.images, extractor)
    else:
        res["3d"] = None
        res["note_3d"] = "2D extractor" if extractor.spatial_dims != 3 else "3D-FID needs >= 2 volumes per set"
    return res


def volume_features(extractor: FeatureExtractor):
    """A (B, 1, D, H, W) -> (B, F) function: 3D features, or the mean of a 2D extractor's axial slice features."""
    if extractor.spatial_dims == 3:
        return extractor.features
    return lambda v: extractor.plane_features(v, "axial").view(len(v), v.shape[2], -1).mean(1)


def evaluate(
    real: Path, synthetic: Path, out: Path, train: Path | None = None,
    features: str | Sequence[str] = "auto", feature_weights: str | None = None,
    cfg: Config | str | Path = "tiny", seg_steps: int | None = None, seed: int = 0, layout: str = "auto",
    device: str = "auto", lpips: bool = True, privacy: bool = True, progress: bool = True,
) -> dict:
    """Evaluate synthetic volumes against real ones and write ``metrics.json`` + ``report.md`` into ``out``.

    Args:
        real: real data set whose label maps produced the synthetic volumes (nnU-Net: its ``imagesTs`` /
            ``labelsTs``; other layouts: every case).
        synthetic: folder of ``<labelname>_s<k>.nii.gz`` (``medlsdm sample``); every file must have a real
            partner and every real case at least one synthetic volume, on the same voxel grid.
        out: report folder (created).
        train: the real training set (nnU-Net: its ``imagesTr``; may be the same folder as ``real``).
            Enables the Dice protocol, the ``domain`` extractor and the privacy audit.
        features: extractor kind(s), comma-separated: ``inception`` (pytorch-fid weights file),
            ``medicalnet`` (MedicalNet ``.pth``), ``random-inception`` / ``random-medicalnet`` (NOT
            pretrained), ``domain`` (encoder of the segmentation network trained on ``train``);
            ``auto`` = domain with ``train``, else random-medicalnet.
        feature_weights: weights file for inception / medicalnet, or a saved segmenter
            (``segmenter.safetensors``) for domain, which then is not retrained.
        cfg: config (preset name, YAML path or Config) whose ``data`` section preprocesses every volume
            (use the generating model's) and whose ``seg`` section sizes the segmentation network.
        seg_steps: segmentation training steps (default: ``cfg.seg``).
        lpips / privacy: switch those parts off (LPIPS runs a VGG16 over every slice: slow on CPU).

    Returns the metrics dict that was written to ``metrics.json``.
    """
    cfg, out, dev = as_config(cfg), Path(out), resolve_device(device)
    kinds = _kinds(features, train is not None)
    if "domain" in kinds and train is None and not feature_weights:
        raise UserError("--features domain: needs --train (the segmentation network is trained on it) or a "
                        "saved segmenter as --feature-weights")
    # non-domain extractors first: a missing weights file fails before any slow work
    extractors = {k: load_extractor(k, feature_weights if k in ("inception", "medicalnet") else None, device=dev)
                  for k in kinds if k != "domain"}
    cases = real_cases(real, test_split(real), layout)
    real_set = load_cases(cases, cfg.data)
    synth_set, partner = load_synthetic(synthetic, cases, real_set, cfg.data)
    train_set = load_real(train, cfg.data, "train", layout, need_labels=True) if train is not None else None
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"inputs": dict(
        real=str(real), synthetic=str(synthetic), train=str(train) if train else None, n_real=len(real_set),
        n_synthetic=len(synth_set), n_train=len(train_set) if train_set else None, config=cfg.name,
        shape=list(cfg.data.shape), modality=cfg.data.modality, features=kinds,
        pairs={s: real_set.ids[i] for s, i in zip(synth_set.ids, partner)},
    ), "notes": []}
    if whole := whole_volumes_note(cfg, real_set, synth_set, train_set):
        metrics["notes"].append(whole)
    metrics["paired"] = paired_metrics(real_set, synth_set, partner, cfg, with_lpips=lpips)
    metrics["fidelity"] = paired_fidelity(real_set, synth_set, partner, cfg)
    metrics["inter_slice"] = M.inter_slice_consistency(real_set.images, synth_set.images)
    changes = (M.adjacent_slice_changes(real_set.images).float(), M.adjacent_slice_changes(synth_set.images).float())

    segmenter, seg_info = None, None
    if "domain" in kinds and feature_weights:
        segmenter, sha = load_segmenter(Path(feature_weights), cfg, dev)
        seg_info = dict(weights=str(feature_weights), sha256=sha)
    elif train_set is not None:
        segmenter, seg_info = train_segmenter(train_set.images, train_set.labels, cfg, steps=seg_steps, seed=seed,
                                              out_path=out / "segmenter.safetensors", device=dev, progress=progress)
    if segmenter is not None and train_set is not None:
        if real_set.labelled:
            metrics["dice"] = dice_protocol(train_set, real_set, synth_set, cfg, model=segmenter, device=dev)
            metrics["dice"]["segmenter"] = seg_info
            if weak := untrusted_classes_note(metrics["dice"]["table"]["real test"]):
                metrics["notes"].append(weak)
        else:
            metrics["notes"].append("Dice protocol skipped: the real volumes have no label maps")

    if "domain" in kinds:
        extractors["domain"] = DomainFeatures(segmentation_encoder(segmenter, cfg), seg_info["sha256"],
                                              name=DOMAIN_NAME, weights_path=seg_info.get("weights"), device=dev)
    metrics["fid"] = {kind: fid_scores(real_set, synth_set, extractors[kind]) for kind in kinds}

    if train_set is not None and privacy:
        train_ids = set(train_set.ids)
        keep = [i for i, c in enumerate(real_set.ids) if c not in train_ids]
        if len(keep) < len(real_set):
            metrics["notes"].append(f"privacy audit: {len(real_set) - len(keep)} real case(s) also in the training "
                                    "set were left out of the held-out reference")
        if keep:
            ex = extractors[kinds[0]]
            metrics["privacy"] = privacy_audit(train_set, real_set.subset(keep), synth_set, volume_features(ex),
                                               kinds[0], out / "figures", spacing=real_set.spacing,
                                               window=display_window(cfg.data, real_set.images[0]))
    metrics = jsonable(metrics)
    write_report(out, metrics, real_set, synth_set, partner, cfg, slice_changes=changes)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics
