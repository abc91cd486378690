"""Stage-2 benchmark: does the latent semantic diffusion model follow the label map, and how fast?

Uses the VQ-GAN trained by ``bench/vqgan.py`` (its training time counts towards the budget), encodes
the phantom set, trains the ``tiny`` LDM for the remaining budget, then generates one volume per
held-out label map and records in BENCHMARKS.md:
- per-class intensity error (|median synthetic - median real| per class / spread of the real class
  medians) for matched pairs and for a control pairing each synthetic volume with a *different* label
  map (and that map's real volume): a model that follows its label map is much better on matched pairs;
- SSIM / PSNR to the real volume of the same label map;
- seconds per volume and the error reached for DDPM-1000, DDIM-50 and DDIM-25.

    python bench/ldm.py --minutes 10 --ddpm-cases 3 [--latent-norm standardize]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from _common import WORK, command_line, header, peak_rss_gib, write_section
from medlsdm.config import load_config
from medlsdm.runs import latest_step
from medlsdm.data.layouts import find_cases
from medlsdm.data.transforms import load_case
from medlsdm.evaluation.metrics import class_intensity_error, psnr, ssim
from medlsdm.pipeline import SynthesisPipeline
from medlsdm.training.latents import encode_dataset, is_latents_dir
from medlsdm.training.run import train_ldm
from vqgan import phantoms


def score(pipe, cases, sampler: str, steps: int, num_classes: int) -> dict:
    synth, times = [], []
    for i, (real, label) in enumerate(cases):
        g = torch.Generator().manual_seed(1000 + i)
        t0 = time.perf_counter()
        vol = pipe.generate(label[None], sampler=sampler, steps=steps, generator=g)[0, 0]
        times.append(time.perf_counter() - t0)
        synth.append(vol)
    n = len(cases)
    matched = [class_intensity_error(synth[i], cases[i][0][0], cases[i][1][0], num_classes) for i in range(n)]
    shifted = [class_intensity_error(synth[i], cases[(i + 1) % n][0][0], cases[(i + 1) % n][1][0], num_classes)
               for i in range(n)]
    reals = torch.stack([c[0] for c in cases])
    return {"sampler": f"{sampler.upper()}-{steps}", "cases": n, "seconds_per_volume": sum(times) / n,
            "matched_error": sum(matched) / n, "mismatched_error": sum(shifted) / n,
            "ssim": ssim(torch.stack(synth)[:, None], reals), "psnr": psnr(torch.stack(synth)[:, None], reals)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=12.0, help="LDM training wall-time budget")
    ap.add_argument("--cases", type=int, default=60, help="phantom set size (must match bench/vqgan.py)")
    ap.add_argument("--ddpm-cases", type=int, default=4, help="held-out label maps sampled with DDPM-1000")
    ap.add_argument("--latent-norm", choices=["codebook", "standardize"], default="codebook",
                    help="latent normalisation (codebook: the paper's and the default)")
    args = ap.parse_args()
    cfg = load_config("tiny", {"ldm": {"latent_norm": args.latent_norm}})
    data = phantoms(args.cases, cfg.data.shape)
    vq_run, lat, run = WORK / "vqgan", WORK / "latents", WORK / f"ldm_{args.latent_norm}"
    config = WORK / f"ldm_{args.latent_norm}.yaml"
    config.write_text(f"base: tiny\nldm:\n  latent_norm: {args.latent_norm}\n")
    vq_info = json.loads((WORK / "vqgan_bench.json").read_text())  # run bench/vqgan.py first
    if not is_latents_dir(lat):
        encode_dataset(vq_run, data, lat, device="cpu")
    t0 = time.perf_counter()
    train_ldm(vq_run, lat, config, run, max_steps=100000, max_minutes=args.minutes, device="cpu")
    train_s = time.perf_counter() - t0
    steps = latest_step(run)

    pipe = SynthesisPipeline.from_pretrained(run, device="cpu")
    cases = []
    for case in find_cases(data, split="test"):
        item = load_case(case, pipe.cfg.data)
        cases.append((item["image"], item["label"]))
    rows = [score(pipe, cases, "ddim", 25, cfg.data.num_classes), score(pipe, cases, "ddim", 50, cfg.data.num_classes)]
    sub = cases[: args.ddpm_cases]
    rows_sub = [score(pipe, sub, "ddpm", 1000, cfg.data.num_classes), score(pipe, sub, "ddim", 50, cfg.data.num_classes)]
    result = {"ldm_steps": steps, "ldm_train_seconds": round(train_s, 1), "vqgan_train_seconds": vq_info["train_seconds"],
              "all_cases": rows, "ddpm_subset": rows_sub, "peak_rss_gib": round(peak_rss_gib(), 2)}
    (WORK / f"ldm_{args.latent_norm}_bench.json").write_text(json.dumps(result, indent=2))

    def line(r: dict) -> str:
        return (f"| {r['sampler']} | {r['cases']} | {r['matched_error']:.3f} | {r['mismatched_error']:.3f} | "
                f"{r['ssim']:.3f} | {r['psnr']:.2f} | {r['seconds_per_volume']:.2f} |")

    ddpm, ddim = rows_sub
    total_min = (vq_info["train_seconds"] + train_s) / 60
    md = "\n".join([
        f"## Latent semantic diffusion (stage 2), `tiny` preset on CPU, latent_norm = {args.latent_norm}", "",
        header(command_line()),
        f"VQ-GAN from `bench/vqgan.py` ({vq_info['steps']} steps, {vq_info['train_seconds'] / 60:.1f} min); LDM "
        f"{steps} steps of batch {cfg.train_ldm.batch_size} in {train_s / 60:.1f} min (total training "
        f"{total_min:.1f} min). Cosine schedule, T = {cfg.ldm.num_timesteps}, eps objective, L2 loss, EMA weights, "
        f"guidance scale {cfg.ldm.guidance_scale:g}. One volume per held-out phantom label map.", "",
        "Class error = mean over classes of |median synthetic - median real| / std of the real class medians "
        "(lower is better). *Mismatched* pairs each synthetic volume with the next case's label map and real volume: "
        "the control that shows whether the label map is followed.", "",
        "| sampler | label maps | class error, matched | class error, mismatched | SSIM | PSNR (dB) | s / volume |",
        "|---|---|---|---|---|---|---|", *[line(r) for r in rows], *[line(r) for r in rows_sub], "",
        f"DDIM-50 vs DDPM-1000 on the same {len(sub)} label maps: matched class error {ddim['matched_error']:.3f} vs "
        f"{ddpm['matched_error']:.3f}, {ddpm['seconds_per_volume'] / ddim['seconds_per_volume']:.1f}x less sampling time. "
        f"Peak memory (RSS): {result['peak_rss_gib']} GiB.", "",
        "Paper size on a GPU: not measured, this issue had no GPU.",
    ])
    write_section(f"ldm-{args.latent_norm}", md)
    print(md)


if __name__ == "__main__":
    main()
