"""Fidelity where the anatomy is: window metrics, a per-class intensity table and a grid-artifact ratio.

All functions compare paired volumes ``pred[i]`` (a reconstruction or a synthetic volume) with ``ref[i]``
(the real volume of the same label map), each (1, D, H, W) or (D, H, W) in the data layer's normalised
units, with ``labels[i]`` (same shape, class indices) where needed, and a ``DataConfig`` that says how to
get back to native units (HU for CT) and which display window a person looks at (``medlsdm.data.display``).

- :func:`window_metrics`: PSNR, SSIM and MAE over the full range and inside the display window (both volumes
  clamped to the window and scaled to [0, 1]; MAE in native units). PSNR over the full CT range is dominated
  by the air/body edge, the window figures by soft tissue.
- :func:`class_table`: median intensity of each label class, real vs other, in native units (voxels pooled
  over all pairs), so that small classes (a kidney, a lesion) are not averaged away.
- :func:`grid_ratio`: a checkerboard detector. For every axis whose length is a multiple of 4 the power
  spectrum along that axis (display window, averaged over all lines of all volumes) is taken at the
  period-4 and period-2 frequencies, as a peak over its spectral neighbours (+-1, +-2 bins); the ratio of
  that peak for ``pred`` to the one for ``ref`` is ~1 when ``pred`` has no more periodic structure at that
  period than the real volumes, and large for the regular 4-voxel pattern a 4x decoder can leave.
- :func:`contrast_table`: can a structure be *seen*? Per volume, each class's median minus the median of a
  shell around it (voxels within ``SHELL`` voxels, outside the class, background excluded), real vs other.
  A class drawn at the right median but no different from its surroundings is invisible; a lesion whose
  label map does not say hypo- or hyper-dense is visible when its |contrast| matches, whatever the sign.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from medlsdm.config import DataConfig
from medlsdm.data.display import describe_window, display_window, native_unit, to_window
from medlsdm.data.transforms import denormalize
from medlsdm.evaluation import metrics as M

AXES = {"D": 0, "H": 1, "W": 2}
PERIODS = (4, 2)
SHELL = (1, 3, 3)  # (D, H, W) voxels of the shell around a class in contrast_table
MIN_VOXELS = 20  # a class (or its shell) with fewer voxels in a volume is not scored there


def _vol(x) -> torch.Tensor:
    """(1, D, H, W) / (D, H, W) tensor or array -> float (D, H, W)."""
    t = torch.as_tensor(x).float()
    return t.reshape(t.shape[-3:])


def window_metrics(preds: Sequence, refs: Sequence, cfg: DataConfig) -> dict[str, dict[str, float]]:
    """``{"window": {psnr, ssim, mae}, "full": {psnr, ssim, mae}}``, each the mean over pairs (MAE in native
    units; PSNR / SSIM with data range 1 in the window and 2 over the full normalised range)."""
    rows: dict[str, dict[str, list[float]]] = {k: {"psnr": [], "ssim": [], "mae": []} for k in ("window", "full")}
    for p, r in zip(preds, refs, strict=True):
        p, r = _vol(p), _vol(r)
        lo, hi = display_window(cfg, r)
        pw, rw = to_window(p, lo, hi), to_window(r, lo, hi)
        rows["full"]["psnr"].append(M.psnr(p, r))
        rows["full"]["ssim"].append(M.ssim(p, r))
        rows["full"]["mae"].append(float((denormalize(p, cfg) - denormalize(r, cfg)).abs().mean()))
        rows["window"]["psnr"].append(M.psnr(pw, rw, data_range=1.0))
        rows["window"]["ssim"].append(M.ssim(pw, rw, data_range=1.0))
        pn, rn = denormalize(p.clamp(lo, hi), cfg), denormalize(r.clamp(lo, hi), cfg)
        rows["window"]["mae"].append(float((pn - rn).abs().mean()))
    return {k: {m: sum(v) / len(v) for m, v in ms.items()} for k, ms in rows.items()}


def class_table(preds: Sequence, refs: Sequence, labels: Sequence, cfg: DataConfig) -> list[dict]:
    """One row per class present: ``cls``, ``name``, ``voxels`` (mean per volume), ``real`` and ``other``
    (medians in native units, voxels of the class pooled over all pairs) and ``error`` (other - real)."""
    names = list(cfg.label_names) + [f"class_{c}" for c in range(len(cfg.label_names), cfg.num_classes)]
    p = torch.cat([denormalize(_vol(x), cfg).flatten() for x in preds])
    r = torch.cat([denormalize(_vol(x), cfg).flatten() for x in refs])
    lab = torch.cat([_vol(x).to(torch.int16).flatten() for x in labels])
    if not p.shape == r.shape == lab.shape:
        raise ValueError("class_table: predictions, references and labels must pair up voxel for voxel")
    rows = []
    for c in range(cfg.num_classes):
        mask = lab == c
        n = int(mask.sum())
        if n:
            real, other = float(r[mask].median()), float(p[mask].median())
            rows.append(dict(cls=c, name=names[c], voxels=n / len(preds), real=real, other=other, error=other - real))
    return rows


def _contrast(vol: torch.Tensor, lab: torch.Tensor, c: int) -> float | None:
    """Median of class ``c`` minus the median of its non-background shell, in ``vol``'s units (None if too few)."""
    mask = lab == c
    if int(mask.sum()) < MIN_VOXELS:
        return None
    k = tuple(2 * s + 1 for s in SHELL)
    grown = F.max_pool3d(mask[None, None].float(), k, stride=1, padding=SHELL)[0, 0] > 0
    shell = grown & ~mask & (lab != 0)
    if int(shell.sum()) < MIN_VOXELS:
        return None
    return float(vol[mask].median() - vol[shell].median())


def contrast_table(preds: Sequence, refs: Sequence, labels: Sequence, cfg: DataConfig) -> list[dict]:
    """One row per foreground class scored in at least one volume: ``cls``, ``name``, ``volumes`` (scored),
    ``real`` and ``other`` (mean |contrast to the shell| in native units), ``ratio`` (other / real: 1 = as
    conspicuous as real, 0 = invisible) and ``same_sign`` (fraction of volumes whose contrast has the real
    one's sign)."""
    names = list(cfg.label_names) + [f"class_{c}" for c in range(len(cfg.label_names), cfg.num_classes)]
    vols = [(denormalize(_vol(p), cfg), denormalize(_vol(r), cfg), _vol(lab).round().to(torch.int16))
             for p, r, lab in zip(preds, refs, labels, strict=True)]  # once per volume, not once per class
    rows = []
    for c in range(1, cfg.num_classes):
        pairs = []
        for p, r, lab in vols:
            cr, cp = _contrast(r, lab, c), _contrast(p, lab, c)
            if cr is not None and cp is not None:
                pairs.append((cr, cp))
        if pairs:
            real = sum(abs(a) for a, _ in pairs) / len(pairs)
            other = sum(abs(b) for _, b in pairs) / len(pairs)
            rows.append(dict(cls=c, name=names[c], volumes=len(pairs), real=real, other=other,
                             ratio=other / real if real > 0 else float("nan"),
                             same_sign=sum((a > 0) == (b > 0) for a, b in pairs) / len(pairs)))
    return rows


def _spectrum(volumes: Sequence[torch.Tensor], windows: Sequence[tuple[float, float]], axis: int) -> torch.Tensor:
    """Mean power spectrum along ``axis`` of the windowed volumes (mean removed per line): (n // 2 + 1,)."""
    total = None
    for v, (lo, hi) in zip(volumes, windows):
        x = to_window(_vol(v).double(), lo, hi)
        x = x - x.mean(dim=axis, keepdim=True)
        power = torch.fft.rfft(x, dim=axis).abs().square().movedim(axis, -1).reshape(-1, x.shape[axis] // 2 + 1)
        total = power.mean(0) if total is None else total + power.mean(0)
    return total / len(volumes)


def _peak(power: torch.Tensor, k: int) -> float:
    """Power at bin ``k`` over the mean of its neighbours k +- 1, k +- 2 (inside 1..n-1, DC excluded)."""
    near = [j for j in (k - 2, k - 1, k + 1, k + 2) if 1 <= j < len(power)]
    return float(power[k] / power[near].mean().clamp_min(1e-20))


def grid_ratio(preds: Sequence, refs: Sequence, cfg: DataConfig) -> dict:
    """``{"max": worst ratio, "per_axis": {"W/4": ratio, ...}}`` (1 = as periodic as the real volumes). Volumes of
    several lengths along an axis (evaluation keeps them whole) are scored per length and averaged, weighted by
    their number; lengths under 8 or not a multiple of 4 are skipped."""
    windows = [display_window(cfg, _vol(r)) for r in refs]
    per_axis = {}
    for name, axis in AXES.items():
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(refs):
            groups.setdefault(_vol(r).shape[axis], []).append(i)
        sums: dict[int, float] = {}
        count = 0
        for n, idx in groups.items():
            if n < 8 or n % 4:
                continue
            pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
            sp, sr = _spectrum(pick(preds), pick(windows), axis), _spectrum(pick(refs), pick(windows), axis)
            for period in PERIODS:
                k = n // period
                sums[period] = sums.get(period, 0.0) + len(idx) * _peak(sp, k) / _peak(sr, k)
            count += len(idx)
        for period, total in sums.items():
            per_axis[f"{name}/{period}"] = total / count
    return {"max": max(per_axis.values()) if per_axis else float("nan"), "per_axis": per_axis}


def fidelity(preds: Sequence, refs: Sequence, labels: Sequence | None, cfg: DataConfig) -> dict:
    """All four: ``{"window_metrics", "classes", "contrast", "grid", "window", "unit"}`` (JSON-friendly);
    ``classes`` and ``contrast`` are empty without ``labels``."""
    return {
        "window": describe_window(cfg),
        "unit": native_unit(cfg),
        "window_metrics": window_metrics(preds, refs, cfg),
        "classes": class_table(preds, refs, labels, cfg) if labels is not None else [],
        "contrast": contrast_table(preds, refs, labels, cfg) if labels is not None else [],
        "grid": grid_ratio(preds, refs, cfg),
    }


def _f(x: float, digits: int) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _contrast_lines(rows: list[dict], other: str, real: str, unit: str) -> list[str]:
    if not rows:
        return []
    shell = "x".join(str(s) for s in SHELL)
    return [f"Can each class be seen? Mean |median of the class - median of the tissue around it| per volume (shell "
            f"of {shell} voxels (D x H x W), background excluded); ratio 1 = as conspicuous as {real}, 0 = invisible:",
            "", f"| class | volumes | {real} contrast ({unit}) | {other} contrast ({unit}) | ratio | same sign |",
            "|---|---|---|---|---|---|",
            *[f"| {r['name']} | {r['volumes']} | {_f(r['real'], 1)} | {_f(r['other'], 1)} | {_f(r['ratio'], 2)} | "
              f"{r['same_sign']:.2f} |" for r in rows], ""]


def markdown(fid: dict, other: str = "synthetic", real: str = "real") -> list[str]:
    """Markdown lines: the window/full metrics table, the per-class table and the grid ratio of ``fid``."""
    wm, unit = fid["window_metrics"], "HU" if fid["unit"] == "HU" else "units"
    lines = [
        f"| {other} vs {real} | PSNR (dB) | SSIM | MAE ({unit}) |", "|---|---|---|---|",
        *[f"| {label} | {_f(wm[k]['psnr'], 2)} | {_f(wm[k]['ssim'], 3)} | {_f(wm[k]['mae'], 1)} |"
          for k, label in (("window", fid["window"]), ("full", "full range"))], "",
        f"| class | voxels per volume | {real} median ({unit}) | {other} median ({unit}) | error ({unit}) |",
        "|---|---|---|---|---|",
        *[f"| {r['name']} | {r['voxels']:.0f} | {_f(r['real'], 1)} | {_f(r['other'], 1)} | {r['error']:+.1f} |"
          for r in fid["classes"]], "",
        *_contrast_lines(fid.get("contrast", []), other, real, unit),
        f"Grid-artifact ratio (period-4 / period-2 spectral peak vs {real}; 1 = like {real}): worst "
        f"**{_f(fid['grid']['max'], 2)}** (" + ", ".join(f"{k} {v:.2f}" for k, v in fid["grid"]["per_axis"].items())
        + ").",
    ]
    return lines
