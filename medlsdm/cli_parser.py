"""The ``medlsdm`` argument parser: every subcommand, its options and their checks (no command runs here)."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Callable, NoReturn

from medlsdm.config import SAMPLERS

EPILOG = ("Data folders: nnU-Net raw (dataset.json, imagesTr/, labelsTr/), images/+labels/ pairs, a CSV/JSON "
          "manifest, SynthRAD2023 (<patient>/ct.nii.gz) or DICOM series folders. See README.md.")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``medlsdm COMMAND: error: ...`` and exit 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"medlsdm: error: {message} (see {self.prog} --help)\n")


def _number(kind: type, rule: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type: ``kind`` (int / float) that must satisfy ``ok`` (described by ``rule``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            noun = "whole number" if kind is int else "number"
            raise argparse.ArgumentTypeError(f"must be a {noun}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return parse


_positive_int = _number(int, "at least 1", lambda v: v >= 1)
_positive_float = _number(float, "a finite number above 0", lambda v: math.isfinite(v) and v > 0)
_finite_float = _number(float, "a finite number", math.isfinite)


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", text):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def _add_config(p: argparse.ArgumentParser, planned: str = "the plan of the data (medlsdm plan)") -> None:
    p.add_argument("--config", default=None,
                   help=f"preset name (tiny, paper), a YAML file or a plan from 'medlsdm plan' (default: {planned})")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set ldm.sampler=ddim (repeatable; validated like the file)")


def _add_model_config(p: argparse.ArgumentParser) -> None:
    """--config, --set and --model for the evaluation commands: without --config, the model's config, else a plan."""
    _add_config(p, planned="the config of --model, else the plan of the data")
    p.add_argument("--model", type=Path, default=None,
                   help="the run or export that made the synthetic volumes: without --config its config.yaml "
                        "(preprocessing, classes, segmenter) is used")



def _add_data(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", type=Path, required=required, help="data folder or manifest (CSV/JSON)")
    p.add_argument("--layout", default="auto",
                   choices=["auto", "nnunet", "pairs", "manifest", "synthrad", "dicom", "unlabelled"],
                   help="how the data folder is organised (default: detect)")
    p.add_argument("--label-dir", type=Path, default=None,
                   help="SynthRAD layout: folder with <patient>.nii.gz label maps")


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, logs, previews, config.yaml)")
    p.add_argument("--max-steps", type=_positive_int, default=None,
                   help="training length in optimiser steps (default: config)")
    p.add_argument("--max-minutes", type=_positive_float, default=None,
                   help="stop (with a checkpoint) after this much wall time")
    p.add_argument("--resume", action="store_true", help="continue exactly from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds another training run: remove its checkpoints, logs and previews, start again")
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="override the config's seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="medlsdm", description="3D semantic label maps -> synthetic 3D medical volumes (Med-LSDM).",
                     epilog=EPILOG)
    from medlsdm import __version__

    parser.add_argument("--version", action="version", version=f"medlsdm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("phantom", help="write a procedural phantom data set (nnU-Net layout)",
                       description="Generate labelled 3D phantoms (6 classes) as NIfTI pairs in the nnU-Net raw "
                                   "layout.")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=_positive_int, default=20, help="number of cases (default: %(default)s)")
    p.add_argument("--modality", choices=["ct", "mr"], default="ct")
    p.add_argument("--shape", nargs=3, metavar=("D", "H", "W"), default=["16", "64", "64"],
                   help="volume shape (default: 16 64 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share written to imagesTs/labelsTs")
    p.add_argument("--scale", choices=["paper", "abdomen"], default="paper",
                   help="paper: a region at the paper's AutoPET voxel size (3 x 2 x 2 mm) around the right kidney, "
                        "spine and liver; abdomen: the whole 96 x 384 x 384 mm abdomen in the shape "
                        "(default: %(default)s)")
    p.add_argument("--lesions", choices=["mixed", "hypo", "hyper"], default="mixed",
                   help="liver lesion appearance: per subject hypo- or hyperdense at random (the label map does not "
                        "say which), or always one of them (default: %(default)s)")

    p = sub.add_parser("plan", help="a config derived from the data set (modality, classes, spacing, shape)",
                       description="Read the data set (dataset.json where present, else the images and label values) "
                                   "and write a config: modality and normalisation, classes and their names, target "
                                   "spacing and volume shape fitted to the model and a memory budget. Prints why.")
    _add_data(p)
    p.add_argument("--base", choices=["tiny", "paper"], default="tiny",
                   help="preset whose model sizes the plan keeps (default: %(default)s)")
    p.add_argument("--gpu-memory", type=_positive_float, default=None, metavar="GB",
                   help="memory to fit the volume shape into (default: the base preset's shape is the budget)")
    p.add_argument("--out", type=Path, required=True, help="the plan, a config YAML")

    p = sub.add_parser("prepare", help="validate a data set, cache preprocessed samples, print a summary",
                       description="Check every case (readable, 3D, matching geometry, known labels, finite), fill "
                                   "the cache, print cases/shapes/spacings/label histogram.")
    _add_data(p)
    _add_config(p)
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--no-cache", action="store_true", help="validate only, do not write the cache")

    p = sub.add_parser("train-vqgan", help="train the 3D VQ-GAN (stage 1) on images",
                       description="Train the 3D VQ-GAN autoencoder (labels not needed). Works under torchrun for "
                                   "multi-GPU.")
    _add_data(p)
    _add_config(p)
    _add_train(p)

    p = sub.add_parser("encode", help="encode a data set into cached VQ-GAN latents for diffusion training",
                       description="Run the frozen VQ-GAN encoder once over a data set; stores latents, label maps "
                                   "and the codebook range.")
    p.add_argument("--vqgan", type=Path, required=True, help="VQ-GAN run folder")
    _add_data(p)
    p.add_argument("--out", type=Path, required=True, help="latents folder")
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--device", type=_device, default="auto")

    p = sub.add_parser("train-ldm", help="train the latent semantic diffusion model (stage 2) or a baseline",
                       description="Train the SPADE diffusion U-Net on VQ-GAN latents (a latents folder from "
                                   "'encode', or an image/label data set encoded on the fly); "
                                   "--method slice2d / pixel3d trains a baseline on image/label pairs instead "
                                   "(no VQ-GAN).")
    p.add_argument("--vqgan", type=Path, default=None, help="VQ-GAN run folder (required for method lsdm)")
    p.add_argument("--method", default=None,
                   help="lsdm (Med-LSDM), slice2d (2D slices, SegGuidedDiff-style) or pixel3d (3D image space, "
                        "Med-DDPM-style); default: the config's ldm.method (lsdm in the presets)")
    p.add_argument("--allow-vqgan-mismatch", action="store_true",
                   help="train although --vqgan's weights differ from those the latents were encoded with, or "
                        "(--resume) from those the run was started with")
    _add_data(p)
    _add_config(p, planned="the --vqgan run's config; baselines: the plan of the data")
    _add_train(p)

    p = sub.add_parser("export", help="a shareable model folder: weights, config, hashes; nothing from training images",
                       description="Copy what sampling needs from an LDM run (EMA U-Net, config without local paths, "
                                   "latent statistics, VQ-GAN) into a new folder with a SHA-256 manifest that "
                                   "'sample' verifies. No previews, caches, logs or absolute paths.")
    p.add_argument("run", type=Path, help="train-ldm run folder")
    p.add_argument("--out", type=Path, required=True, help="new folder for the export")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")

    p = sub.add_parser("sample", help="label maps in, synthetic NIfTI volumes out",
                       description="Generate volumes from label maps; each output has its label map's geometry.")
    p.add_argument("--model", type=Path, required=True, help="train-ldm run folder (any method) or its export")
    p.add_argument("--labels", type=Path, required=True, help="a label map NIfTI file or a folder of them")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-per-label", type=_positive_int, default=1, help="volumes per label map (1..10000)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="ddpm (all T steps), ddim or dpm++ (DPM-Solver++(2M)); default: the model's config")
    p.add_argument("--steps", type=_positive_int, default=None, help="sampling steps (DDIM, DPM++); DDPM uses all T")
    p.add_argument("--guidance", type=_finite_float, default=None,
                   help="classifier-free guidance scale (1 = conditional only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=1,
                   help="volumes (label maps of one shape) per U-Net call")
    p.add_argument("--device", type=_device, default="auto")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=None,
                   help="U-Net under bf16 autocast (auto: on GPU only); default: the config's ldm.sample_precision")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net (pays off for many volumes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, batch jobs)")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds volumes made with other settings (or of unknown origin): remove them first")
    p.add_argument("--no-spade-cache", action="store_true",
                   help="recompute SPADE's label-map modulations at every step (reference path; slower)")
    p.add_argument("--window-overlap", type=float, default=None,
                   help="label maps deeper than the training shape: share of a depth window overlapping the next "
                        "(default: the config's ldm.window_overlap, 0.5)")
    p.add_argument("--window-batch", type=_positive_int, default=None, help="depth windows per U-Net call (default 1)")
    p.add_argument("--dataset", type=Path, default=None, metavar="DIR",
                   help="also write the volumes and their label maps as an nnU-Net raw dataset (imagesTr, labelsTr, "
                        "dataset.json, cases.csv); name it DatasetNNN_Name for nnU-Net's tools")
    p.add_argument("--with-real", type=Path, default=None, metavar="DATA",
                   help="with --dataset: add the labelled training cases of this data set (headers rewritten)")

    p = sub.add_parser("derive-labels", help="new label maps from the ones in hand (seeded elastic + affine)",
                       description="Warp each label map with a seeded random elastic + affine deformation "
                                   "(nearest neighbour); a draw that loses a class, changes a class's volume beyond "
                                   "0.6-1.6x or splits it into more pieces is redrawn. --mix-prob first swaps in "
                                   "organs from another label map of the folder (same shape).")
    p.add_argument("--labels", type=Path, required=True, help="a label map NIfTI file or a folder of them")
    p.add_argument("--out", type=Path, required=True, help="folder for <label>_d<k>.nii.gz and derive_info.json")
    p.add_argument("--n-per-label", type=_positive_int, default=1, help="derived maps per label map (1..10000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--magnitude", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="elastic displacement magnitude range (default 40 80; MONAI Rand3DElastic units)")
    p.add_argument("--rotate", type=float, default=None, metavar="DEG",
                   help="in-plane rotation, +- degrees (default 8)")
    p.add_argument("--scale", type=float, default=None, help="relative size change per axis, +- (default 0.08)")
    p.add_argument("--mix-prob", type=_number(float, "between 0 and 1", lambda v: 0 <= v <= 1), default=None,
                   metavar="P",
                   help="probability that a derived map takes organs from another label map of the same shape in "
                        "the folder, placed inside this map's body (default 0: no mixing)")
    p.add_argument("--mix-classes", type=_positive_int, default=None, metavar="N",
                   help="with --mix-prob: how many classes (never background or the body) come from the other map "
                        "(default 1)")
    p.add_argument("--body-class", type=_positive_int, default=None, metavar="C",
                   help="with --mix-prob: the label value of a body outline holding the other classes (never mixed; "
                        "organs are pasted only inside it); default: none, organs lie on background")

    p = sub.add_parser("evaluate",
                       help="compare synthetic volumes with real ones (the paper's metrics) and write a report",
                       description="Paired SSIM/PSNR/RMSE/LPIPS, FID per plane and 3D-FID (extractor named with its "
                                   "weights' hash), "
                                   "inter-slice consistency; with --train also the Dice protocol (Table 2) and a "
                                   "privacy audit. "
                                   "Writes metrics.json and report.md.")
    p.add_argument("--real", type=Path, required=True,
                   help="real data set whose label maps produced the synthetic volumes (nnU-Net: its test split)")
    p.add_argument("--synthetic", type=Path, required=True,
                   help="folder of <labelname>_s<k>.nii.gz from 'medlsdm sample'")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--train", type=Path, default=None,
                   help="real training set: enables Dice protocol, domain features, privacy audit")
    p.add_argument("--features", default="auto",
                   help="inception, medicalnet, domain, random-inception, random-medicalnet (comma-separated; "
                        "auto = domain with --train, else random-medicalnet)")
    p.add_argument("--feature-weights", default=None,
                   help="weights file for the extractor (pytorch-fid Inception, MedicalNet, or a saved segmenter)")
    _add_model_config(p)
    p.add_argument("--seg-steps", type=_positive_int, default=None, help="segmenter training steps (default: config)")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS (slow on CPU)")
    p.add_argument("--no-privacy", action="store_true", help="skip the privacy audit")
    p.add_argument("--device", type=_device, default="auto")

    p = sub.add_parser("segtest",
                       help="the paper's Dice protocol: a 3D U-Net trained on real data, run on real and synthetic",
                       description="Train the Appendix B segmentation network on the real training set; Dice per "
                                   "class and mean "
                                   "(background excluded) on real train, real test and synthetic volumes.")
    p.add_argument("--real", type=Path, required=True, help="labelled data set (its test split is the real test set)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train", type=Path, default=None, help="training set (default: --real's training split)")
    p.add_argument("--synthetic", type=Path, default=None, help="synthetic volumes generated from the test label maps")
    p.add_argument("--weights", type=Path, default=None, help="a saved segmenter to evaluate instead of training one")
    _add_model_config(p)
    p.add_argument("--steps", type=_positive_int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=_device, default="auto")

    p = sub.add_parser("augment-study",
                       help="does synthetic data help? segmentation Dice with and without it, over seeds",
                       description="Train the segmenter on a small real subset alone, with classical augmentation, "
                                   "plus synthetic volumes from training label maps and (--synthetic-new) plus "
                                   "synthetic volumes from new label maps; Dice on the real test set over seeds, "
                                   "paired gains with 95% intervals.")
    p.add_argument("--real", type=Path, required=True,
                   help="labelled data set (training split sampled, test split evaluated)")
    p.add_argument("--synthetic", type=Path, required=True,
                   help="synthetic volumes generated from training (not test) label maps")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-real", type=_positive_int, default=4, help="size of the small real subset")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--synthetic-new", type=Path, default=None,
                   help="synthetic volumes generated from new label maps (medlsdm derive-labels): a fourth arm")
    p.add_argument("--new-labels", type=Path, default=None, help="the derived label maps of --synthetic-new")
    p.add_argument("--no-classical", action="store_true", help="leave out the classical-augmentation arm")
    _add_model_config(p)
    p.add_argument("--steps", type=_positive_int, default=None)
    p.add_argument("--device", type=_device, default="auto")

    p = sub.add_parser("demo", help="the whole job on built-in phantom data (tiny config, CPU)",
                       description="Generate phantoms, train the VQ-GAN, encode, train the LDM, sample held-out label "
                                   "maps, write NIfTI volumes and previews.")
    p.add_argument("--out", type=Path, default=Path("medlsdm_demo"))
    p.add_argument("--device", type=_device, default="auto")
    p.add_argument("--fast", action="store_true", help="a few steps only (smoke run, useless outputs)")
    return parser
