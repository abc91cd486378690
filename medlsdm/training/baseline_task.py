"""Training entry for the baselines (``medlsdm train-ldm --method slice2d|pixel3d``).

The baselines need no VQ-GAN: the shared :class:`~medlsdm.training.ldm_task.LDMTask` runs with
``vqgan=None`` on the preprocessed images ``{"image" (1, D, H, W) in [-1, 1], "label"}`` of an
image/label data set, with the same trainer (DDP, EMA, checkpoints, resume) as Med-LSDM.
"""

from __future__ import annotations

from pathlib import Path

import torch

from medlsdm.config import Config
from medlsdm.diffusion.baselines import check_method, is_baseline
from medlsdm.errors import UserError
from medlsdm.training.distributed import cleanup_distributed, init_distributed
from medlsdm.training.engine import Trainer
from medlsdm.training.latents import is_latents_dir
from medlsdm.training.run_dir import drop_run_cache, image_split, resolve_config, write_run_info


def train_baseline(data: Path, config: Config | str | Path | None, out: Path, method: str | None = None,
                   layout: str = "auto", label_dir: Path | None = None, max_steps: int | None = None,
                   resume: bool = False, device: str = "auto", seed: int | None = None, progress: bool = True,
                   max_minutes: float | None = None) -> Path:
    """Train the ``slice2d`` or ``pixel3d`` baseline on the image/label pairs of ``data`` into run folder ``out``.

    ``config`` defaults to the ``tiny`` preset; ``method`` overrides its ``ldm.method`` (a resumed run keeps
    its own). Method ``lsdm`` is refused here: it needs a VQ-GAN (``train_ldm`` with ``vqgan_dir``).
    """
    from medlsdm.training.ldm_task import LDMTask

    out = Path(out)
    if method is not None:
        check_method(method)
    cfg = resolve_config(config if config is not None else "tiny", out, resume, seed)
    if method is not None:
        if resume and (out / "config.yaml").is_file() and method != cfg.ldm.method:
            raise UserError(f"{out}: this run was trained with method '{cfg.ldm.method}', not '{method}'")
        cfg.ldm.method = method
    if not is_baseline(cfg):
        raise UserError("train-ldm: --vqgan is required for method lsdm (only the baselines slice2d and pixel3d "
                        "train without a VQ-GAN)")
    if is_latents_dir(data):
        raise UserError(f"{data}: a latents folder; the {cfg.ldm.method} baseline trains on images, give the "
                        "image/label data set")
    if max_steps is not None:
        cfg.train_ldm.max_steps = max_steps
    dist = init_distributed(device)
    try:
        train_set, val_set = image_split(data, cfg, layout, label_dir, labels=True, out=out,
                                          val_fraction=cfg.train_ldm.val_fraction)
        torch.manual_seed(cfg.seed)
        task = LDMTask(cfg, None, None)
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            write_run_info(out, dist, stage="ldm", method=cfg.ldm.method, train_cases=len(train_set),
                            val_cases=len(val_set or []))
        dist.barrier()
        Trainer(task, cfg, cfg.train_ldm, out, train_set, val_set, dist, progress).fit(
            resume=resume, max_seconds=None if max_minutes is None else 60 * max_minutes)
        drop_run_cache(cfg, out, dist)
    finally:
        cleanup_distributed()
    return out
