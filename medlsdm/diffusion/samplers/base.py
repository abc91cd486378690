"""The sampler interface: ``sampler.sample(model_fn, shape, generator, progress=True) -> x0``.

Samplers are objects (diffusers' schedulers): build one and hand it over, e.g.
``pipe(label, sampler=DDIMSampler(schedule, steps=50))``, or name one of the registry
(:data:`medlsdm.diffusion.samplers.SAMPLERS`) and let :meth:`Sampler.create` build it. The defaults are
the config's (``ldm.sampler``, ``ldm.sampling_steps``), read here once as :data:`DEFAULT_SAMPLER` and
:data:`DEFAULT_STEPS`.

A sampler walks the reverse chain over its own list of timesteps; subclasses only say which
timesteps (:meth:`Sampler.timesteps`) and how one step goes (:meth:`Sampler.step`). The model is an
opaque ``model_fn(x_t (B, ...), t (B,) long) -> output`` (network + guidance, see ``guidance.py``)
whose output is interpreted through the shared :class:`NoiseSchedule` for the objective.

Randomness (initial noise and per-step noise) is drawn from ``generator`` on the generator's device
and then moved to ``device``, so a CPU generator gives the same result on every device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
from tqdm.auto import tqdm

from medlsdm.config import LDMConfig
from medlsdm.diffusion.schedule import NoiseSchedule, check_objective

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

DEFAULT_SAMPLER: str = LDMConfig.sampler  # the one default, defined by the config (ldm.sampler)
DEFAULT_STEPS: int = LDMConfig.sampling_steps  # likewise (ldm.sampling_steps)


def resolve_steps(steps: int | None, schedule: NoiseSchedule, what: str) -> int:
    """``steps``, or :data:`DEFAULT_STEPS` (at most T) when None; a ValueError outside ``[1, T]``."""
    if steps is None:
        return min(DEFAULT_STEPS, schedule.num_timesteps)
    if not 1 <= steps <= schedule.num_timesteps:
        raise ValueError(f"{what} steps must be in [1, {schedule.num_timesteps}], got {steps}")
    return steps


def randn(
    shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None, device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (CPU if none), returned on ``device``.

    A list of B generators (one per sample of a batch of B) draws each sample's noise from its own
    generator, so a volume is the same whether it is sampled alone or in a batch.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])
    src = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=src, dtype=dtype).to(device)


class Sampler(ABC):
    """Base class. ``clip``: clamp the predicted x0 to ``[-clip, clip]`` at every step (``None``: never).

    ``name``: the sampler's key in the registry :data:`medlsdm.diffusion.samplers.SAMPLERS`.
    """

    name: str = ""

    def __init__(self, schedule: NoiseSchedule, objective: str = "eps", clip: float | None = 1.0) -> None:
        check_objective(objective)
        self.schedule = schedule
        self.objective = objective
        self.clip = clip

    @classmethod
    def create(
        cls,
        schedule: NoiseSchedule,
        steps: int | None = None,
        eta: float = 0.0,
        objective: str = "eps",
        clip: float | None = 1.0,
    ) -> "Sampler":
        """The sampler from the generic sampling settings; subclasses take what they use (``steps``: None is
        :data:`DEFAULT_STEPS`, at most T) and ignore the rest (DDPM always walks all T steps)."""
        return cls(schedule, objective=objective, clip=clip)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={getattr(self, k)!r}" for k in ("steps", "eta") if hasattr(self, k))
        return f"{type(self).__name__}({self.schedule!r}{extra}, objective={self.objective!r}, clip={self.clip!r})"

    @abstractmethod
    def timesteps(self) -> list[int]:
        """Timesteps visited, in decreasing order; the chain ends after the step at the last one."""

    @abstractmethod
    def step(
        self,
        output: torch.Tensor,
        t: int,
        t_prev: int,
        x_t: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """One reverse step from ``x_t`` at ``t`` to ``t_prev`` (``-1`` = the clean sample)."""

    def pred_x0_eps(self, output: torch.Tensor, t: int, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted (clipped) x0 and the eps consistent with it, so clipping never breaks ``x_t``."""
        x0 = self.schedule.predict_x0(self.objective, x_t, t, output)
        if self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
        return x0, self.schedule.predict_eps_from_x0(x_t, t, x0)

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        progress: bool = True,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Draw ``x_T ~ N(0, I)`` of ``shape`` and denoise it; returns x0 ``shape`` on ``device``."""
        device = torch.device(device)
        x = randn(tuple(shape), generator, device, dtype)
        steps = self.timesteps()
        for i, t in enumerate(tqdm(steps, desc=type(self).__name__, disable=not progress, leave=False)):
            t_prev = steps[i + 1] if i + 1 < len(steps) else -1
            output = model_fn(x, torch.full((shape[0],), t, device=device, dtype=torch.long))
            x = self.step(output.to(dtype), t, t_prev, x, generator)
        return x
