"""Data layer: find cases on disk, preprocess them to (1, D, H, W) tensors, and write results back.

``layouts`` finds image / label-map pairs, ``transforms`` turns files into tensors (and tensors back
into NIfTI on the label map's grid), ``checks`` holds the bad-input checks, ``dataset`` the lazy
torch Dataset with its cache, ``prepare`` the one-pass validation behind ``medlsdm prepare``.
"""

from medlsdm.data.checks import check_target_shape
from medlsdm.data.dataset import VolumeDataset, split_cases
from medlsdm.data.layouts import LAYOUTS, Case, detect_layout, find_cases, read_label_names
from medlsdm.data.prepare import DatasetSummary, format_summary, prepare_dataset
from medlsdm.data.transforms import (
    LabelGeometry,
    load_case,
    load_image,
    load_label_map,
    one_hot,
    save_label,
    save_volume,
)

__all__ = [
    "LAYOUTS",
    "Case",
    "DatasetSummary",
    "LabelGeometry",
    "VolumeDataset",
    "check_target_shape",
    "detect_layout",
    "find_cases",
    "format_summary",
    "load_case",
    "load_image",
    "load_label_map",
    "one_hot",
    "prepare_dataset",
    "read_label_names",
    "save_label",
    "save_volume",
    "split_cases",
]
