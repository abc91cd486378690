"""Full-length volumes: run a model on overlapping depth windows and blend the outputs.

A model trained on latents of ``window`` slices sees exactly that depth at every call. A longer latent
(B, C, L, h, w) is covered by windows of ``window`` slices whose neighbours share at least ``overlap``
slices (start positions spread evenly from 0 to L - window). At every denoising step each window's
(guided) model output is computed, and the outputs are blended with weights that ramp up linearly over
``overlap`` slices from each window edge (positive everywhere) and are normalised to sum to one at every
slice. So a model whose output does not depend on the window gives exactly the single-window result,
and across a window border the blend changes gradually: neighbouring windows are pulled to agree at
every step instead of being stitched at the end. Memory is that of ``batch`` windows (default one at a
time), whatever L. The same blending decodes long latents with the VQ-GAN (``scale`` = its depth factor).
In-plane sizes pass through unchanged (the U-Net is fully convolutional).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DepthWindows:
    """``DepthWindows(length, window, overlap=None)``: the windows covering ``length`` slices.

    ``starts``: first slice of each window; ``size``: slices per window (``min(window, length)``);
    ``overlap`` (default ``window // 2``) is clamped to ``[0, size - 1]``.
    """

    def __init__(self, length: int, window: int, overlap: int | None = None) -> None:
        if length < 1 or window < 1:
            raise ValueError(f"length and window must be positive, got {length} and {window}")
        self.length = length
        self.size = min(window, length)
        self.overlap = max(0, min(self.size // 2 if overlap is None else int(overlap), self.size - 1))
        if length <= self.size:
            self.starts = [0]
        else:
            n = math.ceil((length - self.size) / (self.size - self.overlap)) + 1
            self.starts = [round(i * (length - self.size) / (n - 1)) for i in range(n)]

    def __len__(self) -> int:
        return len(self.starts)

    def __repr__(self) -> str:
        return f"DepthWindows(length={self.length}, size={self.size}, overlap={self.overlap}, starts={self.starts})"

    def ramp(self, scale: int = 1) -> torch.Tensor:
        """Unnormalised weight of one window, ``(size * scale,)`` float64: linear over ``overlap * scale``
        slices at each edge, 1 in the middle, positive everywhere."""
        n, edge = self.size * scale, self.overlap * scale
        pos = torch.arange(n, dtype=torch.float64) + 0.5
        if edge == 0:
            return torch.ones(n, dtype=torch.float64)
        return torch.minimum(torch.minimum(pos / edge, (n - pos) / edge), torch.ones(n, dtype=torch.float64))

    def weights(self, scale: int = 1) -> list[torch.Tensor]:
        """Per window, its normalised weights ``(size * scale,)`` float64 (at every slice they sum to 1)."""
        ramp, total = self.ramp(scale), torch.zeros(self.length * scale, dtype=torch.float64)
        for s in self.starts:
            total[s * scale:(s + self.size) * scale] += ramp
        return [ramp / total[s * scale:(s + self.size) * scale] for s in self.starts]

    def borders(self, scale: int = 1) -> list[int]:
        """Interior window edges in slices of the ``scale``-times finer grid: ``b`` is the border between
        slices ``b - 1`` and ``b`` (for :func:`medlsdm.evaluation.metrics.seam_ratio`)."""
        edges = {s for s in self.starts if s > 0} | {s + self.size for s in self.starts if s + self.size < self.length}
        return sorted(e * scale for e in edges)

    def blend(self, fn: Callable[[int, int], torch.Tensor], scale: int = 1) -> torch.Tensor:
        """``fn(start, stop)`` -> (B, C, (stop - start) * scale, ...) for each window, one at a time, blended
        into (B, C, length * scale, ...)."""
        out = None
        for s, w in zip(self.starts, self.weights(scale)):
            y = fn(s, s + self.size)
            if out is None:
                out = y.new_zeros(*y.shape[:2], self.length * scale, *y.shape[3:])
            out[:, :, s * scale:(s + self.size) * scale] += y * w.to(y).view(1, 1, -1, *([1] * (y.dim() - 3)))
        return out


def windowed_model_fn(windows: DepthWindows, make_fn: Callable[[list[int]], ModelFn], batch: int = 1) -> ModelFn:
    """``model_fn(x (B, C, L, h, w), t (B,))`` evaluated window by window and blended.

    ``make_fn(starts)`` is called once per group of up to ``batch`` windows (so per-window state such as
    cropped label maps and cached SPADE modulations is built once, not at every step) and returns the
    model function for those windows stacked along the batch axis, window-major: rows ``j*B .. (j+1)*B-1``
    are window ``starts[j]``.
    """
    if batch < 1:
        raise ValueError(f"window batch must be at least 1, got {batch}")
    groups = [windows.starts[i:i + batch] for i in range(0, len(windows.starts), batch)]
    fns = [make_fn(g) for g in groups]
    weights = dict(zip(windows.starts, windows.weights()))
    size = windows.size

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b, out = x.shape[0], torch.zeros_like(x)
        for group, fn in zip(groups, fns):
            xs = torch.cat([x[:, :, s:s + size] for s in group])
            ys = fn(xs, t.repeat(len(group))).to(x.dtype)
            for j, s in enumerate(group):
                w = weights[s].to(device=x.device, dtype=x.dtype).view(1, 1, -1, 1, 1)
                out[:, :, s:s + size] += ys[j * b:(j + 1) * b] * w
        return out

    return model_fn
