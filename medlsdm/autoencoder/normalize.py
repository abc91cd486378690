"""Min-max normalisation of VQ-GAN latents to [-1, 1] from the codebook's value range (paper, section 4).

The diffusion model works on ``2 (z - min) / (max - min) - 1`` where min/max are taken over all
codebook entries; sampling inverts it before the latents are quantised to the codebook and decoded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from medlsdm.errors import UserError
from medlsdm.io import atomic_write_text


@dataclass(frozen=True)
class LatentNormalizer:
    zmin: float
    zmax: float

    def __post_init__(self) -> None:
        if not self.zmax > self.zmin:
            raise UserError(f"latent range is empty (min {self.zmin} >= max {self.zmax}): was the VQ-GAN trained?")

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """(B, E, d, h, w) latents -> [-1, 1] (encoder outputs may fall slightly outside)."""
        return 2.0 * (z - self.zmin) / (self.zmax - self.zmin) - 1.0

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z + 1.0) * 0.5 * (self.zmax - self.zmin) + self.zmin

    def save(self, path: Path, **extra: object) -> None:
        atomic_write_text(Path(path), json.dumps({**asdict(self), **extra}, indent=2))

    @classmethod
    def load(cls, path: Path) -> "LatentNormalizer":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            return cls(float(data["zmin"]), float(data["zmax"]))
        except FileNotFoundError:
            raise UserError(f"{path}: latent statistics not found") from None
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}: not a valid latent statistics file") from None
