"""Samplers, one per file, behind one interface (:class:`Sampler`), and the one registry of their names.

``SAMPLERS`` maps each name (what ``ldm.sampler`` and ``--sampler`` accept) to its class; every place that
picks a sampler by name goes through it (:func:`make_sampler`). The default is the config's
(:data:`DEFAULT_SAMPLER` = ``ldm.sampler``, :data:`DEFAULT_STEPS` = ``ldm.sampling_steps``).
"""

from __future__ import annotations

from medlsdm.diffusion.samplers.base import DEFAULT_SAMPLER, DEFAULT_STEPS, ModelFn, Sampler
from medlsdm.diffusion.samplers.ddim import DDIMSampler
from medlsdm.diffusion.samplers.ddpm import DDPMSampler
from medlsdm.diffusion.samplers.dpm_solver import DPMSolverPPSampler
from medlsdm.diffusion.schedule import NoiseSchedule
from medlsdm.errors import UserError

SAMPLERS: dict[str, type[Sampler]] = {cls.name: cls for cls in (DDPMSampler, DDIMSampler, DPMSolverPPSampler)}


def sampler_class(name: str) -> type[Sampler]:
    """The registered class of ``name``; a one-line UserError for an unknown name."""
    if name not in SAMPLERS:
        raise UserError(f"config: unknown sampler '{name}' (choose from {', '.join(SAMPLERS)})")
    return SAMPLERS[name]


def make_sampler(
    name: str,
    schedule: NoiseSchedule,
    steps: int | None = None,
    eta: float = 0.0,
    objective: str = "eps",
    clip: float | None = 1.0,
) -> Sampler:
    """The registered sampler ``name`` over ``schedule`` (:meth:`Sampler.create`): ``"ddpm"`` (always all T
    steps; ``steps`` and ``eta`` are ignored), ``"ddim"`` (``steps``, ``eta``) or ``"dpm++"`` (DPM-Solver++(2M),
    deterministic: ``steps``; ``eta`` is ignored). ``steps`` None: :data:`DEFAULT_STEPS` (at most T)."""
    cls = sampler_class(name)
    if cls is not DDPMSampler and steps is not None and not 1 <= steps <= schedule.num_timesteps:
        raise UserError(f"config: sampling steps must be in [1, {schedule.num_timesteps}], got {steps}")
    return cls.create(schedule, steps=steps, eta=eta, objective=objective, clip=clip)


__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "DEFAULT_SAMPLER",
    "DEFAULT_STEPS",
    "DPMSolverPPSampler",
    "ModelFn",
    "SAMPLERS",
    "Sampler",
    "make_sampler",
    "sampler_class",
]
