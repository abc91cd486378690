"""The LDM's EMA weights: after k real optimiser steps they are the warm-up weighted average of the trajectory."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from medlsdm.autoencoder.normalize import LatentNormalizer
from medlsdm.config import load_config
from medlsdm.training.distributed import DistContext
from medlsdm.training.engine import Trainer
from medlsdm.training.ldm_task import LDMTask


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


def test_ema_is_the_closed_form_average_of_the_trajectory(tmp_path: Path, micro_config: Path) -> None:
    """e_k = prod(d_t) p_0 + sum_t (1 - d_t) prod_{s > t}(d_s) p_t with d_t = min(ema_decay, (1 + t) / (10 + t)),
    p_t the U-Net weights after optimiser step t (run by the real Trainer); a no-op or a copying EMA fails."""
    cfg = load_config(micro_config)
    cfg.train_ldm.lr = 1e-2  # large steps: the trajectory moves far beyond float32 rounding
    cfg.ldm.ema_decay = 0.3  # caps the warm-up decay (1 + t) / (10 + t) from step 3 on: both parts are tested
    k = 6
    torch.manual_seed(0)
    E, (D, H, W) = cfg.vqgan.embedding_dim, cfg.data.shape
    d, h, w = (s // f for s, f in zip((D, H, W), cfg.vqgan.downsample))
    data = [{"latent": torch.randn(E, d, h, w), "label": torch.randint(0, cfg.data.num_classes, (1, D, H, W))}
            for _ in range(4)]  # cached latents (B, E, d, h, w) and label maps (B, 1, D, H, W) once batched
    # cached latents need no VQ-GAN forward: a stand-in module keeps the task on the latent (lsdm) path
    task = LDMTask(cfg, torch.nn.Identity(), LatentNormalizer(-3.0, 3.0, "codebook"))
    trajectory, steps = [_flat(task.unet)], []
    assert torch.equal(_flat(task.unet_ema), trajectory[0])  # the EMA starts as a copy
    update = task.after_step

    def record(step: int) -> None:  # p_t, then the task's own EMA update
        steps.append(step)
        trajectory.append(_flat(task.unet))
        update(step)

    task.after_step = record  # type: ignore[method-assign]
    Trainer(task, cfg, cfg.train_ldm, tmp_path / "run", data, None, DistContext(), progress=False).fit(max_steps=k)
    assert steps == list(range(1, k + 1))

    decays = [min(cfg.ldm.ema_decay, (1 + t) / (10 + t)) for t in steps]
    coeff = [math.prod(decays)] + [(1 - decays[t - 1]) * math.prod(decays[t:]) for t in steps]
    assert abs(sum(coeff) - 1) < 1e-9 and min(coeff) > 0
    expected = sum(c * p.double() for c, p in zip(coeff, trajectory)).float()
    ema, start, now = _flat(task.unet_ema), trajectory[0], trajectory[-1]
    moved = (now - start).abs() > 1e-3  # the weights that training changed (some get no gradient yet)
    assert moved.sum() > 0.3 * moved.numel()
    torch.testing.assert_close(ema, expected, rtol=1e-5, atol=1e-6)
    # neither the initial weights (a no-op EMA) nor the current ones (decay 0), but in between
    assert (ema - start)[moved].abs().median() > 1e-3 and (ema - now)[moved].abs().median() > 1e-4
    assert ((ema - start)[moved] * (now - start)[moved] > 0).float().mean() > 0.9  # moved the way training did
