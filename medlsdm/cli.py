"""The ``medlsdm`` command line: argument parsing only; each subcommand calls one library function.

Errors a user can fix are printed as one line (``medlsdm: error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from medlsdm.errors import UserError

EPILOG = "Data folders: nnU-Net raw (dataset.json, imagesTr/, labelsTr/), images/+labels/ pairs, a CSV/JSON manifest, SynthRAD2023 (<patient>/ct.nii.gz) or DICOM series folders. See README.md."


def _shape(values: Sequence[str]) -> tuple[int, int, int]:
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def _add_config(p: argparse.ArgumentParser, default: Optional[str] = "tiny") -> None:
    p.add_argument("--config", default=default, help="preset name (tiny, paper) or a YAML file (default: %(default)s)")


def _add_data(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", type=Path, required=required, help="data folder or manifest (CSV/JSON)")
    p.add_argument("--layout", default="auto",
                   choices=["auto", "nnunet", "pairs", "manifest", "synthrad", "dicom", "unlabelled"],
                   help="how the data folder is organised (default: detect)")
    p.add_argument("--label-dir", type=Path, default=None, help="SynthRAD layout: folder with <patient>.nii.gz label maps")


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, logs, previews, config.yaml)")
    p.add_argument("--max-steps", type=int, default=None, help="training length in optimiser steps (default: config)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the newest checkpoint in --out")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="override the config's seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medlsdm", description="3D semantic label maps -> synthetic 3D medical volumes (Med-LSDM).", epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("phantom", help="write a procedural phantom data set (nnU-Net layout)",
                       description="Generate labelled 3D phantoms (6 classes) as NIfTI pairs in the nnU-Net raw layout.")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=20, help="number of cases (default: %(default)s)")
    p.add_argument("--modality", choices=["ct", "mr"], default="ct")
    p.add_argument("--shape", nargs=3, metavar=("D", "H", "W"), default=["16", "64", "64"], help="volume shape (default: 16 64 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share written to imagesTs/labelsTs")
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("prepare", help="validate a data set, cache preprocessed samples, print a summary",
                       description="Check every case (readable, 3D, matching geometry, known labels, finite), fill the cache, print cases/shapes/spacings/label histogram.")
    _add_data(p)
    _add_config(p)
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--no-cache", action="store_true", help="validate only, do not write the cache")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("train-vqgan", help="train the 3D VQ-GAN (stage 1) on images",
                       description="Train the 3D VQ-GAN autoencoder (labels not needed). Works under torchrun for multi-GPU.")
    _add_data(p)
    _add_config(p)
    _add_train(p)
    p.set_defaults(func=_cmd_train_vqgan)

    p = sub.add_parser("encode", help="encode a data set into cached VQ-GAN latents for diffusion training",
                       description="Run the frozen VQ-GAN encoder once over a data set; stores latents, label maps and the codebook range.")
    p.add_argument("--vqgan", type=Path, required=True, help="VQ-GAN run folder")
    _add_data(p)
    p.add_argument("--out", type=Path, required=True, help="latents folder")
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_encode)

    p = sub.add_parser("train-ldm", help="train the latent semantic diffusion model (stage 2)",
                       description="Train the SPADE diffusion U-Net on VQ-GAN latents (a latents folder from 'encode', or an image/label data set encoded on the fly).")
    p.add_argument("--vqgan", type=Path, required=True, help="VQ-GAN run folder")
    _add_data(p)
    _add_config(p, default=None)
    _add_train(p)
    p.set_defaults(func=_cmd_train_ldm)

    p = sub.add_parser("sample", help="label maps in, synthetic NIfTI volumes out",
                       description="Generate volumes from label maps; each output has its label map's geometry.")
    p.add_argument("--model", type=Path, required=True, help="LDM run folder")
    p.add_argument("--labels", type=Path, required=True, help="a label map NIfTI file or a folder of them")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-per-label", type=int, default=1)
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default=None, help="default: the model's config")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (DDIM); DDPM uses all T")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1 = conditional only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("evaluate", help="compare synthetic and real volumes (not implemented yet)",
                       description="The evaluation suite (FID, 3D-FID, LPIPS, SSIM, RMSE, PSNR, Dice protocol) arrives with issue 5.")
    p.add_argument("--real", type=Path)
    p.add_argument("--synthetic", type=Path)
    p.add_argument("--out", type=Path)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("demo", help="the whole job on built-in phantom data (tiny config, CPU)",
                       description="Generate phantoms, train the VQ-GAN, encode, train the LDM, sample held-out label maps, write NIfTI volumes and previews.")
    p.add_argument("--out", type=Path, default=Path("medlsdm_demo"))
    p.add_argument("--device", default="auto")
    p.add_argument("--fast", action="store_true", help="a few steps only (smoke run, useless outputs)")
    p.set_defaults(func=_cmd_demo)
    return parser


def _cmd_phantom(a: argparse.Namespace) -> None:
    from medlsdm.data.phantom import write_phantom_dataset

    if a.n < 1:
        raise UserError("--n must be at least 1")
    out = write_phantom_dataset(a.out, a.n, modality=a.modality, shape=_shape(a.shape), seed=a.seed,
                                test_fraction=a.test_fraction)
    print(f"wrote {a.n} {a.modality.upper()} phantoms to {out}")


def _cmd_prepare(a: argparse.Namespace) -> None:
    from medlsdm.config import load_config
    from medlsdm.data.prepare import format_summary, prepare_dataset

    cfg = load_config(a.config)
    summary = prepare_dataset(a.data, cfg.data, layout=a.layout, split=a.split, cache=not a.no_cache,
                              label_dir=a.label_dir)
    print(format_summary(summary))


def _cmd_train_vqgan(a: argparse.Namespace) -> None:
    from medlsdm.training.run import train_vqgan

    train_vqgan(a.data, a.config, a.out, layout=a.layout, label_dir=a.label_dir, max_steps=a.max_steps,
                resume=a.resume, device=a.device, seed=a.seed, progress=not a.no_progress)


def _cmd_encode(a: argparse.Namespace) -> None:
    from medlsdm.training.run import encode_dataset

    out = encode_dataset(a.vqgan, a.data, a.out, layout=a.layout, label_dir=a.label_dir, split=a.split, device=a.device)
    print(f"latents written to {out}")


def _cmd_train_ldm(a: argparse.Namespace) -> None:
    from medlsdm.training.run import train_ldm

    train_ldm(a.vqgan, a.data, a.config, a.out, layout=a.layout, label_dir=a.label_dir, max_steps=a.max_steps,
              resume=a.resume, device=a.device, seed=a.seed, progress=not a.no_progress)


def _cmd_sample(a: argparse.Namespace) -> None:
    from medlsdm.pipeline import sample_to_folder

    written = sample_to_folder(a.model, a.labels, a.out, n_per_label=a.n_per_label, sampler=a.sampler,
                               steps=a.steps, guidance=a.guidance, seed=a.seed, batch_size=a.batch_size,
                               device=a.device)
    print(f"wrote {len(written)} volume(s) to {a.out}")


def _cmd_evaluate(a: argparse.Namespace) -> None:
    raise UserError("'medlsdm evaluate' is not implemented yet (the evaluation suite is issue 5)")


def _cmd_demo(a: argparse.Namespace) -> None:
    from medlsdm.demo import run_demo

    run_demo(a.out, device=a.device, fast=a.fast)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except UserError as exc:
        print(f"medlsdm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("medlsdm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
