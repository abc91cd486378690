"""Display windows: the intensity range a person looks at, per modality.

Every preview, report figure and window metric uses it, because the training range hides soft tissue: with
CT normalised over -1000..1000 HU, liver vs surrounding tissue (~20-80 HU) is 1-4 % of the range.

- CT: ``cfg.ct_display_window`` in HU (default -160..240, a soft-tissue window: level 40, width 400),
  mapped into the normalised range through ``cfg.ct_window``.
- MR (no absolute scale): the ``cfg.mr_display_percentiles`` of the reference volume.

Windows are returned in normalised units (the [-1, 1] scale of the data layer), so they apply directly to
model inputs and outputs; :func:`medlsdm.data.transforms.denormalize` gives native units (HU for CT).
"""

from __future__ import annotations

import numpy as np
import torch

from medlsdm.config import DataConfig


def display_window(cfg: DataConfig, reference: torch.Tensor | np.ndarray | None = None) -> tuple[float, float]:
    """(lo, hi) of the display window in normalised units; MR needs the ``reference`` volume (any shape)."""
    if cfg.modality == "ct":
        w_lo, w_hi = cfg.ct_window
        return tuple(float(2.0 * (h - w_lo) / (w_hi - w_lo) - 1.0) for h in cfg.ct_display_window)  # type: ignore
    if reference is None:
        raise ValueError("an MR display window is taken from a reference volume; none was given")
    v = torch.as_tensor(reference).detach().float().flatten().cpu()
    lo, hi = (float(q) for q in torch.quantile(v[:: max(1, v.numel() // 2**20)],
                                                 torch.tensor(cfg.mr_display_percentiles) / 100.0))
    return lo, hi if hi > lo else lo + 1e-6


def to_window(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``x`` clamped to the window (lo, hi) and scaled to [0, 1] (any shape)."""
    return (x.clamp(lo, hi) - lo) / (hi - lo)


def native_unit(cfg: DataConfig) -> str:
    """The unit of :func:`denormalize`'s output: HU for CT; MR is written 0..1 (training percentiles)."""
    return "HU" if cfg.modality == "ct" else "MR units (0..1 = training percentiles)"


def describe_window(cfg: DataConfig) -> str:
    """One phrase for reports, e.g. ``CT display window -160..240 HU``."""
    if cfg.modality == "ct":
        lo, hi = cfg.ct_display_window
        return f"CT display window {lo:g}..{hi:g} HU"
    lo, hi = cfg.mr_display_percentiles
    return f"MR display window: percentiles {lo:g}..{hi:g} of the reference volume"
