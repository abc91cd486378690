"""The two baselines Med-LSDM is compared with, built from the project's own U-Net, schedule and samplers.

- ``pixel3d`` (Med-DDPM-style): the U-Net in concat mode on the image itself, ``(B, 1, D, H, W)`` in
  [-1, 1], with the one-hot label map concatenated to the noisy volume. A plain :class:`LatentDiffusion`
  whose "latent" is the image (``in_channels`` 1, ``image_down`` (1, 1, 1)).
- ``slice2d`` (SegGuidedDiff-style): the same concat U-Net on single axial slices, inputs
  ``(N, C, 1, H, W)`` (3x3x3 convolutions with padding act as 2D convolutions on depth 1, and the halving
  rule never halves a depth of 1). :class:`SliceDiffusion` trains on random slices of the training
  volumes and samples a volume slice by slice, each slice from its own 2D mask and its own seed, then
  stacks the slices.

Neither needs a VQ-GAN: the sampler's output already is the image.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from medlsdm.config import LDM_METHODS, Config, LDMConfig
from medlsdm.diffusion.model import LatentDiffusion
from medlsdm.diffusion.options import SamplingOptions
from medlsdm.diffusion.samplers import Sampler
from medlsdm.errors import UserError

BASELINES = ("slice2d", "pixel3d")


def check_method(method: str) -> str:
    """``method`` if it is one of lsdm / slice2d / pixel3d, else a one-line UserError."""
    if method not in LDM_METHODS:
        raise UserError(f"unknown method '{method}' (choose from {', '.join(LDM_METHODS)})")
    return method


def is_baseline(cfg: Config) -> bool:
    """True for the pixel-space baselines (no VQ-GAN, the sampler's output is the image)."""
    return check_method(cfg.ldm.method) in BASELINES


def build_baseline(cfg: Config) -> LatentDiffusion:
    """The diffusion model of a baseline config: widths, schedule and objective from ``cfg.ldm``; a concat-mode
    U-Net on the image itself (1 channel, no down-sampling, data in [-1, 1])."""
    ldm = cfg.ldm
    if check_method(ldm.method) not in BASELINES:
        raise ValueError(f"{ldm.method} is not a baseline")
    cls = SliceDiffusion if ldm.method == "slice2d" else LatentDiffusion
    return cls.from_config(ldm, num_classes=cfg.data.num_classes, image_down=(1, 1, 1), in_channels=1,
                           conditioning="concat")


def slice_seed(volume_seed: int, index: int) -> int:
    """Seed of slice ``index`` of a volume; the slices of one volume never share a seed (the step is odd,
    hence invertible modulo 2**63)."""
    return (int(volume_seed) + (index + 1) * 0x9E3779B97F4A7C15) % 2**63


def to_slices(x: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) -> (B * D, C, 1, H, W), the axial slices of every volume, volume by volume."""
    b, c, d, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * d, c, 1, h, w)


class SliceDiffusion(LatentDiffusion):
    """A 2D diffusion model over axial slices that reads and writes whole volumes.

    ``SliceDiffusion(unet, schedule, objective, loss, cond_drop_prob, clip_sample, class_weight_power, clip_value,
    slices_per_volume=4)`` with a concat-mode :class:`SemanticUNet` (``in_channels`` 1, ``image_down`` (1, 1, 1)).
    """

    def __init__(self, *args, slices_per_volume: int = 4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if slices_per_volume < 0:
            raise UserError(f"config: ldm.slices_per_volume must be >= 0, got {slices_per_volume}")
        self.slices_per_volume = slices_per_volume

    @classmethod
    def _config_arguments(cls, cfg: LDMConfig) -> dict:
        return {"slices_per_volume": cfg.slices_per_volume}

    def view(self, unet: torch.nn.Module, cond_drop_prob: float | None = None) -> "SliceDiffusion":
        p = self.cond_drop_prob if cond_drop_prob is None else cond_drop_prob
        return SliceDiffusion(unet, self.schedule, self.objective, self.loss, p, self.clip_sample,
                              self.class_weight_power, clip_value=self.clip_value,
                              slices_per_volume=self.slices_per_volume)

    def training_loss(
        self, x0: torch.Tensor, labels_onehot: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Volumes ``x0`` (B, 1, D, H, W) and label maps (B, C, D, H, W): ``slices_per_volume`` random axial
        slices of each volume (all of them with 0) form the 2D batch (B * k, ., 1, H, W) of the objective."""
        b, d = x0.shape[0], x0.shape[2]
        k = d if self.slices_per_volume == 0 else min(self.slices_per_volume, d)
        xs, ls = to_slices(x0), to_slices(labels_onehot)
        if k < d:
            src = generator.device if generator is not None else torch.device("cpu")
            rows = torch.stack([torch.randperm(d, generator=generator, device=src)[:k] + i * d for i in range(b)])
            rows = rows.flatten().to(x0.device)
            xs, ls = xs[rows], ls[rows]
        loss, logs = super().training_loss(xs, ls, generator)
        return loss, {**logs, "slices": float(len(xs))}

    @staticmethod
    def volume_seeds(batch: int, generator: torch.Generator | list[torch.Generator] | None) -> list[int]:
        """One seed per volume, drawn from ``generator`` (the global RNG when None), or from each volume's own
        generator when a list of ``batch`` is given (a volume then does not depend on its batch)."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch:
                raise ValueError(f"{len(generator)} generators for a batch of {batch}")
            return [int(torch.randint(0, 2**62, (1,), generator=g, device=g.device)) for g in generator]
        src = generator.device if generator is not None else torch.device("cpu")
        return torch.randint(0, 2**62, (batch,), generator=generator, device=src).tolist()

    @torch.no_grad()
    def sample(
        self,
        labels_onehot: torch.Tensor,
        *options: SamplingOptions | str | Sampler | int | float | None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        progress: bool = True,
        **fields,
    ) -> torch.Tensor:
        """Volumes (B, 1, D, H, W) for label maps (B, C, D, H, W). Every slice is a separate reverse chain
        conditioned only on its own 2D mask and driven by its own generator seeded with
        :func:`slice_seed` (volume seed, slice index); the volume seeds come from ``generator``.
        ``options`` / ``fields``: :meth:`LatentDiffusion.sample`'s, applied to each slice's chain."""
        opts = SamplingOptions.of(*options, **fields)
        b, d = labels_onehot.shape[0], labels_onehot.shape[2]
        seeds = self.volume_seeds(b, generator)
        src = (generator[0] if isinstance(generator, (list, tuple)) else generator)
        src = src.device if src is not None else torch.device("cpu")
        volumes = []
        for i in range(b):
            slices = []
            for k in tqdm(range(d), desc="slices", disable=not progress, leave=False):
                g = torch.Generator(src).manual_seed(slice_seed(seeds[i], k))
                slices.append(super().sample(labels_onehot[i:i + 1, :, k:k + 1], opts, generator=g, progress=False))
            volumes.append(torch.cat(slices, dim=2))
        return torch.cat(volumes, dim=0)
