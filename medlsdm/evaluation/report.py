"""The evaluation report: PNG figures (matplotlib, Agg canvas) and ``report.md`` that references each one.

Figures: real vs synthetic three-plane montages for the same label maps, bar charts of the paired
metrics, FIDs and Dice scores, per-class intensity histograms (real vs synthetic voxels of each
labelled class) and the inter-slice change profile. Inputs are the ``metrics`` dict that
:func:`medlsdm.evaluation.evaluate.evaluate` writes to ``metrics.json`` and the volume sets behind it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from medlsdm.config import Config
from medlsdm.data.display import describe_window, display_window, native_unit
from medlsdm.data.transforms import denormalize
from medlsdm.evaluation.fidelity import markdown as fidelity_markdown
from medlsdm.evaluation.pairing import VolumeSet
from medlsdm.evaluation.stats import ratio_with_interval, with_interval
from medlsdm.io import atomic_path, atomic_write_text
from medlsdm.viz import montage

REAL, SYNTH = "#4C72B0", "#DD8452"  # colours of real and synthetic data in every figure


def save_figure(fig: Figure, path: Path) -> str:
    """Write ``fig`` as a PNG atomically; returns the file name (for Markdown links)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi, bbox_inches="tight")
    return path.name


def _fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines + [""]


# --------------------------------------------------------------------------------------------- figures


def montage_figure(path: Path, real: VolumeSet, synthetic: VolumeSet, partner: Sequence[int], cfg: Config,
                   n: int = 4) -> str:
    """Real and synthetic three-plane views of up to ``n`` label maps (the first sample of each), in the
    display window (``medlsdm.data.display``)."""
    rows, seen = [], set()
    for j, i in enumerate(partner):
        if i not in seen and len(rows) < n:
            seen.add(i)
            rows.append((real.ids[i], real.images[i], synthetic.images[j]))
    lo, hi = display_window(cfg.data, rows[0][1])
    montage(path, rows, spacing=real.spacing, vmin=lo, vmax=hi,
            title=f"real (left) vs synthetic (right) for the same label map; {describe_window(cfg.data)}")
    return path.name


def histogram_figure(path: Path, real: VolumeSet, synthetic: VolumeSet, partner: Sequence[int], cfg: Config) -> str:
    """Intensity histograms of the voxels of each labelled class, real vs synthetic (pooled over pairs)."""
    names = list(cfg.data.label_names) + [f"class_{i}" for i in range(len(cfg.data.label_names), cfg.data.num_classes)]
    used = sorted({i for i in partner})
    real_x = torch.cat([denormalize(real.images[i], cfg.data).flatten() for i in used])
    real_y = torch.cat([real.labels[i].flatten() for i in used])
    syn_x = torch.cat([denormalize(v, cfg.data).flatten() for v in synthetic.images])
    syn_y = torch.cat([lab.flatten() for lab in synthetic.labels])
    classes = [c for c in range(cfg.data.num_classes) if bool((real_y == c).any())]
    cols = min(3, len(classes))
    rows = math.ceil(len(classes) / cols)
    fig = Figure(figsize=(3.6 * cols, 2.6 * rows), dpi=100)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, c in zip(axes, classes):
        both = torch.cat([real_x[real_y == c], syn_x[syn_y == c]]).numpy()
        lo, hi = np.percentile(both, [0.5, 99.5])
        bins = np.linspace(lo, hi + 1e-6, 51)
        for x, y, colour, name in ((real_x, real_y, REAL, "real"), (syn_x, syn_y, SYNTH, "synthetic")):
            vals = x[y == c].numpy()
            if vals.size:
                ax.hist(vals, bins=bins, density=True, histtype="stepfilled", alpha=0.45, color=colour,
                        label=f"{name} (median {np.median(vals):.0f})" if cfg.data.modality == "ct" else name)
        ax.set_title(names[c], fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_yticks([])
        ax.legend(fontsize=6, frameon=False)
    for ax in axes[len(classes):]:
        ax.axis("off")
    fig.supxlabel(native_unit(cfg.data), fontsize=8)
    fig.suptitle("intensity per labelled class: real vs synthetic", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _num(v) -> float:
    """A finite float, or NaN for None / "inf" / non-finite values (drawn as no bar)."""
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else float("nan")


def _bars(ax, values: dict, title: str, colour: str = SYNTH, ylabel: str = "") -> None:
    keys = list(values)
    vals = [_num(values[k]) for k in keys]
    bars = ax.bar(range(len(keys)), vals, color=colour)
    ax.bar_label(bars, labels=[_fmt(v, 3) for v in vals], fontsize=7, padding=1)
    tilt = len(keys) > 3
    ax.set_xticks(range(len(keys)), keys, rotation=30 if tilt else 0, ha="right" if tilt else "center", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.margins(y=0.2)


def paired_figure(path: Path, paired: dict) -> str:
    """One panel per paired metric: its value for every synthetic volume, the mean as a dashed line."""
    names = [k for k in ("ssim", "psnr", "rmse", "lpips") if k in paired]
    fig = Figure(figsize=(3.4 * len(names), 2.8), dpi=100)
    axes = np.atleast_1d(fig.subplots(1, len(names), squeeze=False)).ravel()
    arrows = dict(ssim="↑", psnr="↑ dB", rmse="↓", lpips="↓")
    for ax, name in zip(axes, names):
        per = paired[name]["per_volume"]
        _bars(ax, per, f"{name.upper()} {arrows[name]}")
        if math.isfinite(_num(paired[name]["mean"])):
            ax.axhline(paired[name]["mean"], color="k", lw=0.8, ls="--")
    fig.suptitle("paired metrics: each synthetic volume vs the real volume of its label map", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def fid_figure(path: Path, fid: dict) -> str:
    """Per extractor: FID per plane (2D) and 3D-FID, side by side."""
    fig = Figure(figsize=(4.0 * len(fid), 2.8), dpi=100)
    axes = np.atleast_1d(fig.subplots(1, len(fid), squeeze=False)).ravel()
    for ax, (name, res) in zip(axes, fid.items()):
        values = {k: res.get(k) for k in ("axial", "coronal", "sagittal", "3d") if res.get(k) is not None}
        pre = "" if res.get("extractor", {}).get("pretrained") else " (NOT pretrained)"
        _bars(ax, values, f"FID ↓ — {name}{pre}", colour=REAL)
    fig.tight_layout()
    return save_figure(fig, path)


def dice_figure(path: Path, table: dict) -> str:
    """Grouped bars: Dice per foreground class for each data source (the paper's Table 2)."""
    rows = list(table)
    classes = list(next(iter(table.values()))["per_class"]) + ["mean"]
    fig = Figure(figsize=(1.1 * len(classes) + 2.5, 3.0), dpi=100)
    ax = fig.subplots()
    width = 0.8 / len(rows)
    colours = [REAL, "#55A868", SYNTH, "#8172B3"]
    for r, row in enumerate(rows):
        vals = [table[row]["per_class"].get(c) if c != "mean" else table[row]["mean"] for c in classes]
        vals = [_num(v) for v in vals]
        ax.bar(np.arange(len(classes)) + (r - (len(rows) - 1) / 2) * width, vals, width, label=row,
               color=colours[r % len(colours)])
    ax.set_xticks(range(len(classes)), classes, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Dice", fontsize=8)
    ax.legend(fontsize=7, frameon=False, ncols=len(rows), loc="upper center", bbox_to_anchor=(0.5, 1.16))
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def slice_profile_figure(path: Path, real: torch.Tensor, synthetic: torch.Tensor) -> str:
    """Mean normalised change between adjacent slices along depth, real vs synthetic ((B, D-1) inputs; NaN past
    the end of a shorter volume)."""
    fig = Figure(figsize=(5.0, 2.6), dpi=100)
    ax = fig.subplots()
    for x, colour, name in ((real, REAL, "real"), (synthetic, SYNTH, "synthetic")):
        x = x.numpy()
        mean = np.nanmean(x, 0)
        ax.plot(np.arange(len(mean)) + 0.5, mean, color=colour, label=name, marker="o", ms=3)
        if len(x) > 1:
            std = np.nan_to_num(np.nanstd(x, 0))
            ax.fill_between(np.arange(len(mean)) + 0.5, mean - std, mean + std, color=colour, alpha=0.2)
    ax.set_xlabel("slice pair (d, d+1)", fontsize=8)
    ax.set_ylabel("mean |Δ| / std", fontsize=8)
    ax.set_title("inter-slice change along depth (lower and matching = consistent)", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


# -------------------------------------------------------------------------------------------- markdown


def _paired_section(paired: dict) -> list[str]:
    rows = [[k.upper(), v["mean"], v["std"], v.get("backbone", "")] for k, v in paired.items()]
    return ["## Paired metrics (synthetic vs the real volume of the same label map)", "",
            *_table(["metric", "mean", "std", "note"], rows)]


def _fid_section(fid: dict) -> list[str]:
    out = ["## FID (distribution distance, lower is better)", ""]
    rows = []
    for name, res in fid.items():
        ex = res.get("extractor", {})
        rows.append([name, res.get("axial"), res.get("coronal"), res.get("sagittal"), res.get("3d"),
                     "yes" if ex.get("pretrained") else "**no**", f"`{ex.get('weights') or '-'}`",
                     ex.get("sha256") or "-"])
    out += _table(["extractor", "axial", "coronal", "sagittal", "3D", "pretrained", "weights", "sha256"], rows)
    if any(res.get("note_planes") for res in fid.values()):
        out += ["Per-plane FID comes from per-slice features of 2D extractors only; for the 3D extractors (marked "
                "–) it is not reported: their deepest feature map has a few slabs per volume, not slices.", ""]
    if any(not res.get("extractor", {}).get("pretrained") for res in fid.values()):
        out += ["Extractors marked **no** use randomly initialised weights: their FIDs rank models against each "
                "other on this machine only and are not comparable with published numbers.", ""]
    return out


def _dice_section(dice: dict) -> list[str]:
    table = dice["table"]
    classes = list(next(iter(table.values()))["per_class"])

    cell = with_interval  # "0.912 [0.88, 0.94]": the 95% bootstrap interval over volumes
    rows = [[row, v["n"], cell(v["mean"], v.get("mean_ci")),
             *[cell(v["per_class"][c], v.get("per_class_ci", {}).get(c)) for c in classes]] for row, v in table.items()]
    out = ["## Dice protocol (paper Table 2)", "",
           "A segmentation network (Appendix B) trained on the real training set segments each data source; "
           "Dice is averaged over the foreground classes (background excluded); brackets: 95% bootstrap interval "
           "over volumes.", "",
           *_table(["data", "volumes", "mean Dice", *classes], rows)]
    ratio = dice.get("ratio")
    if ratio:
        r = ratio_with_interval
        out += ["Synthetic / real-test Dice (1 = the segmenter finds the anatomy in synthetic volumes as well as "
                "in real ones):", "", *_table(["mean", *classes], [[r(ratio["mean"]), *[r(ratio[c]) for c in classes
                                                                                    if c in ratio]]])]
    seg = dice.get("segmenter")
    if seg and "steps" in seg:
        out += [f"Segmenter: {seg['steps']} steps ({seg['epochs']} epochs) on {seg['n_volumes']} volumes, patch "
                f"{tuple(seg['patch'])}, weights sha256 `{seg.get('sha256')}`.", ""]
    elif seg:  # a saved segmenter given as --feature-weights (not trained in this run)
        out += [f"Segmenter: loaded from `{seg.get('weights')}`, weights sha256 `{seg.get('sha256')}`.", ""]
    return out


def _privacy_section(privacy: dict) -> list[str]:
    out = ["## Privacy audit (memorisation)", "",
           f"Nearest training scan of each of {privacy['n_synthetic']} synthetic volumes vs that of "
           f"{privacy['n_heldout']} real held-out volumes ({privacy['n_train']} training scans). A synthetic "
           "volume is flagged when it is closer to a training scan than the 5th percentile of the real "
           "held-out distances.", ""]
    rows = []
    for key in ("image", "feature"):
        if key in privacy:
            s = privacy[key]
            rows.append([s["metric"], s["threshold"], s["heldout_median"], s["synthetic_median"],
                         f"{100 * s['fraction_below']:.0f}%", ", ".join(s["flagged"]) or "none"])
    out += _table(["space", "threshold", "real median", "synthetic median", "flagged", "flagged ids"], rows)
    if privacy.get("exact_copies"):
        out += [f"**Exact copies of training scans:** {', '.join(privacy['exact_copies'])}", ""]
    out += _table(["closest synthetic", "training scan", "distance"],
                  [[p["synthetic"], p["train"], p["distance"]] for p in privacy["closest_pairs"]])
    if privacy.get("note"):
        out += [f"Note: {privacy['note']}.", ""]
    return out


def write_report(out: Path, metrics: dict, real: VolumeSet, synthetic: VolumeSet, partner: Sequence[int],
                 cfg: Config, slice_changes: tuple[torch.Tensor, torch.Tensor] | None = None) -> Path:
    """Write the figures and ``report.md`` into ``out``; returns the report path.

    ``slice_changes``: (real (B, D-1), synthetic (B', D-1)) adjacent-slice changes for the profile plot (D the
    largest depth; NaN past the end of a shorter volume).
    """
    out = Path(out)
    fig = lambda name: out / "figures" / name  # noqa: E731
    link = lambda alt, name: [f"![{alt}](figures/{name})", ""]  # noqa: E731
    inp = metrics["inputs"]
    train = f" — training set: `{inp['train']}` ({inp.get('n_train')} volumes)" if inp.get("train") else ""
    md = ["# medlsdm evaluation report", "",
          f"Real: `{inp['real']}` ({inp['n_real']} volumes) — synthetic: `{inp['synthetic']}` "
          f"({inp['n_synthetic']} volumes){train}. Config `{inp['config']}` (data shape (D, H, W) "
          f"{tuple(inp['shape'])}; volumes larger than it are evaluated whole, not cropped).", ""]
    md += ["## Real vs synthetic", "",
           *link("real vs synthetic", montage_figure(fig("montage.png"), real, synthetic, partner, cfg))]
    if "fidelity" in metrics:
        f = metrics["fidelity"]
        md += ["## Where the anatomy is: display window, per class, grid artefacts", "",
               f"Paired metrics in the {f['window']} (both volumes clamped to it) and over the full range; median "
               f"intensity of each labelled class ({f['unit']}, voxels pooled over all pairs); the grid-artifact ratio "
               "compares the periodic 4- and 2-voxel structure of the synthetic volumes with the real ones.", "",
               *fidelity_markdown(f), ""]
    if "paired" in metrics:
        md += _paired_section(metrics["paired"])
        md += link("paired metrics", paired_figure(fig("paired_metrics.png"), metrics["paired"]))
    if metrics.get("fid"):
        md += _fid_section(metrics["fid"]) + link("FID", fid_figure(fig("fid.png"), metrics["fid"]))
    if "inter_slice" in metrics:
        s = metrics["inter_slice"]
        md += ["## Inter-slice consistency", "",
               "Mean change between adjacent slices (divided by the volume's intensity std), pooled per set; the "
               "Wasserstein distance compares the two pools (lower = synthetic slices change like real ones).", "",
               *_table(["real mean", "synthetic mean", "Wasserstein"],
                       [[s["real_mean"], s["synthetic_mean"], s["wasserstein"]]])]
        if slice_changes is not None:
            md += link("inter-slice profile", slice_profile_figure(fig("inter_slice.png"), *slice_changes))
    if real.labelled:
        md += ["## Intensities per labelled class", "",
               *link("intensity histograms", histogram_figure(fig("histograms.png"), real, synthetic, partner, cfg))]
    if "dice" in metrics:
        md += _dice_section(metrics["dice"])
        md += link("Dice per class", dice_figure(fig("dice.png"), metrics["dice"]["table"]))
    if "privacy" in metrics:
        md += _privacy_section(metrics["privacy"])
        for path in metrics["privacy"].get("figures", []):
            md += link("closest pairs", Path(path).name)
    if metrics.get("notes"):
        md += ["## Notes", "", *[f"- {n}" for n in metrics["notes"]], ""]
    md += ["All numbers are in `metrics.json` beside this report."]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    return path
