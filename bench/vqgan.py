"""Stage-1 benchmark: train the ``tiny`` VQ-GAN on phantoms for a fixed CPU budget and measure it.

Records in BENCHMARKS.md: held-out PSNR / SSIM of reconstructions, the same for trilinear 4x
down-and-up sampling (the naive baseline), codebook usage and perplexity on the held-out set,
seconds per training step and peak memory.

    python bench/vqgan.py --minutes 15
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

import torch
import torch.nn.functional as F
from monai.metrics import PSNRMetric, SSIMMetric

from _common import WORK, command_line, header, peak_rss_gib, write_section
from medlsdm.config import load_config
from medlsdm.runs import latest_step
from medlsdm.data.dataset import VolumeDataset
from medlsdm.data.layouts import find_cases
from medlsdm.data.phantom import write_phantom_dataset
from medlsdm.runs import load_vqgan
from medlsdm.training.run import train_vqgan


def phantoms(n: int, shape: tuple[int, int, int]):
    root = WORK / f"phantoms_{n}_{'x'.join(map(str, shape))}"
    if not (root / "dataset.json").is_file():
        write_phantom_dataset(root, n, modality="ct", shape=shape, seed=0, test_fraction=0.2)
    return root


@torch.no_grad()
def evaluate(run, data, cfg) -> dict:
    vqgan, _ = load_vqgan(run, "cpu")
    test = VolumeDataset(find_cases(data, split="test"), cfg.data, with_images=True, with_labels=False)
    k = min(11, min(cfg.data.shape) // 2 * 2 - 1)
    metrics = {name: (PSNRMetric(max_val=2.0), SSIMMetric(spatial_dims=3, data_range=2.0, win_size=k))
               for name in ("vqgan", "trilinear")}
    counts = torch.zeros(cfg.vqgan.n_codes)
    factor = [1 / f for f in cfg.vqgan.downsample]
    for i in range(len(test)):
        x = test[i]["image"][None]
        rec, vq = vqgan(x)
        down = F.interpolate(x, scale_factor=factor, mode="trilinear", align_corners=False)
        naive = F.interpolate(down, size=x.shape[2:], mode="trilinear", align_corners=False)
        for name, y in (("vqgan", rec.clamp(-1, 1)), ("trilinear", naive)):
            for m in metrics[name]:
                m(y, x)
        counts += torch.bincount(vq.indices.flatten(), minlength=counts.numel())
    p = counts / counts.sum()
    out = {f"{name}_{kind}": m.aggregate().item() for name, ms in metrics.items() for kind, m in zip(("psnr", "ssim"), ms)}
    out["codebook_usage"] = float((counts > 0).float().mean())
    out["perplexity"] = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    out["test_cases"] = len(test)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=15.0, help="training wall-time budget (<= 20)")
    ap.add_argument("--cases", type=int, default=60)
    ap.add_argument("--fresh", action="store_true", help="retrain even if a finished run exists")
    args = ap.parse_args()
    cfg = load_config("tiny")
    data = phantoms(args.cases, cfg.data.shape)
    run = WORK / "vqgan"
    if args.fresh:
        shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    train_vqgan(data, "tiny", run, max_steps=100000, max_minutes=args.minutes, device="cpu")
    train_s = time.perf_counter() - t0
    steps = latest_step(run)
    res = evaluate(run, data, cfg)
    res.update(steps=steps, train_seconds=round(train_s, 1), seconds_per_step=round(train_s / max(steps, 1), 2),
               peak_rss_gib=round(peak_rss_gib(), 2))
    (WORK / "vqgan_bench.json").write_text(json.dumps(res, indent=2))
    gain = res["vqgan_psnr"] - res["trilinear_psnr"]
    md = "\n".join([
        "## VQ-GAN (stage 1), `tiny` preset on CPU", "", header(command_line()),
        f"Phantom CT set: {args.cases} cases of {cfg.data.shape} (D, H, W), {res['test_cases']} held out. "
        f"Training budget {args.minutes:g} min wall time: {steps} steps of batch {cfg.train_vqgan.batch_size} "
        f"({res['seconds_per_step']} s/step, discriminators on from step {cfg.vqgan.disc_start_step}), "
        f"perceptual loss: none (no weights file on this machine).", "",
        "| held-out reconstruction | PSNR (dB) | SSIM |", "|---|---|---|",
        f"| VQ-GAN ({cfg.vqgan.n_codes} x {cfg.vqgan.embedding_dim} codebook) | {res['vqgan_psnr']:.2f} | {res['vqgan_ssim']:.4f} |",
        f"| trilinear 4x down + up (baseline) | {res['trilinear_psnr']:.2f} | {res['trilinear_ssim']:.4f} |", "",
        f"PSNR gain over the baseline: **{gain:+.2f} dB**. Codebook usage on the held-out set: "
        f"{100 * res['codebook_usage']:.1f}% of {cfg.vqgan.n_codes} codes, perplexity {res['perplexity']:.1f}. "
        f"Peak memory (RSS): {res['peak_rss_gib']} GiB.", "",
        "Paper size (256 x 256 x 32, batch 2, bf16 on a GPU): not measured, this issue had no GPU.",
    ])
    write_section("vqgan", md)
    print(md)


if __name__ == "__main__":
    main()
