"""Ancestral DDPM sampling (Ho et al. 2020): all T steps, ``x_{t-1} ~ q(x_{t-1} | x_t, x0_hat)``
with the posterior variance ``beta_t * (1 - ab_{t-1}) / (1 - ab_t)``; no noise at the last step.

MONAI's ``DDPMScheduler.step`` computes the same update, but it keeps its own float32 copy of the
alphas and draws noise on the model's device (a CPU generator cannot drive GPU sampling); this
sampler uses the shared :class:`NoiseSchedule` instead. ``tests/test_diffusion_sampling.py`` checks
that the two agree.
"""

from __future__ import annotations

import torch

from medlsdm.diffusion.samplers.base import Sampler, randn


class DDPMSampler(Sampler):
    """``DDPMSampler(schedule, objective="eps", clip=1.0)``: always all T steps."""

    name = "ddpm"

    def timesteps(self) -> list[int]:
        return list(range(self.schedule.num_timesteps - 1, -1, -1))

    def step(
        self, output: torch.Tensor, t: int, t_prev: int, x_t: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        x0, _ = self.pred_x0_eps(output, t, x_t)
        mean, var = self.schedule.posterior(x0, x_t, t)
        if t == 0:
            return mean
        return mean + var.sqrt() * randn(tuple(x_t.shape), generator, x_t.device, x_t.dtype)
