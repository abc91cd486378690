"""Stage-1 benchmark: train the ``tiny`` VQ-GAN on phantoms for a fixed CPU budget and measure it where the
anatomy is.

Each ``--variant`` is a data scale plus config overrides (see VARIANTS); its results go to
``bench/_work/vqgan_<variant>.json`` and the BENCHMARKS.md section lists every variant measured so far, so
the default can be chosen from figures. Per variant, on the held-out phantoms, for the VQ-GAN and for
trilinear 4x down-and-up sampling (the trivial codec that keeps one voxel in 64): PSNR / SSIM / MAE in the
CT display window and over the full range, the per-class median table (HU), the grid-artifact ratio, codebook
use, and the validation window-PSNR before and after the discriminators start.

    python bench/vqgan.py --variant default --minutes 15
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import WORK, command_line, header, peak_rss_gib, write_section

from medlsdm.config import load_config
from medlsdm.data.dataset import VolumeDataset
from medlsdm.data.layouts import find_cases
from medlsdm.data.phantom import PAPER_SPACING, ROI_CENTRE_MM, write_phantom_dataset
from medlsdm.evaluation.fidelity import fidelity, markdown
from medlsdm.io import atomic_write_text
from medlsdm.runs import latest_step, load_vqgan
from medlsdm.training.run import train_vqgan

# data scale: "abdomen" = the whole 384 x 384 mm abdomen in 64 x 64 (6 mm voxels, the old tiny data);
# "paper" = a 128 x 128 x 48 mm region at the paper's AutoPET voxel size (3 x 2 x 2 mm)
SCALES = {"abdomen": dict(spacing=None, centre=(0.0, 0.0, 0.0)),
          "paper": dict(spacing=PAPER_SPACING, centre=ROI_CENTRE_MM)}
OLD = {"data": {"spacing": None},
       "vqgan": {"upsample": "transpose", "window_l1_weight": 0.0, "disc_start_step": 400},
       "train_vqgan": {"keep_best": None}}
VARIANTS = {
    # the tiny preset before issue 12: whole abdomen at 6 mm, transposed convs, L1 over -1000..1000 HU only
    "old": ("abdomen", OLD),
    "old-paper-scale": ("paper", {**OLD, "data": {"spacing": list(PAPER_SPACING)}}),  # the same at the new scale
    "default": ("paper", {}),  # the tiny preset as it is now
    # the display-window L1 term, and with it transposed convs or a GAN phase inside the 15 minutes
    "window-l1": ("paper", {"vqgan": {"window_l1_weight": 4.0}}),
    "window-l1-transpose": ("paper", {"vqgan": {"upsample": "transpose", "window_l1_weight": 4.0}}),
    "window-l1-gan-at-1000": ("paper", {"vqgan": {"disc_start_step": 1000, "window_l1_weight": 4.0}}),
}


def phantoms(n: int, shape: tuple[int, int, int], scale: str = "paper", lesions: str = "mixed", seed: int = 0,
             test_fraction: float = 0.2) -> Path:
    """The bench's phantom data set (written once under bench/_work): seed 0 with a 20% test split is the shared
    one; another generator ``seed`` gives other subjects (e.g. all ``n`` as a held-out set, ``test_fraction`` 0)."""
    root = WORK / (f"phantoms_{scale}_{n}_{'x'.join(map(str, shape))}" + ("" if lesions == "mixed" else f"_{lesions}")
                   + ("" if (seed, test_fraction) == (0, 0.2) else f"_seed{seed}_test{test_fraction:g}"))
    if not (root / "dataset.json").is_file():
        write_phantom_dataset(root, n, modality="ct", shape=shape, seed=seed, test_fraction=test_fraction,
                              lesions=lesions, **SCALES[scale])
    return root


def trilinear(x: torch.Tensor, factor) -> torch.Tensor:
    """The trivial codec: trilinear down-sampling by ``factor`` per axis and back up. x: (B, 1, D, H, W)."""
    down = F.interpolate(x, scale_factor=[1 / f for f in factor], mode="trilinear", align_corners=False)
    return F.interpolate(down, size=x.shape[2:], mode="trilinear", align_corners=False)


@torch.no_grad()
def evaluate(run: Path, data: Path, cfg) -> dict:
    vqgan, _ = load_vqgan(run, "cpu")
    test = VolumeDataset(find_cases(data, split="test"), cfg.data, with_images=True, with_labels=True)
    real, rec, naive, labels = [], [], [], []
    counts = torch.zeros(cfg.vqgan.n_codes)
    for i in range(len(test)):
        item = test[i]
        x = item["image"][None]
        y, vq = vqgan(x)
        real.append(x[0])
        rec.append(y[0].clamp(-1, 1))
        naive.append(trilinear(x, cfg.vqgan.downsample)[0])
        labels.append(item["label"])
        counts += torch.bincount(vq.indices.flatten(), minlength=counts.numel())
    p = counts / counts.sum()
    return {
        "vqgan": fidelity(rec, real, labels, cfg.data),
        "trilinear": fidelity(naive, real, labels, cfg.data),
        "codebook_usage": float((counts > 0).float().mean()),
        "perplexity": float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())),
        "test_cases": len(test),
    }


def validation_curve(run: Path) -> list[tuple[int, float, float]]:
    """(step, val PSNR full range, val PSNR in the display window) from the run's metrics.csv."""
    rows: dict[int, dict[str, float]] = {}
    with open(run / "metrics.csv") as fh:
        for step, split, name, value in csv.reader(fh):
            if split == "val" and name in ("psnr", "psnr_window"):
                rows.setdefault(int(step), {})[name] = float(value)
    return [(s, v.get("psnr", float("nan")), v.get("psnr_window", float("nan"))) for s, v in sorted(rows.items())]


def gan_phase(curve, disc_start: int, run: Path) -> dict:
    """Validation window PSNR at the last validation before the discriminators start and at the end, and the
    step whose weights the run uses (``best/best.json`` with ``train.keep_best``, else the last)."""
    best = run / "best" / "best.json"
    kept = json.loads(best.read_text())["step"] if best.is_file() else (curve[-1][0] if curve else None)
    before = [c for c in curve if c[0] <= disc_start]
    after = [c for c in curve if c[0] > disc_start]
    return {"pre_gan_step": before[-1][0] if before else None, "pre_gan_psnr_window": before[-1][2] if before else None,
            "pre_gan_psnr": before[-1][1] if before else None, "end_psnr": curve[-1][1] if curve else None,
            "end_step": curve[-1][0] if curve else None, "end_psnr_window": curve[-1][2] if curve else None,
            "gan_steps": (curve[-1][0] - disc_start) if after else 0, "used_step": kept}


def section() -> str:
    """The BENCHMARKS.md section: every variant measured so far, then the details of each."""
    files = {v: WORK / f"vqgan_{v}.json" for v in VARIANTS}
    results = {v: json.loads(f.read_text()) for v, f in files.items() if f.is_file()}
    lines = ["## VQ-GAN (stage 1), `tiny` preset on CPU, measured where the anatomy is", "",
             "Held-out phantoms (CT), reconstructed by the VQ-GAN and by the trivial codec (trilinear 4x down + up, "
             "one voxel in 64 kept). *Window* = the CT display window -160..240 HU (both volumes clamped to it); "
             "*full* = -1000..1000 HU. Targets (issue 12): window PSNR >= trilinear + 3 dB, window SSIM >= "
             "trilinear + 0.05, grid ratio <= 1.2, no class with >= 200 voxels off by more than 20 HU in median, GAN "
             "phase ending within 0.5 dB of the pre-GAN validation window PSNR.", "",
             "| variant | data | steps (min) | window PSNR VQ-GAN / trilinear | window SSIM VQ-GAN / trilinear | "
             "full PSNR VQ-GAN / trilinear | worst class error (HU, >= 200 voxels) | grid ratio VQ-GAN / trilinear | "
             "val window PSNR pre-GAN -> end |", "|---|---|---|---|---|---|---|---|---|"]
    for v, r in results.items():
        vq, tri = r["vqgan"], r["trilinear"]
        worst = max((abs(c["error"]) for c in vq["classes"] if c["voxels"] >= 200), default=float("nan"))
        g = r["gan_phase"]
        window = g["end_psnr_window"] == g["end_psnr_window"]  # runs from before the window metric logged only full
        pre, end = (g["pre_gan_psnr_window"], g["end_psnr_window"]) if window else (g["pre_gan_psnr"], g["end_psnr"])
        pre = "–" if pre is None else f"{pre:.2f}"
        end = ("–" if end is None else f"{end:.2f}") + ("" if window else " (full range)")
        lines.append(
            f"| `{v}` | {r['scale']} | {r['steps']} ({r['minutes']:g}) | "
            f"{vq['window_metrics']['window']['psnr']:.2f} / "
            f"{tri['window_metrics']['window']['psnr']:.2f} | {vq['window_metrics']['window']['ssim']:.3f} / "
            f"{tri['window_metrics']['window']['ssim']:.3f} | {vq['window_metrics']['full']['psnr']:.2f} / "
            f"{tri['window_metrics']['full']['psnr']:.2f} | {worst:.1f} | {vq['grid']['max']:.2f} / "
            f"{tri['grid']['max']:.2f} | {pre} -> {end} ({g['gan_steps']} GAN steps; weights "
            f"used: step {g['used_step']}) |")
    lines.append("")
    for v, r in results.items():
        lines += [f"### `{v}`", "", header(r["command"]),
                  f"Data: {r['data_note']}. Config overrides of the tiny preset: `{json.dumps(r['overrides'])}`. "
                  f"{r['steps']} steps of batch {r['batch_size']} in {r['minutes']:g} min "
                  f"({r['seconds_per_step']} s/step), discriminators from step {r['disc_start']}, perceptual loss: "
                  "none (no weights file on this machine). "
                  f"Codebook use on the held-out set {100 * r['codebook_usage']:.1f}% of {r['n_codes']}, perplexity "
                  f"{r['perplexity']:.1f}; peak RSS {r['peak_rss_gib']} GiB. "
                  "Validation (step, full PSNR, window PSNR): "
                  + ", ".join(f"{s}: {a:.1f}/{b:.1f}" for s, a, b in r["curve"]) + ".", "",
                  "VQ-GAN:", "", *markdown(r["vqgan"], other="VQ-GAN", real="real"), "",
                  "Trilinear 4x down + up:", "", *markdown(r["trilinear"], other="trilinear", real="real"), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="default")
    ap.add_argument("--minutes", type=float, default=15.0, help="training wall-time budget (<= 20)")
    ap.add_argument("--cases", type=int, default=60)
    ap.add_argument("--fresh", action="store_true", help="retrain even if a finished run exists")
    ap.add_argument("--report-only", action="store_true", help="rewrite the BENCHMARKS.md section from saved results")
    args = ap.parse_args()
    if not args.report_only:
        scale, overrides = VARIANTS[args.variant]
        run = WORK / f"vqgan_{args.variant}"
        WORK.mkdir(parents=True, exist_ok=True)
        config = WORK / f"vqgan_{args.variant}.yaml"
        atomic_write_text(config, json.dumps({"base": "tiny", **overrides}))  # JSON is YAML
        cfg = load_config(config)
        data = phantoms(args.cases, cfg.data.shape, scale)
        if args.fresh:
            shutil.rmtree(run, ignore_errors=True)
        timing = run / "bench_train_seconds"
        if latest_step(run) is None or not timing.is_file():  # a run without its timing is retrained
            shutil.rmtree(run, ignore_errors=True)
            t0 = time.perf_counter()
            train_vqgan(data, config, run, max_steps=100000, max_minutes=args.minutes, device="cpu", progress=False,
                        overwrite=True)
            timing.write_text(f"{time.perf_counter() - t0:.1f}\n")
        train_s = float(timing.read_text())
        steps = latest_step(run)
        res = evaluate(run, data, cfg)
        curve = validation_curve(run)
        res.update(variant=args.variant, scale=scale, overrides=overrides, command=command_line(), steps=steps,
                   minutes=args.minutes, batch_size=cfg.train_vqgan.batch_size, n_codes=cfg.vqgan.n_codes,
                   train_seconds=round(train_s, 1), seconds_per_step=round(train_s / max(steps, 1), 2),
                   peak_rss_gib=round(peak_rss_gib(), 2), disc_start=cfg.vqgan.disc_start_step, curve=curve,
                   gan_phase=gan_phase(curve, cfg.vqgan.disc_start_step, run),
                   data_note=f"{args.cases} phantoms of {tuple(cfg.data.shape)} (D, H, W), {res['test_cases']} "
                   "held out, "
                   + ("the whole abdomen at ~6 mm" if scale == "abdomen" else
                      f"a region at {PAPER_SPACING} mm (the paper's AutoPET voxels) around {ROI_CENTRE_MM} mm"))
        (WORK / f"vqgan_{args.variant}.json").write_text(json.dumps(res, indent=2))
    md = section()
    write_section("vqgan", md)
    print(md)


if __name__ == "__main__":
    main()
