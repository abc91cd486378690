"""Entry points behind ``medlsdm train-vqgan``, ``encode`` and ``train-ldm``.

Each one resolves the config (a resumed run always uses the config saved in its folder), finds and
splits the data, builds the stage's task and hands it to the shared :class:`Trainer`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from medlsdm.autoencoder.normalize import ChannelStats, LatentNormalizer
from medlsdm.config import Config, save_config
from medlsdm.data.checks import check_target_shape
from medlsdm.data.dataset import VolumeDataset
from medlsdm.errors import UserError
from medlsdm.io import file_sha256, folder_lock
from medlsdm.runs import load_vqgan, run_config, selected_weights
from medlsdm.training.distributed import DistContext, cleanup_distributed, init_distributed
from medlsdm.training.engine import Trainer
from medlsdm.training.latents import LatentDataset, encode_dataset, is_latents_dir
from medlsdm.training.run_dir import (
    claim_run_dir,
    drop_run_cache,
    first_rank,
    image_split,
    resolve_config,
    write_run_info,
)

__all__ = ["train_vqgan", "train_ldm", "encode_dataset"]


def train_vqgan(data: Path, config: Config | str | Path | None, out: Path, layout: str = "auto",
                label_dir: Path | None = None, max_steps: int | None = None, resume: bool = False,
                device: str = "auto", seed: int | None = None, progress: bool = True,
                max_minutes: float | None = None, overwrite: bool = False) -> Path:
    """Train the 3D VQ-GAN on the images of ``data`` (labels are ignored) into run folder ``out``
    (``overwrite``: see :func:`claim_run_dir`)."""
    out = Path(out)
    with folder_lock(out, enabled=first_rank()):
        _train_vqgan(data, config, out, layout, label_dir, max_steps, resume, device, seed, progress, max_minutes,
                     overwrite)
    return out


def _train_vqgan(data, config, out: Path, layout, label_dir, max_steps, resume, device, seed, progress, max_minutes,
                 overwrite) -> None:
    from medlsdm.training.vqgan_task import VQGANTask

    claim_run_dir(out, resume, overwrite)
    cfg = resolve_config(config, out, resume, seed)
    if max_steps is not None:
        cfg.train_vqgan.max_steps = max_steps
    check_target_shape(cfg.data.shape, cfg.vqgan.downsample, "config data.shape")
    dist = init_distributed(device)
    try:
        train_set, val_set = image_split(data, cfg, layout, label_dir, labels=False, out=out,
                                          val_fraction=cfg.train_vqgan.val_fraction)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        task = VQGANTask(cfg)
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            print(f"perceptual loss: {task.perceptual_description}")
            write_run_info(out, dist, stage="vqgan", perceptual=task.perceptual_description,
                            train_cases=len(train_set), val_cases=len(val_set or []))
        Trainer(task, cfg, cfg.train_vqgan, out, train_set, val_set, dist, progress).fit(
            resume=resume, max_seconds=None if max_minutes is None else 60 * max_minutes)
        drop_run_cache(cfg, out, dist)
    finally:
        cleanup_distributed()


def train_ldm(vqgan_dir: Path | None, data: Path, config: Config | str | Path | None, out: Path, layout: str = "auto",
              label_dir: Path | None = None, max_steps: int | None = None, resume: bool = False,
              device: str = "auto", seed: int | None = None, progress: bool = True,
              max_minutes: float | None = None, method: str | None = None,
              allow_vqgan_mismatch: bool = False, overwrite: bool = False) -> Path:
    """Train the latent semantic diffusion model on ``data`` (a latents folder or image/label pairs).
    ``overwrite``: see :func:`claim_run_dir`.

    The VQ-GAN weights must be the ones the latents were encoded with and, on ``resume``, the ones the run
    was started with (see :func:`check_vqgan_link`); ``allow_vqgan_mismatch`` turns both checks off.
    ``method`` slice2d / pixel3d (or no ``vqgan_dir``) trains a baseline instead: see
    :func:`medlsdm.training.baseline_task.train_baseline`.
    """
    with folder_lock(Path(out), enabled=first_rank()):
        claim_run_dir(Path(out), resume, overwrite)
        if method not in (None, "lsdm") or vqgan_dir is None:
            from medlsdm.training.baseline_task import train_baseline

            return train_baseline(data, config, out, method, layout, label_dir, max_steps, resume, device, seed,
                                  progress, max_minutes)
        _train_ldm(vqgan_dir, data, config, Path(out), layout, label_dir, max_steps, resume, device, seed, progress,
                   max_minutes, allow_vqgan_mismatch, method)
    return Path(out)


def _train_ldm(vqgan_dir, data, config, out: Path, layout, label_dir, max_steps, resume, device, seed, progress,
               max_minutes, allow_vqgan_mismatch, method) -> None:
    from medlsdm.training.ldm_task import LDMTask

    vq_cfg = run_config(vqgan_dir)
    vqgan_sha = check_vqgan_link(Path(vqgan_dir), Path(data), out, resume, allow_vqgan_mismatch)
    cfg = resolve_config(config if config is not None else Path(vqgan_dir) / "config.yaml", out, resume, seed)
    if method is None and cfg.ldm.method != "lsdm":
        raise UserError(f"config: ldm.method is '{cfg.ldm.method}', a baseline that trains without --vqgan "
                        "(drop --vqgan, or pass --method lsdm)")
    cfg.ldm.method = "lsdm"
    # the VQ-GAN fixes image preprocessing and the autoencoder; the LDM config keeps its label settings
    cfg.vqgan = vq_cfg.vqgan
    cfg.data = dataclasses.replace(vq_cfg.data, num_classes=cfg.data.num_classes, label_remap=cfg.data.label_remap,
                                   label_names=cfg.data.label_names, cache_dir=cfg.data.cache_dir)
    if max_steps is not None:
        cfg.train_ldm.max_steps = max_steps
    dist = init_distributed(device)
    try:
        vqgan, _ = load_vqgan(vqgan_dir, dist.device)
        kind = cfg.ldm.latent_norm
        if is_latents_dir(data):
            full = LatentDataset(data)
            if full.stats.get("image_shape") != list(cfg.data.shape):
                raise UserError(f"{data}: latents were encoded for shape {full.stats.get('image_shape')}, "
                                f"but this VQ-GAN run uses {list(cfg.data.shape)}")
            normalizer = full.normalizer(kind)
            n_val = max(1, round(len(full.ids) * cfg.train_ldm.val_fraction)) if len(full.ids) > 2 else 0
            g = torch.Generator().manual_seed(cfg.seed)
            order = [full.ids[i] for i in torch.randperm(len(full.ids), generator=g).tolist()]
            train_set = LatentDataset(data, sorted(order[n_val:]))
            val_set = LatentDataset(data, sorted(order[:n_val])) if n_val else None
        else:
            train_set, val_set = image_split(data, cfg, layout, label_dir, labels=True, out=out,
                                              val_fraction=cfg.train_ldm.val_fraction)
            normalizer = _normalizer_from_images(vqgan, train_set, kind, dist, progress)
        torch.manual_seed(cfg.seed)
        task = LDMTask(cfg, vqgan, normalizer)
        if dist.is_main:
            _copy_vqgan(Path(vqgan_dir), out)
            normalizer.save(out / "latent_stats.json")
            write_run_info(out, dist, stage="ldm", train_cases=len(train_set), val_cases=len(val_set or []),
                            vqgan_run=Path(vqgan_dir).name, vqgan_weights_sha256=vqgan_sha)
        dist.barrier()
        Trainer(task, cfg, cfg.train_ldm, out, train_set, val_set, dist, progress).fit(
            resume=resume, max_seconds=None if max_minutes is None else 60 * max_minutes)
        drop_run_cache(cfg, out, dist)
    finally:
        cleanup_distributed()


def check_vqgan_link(vqgan_dir: Path, data: Path, out: Path, resume: bool, allow_mismatch: bool = False) -> str:
    """The short SHA-256 of the VQ-GAN weights ``vqgan_dir`` is used with (``runs.selected_weights``), after
    checking it against the hash that a latents folder ``data`` recorded (``stats.json``) and, on ``resume``,
    against the run's own copy ``out/vqgan/vqgan.safetensors``. A mismatch is a UserError unless ``allow_mismatch``."""
    sha = file_sha256(selected_weights(vqgan_dir, "vqgan"))
    if allow_mismatch:
        return sha
    hint = "or pass --allow-vqgan-mismatch if this is intended"
    if is_latents_dir(data):
        recorded = json.loads((data / "stats.json").read_text()).get("vqgan_weights_sha256")
        if recorded != sha:
            raise UserError(f"{data}: latents were encoded with VQ-GAN weights {recorded or '(not recorded)'}, "
                            f"but --vqgan {vqgan_dir} has weights {sha}; re-run 'medlsdm encode' with this "
                            f"VQ-GAN, {hint}")
    copy = out / "vqgan" / "vqgan.safetensors"
    if resume and copy.is_file():
        used = file_sha256(copy)
        if used != sha:
            raise UserError(f"{out}: this run was started with VQ-GAN weights {used}, but --vqgan {vqgan_dir} "
                            f"has weights {sha}; resume with the run's own VQ-GAN ({out / 'vqgan'}), {hint}")
    return sha


@torch.no_grad()
def _normalizer_from_images(vqgan: torch.nn.Module, train_set: VolumeDataset, kind: str, dist: DistContext,
                            progress: bool) -> LatentNormalizer:
    """Latent statistics for on-the-fly encoding: one encoder pass over the training set (standardize only)."""
    zmin, zmax = vqgan.codebook_range()
    if kind != "standardize":
        return LatentNormalizer(zmin, zmax, kind)
    stats = ChannelStats()
    for i in tqdm(range(len(train_set)), desc="latent statistics", disable=not (progress and dist.is_main)):
        stats.add(vqgan.encode(train_set[i]["image"][None].to(dist.device)).float())
    mean, std = stats.result()
    return LatentNormalizer(zmin, zmax, kind, mean, std)


def _copy_vqgan(vqgan_dir: Path, out: Path) -> None:
    """Copy the frozen VQ-GAN (weights + config) into the LDM run so the run is usable on its own."""
    target = out / "vqgan"
    target.mkdir(parents=True, exist_ok=True)
    weights = selected_weights(vqgan_dir, "vqgan")
    if (not (target / "vqgan.safetensors").is_file()
            or file_sha256(target / "vqgan.safetensors") != file_sha256(weights)):
        tmp = target / ".vqgan.safetensors.tmp"
        shutil.copyfile(weights, tmp)
        tmp.replace(target / "vqgan.safetensors")
    save_config(run_config(vqgan_dir), target / "config.yaml")
