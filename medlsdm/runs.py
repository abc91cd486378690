"""Reading trained run folders: their resolved config and the weights they are used with (the newest
checkpoint's, or the best validation weights a run kept with ``train.keep_best``).

A run folder is self-describing (``config.yaml`` + ``checkpoints/latest``); an LDM run also holds a
copy of its frozen VQ-GAN under ``vqgan/`` so that it can be moved and used offline on its own (it also holds
previews of real slices: share an export, :mod:`medlsdm.export`, instead).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medlsdm.config import Config, load_config
from medlsdm.errors import UserError
from medlsdm.io import load_into


def run_config(run_dir: Path) -> Config:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run folder not found")
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{path}: missing; is {run_dir} a medlsdm run folder?")
    return load_config(path)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """``RUN_DIR/checkpoints/step_NNNNNNN`` named by ``checkpoints/latest``, or None before the first one."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def latest_step(run_dir: Path) -> int | None:
    """The optimiser step of the newest finished checkpoint, or None."""
    ckpt = latest_checkpoint(run_dir)
    return None if ckpt is None else int(ckpt.name.split("_")[1])


def latest_weights(run_dir: Path, name: str) -> Path:
    """``RUN_DIR/checkpoints/<latest>/<name>.safetensors`` (or ``RUN_DIR/<name>.safetensors`` for exports)."""
    run_dir = Path(run_dir)
    flat = run_dir / f"{name}.safetensors"
    if flat.is_file():
        return flat
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"{run_dir}: no finished checkpoint (checkpoints/latest is missing)")
    path = ckpt / f"{name}.safetensors"
    if not path.is_file():
        raise UserError(f"{path}: checkpoint file not found")
    return path


def selected_weights(run_dir: Path, name: str) -> Path:
    """The weights a run is used with: ``RUN_DIR/best/<name>.safetensors`` when the run kept its best
    validation weights (``train.keep_best``), else those of the latest checkpoint (or an export's flat file)."""
    run_dir = Path(run_dir)
    record = run_dir / "best" / "best.json"
    if record.is_file() and not (run_dir / f"{name}.safetensors").is_file():
        best = record.parent / json.loads(record.read_text())["folder"] / f"{name}.safetensors"
        if best.is_file():
            return best
    return latest_weights(run_dir, name)


def load_vqgan(run_dir: Path, device: torch.device | str = "cpu") -> tuple["torch.nn.Module", Config]:
    """The frozen VQ-GAN of a VQ-GAN run folder (or of an LDM run's ``vqgan/`` copy), in eval mode."""
    from medlsdm.autoencoder.build import build_vqgan

    cfg = run_config(run_dir)
    model = build_vqgan(cfg.vqgan)
    load_into(model, selected_weights(run_dir, "vqgan"), what="VQ-GAN")
    model.to(device).eval().requires_grad_(False)
    return model, cfg
