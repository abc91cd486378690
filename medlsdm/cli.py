"""The ``medlsdm`` command line: each subcommand calls one library function (parser: ``cli_parser``).

Errors a user can fix are printed as one line (``medlsdm: error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from medlsdm.cli_parser import build_parser
from medlsdm.errors import UserError


def _shape(values: Sequence[str]) -> tuple[int, int, int]:
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def _model_config(a: argparse.Namespace) -> Path | None:
    """``--model``'s config.yaml (None without --model); a model folder without one is a one-line error."""
    if getattr(a, "model", None) is None:
        return None
    path = Path(a.model) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{a.model}: no config.yaml here (--model takes a train-ldm run folder or an export)")
    return path


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


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "phantom": _cmd_phantom, "plan": _cmd_plan, "prepare": _cmd_prepare, "train-vqgan": _cmd_train_vqgan,
    "encode": _cmd_encode, "train-ldm": _cmd_train_ldm, "export": _cmd_export, "sample": _cmd_sample,
    "derive-labels": _cmd_derive, "evaluate": _cmd_evaluate, "segtest": _cmd_segtest, "augment-study": _cmd_augment,
    "demo": _cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a one-line argument error (2)
        return exc.code if isinstance(exc.code, int) else 2
    func = COMMANDS[args.command]
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
