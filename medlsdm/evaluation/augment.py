"""The augmentation study: does adding synthetic volumes to a small real training set raise segmentation Dice?

Arms (real only, classical augmentation, + synthetic from training label maps, + synthetic from new label maps)
train the segmenter of :mod:`medlsdm.evaluation.segmentation` with equal step counts over seeds; paired gains
come with 95% bootstrap intervals.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from medlsdm.config import Config
from medlsdm.evaluation.pairing import VolumeSet
from medlsdm.evaluation.segmentation import check_volumes, evaluate_dice, train_segmenter
from medlsdm.evaluation.stats import paired_gain


def _summary(runs: list[dict]) -> dict:
    means = np.array([r["mean"] for r in runs], dtype=float)
    names = runs[0]["per_class"].keys()
    per_class = {}
    for n in names:
        vals = [r["per_class"][n] for r in runs if r["per_class"][n] is not None]
        per_class[n] = float(np.mean(vals)) if vals else None
    return dict(mean=float(means.mean()), std=float(means.std(ddof=1)) if len(means) > 1 else 0.0,
                per_seed=[float(m) for m in means], per_class=per_class)


def augment_study(real_small: VolumeSet, synthetic_extra: VolumeSet, real_test: VolumeSet, cfg: Config,
                  seeds: Sequence[int] = (0, 1, 2), steps: int | None = None,
                  device: str | torch.device = "cpu", progress: bool = False,
                  synthetic_new: VolumeSet | None = None, classical: bool = True) -> dict:
    """Does adding synthetic volumes help, and more than classical augmentation? Arms, each trained once per seed
    with the same number of optimiser steps (``steps``, else ``cfg.seg.steps``, else ``cfg.seg.epochs`` passes over
    the largest training set), so they differ in data only:

    ``real_only``; ``real_classical`` (``real_small`` with
    :func:`~medlsdm.evaluation.segmentation.classical_augmentation`, when ``classical``); ``real_plus_synthetic``
    (+ ``synthetic_extra``, made from training label maps); ``real_plus_new`` (+ ``synthetic_new``, made from new
    label maps, when given).

    Each is scored on ``real_test``. Returns per arm the mean / std / per-seed foreground-mean Dice, and the paired
    gain of every arm over ``real_only`` (and of synthetic over classical) with a 95% bootstrap interval over seeds.
    """
    check_volumes(synthetic_extra.images, synthetic_extra.labels, "augmentation study: synthetic set")
    arms: dict[str, tuple[VolumeSet, bool]] = {"real_only": (real_small, False)}
    if classical:
        arms["real_classical"] = (real_small, True)
    arms["real_plus_synthetic"] = (real_small + synthetic_extra, False)
    if synthetic_new is not None and len(synthetic_new):
        check_volumes(synthetic_new.images, synthetic_new.labels, "augmentation study: new-label-map set")
        arms["real_plus_new"] = (real_small + synthetic_new, False)
    if steps is None and cfg.seg.steps <= 0:
        steps = math.ceil(max(len(d) for d, _ in arms.values()) / cfg.seg.batch_size) * cfg.seg.epochs
    runs: dict[str, list[dict]] = {k: [] for k in arms}
    for seed in seeds:
        for arm, (data, augment) in arms.items():
            model, _ = train_segmenter(data.images, data.labels, cfg, steps=steps, seed=seed, device=device,
                                       progress=progress, augment=augment)
            runs[arm].append(evaluate_dice(model, real_test.images, real_test.labels, cfg, device))
    out: dict = {arm: _summary(r) for arm, r in runs.items()}
    base = out["real_only"]["per_seed"]
    out["gains"] = {arm: paired_gain(out[arm]["per_seed"], base) for arm in arms if arm != "real_only"}
    if classical:
        out["synthetic_vs_classical"] = {arm: paired_gain(out[arm]["per_seed"], out["real_classical"]["per_seed"])
                                         for arm in ("real_plus_synthetic", "real_plus_new") if arm in out}
    out.update(gain=out["real_plus_synthetic"]["mean"] - out["real_only"]["mean"], seeds=list(seeds),
               steps=steps or cfg.seg.steps, n_real=len(real_small), n_synthetic=len(synthetic_extra),
               n_new=len(synthetic_new) if synthetic_new is not None else 0, n_test=len(real_test),
               arms=list(arms))
    return out
