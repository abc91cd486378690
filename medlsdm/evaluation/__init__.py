"""Evaluation: image-quality metrics, Fréchet distances with named feature extractors, and (in the
sibling modules) the segmentation protocol, privacy audit and report."""

from medlsdm.evaluation.features import (
    KINDS,
    DomainFeatures,
    FeatureExtractor,
    InceptionFID2D,
    MedicalNet3D,
    fid_2d,
    fid_3d,
    load_extractor,
)
from medlsdm.evaluation.metrics import (
    PLANES,
    frechet_distance,
    frechet_from_features,
    inter_slice_consistency,
    lpips,
    psnr,
    rmse,
    ssim,
)

__all__ = [
    "KINDS", "PLANES", "DomainFeatures", "FeatureExtractor", "InceptionFID2D", "MedicalNet3D", "fid_2d", "fid_3d",
    "frechet_distance", "frechet_from_features", "inter_slice_consistency", "load_extractor", "lpips", "psnr",
    "rmse", "ssim",
]
