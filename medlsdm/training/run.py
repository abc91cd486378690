"""Entry points behind ``medlsdm train-vqgan``, ``encode`` and ``train-ldm``.

Each one resolves the config (a resumed run always uses the config saved in its folder), finds and
splits the data, builds the stage's task and hands it to the shared :class:`Trainer`.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from medlsdm.autoencoder.normalize import ChannelStats, LatentNormalizer
from medlsdm.config import Config, load_config, save_config
from medlsdm.data.checks import check_target_shape
from medlsdm.data.dataset import VolumeDataset, split_cases
from medlsdm.data.layouts import find_cases
from medlsdm.errors import UserError
from medlsdm.io import atomic_write_text, file_sha256
from medlsdm.runs import latest_step, load_vqgan, run_config, selected_weights
from medlsdm.training.distributed import DistContext, cleanup_distributed, init_distributed
from medlsdm.training.engine import Trainer
from medlsdm.training.latents import LatentDataset, encode_dataset, is_latents_dir

__all__ = ["train_vqgan", "train_ldm", "encode_dataset"]


def _resolve(config: Optional[str | Path], out: Path, resume: bool, seed: Optional[int]) -> Config:
    if resume and (Path(out) / "config.yaml").is_file():
        cfg = load_config(Path(out) / "config.yaml")  # a resumed run keeps its own config
    elif config is None:
        raise UserError("--config is required (a preset name such as tiny / paper, or a YAML file)")
    else:
        cfg = load_config(config)
    if seed is not None:
        cfg.seed = seed
    return cfg


RUN_OUTPUTS = ("checkpoints", "best", "previews", "metrics.csv", "ddp_check.json")


def claim_run_dir(out: Path, resume: bool, overwrite: bool = False) -> None:
    """A training run owns ``out``: without ``resume`` a folder that holds another run's checkpoints stops with one
    line (a new run would mix its checkpoints and logs with the old ones), unless ``overwrite``, which removes that
    run's outputs first (``RUN_OUTPUTS``). Called before anything is written."""
    out = Path(out)
    if resume or latest_step(out) is None:
        return
    if not overwrite:
        raise UserError(f"{out}: already holds a training run; pass --resume to continue it, --overwrite to start "
                        "again in this folder, or use another --out")
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _write_run_info(out: Path, dist: DistContext, **extra: object) -> None:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(dist.device),
            "world_size": dist.world_size, **extra}
    atomic_write_text(out / "run_info.json", json.dumps(info, indent=2))


def _image_split(data: Path, cfg: Config, layout: str, label_dir: Optional[Path], labels: bool, out: Path,
                 val_fraction: float):
    """Train/val VolumeDatasets; preprocessed samples are cached in ``data.cache_dir`` or else ``RUN_DIR/cache``."""
    cases = find_cases(Path(data), layout=layout, split="train", label_dir=label_dir)
    if labels:
        unlabelled = [c for c in cases if c.label is None]
        if unlabelled:
            raise UserError(f"{unlabelled[0].image}: no label map; diffusion training needs image/label pairs")
    train, val = split_cases(cases, val_fraction, cfg.seed)
    kw = dict(with_images=True, with_labels=labels, cache_dir=cfg.data.cache_dir or str(out / "cache"))
    return VolumeDataset(train, cfg.data, **kw), (VolumeDataset(val, cfg.data, **kw) if val else None)


def train_vqgan(data: Path, config: Optional[str | Path], out: Path, layout: str = "auto",
                label_dir: Optional[Path] = None, max_steps: Optional[int] = None, resume: bool = False,
                device: str = "auto", seed: Optional[int] = None, progress: bool = True,
                max_minutes: Optional[float] = None, overwrite: bool = False) -> Path:
    """Train the 3D VQ-GAN on the images of ``data`` (labels are ignored) into run folder ``out``
    (``overwrite``: see :func:`claim_run_dir`)."""
    from medlsdm.training.vqgan_task import VQGANTask

    out = Path(out)
    claim_run_dir(out, resume, overwrite)
    cfg = _resolve(config, out, resume, seed)
    if max_steps is not None:
        cfg.train_vqgan.max_steps = max_steps
    check_target_shape(cfg.data.shape, cfg.vqgan.downsample, "config data.shape")
    dist = init_distributed(device)
    try:
        train_set, val_set = _image_split(data, cfg, layout, label_dir, labels=False, out=out,
                                          val_fraction=cfg.train_vqgan.val_fraction)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        task = VQGANTask(cfg)
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            print(f"perceptual loss: {task.perceptual_description}")
            _write_run_info(out, dist, stage="vqgan", perceptual=task.perceptual_description,
                            train_cases=len(train_set), val_cases=len(val_set or []))
        Trainer(task, cfg, cfg.train_vqgan, out, train_set, val_set, dist, progress).fit(
            resume=resume, max_seconds=None if max_minutes is None else 60 * max_minutes)
    finally:
        cleanup_distributed()
    return out


def train_ldm(vqgan_dir: Optional[Path], data: Path, config: Optional[str | Path], out: Path, layout: str = "auto",
              label_dir: Optional[Path] = None, max_steps: Optional[int] = None, resume: bool = False,
              device: str = "auto", seed: Optional[int] = None, progress: bool = True,
              max_minutes: Optional[float] = None, method: Optional[str] = None,
              allow_vqgan_mismatch: bool = False, overwrite: bool = False) -> Path:
    """Train the latent semantic diffusion model on ``data`` (a latents folder or image/label pairs).
    ``overwrite``: see :func:`claim_run_dir`.

    The VQ-GAN weights must be the ones the latents were encoded with and, on ``resume``, the ones the run
    was started with (see :func:`check_vqgan_link`); ``allow_vqgan_mismatch`` turns both checks off.
    ``method`` slice2d / pixel3d (or no ``vqgan_dir``) trains a baseline instead: see
    :func:`medlsdm.training.baseline_task.train_baseline`.
    """
    from medlsdm.training.ldm_task import LDMTask

    claim_run_dir(Path(out), resume, overwrite)
    if method not in (None, "lsdm") or vqgan_dir is None:
        from medlsdm.training.baseline_task import train_baseline

        return train_baseline(data, config, out, method, layout, label_dir, max_steps, resume, device, seed,
                              progress, max_minutes)
    out = Path(out)
    vq_cfg = run_config(vqgan_dir)
    vqgan_sha = check_vqgan_link(Path(vqgan_dir), Path(data), out, resume, allow_vqgan_mismatch)
    cfg = _resolve(config if config is not None else Path(vqgan_dir) / "config.yaml", out, resume, seed)
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
            train_set, val_set = _image_split(data, cfg, layout, label_dir, labels=True, out=out,
                                              val_fraction=cfg.train_ldm.val_fraction)
            normalizer = _normalizer_from_images(vqgan, train_set, kind, dist, progress)
        torch.manual_seed(cfg.seed)
        task = LDMTask(cfg, vqgan, normalizer)
        if dist.is_main:
            _copy_vqgan(Path(vqgan_dir), out)
            normalizer.save(out / "latent_stats.json")
            _write_run_info(out, dist, stage="ldm", train_cases=len(train_set), val_cases=len(val_set or []),
                            vqgan_run=str(Path(vqgan_dir).resolve()), vqgan_weights_sha256=vqgan_sha)
        dist.barrier()
        Trainer(task, cfg, cfg.train_ldm, out, train_set, val_set, dist, progress).fit(
            resume=resume, max_seconds=None if max_minutes is None else 60 * max_minutes)
    finally:
        cleanup_distributed()
    return out


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
    if not (target / "vqgan.safetensors").is_file() or file_sha256(target / "vqgan.safetensors") != file_sha256(weights):
        tmp = target / ".vqgan.safetensors.tmp"
        shutil.copyfile(weights, tmp)
        tmp.replace(target / "vqgan.safetensors")
    save_config(run_config(vqgan_dir), target / "config.yaml")
