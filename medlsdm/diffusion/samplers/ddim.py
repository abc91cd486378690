"""DDIM sampling (Song et al. 2021, eq. 12) on S evenly spaced timesteps with stochasticity ``eta``.

``x_prev = sqrt(ab_prev) * x0 + sqrt(1 - ab_prev - sigma^2) * eps + sigma * z`` with
``sigma = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev)`` and ``ab_prev = 1`` after
the last step. ``eta = 0`` is deterministic; ``S = T, eta = 1`` is exactly ancestral DDPM.

Not MONAI's ``DDIMScheduler``: its ``step`` takes the previous timestep as ``t - T // S`` while
``set_timesteps`` spaces the timesteps with ``linspace(...).round()``; when S does not divide T
(e.g. T = 1000, S = 25 in the tiny preset) the two disagree and the chain uses wrong alphas.
Here the previous timestep is always the next one in the list.
"""

from __future__ import annotations

import torch

from medlsdm.diffusion.samplers.base import Sampler, randn, resolve_steps
from medlsdm.diffusion.schedule import NoiseSchedule


class DDIMSampler(Sampler):
    """``DDIMSampler(schedule, steps=None, eta=0.0, objective="eps", clip=1.0)``; ``steps`` None is
    :data:`~medlsdm.diffusion.samplers.base.DEFAULT_STEPS` (at most T)."""

    name = "ddim"

    def __init__(
        self,
        schedule: NoiseSchedule,
        steps: int | None = None,
        eta: float = 0.0,
        objective: str = "eps",
        clip: float | None = 1.0,
    ) -> None:
        super().__init__(schedule, objective, clip)
        self.steps = resolve_steps(steps, schedule, "DDIM")
        self.eta = eta

    @classmethod
    def create(cls, schedule: NoiseSchedule, steps: int | None = None, eta: float = 0.0, objective: str = "eps",
               clip: float | None = 1.0) -> "DDIMSampler":
        return cls(schedule, steps, eta, objective, clip)

    def timesteps(self) -> list[int]:
        t = torch.linspace(self.schedule.num_timesteps - 1, 0, self.steps, dtype=torch.float64).round().long()
        return t.tolist()

    def step(
        self, output: torch.Tensor, t: int, t_prev: int, x_t: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        x0, eps = self.pred_x0_eps(output, t, x_t)
        ab = float(self.schedule.alphas_cumprod[t])
        ab_prev = float(self.schedule.alphas_cumprod[t_prev]) if t_prev >= 0 else 1.0
        sigma = self.eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) ** 0.5
        x_prev = ab_prev**0.5 * x0 + max(1 - ab_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x_prev = x_prev + sigma * randn(tuple(x_t.shape), generator, x_t.device, x_t.dtype)
        return x_prev
