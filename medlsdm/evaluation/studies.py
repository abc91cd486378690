"""Entry functions behind ``medlsdm segtest`` (the Dice protocol alone) and ``medlsdm augment-study``.

Both read nnU-Net-style data sets (``imagesTr``/``labelsTr`` for training, ``imagesTs``/``labelsTs`` for
testing; other layouts: pass the training and test sets as separate folders) and write JSON plus a
figure into ``out``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from medlsdm.config import Config
from medlsdm.devices import resolve_device
from medlsdm.errors import UserError
from medlsdm.evaluation.augment import augment_study
from medlsdm.evaluation.evaluate import as_config, jsonable, test_split, whole_volumes_note
from medlsdm.evaluation.pairing import label_files, load_cases, load_real, load_synthetic, real_cases, synthetic_files
from medlsdm.evaluation.report import REAL, SYNTH, dice_figure, save_figure
from medlsdm.evaluation.segmentation import dice_protocol, load_segmenter, untrusted_classes_note
from medlsdm.io import atomic_write_text


def run_segtest(
    real: Path, out: Path, cfg: Config | str | Path = "tiny", train: Path | None = None,
    synthetic: Path | None = None, weights: Path | None = None, steps: int | None = None, seed: int = 0,
    layout: str = "auto", device: str = "auto", progress: bool = True,
) -> dict:
    """The paper's Dice protocol (Table 2) on its own; writes ``segtest.json``, ``dice.png`` (and the weights).

    Args:
        real: labelled data set; its test split (nnU-Net ``imagesTs``) is the real test set.
        train: labelled training set (default: ``real``'s training split).
        synthetic: optional folder of ``<labelname>_s<k>.nii.gz`` generated from the test label maps.
        weights: a saved segmenter (``segmenter.safetensors``) to evaluate instead of training one.
        steps: training steps (default ``cfg.seg``: steps, else epochs).
    """
    cfg, out, dev = as_config(cfg), Path(out), resolve_device(device)
    test_cases = real_cases(real, test_split(real), layout)
    test_set = load_cases(test_cases, cfg.data, need_labels=True)
    train_set = load_real(train or real, cfg.data, "train", layout, need_labels=True)
    synth_set = load_synthetic(synthetic, test_cases, test_set, cfg.data)[0] if synthetic is not None else None
    out.mkdir(parents=True, exist_ok=True)
    model = load_segmenter(weights, cfg, dev)[0] if weights is not None else None
    result = dice_protocol(train_set, test_set, synth_set, cfg, model=model, steps=steps, seed=seed,
                           out_path=None if weights else out / "segmenter.safetensors", device=dev, progress=progress)
    notes = [whole_volumes_note(cfg, test_set, train_set, synth_set),
             untrusted_classes_note(result["table"]["real test"])]
    result = jsonable(dict(result, inputs=dict(real=str(real), train=str(train or real), synthetic=synthetic,
                                               weights=weights, config=cfg.name), notes=[n for n in notes if n]))
    result["figure"] = dice_figure(out / "dice.png", result["table"])
    atomic_write_text(out / "segtest.json", json.dumps(result, indent=2) + "\n")
    return result


def _synthetic_partners(synthetic: Path, train: Path, labels: Path | None, test_ids: set[str], cfg: Config,
                        layout: str):
    """Synthetic volumes with the label maps they were generated from (training or extra label maps)."""
    leaked = [(name, path) for name, path in synthetic_files(synthetic) if name in test_ids]
    if leaked:
        raise UserError(f"{leaked[0][1]}: generated from test label map '{leaked[0][0]}': training on it would leak "
                        "the test set; generate augmentation volumes from training (or extra) label maps")
    cases = label_files(labels) if labels is not None else real_cases(train, "train", layout)
    partners = load_cases(cases, cfg.data, need_labels=True)
    return load_synthetic(synthetic, cases, partners, cfg.data, require_all=False)[0]


ARM_LABELS = {"real_only": "real only", "real_classical": "real +\nclassical aug.",
              "real_plus_synthetic": "real +\nsynthetic", "real_plus_new": "real + synthetic\n(new label maps)"}


def augment_figure(path: Path, study: dict) -> str:
    """Mean +- std Dice on the real test set for every arm of the study, seeds as dots."""
    arms = [a for a in study.get("arms", ["real_only", "real_plus_synthetic"]) if a in study]
    fig = Figure(figsize=(1.4 + 1.3 * len(arms), 3.0), dpi=100)
    ax = fig.subplots()
    colours = [REAL if a == "real_only" else SYNTH for a in arms]
    bars = ax.bar(range(len(arms)), [study[a]["mean"] for a in arms], yerr=[study[a]["std"] for a in arms],
                  capsize=6, color=colours)
    ax.bar_label(bars, labels=[f"{study[a]['mean']:.3f}" for a in arms], fontsize=8, padding=2, label_type="center")
    for i, a in enumerate(arms):
        ax.scatter([i] * len(study[a]["per_seed"]), study[a]["per_seed"], color="k", s=10, zorder=3)
    ax.set_xticks(range(len(arms)), [ARM_LABELS.get(a, a) for a in arms], fontsize=7)
    ax.set_ylabel("mean foreground Dice (real test set)", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(f"augmentation study: {study['n_real']} real volumes ({len(study['seeds'])} seeds, "
                 f"{study['steps']} steps each)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def run_augment_study(
    real: Path, synthetic: Path, out: Path, cfg: Config | str | Path = "tiny", n_real: int = 4,
    seeds: Sequence[int] = (0, 1, 2), steps: int | None = None, synthetic_labels: Path | None = None,
    test: Path | None = None, subset_seed: int = 0, layout: str = "auto", device: str = "auto",
    progress: bool = True, synthetic_new: Path | None = None, new_labels: Path | None = None,
    classical: bool = True,
) -> dict:
    """Train the segmenter on ``n_real`` real training volumes with and without the synthetic volumes.

    Args:
        real: labelled data set; ``n_real`` cases of its training split are drawn (``subset_seed``) and
            its test split (or ``test``) is the evaluation set.
        synthetic: ``<labelname>_s<k>.nii.gz`` generated from training label maps (any of them, not
            only the drawn subset) or from ``synthetic_labels``; test label maps are refused (leakage).
        seeds: one training run per seed and arm; the result has mean and std over seeds, and paired gains.
        synthetic_new: volumes generated from new label maps (``medlsdm derive-labels``) in ``new_labels``:
            a fourth arm. ``classical``: the arm with MONAI's classical augmentation.
        steps: optimiser steps per run (default: ``cfg.seg`` epochs over the combined set, for both arms).
    Writes ``augment.json`` and ``augment.png``.
    """
    cfg, out, dev = as_config(cfg), Path(out), resolve_device(device)
    train_cases = real_cases(real, "train", layout)
    if not 1 <= n_real <= len(train_cases):
        raise UserError(f"{real}: --n-real must be between 1 and the {len(train_cases)} training cases, got {n_real}")
    pick = sorted(np.random.default_rng(subset_seed).choice(len(train_cases), n_real, replace=False).tolist())
    small = load_cases([train_cases[i] for i in pick], cfg.data, need_labels=True)
    if test is None and test_split(real) != "test":
        raise UserError(f"{real}: no imagesTs/ test split here; give the real test set separately (--test)")
    test_set = load_real(test or real, cfg.data, test_split(test or real), layout, need_labels=True)
    synth = _synthetic_partners(Path(synthetic), real, synthetic_labels, set(test_set.ids), cfg, layout)
    out.mkdir(parents=True, exist_ok=True)
    new = None
    if synthetic_new is not None:
        if new_labels is None:
            raise UserError("--synthetic-new needs --new-labels (the derived label maps the volumes were made from)")
        new = _synthetic_partners(Path(synthetic_new), real, new_labels, set(test_set.ids), cfg, layout)
    study = augment_study(small, synth, test_set, cfg, seeds=seeds, steps=steps, device=dev, progress=progress,
                          synthetic_new=new, classical=classical)
    study["inputs"] = dict(real=str(real), synthetic=str(synthetic), real_subset=small.ids, config=cfg.name)
    note = whole_volumes_note(cfg, small, test_set, synth, new)
    study["notes"] = [note] if note else []
    study = jsonable(study)
    study["figure"] = augment_figure(out / "augment.png", study)
    atomic_write_text(out / "augment.json", json.dumps(study, indent=2) + "\n")
    return study
