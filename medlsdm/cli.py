"""The ``medlsdm`` command line: argument parsing only; each subcommand calls one library function.

Errors a user can fix are printed as one line (``medlsdm: error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from medlsdm.config import SAMPLERS
from medlsdm.errors import UserError

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


def _shape(values: Sequence[str]) -> tuple[int, int, int]:
    return tuple(int(v) for v in values)  # type: ignore[return-value]


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


def _model_config(a: argparse.Namespace) -> Path | None:
    """``--model``'s config.yaml (None without --model); a model folder without one is a one-line error."""
    if getattr(a, "model", None) is None:
        return None
    path = Path(a.model) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{a.model}: no config.yaml here (--model takes a train-ldm run folder or an export)")
    return path


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
    p.set_defaults(func=_cmd_phantom)

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
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("prepare", help="validate a data set, cache preprocessed samples, print a summary",
                       description="Check every case (readable, 3D, matching geometry, known labels, finite), fill "
                                   "the cache, print cases/shapes/spacings/label histogram.")
    _add_data(p)
    _add_config(p)
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--no-cache", action="store_true", help="validate only, do not write the cache")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("train-vqgan", help="train the 3D VQ-GAN (stage 1) on images",
                       description="Train the 3D VQ-GAN autoencoder (labels not needed). Works under torchrun for "
                                   "multi-GPU.")
    _add_data(p)
    _add_config(p)
    _add_train(p)
    p.set_defaults(func=_cmd_train_vqgan)

    p = sub.add_parser("encode", help="encode a data set into cached VQ-GAN latents for diffusion training",
                       description="Run the frozen VQ-GAN encoder once over a data set; stores latents, label maps "
                                   "and the codebook range.")
    p.add_argument("--vqgan", type=Path, required=True, help="VQ-GAN run folder")
    _add_data(p)
    p.add_argument("--out", type=Path, required=True, help="latents folder")
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--device", type=_device, default="auto")
    p.set_defaults(func=_cmd_encode)

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
    p.set_defaults(func=_cmd_train_ldm)

    p = sub.add_parser("export", help="a shareable model folder: weights, config, hashes; nothing from training images",
                       description="Copy what sampling needs from an LDM run (EMA U-Net, config without local paths, "
                                   "latent statistics, VQ-GAN) into a new folder with a SHA-256 manifest that "
                                   "'sample' verifies. No previews, caches, logs or absolute paths.")
    p.add_argument("run", type=Path, help="train-ldm run folder")
    p.add_argument("--out", type=Path, required=True, help="new folder for the export")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    p.set_defaults(func=_cmd_export)

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
    p.set_defaults(func=_cmd_sample)

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
    p.set_defaults(func=_cmd_derive)

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
    p.set_defaults(func=_cmd_evaluate)

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
    p.set_defaults(func=_cmd_segtest)

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
    p.set_defaults(func=_cmd_augment)

    p = sub.add_parser("demo", help="the whole job on built-in phantom data (tiny config, CPU)",
                       description="Generate phantoms, train the VQ-GAN, encode, train the LDM, sample held-out label "
                                   "maps, write NIfTI volumes and previews.")
    p.add_argument("--out", type=Path, default=Path("medlsdm_demo"))
    p.add_argument("--device", type=_device, default="auto")
    p.add_argument("--fast", action="store_true", help="a few steps only (smoke run, useless outputs)")
    p.set_defaults(func=_cmd_demo)
    return parser


def _cmd_phantom(a: argparse.Namespace) -> None:
    from medlsdm.data.phantom import PAPER_SPACING, ROI_CENTRE_MM, write_phantom_dataset

    if a.n < 1:
        raise UserError("--n must be at least 1")
    region = dict(spacing=PAPER_SPACING, centre=ROI_CENTRE_MM) if a.scale == "paper" else {}
    out = write_phantom_dataset(a.out, a.n, modality=a.modality, shape=_shape(a.shape), seed=a.seed,
                                test_fraction=a.test_fraction, lesions=a.lesions, **region)
    print(f"wrote {a.n} {a.modality.upper()} phantoms to {out}")


def _config_for(a: argparse.Namespace, data: Path, default: str | Path | None = None):
    """The config a command runs with: ``--config`` (else ``default``, else the plan of ``data``) with the
    ``--set`` overrides, checked against ``data``'s dataset.json. None on ``--resume`` of a run that has its
    own config.yaml (the run keeps it)."""
    from medlsdm.config import config_from_dict, deep_update, load_config, parse_overrides
    from medlsdm.data.plan import check_config_against_data, fingerprint, plan_config

    overrides = parse_overrides(a.set) if a.set else {}
    out = getattr(a, "out", None)
    if getattr(a, "resume", False) and out is not None and (Path(out) / "config.yaml").is_file():
        if overrides:
            raise UserError(f"{Path(out) / 'config.yaml'}: --resume continues with the run's own config; --set "
                            "cannot change it (edit that file, or start a new run)")
        return None
    source = a.config if a.config is not None else default
    if source is None:
        cfg, why = plan_config(fingerprint(data, getattr(a, "layout", "auto"), getattr(a, "label_dir", None)))
        print(f"no --config: planned from {data} ('medlsdm plan' writes this as a file):")
        print("".join(f"  {line}\n" for line in why), end="")
        cfg = config_from_dict(deep_update(cfg.to_dict(), overrides)) if overrides else cfg
    else:
        cfg = load_config(source, overrides or None)
    check_config_against_data(cfg, data)
    return cfg


def _cmd_plan(a: argparse.Namespace) -> None:
    from medlsdm.data.plan import fingerprint, plan_config, write_plan

    fp = fingerprint(a.data, a.layout, a.label_dir)
    cfg, why = plan_config(fp, base=a.base, gpu_memory_gb=a.gpu_memory)
    print(f"plan for {a.data} ({len(fp.shapes)} training cases, layout {fp.layout}):")
    print("".join(f"  {line}\n" for line in why), end="")
    print(f"wrote {write_plan(cfg, why, a.out)}; use it with --config {a.out}")


def _cmd_prepare(a: argparse.Namespace) -> None:
    from medlsdm.data.prepare import format_summary, prepare_dataset

    cfg = _config_for(a, a.data)
    summary = prepare_dataset(a.data, cfg.data, layout=a.layout, split=a.split, cache=not a.no_cache,
                              label_dir=a.label_dir)
    print(format_summary(summary))


def _cmd_train_vqgan(a: argparse.Namespace) -> None:
    from medlsdm.training.run import train_vqgan

    train_vqgan(a.data, _config_for(a, a.data), a.out, layout=a.layout, label_dir=a.label_dir, max_steps=a.max_steps,
                resume=a.resume, device=a.device, seed=a.seed, progress=not a.no_progress, max_minutes=a.max_minutes,
                overwrite=a.overwrite)


def _cmd_encode(a: argparse.Namespace) -> None:
    from medlsdm.training.run import encode_dataset

    out = encode_dataset(a.vqgan, a.data, a.out, layout=a.layout, label_dir=a.label_dir, split=a.split, device=a.device)
    print(f"latents written to {out}")


def _cmd_train_ldm(a: argparse.Namespace) -> None:
    from medlsdm.training.run import train_ldm

    default = Path(a.vqgan) / "config.yaml" if a.vqgan is not None and a.method in (None, "lsdm") else None
    train_ldm(a.vqgan, a.data, _config_for(a, a.data, default), a.out, layout=a.layout, label_dir=a.label_dir,
              max_steps=a.max_steps, resume=a.resume, device=a.device, seed=a.seed, progress=not a.no_progress,
              max_minutes=a.max_minutes, method=a.method, allow_vqgan_mismatch=a.allow_vqgan_mismatch,
              overwrite=a.overwrite)


def _cmd_sample(a: argparse.Namespace) -> None:
    from medlsdm.pipeline import sample_to_folder
    from medlsdm.training.distributed import cleanup_distributed, init_distributed

    options = {k: v for k, v in (("sample_precision", a.precision), ("window_overlap", a.window_overlap),
                                 ("window_batch", a.window_batch)) if v is not None}
    if a.compile:
        options["sample_compile"] = True
    if a.no_spade_cache:
        options["spade_cache"] = False
    if a.with_real is not None and a.dataset is None:
        raise UserError("--with-real adds real cases to an nnU-Net dataset: give --dataset DIR as well")
    ctx = init_distributed(a.device)  # under torchrun: each rank takes every world_size-th volume
    try:
        written = sample_to_folder(a.model, a.labels, a.out, n_per_label=a.n_per_label, sampler=a.sampler,
                                   steps=a.steps, guidance=a.guidance, seed=a.seed, batch_size=a.batch_size,
                                   device=str(ctx.device), rank=ctx.rank, world_size=ctx.world_size,
                                   progress=ctx.is_main and not a.no_progress, options=options,
                                   overwrite=a.overwrite)
        where = f" (rank {ctx.rank} of {ctx.world_size})" if ctx.enabled else ""
        # one write per line: ranks share stdout, and print() sends text and newline apart, so lines interleave
        sys.stdout.write(f"wrote {len(written)} volume(s) to {a.out}{where}\n")
        sys.stdout.flush()
        if a.dataset is not None:
            ctx.barrier()  # every rank's volumes are written
            if ctx.is_main:
                from medlsdm.data.nnunet import write_nnunet_dataset
                from medlsdm.pipeline import label_files
                from medlsdm.runs import run_config

                cfg = run_config(a.model).data
                out = write_nnunet_dataset(a.out, label_files(a.labels), a.dataset, cfg, with_real=a.with_real,
                                           overwrite=a.overwrite)
                print(f"nnU-Net dataset written to {out} (cases.csv says which cases are synthetic)")
    finally:
        cleanup_distributed()


def _cmd_derive(a: argparse.Namespace) -> None:
    from medlsdm.data.derive import DeformConfig, derive_folder

    given = dict(magnitude=tuple(a.magnitude) if a.magnitude else None, rotate_deg=a.rotate, scale=a.scale,
                 mix_prob=a.mix_prob, mix_classes=a.mix_classes, body_class=a.body_class)
    cfg = DeformConfig(**{k: v for k, v in given.items() if v is not None})
    written = derive_folder(a.labels, a.out, n_per_label=a.n_per_label, seed=a.seed, cfg=cfg)
    mixed = ""
    if cfg.mix_prob > 0:
        maps = json.loads((Path(a.out) / "derive_info.json").read_text())["maps"]
        mixed = f", {sum(m['donor'] is not None for m in maps)} of them mixed with another map"
    print(f"wrote {len(written)} derived label map(s) to {a.out}{mixed} (settings and sources in derive_info.json)")


def _cmd_export(a: argparse.Namespace) -> None:
    from medlsdm.export import export_model

    out = export_model(a.run, a.out, overwrite=a.overwrite)
    print(f"exported {a.run} to {out} (files and SHA-256 in {out / 'manifest.json'})")


def _cmd_evaluate(a: argparse.Namespace) -> None:
    from medlsdm.evaluation.evaluate import evaluate

    cfg = _config_for(a, a.real, _model_config(a))
    m = evaluate(a.real, a.synthetic, a.out, train=a.train, features=a.features, feature_weights=a.feature_weights,
                 cfg=cfg, seg_steps=a.seg_steps, device=a.device, lpips=not a.no_lpips, privacy=not a.no_privacy)
    _print_notes(m)
    print(f"report written to {a.out / 'report.md'}")


def _print_notes(result: dict) -> None:
    for note in result.get("notes", []):
        print(f"note: {note}")


def _cmd_segtest(a: argparse.Namespace) -> None:
    from medlsdm.evaluation.studies import run_segtest

    cfg = _config_for(a, a.real, _model_config(a))
    _print_notes(run_segtest(a.real, a.out, cfg=cfg, train=a.train, synthetic=a.synthetic, weights=a.weights,
                             steps=a.steps, seed=a.seed, device=a.device))
    print(f"Dice protocol written to {a.out / 'segtest.json'}")


def _cmd_augment(a: argparse.Namespace) -> None:
    from medlsdm.evaluation.studies import run_augment_study

    cfg = _config_for(a, a.real, _model_config(a))
    _print_notes(run_augment_study(a.real, a.synthetic, a.out, cfg=cfg, n_real=a.n_real,
                                   seeds=a.seeds, steps=a.steps, device=a.device, synthetic_new=a.synthetic_new,
                                   new_labels=a.new_labels, classical=not a.no_classical))
    print(f"augmentation study written to {a.out / 'augment.json'}")


def _cmd_demo(a: argparse.Namespace) -> None:
    from medlsdm.demo import run_demo

    run_demo(a.out, device=a.device, fast=a.fast)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a one-line argument error (2)
        return exc.code if isinstance(exc.code, int) else 2
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except UserError as exc:
        _error(f"medlsdm: error: {exc}")
        return 2
    except OSError as exc:  # the machine's side: --out is a file, no permission, read-only, disk full
        where = f"{exc.filename}: " if exc.filename else ""
        _error(f"medlsdm: error: {where}{exc.strerror or exc}")
        return 2
    except KeyboardInterrupt:
        _error("medlsdm: interrupted")
        return 130
    return 0


def _error(message: str) -> None:
    """One line on stderr, never on a progress bar's line (tqdm.write moves an active bar out of the way)."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
