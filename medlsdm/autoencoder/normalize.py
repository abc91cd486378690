"""Normalisation of VQ-GAN latents for the diffusion model, and its inverse.

Two kinds (``ldm.latent_norm``):

- ``codebook`` (the paper, section 4, and the default): min-max to [-1, 1] from the codebook's value
  range, ``2 (z - min) / (max - min) - 1``. On the phantoms the latents then sit off-centre (mean ~0.5)
  and narrow (std ~0.17) inside [-1, 1];
- ``standardize``: per-channel ``(z - mean) / std`` with the statistics of the encoded training set
  (as latent diffusion models usually scale their latents), so the data matches the N(0, I) prior.
  Measured against ``codebook`` in BENCHMARKS.md (sections ``ldm-codebook`` and ``ldm-standardize``).

Either way ``clip`` is the normalised codebook range: predicted clean latents outside it cannot be
reached by any code, so samplers may clip there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medlsdm.errors import UserError
from medlsdm.io import atomic_write_text

KINDS = ("codebook", "standardize")


@dataclass(frozen=True)
class LatentNormalizer:
    zmin: float  # codebook range
    zmax: float
    kind: str = "codebook"
    mean: list[float] | None = field(default=None)  # per channel (standardize)
    std: list[float] | None = field(default=None)

    def __post_init__(self) -> None:
        if not self.zmax > self.zmin:
            raise UserError(f"latent range is empty (min {self.zmin} >= max {self.zmax}): was the VQ-GAN trained?")
        if self.kind not in KINDS:
            raise UserError(f"config: ldm.latent_norm must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "standardize" and (self.mean is None or self.std is None):
            raise UserError("latent statistics: 'standardize' needs per-channel mean and std")

    def _shift_scale(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Broadcastable (1, E, 1, 1, 1) shift and scale with ``normalize(z) = (z - shift) / scale``."""
        if self.kind == "codebook":
            shift, scale = [(self.zmax + self.zmin) / 2], [(self.zmax - self.zmin) / 2]
        else:
            shift, scale = self.mean, [max(s, 1e-6) for s in self.std]
        view = (1, -1) + (1,) * (like.dim() - 2)
        return (torch.tensor(shift, dtype=like.dtype, device=like.device).view(view),
                torch.tensor(scale, dtype=like.dtype, device=like.device).view(view))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """(B, E, d, h, w) latents -> diffusion space."""
        shift, scale = self._shift_scale(z)
        return (z - shift) / scale

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        shift, scale = self._shift_scale(z)
        return z * scale + shift

    @property
    def clip(self) -> float:
        """Largest |value| of the codebook range in diffusion space."""
        if self.kind == "codebook":
            return 1.0
        return max(max(abs(self.zmin - m), abs(self.zmax - m)) / max(s, 1e-6) for m, s in zip(self.mean, self.std))

    def save(self, path: Path, **extra: object) -> None:
        data = {"zmin": self.zmin, "zmax": self.zmax, "kind": self.kind, "mean": self.mean, "std": self.std}
        atomic_write_text(Path(path), json.dumps({**extra, **data}, indent=2))

    @classmethod
    def load(cls, path: Path, kind: str | None = None) -> "LatentNormalizer":
        """Read statistics; ``kind`` overrides the stored kind (a latents folder stores both statistics)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            return cls(float(data["zmin"]), float(data["zmax"]), kind or data.get("kind", "codebook"),
                       data.get("mean"), data.get("std"))
        except FileNotFoundError:
            raise UserError(f"{path}: latent statistics not found") from None
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}: not a valid latent statistics file") from None


class ChannelStats:
    """Streaming per-channel mean / std of latents (B, E, d, h, w)."""

    def __init__(self) -> None:
        self.n, self.s, self.ss = 0, None, None

    def add(self, z: torch.Tensor) -> None:
        flat = z.detach().double().movedim(1, 0).reshape(z.shape[1], -1)
        self.s = flat.sum(1) if self.s is None else self.s + flat.sum(1)
        self.ss = flat.pow(2).sum(1) if self.ss is None else self.ss + flat.pow(2).sum(1)
        self.n += flat.shape[1]

    def result(self) -> tuple[list[float], list[float]]:
        mean = self.s / self.n
        std = (self.ss / self.n - mean.pow(2)).clamp_min(0).sqrt()
        return mean.tolist(), std.tolist()
