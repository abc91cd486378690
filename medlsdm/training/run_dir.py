"""What every training entry point does to its run folder: resolve the config, claim the folder, split the data
(with the preprocessing cache), record ``run_info.json`` and drop the cache at the end.

Shared by :mod:`medlsdm.training.run` and :mod:`medlsdm.training.baseline_task`, so neither imports the other.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

import torch

from medlsdm.config import Config, load_config
from medlsdm.data.dataset import VolumeDataset, split_cases
from medlsdm.data.layouts import find_cases
from medlsdm.errors import UserError
from medlsdm.io import atomic_write_text
from medlsdm.runs import latest_step
from medlsdm.training.distributed import DistContext

__all__ = ["resolve_config", "claim_run_dir", "write_run_info", "drop_run_cache", "image_split", "first_rank",
           "RUN_OUTPUTS"]


def resolve_config(config: Config | str | Path | None, out: Path, resume: bool, seed: int | None) -> Config:
    """The run's config: on ``resume`` the one saved in ``out``, else ``config`` (a Config, a preset name or a YAML
    file)."""
    if resume and (Path(out) / "config.yaml").is_file():
        cfg = load_config(Path(out) / "config.yaml")  # a resumed run keeps its own config
    elif isinstance(config, Config):
        cfg = config
    elif config is None:
        raise UserError("--config is required (a preset name such as tiny / paper, or a YAML file)")
    else:
        cfg = load_config(config)
    if seed is not None:
        cfg.seed = seed
    return cfg


RUN_OUTPUTS = ("checkpoints", "best", "previews", "tensorboard", "metrics.csv", "ddp_check.json")


def claim_run_dir(out: Path, resume: bool, overwrite: bool = False) -> None:
    """A training run owns ``out``: without ``resume`` a folder that holds another run's checkpoints stops with one
    line (a new run would mix its checkpoints and logs with the old ones), unless ``overwrite``, which removes that
    run's outputs first (``RUN_OUTPUTS``). Called before anything is written, and again (without ``overwrite``)
    by ``Trainer.fit`` for a new run: the one place that decides whether a folder holds a run."""
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


def write_run_info(out: Path, dist: DistContext, **extra: object) -> None:
    """``out/run_info.json``: software versions, device, world size and ``extra`` (no absolute paths)."""
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(dist.device),
            "world_size": dist.world_size, **extra}
    atomic_write_text(out / "run_info.json", json.dumps(info, indent=2))


def drop_run_cache(cfg: Config, out: Path, dist: DistContext) -> None:
    """Remove ``RUN_DIR/cache`` (preprocessed training images) when training ends without an error, so that a
    run folder holds no copy of the training data (an interrupted run keeps it for ``--resume``). A cache the
    config places elsewhere (``data.cache_dir``) is the user's and stays."""
    dist.barrier()
    if dist.is_main and not cfg.data.cache_dir:
        shutil.rmtree(out / "cache", ignore_errors=True)


def image_split(data: Path, cfg: Config, layout: str, label_dir: Path | None, labels: bool, out: Path,
                val_fraction: float) -> tuple[VolumeDataset, VolumeDataset | None]:
    """Train/val VolumeDatasets; preprocessed samples are cached in ``data.cache_dir`` or else ``RUN_DIR/cache``."""
    cases = find_cases(Path(data), layout=layout, split="train", label_dir=label_dir)
    if labels:
        unlabelled = [c for c in cases if c.label is None]
        if unlabelled:
            raise UserError(f"{unlabelled[0].image}: no label map; diffusion training needs image/label pairs")
    train, val = split_cases(cases, val_fraction, cfg.seed)
    kw = dict(with_images=True, with_labels=labels, cache_dir=cfg.data.cache_dir or str(out / "cache"))
    return VolumeDataset(train, cfg.data, **kw), (VolumeDataset(val, cfg.data, **kw) if val else None)


def first_rank() -> bool:
    """True outside torchrun and on its rank 0 (the rank that holds the run folder's lock)."""
    return os.environ.get("RANK", "0") == "0"
