"""Samplers, one per file, behind one interface (:class:`Sampler`); :func:`make_sampler` picks by name."""

from __future__ import annotations

from medlsdm.diffusion.samplers.base import ModelFn, Sampler
from medlsdm.diffusion.samplers.ddim import DDIMSampler
from medlsdm.diffusion.samplers.ddpm import DDPMSampler
from medlsdm.diffusion.samplers.dpm_solver import DPMSolverPPSampler
from medlsdm.diffusion.schedule import NoiseSchedule
from medlsdm.errors import UserError

SAMPLERS = ("ddpm", "ddim", "dpm++")


def make_sampler(
    name: str,
    schedule: NoiseSchedule,
    steps: int | None = None,
    eta: float = 0.0,
    objective: str = "eps",
    clip: float | None = 1.0,
) -> Sampler:
    """``"ddpm"`` (always all T steps; ``steps`` and ``eta`` are ignored), ``"ddim"`` (``steps``, default 50)
    or ``"dpm++"`` (DPM-Solver++(2M), deterministic: ``steps``, default 20; ``eta`` is ignored)."""
    if name == "ddpm":
        return DDPMSampler(schedule, objective, clip)
    if name in ("ddim", "dpm++") and steps is not None and not 1 <= steps <= schedule.num_timesteps:
        raise UserError(f"config: sampling steps must be in [1, {schedule.num_timesteps}], got {steps}")
    if name == "ddim":
        return DDIMSampler(schedule, steps or min(50, schedule.num_timesteps), eta, objective, clip)
    if name == "dpm++":
        return DPMSolverPPSampler(schedule, steps or min(20, schedule.num_timesteps), objective, clip)
    raise UserError(f"config: unknown sampler '{name}' (choose from {', '.join(SAMPLERS)})")


__all__ = ["DDIMSampler", "DDPMSampler", "DPMSolverPPSampler", "ModelFn", "SAMPLERS", "Sampler", "make_sampler"]
