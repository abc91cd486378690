"""The paper's segmentation network (Appendix B) and its Dice protocol (Table 2).

A MONAI ``UNet`` (kernel 3, instance norm, 1 input channel, C output classes) is trained with
``DiceCELoss`` and Adam on random patches (``RandCropByPosNegLabeld``) of real volumes, then segments
whole volumes with ``sliding_window_inference``. Dice is MONAI's ``DiceMetric`` over the foreground
classes only: the background channel is never averaged in. Sizes come from ``cfg.seg``
(:class:`medlsdm.config.SegConfig`).

Volumes are lists of (1, D, H, W) tensors: images in [-1, 1], labels class indices. The augmentation study that
trains this network on several data arms is :mod:`medlsdm.evaluation.augment`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.layers import Norm
from monai.networks.nets import UNet
from monai.networks.nets.unet import SkipConnection
from monai.networks.utils import one_hot
from monai.transforms import RandCropByLabelClassesd, RandCropByPosNegLabeld, RandSpatialCropd
from torch import Tensor, nn
from tqdm import tqdm

from medlsdm.config import Config
from medlsdm.data.display import display_window, to_window
from medlsdm.errors import UserError
from medlsdm.evaluation.pairing import VolumeSet
from medlsdm.evaluation.stats import bootstrap_class_mean, bootstrap_mean, bootstrap_ratio, with_interval
from medlsdm.io import file_sha256, load_into, save_weights


def effective_patch(cfg: Config) -> tuple[int, int, int]:
    """Training crop and sliding-window roi (D, H, W): ``cfg.seg.patch`` capped at ``cfg.data.shape``."""
    patch = tuple(min(int(p), int(s)) for p, s in zip(cfg.seg.patch, cfg.data.shape))
    factor = 2 ** (len(cfg.seg.channels) - 1)
    if len(cfg.seg.channels) < 2 or any(p % factor for p in patch):
        raise UserError(f"config: seg.patch {patch} (capped at data.shape) must be a multiple of {factor} "
                        f"for a U-Net with {len(cfg.seg.channels)} levels (seg.channels)")
    return patch


def build_segmenter(cfg: Config) -> UNet:
    """The Appendix B network: 3D MONAI UNet, kernel 3, InstanceNorm, 1 -> ``cfg.data.num_classes`` channels."""
    return UNet(
        spatial_dims=3, in_channels=1, out_channels=cfg.data.num_classes, channels=tuple(cfg.seg.channels),
        strides=(2,) * (len(cfg.seg.channels) - 1), kernel_size=3, up_kernel_size=3,
        num_res_units=cfg.seg.num_res_units, norm=Norm.INSTANCE,
    )


def state_sha256(model: nn.Module, length: int = 12) -> str:
    """Short SHA-256 of a model's weights (names, shapes and values), for models never saved to disk."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:length]


def check_volumes(images: Sequence[Tensor], labels: Sequence[Tensor | None], what: str) -> None:
    """One-line UserError unless ``images`` is non-empty and every image has its label map."""
    if len(images) == 0:
        raise UserError(f"{what}: no volumes to train or evaluate the segmentation network on")
    if len(images) != len(labels) or any(lab is None for lab in labels):
        raise UserError(f"{what}: every volume needs its label map for the Dice protocol")


def seg_input(x: Tensor, cfg: Config) -> Tensor:
    """What the segmenter sees (``seg.input_window``): the volume as is, or its display window mapped to [-1, 1]
    (any shape; MR windows come from each volume's own percentiles)."""
    if cfg.seg.input_window == "model":
        return x
    if x.ndim == 5:
        return torch.stack([seg_input(v, cfg) for v in x])
    lo, hi = display_window(cfg.data, x)
    return to_window(x, lo, hi) * 2 - 1


MAX_CROP_BOOST = 4.0


def crop_ratios(cfg: Config, labels: Sequence[Tensor]) -> list[float] | None:
    """Per-class crop-centre ratios: ``seg.class_ratios`` when given, else (``seg.crop_balance: inverse_sqrt``)
    background 0.5 and each foreground class min(4, sqrt(largest share / its share)) in ``labels``; else None."""
    if cfg.seg.class_ratios is not None:
        return list(cfg.seg.class_ratios)
    if cfg.seg.crop_balance == "none":
        return None
    counts = torch.zeros(cfg.data.num_classes, dtype=torch.float64)
    for lab in labels:
        counts += torch.bincount(lab.flatten().long(), minlength=cfg.data.num_classes)[: cfg.data.num_classes]
    fg = counts[1:]
    top = float(fg.max()) if bool((fg > 0).any()) else 1.0
    return [0.5] + [min(MAX_CROP_BOOST, math.sqrt(top / float(c))) if c > 0 else 0.0 for c in fg]


def _cropper(cfg: Config, patch: tuple[int, int, int], seed: int, ratios: list[float] | None = None):
    pos = float(cfg.seg.pos_fraction)
    if ratios is not None:
        if len(ratios) != cfg.data.num_classes:
            raise UserError(f"config: seg.class_ratios has {len(ratios)} ratios for {cfg.data.num_classes} classes")
        crop = RandCropByLabelClassesd(keys=["image", "label"], label_key="label", spatial_size=patch, ratios=ratios,
                                       num_classes=cfg.data.num_classes, num_samples=1, allow_smaller=True,
                                       warn=False)
    elif pos <= 0:
        crop = RandSpatialCropd(keys=["image", "label"], roi_size=patch, random_size=False)
    else:  # negative crops are centred inside the body (image above air), not in empty background
        crop = RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=patch, pos=pos,
                                      neg=max(1.0 - pos, 0.0), num_samples=1, image_key="image",
                                      image_threshold=-0.99, allow_smaller=True)
    crop.set_random_state(seed)
    return crop


def _crop(crop, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
    out = crop({"image": image, "label": label})
    out = out[0] if isinstance(out, list) else out
    return torch.as_tensor(out["image"]), torch.as_tensor(out["label"])


def classical_augmentation(seed: int):
    """The classical baseline of the augmentation study, applied to each training crop: MONAI's random affine
    (rotation +-0.2 rad, scale +-10 %) with a random elastic component, Gaussian noise and intensity scale / shift.
    Seeded."""
    from monai.transforms import (
        Compose,
        Rand3DElasticd,
        RandAffined,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    keys = ["image", "label"]
    aug = Compose([
        RandAffined(keys, prob=0.5, rotate_range=(0.2, 0.2, 0.2), scale_range=(0.1, 0.1, 0.1),
                    mode=("bilinear", "nearest"), padding_mode="border"),
        Rand3DElasticd(keys, sigma_range=(5, 7), magnitude_range=(20, 50), prob=0.3, mode=("bilinear", "nearest"),
                       padding_mode="border"),
        RandGaussianNoised("image", prob=0.3, std=0.02),
        RandScaleIntensityd("image", factors=0.1, prob=0.3),
        RandShiftIntensityd("image", offsets=0.05, prob=0.3),
    ])
    aug.set_random_state(seed)
    return aug


def train_segmenter(
    images: Sequence[Tensor], labels: Sequence[Tensor], cfg: Config, steps: int | None = None,
    epochs: int | None = None, seed: int = 0, out_path: Path | None = None,
    device: str | torch.device = "cpu", progress: bool = False, augment: bool = False,
) -> tuple[UNet, dict]:
    """Train the Appendix B network on (1, D, H, W) images / label maps.

    Length: ``steps`` optimiser steps if given, else ``cfg.seg.steps`` if > 0, else ``epochs`` (default
    ``cfg.seg.epochs``) passes of one random crop per volume (``ceil(N / batch_size)`` steps each).
    With ``out_path`` the weights are saved as safetensors. Returns ``(model in eval mode, info)``;
    ``info`` holds the step count, loss curve, timing and the weights' ``sha256``.
    """
    check_volumes(images, labels, "segmentation training set")
    device = torch.device(device)
    patch = effective_patch(cfg)
    per_epoch = math.ceil(len(images) / cfg.seg.batch_size)
    if steps is None:
        steps = cfg.seg.steps if cfg.seg.steps > 0 else per_epoch * (epochs if epochs is not None else cfg.seg.epochs)
    if steps < 1:
        raise UserError(f"segmentation training: the number of steps must be at least 1, got {steps}")
    torch.manual_seed(seed)
    model = build_segmenter(cfg).to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.seg.lr)
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (1 - i / steps) ** 0.9)
             if cfg.seg.lr_schedule == "poly" else None)
    ratios = crop_ratios(cfg, labels)
    inputs = [seg_input(x, cfg) for x in images]  # once, not at every step
    aug = classical_augmentation(seed) if augment else None
    crop, rng = _cropper(cfg, patch, seed, ratios), np.random.default_rng(seed)
    order: list[int] = []
    curve, start = [], time.perf_counter()
    model.train()
    for step in tqdm(range(steps), desc="segmenter", disable=not progress):
        if len(order) < cfg.seg.batch_size:  # shuffled passes over the volumes (epochs)
            order += [int(i) for i in rng.permutation(len(images))]
        batch = [_crop(crop, inputs[i], labels[i]) for i in order[: cfg.seg.batch_size]]
        if aug is not None:
            batch = [(torch.as_tensor(o["image"]), torch.as_tensor(o["label"]).round().long())
                     for o in (aug({"image": x, "label": y.float()}) for x, y in batch)]
        del order[: cfg.seg.batch_size]
        x = torch.stack([b[0] for b in batch]).to(device)
        y = torch.stack([b[1] for b in batch]).to(device)
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        curve.append(float(loss.detach()))
    model.eval()
    info = dict(steps=steps, epochs=round(steps / per_epoch, 2), n_volumes=len(images), patch=list(patch),
                crop_ratios=None if ratios is None else [round(r, 3) for r in ratios], augment=augment,
                input_window=cfg.seg.input_window,
                batch_size=cfg.seg.batch_size, lr=cfg.seg.lr, lr_schedule=cfg.seg.lr_schedule,
                final_lr=float(opt.param_groups[0]["lr"]), seed=seed, seconds=round(time.perf_counter() - start, 2),
                first_loss=curve[0], final_loss=float(np.mean(curve[-max(1, len(curve) // 10):])),
                parameters=sum(p.numel() for p in model.parameters()), weights=None)
    if out_path is not None:
        arch = dict(channels=list(cfg.seg.channels), num_res_units=cfg.seg.num_res_units,
                    num_classes=cfg.data.num_classes, label_names=list(cfg.data.label_names))
        save_weights(model.state_dict(), Path(out_path), metadata={"medlsdm": "segmenter", "arch": json.dumps(arch)})
        info.update(weights=str(out_path), sha256=file_sha256(Path(out_path)))
    else:
        info["sha256"] = state_sha256(model)
    return model, info


def load_segmenter(path: Path, cfg: Config, device: str | torch.device = "cpu") -> tuple[UNet, str]:
    """A saved segmenter (architecture from ``cfg``) and its file's sha256; a mismatch is a UserError."""
    model = build_segmenter(cfg)
    load_into(model, Path(path), what="segmentation network (seg config)")
    return model.to(device).eval(), file_sha256(Path(path))


@torch.no_grad()
def predict(model: nn.Module, image: Tensor, cfg: Config, device: str | torch.device = "cpu") -> Tensor:
    """(1, D, H, W) image -> (1, D, H, W) predicted class indices (sliding window, roi = the patch)."""
    logits = sliding_window_inference(seg_input(image, cfg)[None].to(device), effective_patch(cfg),
                                      cfg.seg.sw_batch_size, model, overlap=cfg.seg.sw_overlap, mode="gaussian")
    return logits.argmax(1).cpu()


def dice_scores(preds: Sequence[Tensor], labels: Sequence[Tensor], num_classes: int,
                names: Sequence[str] | None = None) -> dict:
    """Dice of predicted vs true (1, D, H, W) class maps, foreground classes only.

    A class absent from a case's ground truth does not count for that case (MONAI ``ignore_empty``).
    Returns ``dict(per_class={name: dice}, mean=mean over foreground classes, per_case=[mean per case])``;
    classes never present are reported as None and left out of the mean.
    """
    names = list(names or []) + [f"class_{i}" for i in range(len(names or []), num_classes)]
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    rows = []
    for p, t in zip(preds, labels):
        oh = lambda x: one_hot(x[None].long(), num_classes=num_classes, dim=1)  # noqa: E731
        rows.append(metric(oh(p), oh(t))[0])
    scores = torch.stack(rows).double()  # (cases, C - 1); NaN where the class is absent from the truth
    per_class = torch.nanmean(scores, dim=0)
    finite = ~torch.isnan(per_class)
    case_means = [float(torch.nanmean(r)) if bool((~torch.isnan(r)).any()) else None for r in scores]
    cols = {names[c + 1]: [None if math.isnan(v) else float(v) for v in scores[:, c].tolist()]
            for c in range(num_classes - 1)}
    ci = {n: bootstrap_mean(v) for n, v in cols.items()}
    mean_ci = bootstrap_class_mean([list(r) for r in zip(*cols.values())])  # the same statistic as "mean"
    return dict(
        per_class={names[c + 1]: (float(per_class[c]) if finite[c] else None) for c in range(num_classes - 1)},
        mean=float(per_class[finite].mean()) if bool(finite.any()) else float("nan"),
        per_case=case_means,
        per_class_cases=cols,  # Dice per case (NaN where the class is absent), for intervals and ratios
        per_class_ci={n: [c["lo"], c["hi"]] for n, c in ci.items()},  # 95% bootstrap over cases
        mean_ci=[mean_ci["lo"], mean_ci["hi"]],  # 95% bootstrap, whole volumes resampled
    )


def dice_ratio(synthetic: dict, real: dict) -> dict:
    """Dice on synthetic volumes over Dice on real test volumes (the paper's "can a segmenter tell" ratio), for
    the mean and per class, each with a 95% bootstrap interval (the two sets resampled independently)."""
    out = {"mean": bootstrap_ratio(synthetic["per_case"], real["per_case"])}
    for name in real.get("per_class_cases", {}):
        out[name] = bootstrap_ratio(synthetic["per_class_cases"].get(name, []), real["per_class_cases"][name])
    return out


TRUSTED_DICE = 0.6  # a class found worse than this on real test volumes cannot be judged on synthetic ones


def untrusted_classes_note(real_test: dict, threshold: float = TRUSTED_DICE) -> str | None:
    """The classes the segmenter finds below ``threshold`` Dice on real test volumes (a :func:`dice_scores` dict),
    for which its Dice on synthetic volumes says little; None when it finds every present class."""
    weak = [n for n, v in real_test["per_class"].items() if v is not None and v < threshold]
    if not weak:
        return None
    found = ", ".join(f"{n} {with_interval(real_test['per_class'][n], real_test['per_class_ci'].get(n), 2)}"
                      for n in weak)
    return (f"the segmenter finds {found} on the real test volumes (Dice under {threshold:g}): its Dice on synthetic "
            "volumes cannot judge these classes; train it on more real subjects, or with more channels or steps "
            "(seg.channels, seg.steps)")


def evaluate_dice(model: nn.Module, images: Sequence[Tensor], labels: Sequence[Tensor], cfg: Config,
                  device: str | torch.device = "cpu") -> dict:
    """Segment every image and score it against its label map: see :func:`dice_scores`."""
    check_volumes(images, labels, "Dice evaluation set")
    model.eval()
    preds = [predict(model, img, cfg, device) for img in images]
    out = dice_scores(preds, labels, cfg.data.num_classes, cfg.data.label_names)
    out["n"] = len(images)
    return out


def dice_protocol(real_train: VolumeSet, real_test: VolumeSet, synthetic: VolumeSet | None, cfg: Config,
                  model: nn.Module | None = None, steps: int | None = None, seed: int = 0,
                  out_path: Path | None = None, device: str | torch.device = "cpu", progress: bool = False) -> dict:
    """The paper's Table 2: a net trained on real training volumes, Dice on real train / real test / synthetic.

    ``synthetic`` holds volumes generated from the test label maps (with those label maps); ``model``
    skips training. Returns ``dict(table={row: dice dict}, segmenter=training info or None)``.
    """
    info = None
    if model is None:
        model, info = train_segmenter(real_train.images, real_train.labels, cfg, steps=steps, seed=seed,
                                      out_path=out_path, device=device, progress=progress)
    table = {"real train": evaluate_dice(model, real_train.images, real_train.labels, cfg, device),
             "real test": evaluate_dice(model, real_test.images, real_test.labels, cfg, device)}
    if synthetic is not None and len(synthetic):
        table["synthetic"] = evaluate_dice(model, synthetic.images, synthetic.labels, cfg, device)
        return dict(table=table, segmenter=info, ratio=dice_ratio(table["synthetic"], table["real test"]))
    return dict(table=table, segmenter=info)


class UNetEncoder(nn.Module):
    """The down path of a trained MONAI UNet: (B, 1, D, H, W) -> its deepest feature map (B, C, d, h, w).

    ``levels(x)`` returns the feature map of every level, finest first.
    """

    def __init__(self, unet: UNet, cfg: Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg  # seg.input_window: the encoder sees what the segmenter saw
        stages, block = [], unet.model
        while isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection):
            stages.append(block[0])
            block = block[1].submodule
        stages.append(block)  # the bottom layer
        self.stages = nn.ModuleList(stages)
        self.out_channels = int(unet.channels[-1])

    def levels(self, x: Tensor) -> list[Tensor]:
        x = x if self.cfg is None else seg_input(x, self.cfg)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def forward(self, x: Tensor) -> Tensor:
        return self.levels(x)[-1]


def segmentation_encoder(model: UNet, cfg: Config | None = None) -> UNetEncoder:
    """The down path of a trained segmenter, frozen and in eval mode, for the domain feature extractor (``cfg``:
    the segmenter's config, so that its input window is applied)."""
    enc = UNetEncoder(model, cfg).eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc
