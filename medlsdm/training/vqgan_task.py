"""Stage 1 specifics: the VQ-GAN, its two discriminators, two optimisers and validation.

A training step computes the generator loss (reconstruction: L1 over the full range and, with
``vqgan.window_l1_weight``, inside the display window; perceptual; commitment; adaptive GAN terms) with the
discriminators frozen, and the discriminator loss on detached reconstructions;
the two graphs are disjoint, so the engine's single backward fills each optimiser's gradients.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from monai.metrics import PSNRMetric, SSIMMetric
from torch import nn

from medlsdm.autoencoder.build import build_perceptual, build_vqgan, build_vqgan_loss
from medlsdm.autoencoder.discriminators import PatchDiscriminator3D, SliceDiscriminator2D
from medlsdm.config import Config, TrainConfig
from medlsdm.data.display import display_window, to_window
from medlsdm.training.engine import Task

log = logging.getLogger("medlsdm")


def build_discriminators(cfg: Config) -> tuple[nn.Module, nn.Module]:
    v = cfg.vqgan
    return (SliceDiscriminator2D(channels=v.disc_channels, num_layers=v.disc_layers),
            PatchDiscriminator3D(channels=v.disc_channels, num_layers=v.disc_layers))


class _Frozen:
    """Context manager: parameters of the given modules do not require grad inside the block."""

    def __init__(self, *modules: nn.Module) -> None:
        self.params = [p for m in modules for p in m.parameters()]

    def __enter__(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc: Any) -> None:
        for p in self.params:
            p.requires_grad_(True)


class VQGANTask(Task):
    name = "vqgan"
    best_metrics = ("psnr_window", "psnr", "ssim")
    progress_keys = ("l1", "commitment", "perplexity", "g_gan", "d_loss")

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.vqgan = build_vqgan(cfg.vqgan)
        self.disc2d, self.disc3d = build_discriminators(cfg)
        perceptual, self.perceptual_description = build_perceptual(cfg.vqgan)
        self.loss = build_vqgan_loss(cfg.vqgan, perceptual, window=lambda x: display_window(cfg.data, x))
        self.perceptual = perceptual

    def modules(self) -> dict[str, nn.Module]:
        return {"vqgan": self.vqgan, "disc2d": self.disc2d, "disc3d": self.disc3d}

    def trainable(self) -> dict[str, nn.Module]:
        return self.modules()

    def configure(
        self, device: torch.device, wrapped: Mapping[str, nn.Module], train: TrainConfig
    ) -> dict[str, torch.optim.Optimizer]:
        self.views = dict(wrapped)
        if self.perceptual is not None:
            self.perceptual.to(device)
        disc_params = list(self.disc2d.parameters()) + list(self.disc3d.parameters())
        return {
            "generator": torch.optim.Adam(self.vqgan.parameters(), lr=train.lr, betas=train.betas),
            "discriminator": torch.optim.Adam(disc_params, lr=train.lr, betas=train.betas),
        }

    def training_losses(self, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["image"]  # (B, 1, D, H, W) in [-1, 1]
        x_rec, vq = self.views["vqgan"](x)
        with _Frozen(self.disc2d, self.disc3d):  # the generator's GAN terms must not train the discriminators
            g_loss, logs = self.loss.generator_loss(x, x_rec, vq, self.disc2d, self.disc3d, step, self.vqgan.last_layer)
        d_loss, d_logs = self.loss.discriminator_loss(x, x_rec.detach(), self.views["disc2d"], self.views["disc3d"],
                                                      step)
        return g_loss + d_loss, {**logs, **d_logs}

    @torch.no_grad()
    def validate(self, loader: Any, step: int, run_dir: Path) -> dict[str, float]:
        from medlsdm.viz import save_preview

        k = min(11, min(self.cfg.data.shape) // 2 * 2 - 1)  # MONAI's 11^3 window, shrunk for thin volumes
        psnr, ssim = PSNRMetric(max_val=2.0), SSIMMetric(spatial_dims=3, data_range=2.0, win_size=k)
        psnr_win = PSNRMetric(max_val=1.0)
        # per-case values: aggregate() would all_gather under DDP
        scores: dict[str, list[float]] = {"psnr": [], "ssim": [], "psnr_window": []}
        counts = torch.zeros(self.cfg.vqgan.n_codes, dtype=torch.float64)
        device = next(self.vqgan.parameters()).device
        for i, batch in enumerate(loader):
            x = batch["image"].to(device)
            x_rec, vq = self.vqgan(x)
            x_rec = x_rec.float().clamp(-1, 1)
            scores["psnr"] += psnr(x_rec, x).flatten().tolist()
            scores["ssim"] += ssim(x_rec, x).flatten().tolist()
            lo, hi = display_window(self.cfg.data, x)
            scores["psnr_window"] += psnr_win(to_window(x_rec, lo, hi), to_window(x, lo, hi)).flatten().tolist()
            counts += torch.bincount(vq.indices.flatten().cpu(), minlength=counts.numel()).double()
            if i == 0:  # validation batches hold one volume: (lo, hi) is its window
                save_preview(run_dir / "previews" / f"step_{step:07d}.png",
                             {"input": x[0, 0].cpu().numpy(), "reconstruction": x_rec[0, 0].cpu().numpy()},
                             title=f"VQ-GAN step {step}", vmin=lo, vmax=hi)
        p = counts / counts.sum().clamp_min(1)
        perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
        return {**{k: sum(v) / len(v) for k, v in scores.items()},
                "codebook_usage": float((counts > 0).double().mean()), "perplexity": float(perplexity)}
