"""Stage 2 specifics: the semantic U-Net on frozen VQ-GAN latents, its EMA copy and label dropout.

Batches are either cached latents (``{"latent", "label"}`` from ``medlsdm encode``) or images that
are encoded on the fly by the frozen VQ-GAN (``{"image", "label"}``). Latents are min-max
normalised with the codebook range; the label map enters at full resolution as one-hot.
For the baselines (``ldm.method`` slice2d / pixel3d) there is no VQ-GAN: ``vqgan`` and ``normalizer`` are
None and the images ``{"image", "label"}`` themselves are the diffusion model's data.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from medlsdm.autoencoder.normalize import LatentNormalizer
from medlsdm.config import Config, TrainConfig
from medlsdm.data.transforms import one_hot
from medlsdm.pipeline import SynthesisPipeline, build_diffusion
from medlsdm.training.engine import Task


class LDMTask(Task):
    name = "ldm"

    def __init__(self, cfg: Config, vqgan: nn.Module | None, normalizer: LatentNormalizer | None) -> None:
        self.cfg, self.normalizer = cfg, normalizer
        self.vqgan = vqgan.eval().requires_grad_(False) if vqgan is not None else None
        self.diffusion = build_diffusion(cfg, normalizer)  # clips at the latents' range when sampling
        self.unet = self.diffusion.unet
        self.unet_ema = copy.deepcopy(self.unet).requires_grad_(False)

    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "unet_ema": self.unet_ema}

    def trainable(self) -> dict[str, nn.Module]:
        return {"unet": self.unet}

    def configure(
        self, device: torch.device, wrapped: Mapping[str, nn.Module], train: TrainConfig
    ) -> dict[str, torch.optim.Optimizer]:
        if self.vqgan is not None:
            self.vqgan.to(device)
        # the same objective over the (possibly DDP-wrapped) U-Net
        self.train_view = self.diffusion.view(wrapped["unet"])
        return {"unet": torch.optim.Adam(self.unet.parameters(), lr=train.lr, betas=train.betas)}

    @torch.no_grad()
    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """Normalised latents (B, E, d, h, w) of a batch (cached, or encoded now); a baseline's images."""
        if self.vqgan is None:
            return batch["image"].float()
        z = batch["latent"] if "latent" in batch else self.vqgan.encode(batch["image"])
        return self.normalizer.normalize(z.float())

    def training_losses(self, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x0 = self.latents(batch)
        onehot = one_hot(batch["label"], self.cfg.data.num_classes)
        return self.train_view.training_loss(x0, onehot)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """EMA of the U-Net weights, with a warm-up so early steps do not dominate short runs."""
        decay = min(self.cfg.ldm.ema_decay, (1 + step) / (10 + step))
        for e, p in zip(self.unet_ema.parameters(), self.unet.parameters()):
            e.lerp_(p.detach(), 1 - decay)
        for e, b in zip(self.unet_ema.buffers(), self.unet.buffers()):
            e.copy_(b)

    @torch.no_grad()
    def validate(self, loader: Any, step: int, run_dir: Path) -> dict[str, float]:
        """Diffusion loss of the EMA model at fixed seeds; one DDIM sample of the first case as a preview
        (``train_ldm.preview_steps`` steps at most; none when 0)."""
        from medlsdm.data.display import display_window
        from medlsdm.viz import save_preview

        device = next(self.unet_ema.parameters()).device
        ema = self.diffusion.view(self.unet_ema, cond_drop_prob=0.0)
        g = torch.Generator(device).manual_seed(1234)
        losses, first = [], None
        for batch in loader:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            loss, _ = ema.training_loss(self.latents(batch), one_hot(batch["label"], self.cfg.data.num_classes), g)
            losses.append(float(loss))
            first = first or batch
        metrics = {"loss_ema": sum(losses) / max(1, len(losses))}
        preview = self.cfg.train_ldm.preview_steps
        if first is not None and preview > 0:
            pipe = SynthesisPipeline(self.vqgan, ema, self.normalizer, self.cfg)
            vol = pipe.generate(first["label"][:1], sampler="ddim", steps=min(preview, self.cfg.ldm.sampling_steps),
                                generator=torch.Generator(device).manual_seed(0))
            views = {"synthetic": vol[0, 0].cpu().numpy()}
            if "image" in first:
                views = {"real": first["image"][0, 0].cpu().numpy(), **views}
            name = "LDM" if self.vqgan is not None else self.cfg.ldm.method
            lo, hi = display_window(self.cfg.data, next(iter(views.values())))
            save_preview(run_dir / "previews" / f"step_{step:07d}.png", views, vmin=lo, vmax=hi,
                         labels=first["label"][0, 0].cpu().numpy(), title=f"{name} step {step} (DDIM, EMA)")
        return metrics
