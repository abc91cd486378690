"""``SamplingOptions``: everything that says how a :class:`~medlsdm.diffusion.model.LatentDiffusion` samples,
in one small frozen dataclass instead of a dozen keyword arguments.

    SamplingOptions()                                   # the config's default sampler and steps
    SamplingOptions("ddim", steps=50, guidance_scale=1.5)
    SamplingOptions(DDIMSampler(schedule, steps=50))    # a sampler object: its own steps / eta
    SamplingOptions.from_config(cfg.ldm, window=2)      # what ``ldm.*`` says, with overrides

``sampler`` is a name of the registry :data:`medlsdm.diffusion.samplers.SAMPLERS` or a :class:`Sampler`
instance; ``steps`` (None: :data:`DEFAULT_STEPS`, at most T) and ``eta`` belong to a named sampler only (an
instance carries its own). ``window`` / ``overlap`` / ``window_batch``: depth windows of a long latent
(:mod:`medlsdm.diffusion.windows`); ``cache``, ``precision`` ("auto", "bf16", "fp32") and ``compile`` are the
efficiency switches measured by ``bench/speed.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from medlsdm.config import LDMConfig
from medlsdm.diffusion.samplers import DEFAULT_SAMPLER, Sampler, sampler_class
from medlsdm.errors import UserError

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample (see the module docstring); checked when built."""

    sampler: str | Sampler = DEFAULT_SAMPLER
    steps: int | None = None
    guidance_scale: float = 1.0
    eta: float = 0.0
    window: int | None = None
    overlap: int | None = None
    window_batch: int = 1
    cache: bool = False
    precision: str = "fp32"
    compile: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.sampler, Sampler):
            if self.steps is not None or self.eta != 0.0:
                raise UserError(f"steps / eta are set by the sampler object {self.sampler!r}, not by the options")
        elif isinstance(self.sampler, str):
            sampler_class(self.sampler)  # a one-line UserError for an unknown name
        else:
            raise TypeError(f"sampler must be a registered name or a Sampler, got {type(self.sampler).__name__}")
        if self.precision not in PRECISIONS:
            raise UserError(f"config: sampling precision must be auto, bf16 or fp32, got {self.precision!r}")
        if self.window_batch < 1:
            raise UserError(f"config: ldm.window_batch must be at least 1, got {self.window_batch}")

    @property
    def sampler_name(self) -> str:
        """The registry name of the sampler (of a sampler object: its class's ``name``)."""
        return self.sampler.name if isinstance(self.sampler, Sampler) else self.sampler

    @classmethod
    def of(cls, *args: Any, **fields: Any) -> "SamplingOptions":
        """Options from ``SamplingOptions`` (fields in ``fields`` replaced) or from the fields themselves,
        positionally in field order (sampler, steps, guidance_scale, eta, ...) and/or by keyword."""
        if args and isinstance(args[0], SamplingOptions):
            if len(args) > 1:
                raise TypeError("give SamplingOptions alone, or its fields, not both positionally")
            return dataclasses.replace(args[0], **fields) if fields else args[0]
        return cls(*args, **fields)

    @classmethod
    def from_config(cls, ldm: LDMConfig, **overrides: Any) -> "SamplingOptions":
        """What the config's ``ldm`` section says (sampler, sampling_steps, guidance_scale, window_batch,
        spade_cache, sample_precision, sample_compile), with ``overrides`` (fields of this class) on top;
        a sampler object in ``overrides`` brings its own steps."""
        values: dict[str, Any] = {"sampler": ldm.sampler, "steps": ldm.sampling_steps,
                                  "guidance_scale": ldm.guidance_scale, "window_batch": ldm.window_batch,
                                  "cache": ldm.spade_cache, "precision": ldm.sample_precision,
                                  "compile": ldm.sample_compile}
        if isinstance(overrides.get("sampler"), Sampler) and "steps" not in overrides:
            values["steps"] = None
        return cls(**{**values, **overrides})
