"""Three-plane previews of volumes: reconstructions, samples, label overlays, real-vs-synthetic montages.

Volumes are (D, H, W) arrays or tensors (leading singleton batch/channel axes are dropped). Slices are
drawn with ``origin="lower"``, so for the RAS-ordered arrays of medlsdm (D -> superior, H -> anterior,
W -> right) superior and anterior point up. Figures use matplotlib's Agg canvas directly (no pyplot,
no screen, no global backend change) and are written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from medlsdm.io import atomic_path

PLANES = ("axial", "coronal", "sagittal")


def _as_volume(volume) -> np.ndarray:
    """(…, D, H, W) array or tensor with singleton leading axes -> float32 numpy (D, H, W)."""
    if isinstance(volume, torch.Tensor):
        v = volume.detach().float().cpu().numpy()
    else:
        v = np.asarray(volume, dtype=np.float32)
    while v.ndim > 3 and v.shape[0] == 1:
        v = v[0]
    if v.ndim != 3:
        raise ValueError(f"expected a (D, H, W) volume, got shape {tuple(np.shape(volume))}")
    return v


def _square_pixels(img: np.ndarray, row_mm: float, col_mm: float, nearest: bool) -> np.ndarray:
    """Resample a 2D slice so that its pixels are square (the finer spacing of the two)."""
    finest = min(row_mm, col_mm)
    size = (max(1, round(img.shape[0] * row_mm / finest)), max(1, round(img.shape[1] * col_mm / finest)))
    if size == img.shape:
        return img
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    mode = dict(mode="nearest") if nearest else dict(mode="bilinear", align_corners=False)
    return F.interpolate(t, size=size, **mode)[0, 0].numpy()


def three_plane(
    volume, spacing: Sequence[float] | None = None, nearest: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Central slices: axial (H, W), coronal (D, W), sagittal (D, H).

    With ``spacing`` (D, H, W in mm) each slice is resampled to square pixels (``nearest`` for label
    maps), so it shows the true aspect ratio.
    """
    v = _as_volume(volume)
    d, h, w = v.shape
    slices = (v[d // 2], v[:, h // 2, :], v[:, :, w // 2])
    if spacing is None:
        return slices
    sd, sh, sw = (float(s) for s in spacing)
    pairs = ((sh, sw), (sd, sw), (sd, sh))
    return tuple(_square_pixels(s, r, c, nearest) for s, (r, c) in zip(slices, pairs))


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=fig.dpi)
    return path


def _window(v: np.ndarray, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    """The grey window: given values, or the 1st / 99th percentile where one is None."""
    lo, hi = np.percentile(v, [1, 99]) if vmin is None or vmax is None else (vmin, vmax)
    return float(lo if vmin is None else vmin), float(hi if vmax is None else vmax)


Panel = list[tuple[np.ndarray, dict]]  # image layers of one panel, each with its imshow keyword arguments


def _grid(rows: list[tuple[str, list[Panel]]], col_titles: Sequence[str], title: str | None) -> Figure:
    """A figure with one row per entry; each panel is a list of (image, imshow kwargs) layers."""
    n_rows, n_cols = len(rows), len(col_titles)
    fig = Figure(figsize=(2.0 * n_cols, 2.0 * n_rows + (0.3 if title else 0)), dpi=100)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, (name, panels) in enumerate(rows):
        for c, layers in enumerate(panels):
            ax = axes[r, c]
            for img, kw in layers:
                ax.imshow(img, origin="lower", interpolation="nearest", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_titles[c], fontsize=8)
        axes[r, 0].set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _label_kw(labels: np.ndarray, alpha: float) -> dict:
    cmap = "tab10" if labels.max() < 10 else "tab20"
    return dict(cmap=cmap, vmin=-0.5, vmax=(9.5 if cmap == "tab10" else 19.5), alpha=alpha)


def save_preview(
    path: str | Path,
    volumes: dict,
    labels=None,
    spacing: Sequence[float] | None = None,
    title: str | None = None,
    vmin: float | None = -1.0,
    vmax: float | None = 1.0,
    alpha: float = 0.45,
) -> Path:
    """Save a PNG: one row per named (D, H, W) volume, columns axial / coronal / sagittal.

    ``vmin`` / ``vmax`` fix the grey window (default [-1, 1] for normalised data; None = 1st / 99th
    percentile of each volume). With ``labels`` (D, H, W) an extra row overlays the label map on the
    first volume.
    """
    if not volumes:
        raise ValueError("save_preview needs at least one volume")
    vols = {name: _as_volume(v) for name, v in volumes.items()}
    first = next(iter(vols.values()))
    rows = []
    for name, v in vols.items():
        lo, hi = _window(v, vmin, vmax)
        rows.append((name, [[(s, dict(cmap="gray", vmin=lo, vmax=hi))] for s in three_plane(v, spacing)]))
    if labels is not None:
        lab = _as_volume(labels)
        if lab.shape != first.shape:
            raise ValueError(f"labels shape {lab.shape} differs from volume shape {first.shape}")
        lo, hi = _window(first, vmin, vmax)
        grey = three_plane(first, spacing)
        masks = three_plane(lab, spacing, nearest=True)
        kw = _label_kw(lab, alpha)
        grey_kw = dict(cmap="gray", vmin=lo, vmax=hi)
        panels = [[(g, grey_kw), (np.ma.masked_equal(m.round(), 0), kw)] for g, m in zip(grey, masks)]
        rows.append(("labels", panels))
    return _save(_grid(rows, PLANES, title), path)


def montage(
    path: str | Path,
    pairs: Sequence[tuple[str, object, object]],
    spacing: Sequence[float] | None = None,
    title: str | None = None,
    vmin: float | None = -1.0,
    vmax: float | None = 1.0,
) -> Path:
    """Save a PNG with one row per ``(name, real, synthetic)``: real and synthetic three-plane views side by side."""
    if not pairs:
        raise ValueError("montage needs at least one (name, real, synthetic) row")
    rows = []
    for name, real, synth in pairs:
        real, synth = _as_volume(real), _as_volume(synth)
        lo, hi = _window(real, vmin, vmax)
        kw = dict(cmap="gray", vmin=lo, vmax=hi)
        rows.append((name, [[(s, kw)] for s in (*three_plane(real, spacing), *three_plane(synth, spacing))]))
    cols = [f"real {p}" for p in PLANES] + [f"synthetic {p}" for p in PLANES]
    return _save(_grid(rows, cols, title), path)
