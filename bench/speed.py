"""Efficiency figures: training step time and memory, sampling time per sampler, growth with depth
(full-length volumes on depth windows, with the seam metric), model FLOPs, and the effect of every
sampling switch (SPADE cache, volume batching, window batching, bf16, torch.compile, ranks).

Sampling uses the LDM run of ``bench/ldm.py`` (``--run``); timings do not depend on how well it is
trained, the seam ratio does. Every memory figure is the peak RSS of a child process that does just
that one thing (Linux ``ru_maxrss``), so figures do not leak into each other.

    python bench/speed.py [--run bench/_work/ldm_v-codebook]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import torch
from _common import ROOT, WORK, command_line, header, run_child, write_section

from medlsdm.data.phantom import PAPER_SPACING, ROI_CENTRE_MM, phantom_affine

HERE = Path(__file__).resolve()


# ---- measurements, each run in its own child process ---------------------------------------------
def long_label_map(depth: int, seed: int = 3, in_plane: tuple[int, int] = (64, 64)) -> torch.Tensor:
    """A phantom label map of ``depth`` slices at the training voxel size (the tiny preset's 3 x 2 x 2 mm region):
    the region grows along depth (spine and vessels continue, organs occupy their usual band).
    (1, 1, depth, H, W) long."""
    import medlsdm.data.phantom as ph

    _, lab = ph.generate_phantom(seed, (depth, *in_plane), spacing=ph.PAPER_SPACING, centre=ph.ROI_CENTRE_MM)
    return torch.from_numpy(lab).long()[None, None]


def child_sample(spec: dict) -> dict:
    from medlsdm.diffusion.windows import DepthWindows
    from medlsdm.evaluation.metrics import seam_ratio
    from medlsdm.pipeline import SynthesisPipeline

    pipe = SynthesisPipeline.from_pretrained(spec["run"], device="cpu").configure(**spec.get("options", {}))
    lab = long_label_map(spec["depth"]).repeat(spec.get("batch", 1), 1, 1, 1, 1)
    gens = [torch.Generator().manual_seed(k) for k in range(lab.shape[0])]
    # warm-up outside the timing: a fresh process pays one-time kernel and allocator set-up at its first call;
    # with "warmup" (torch.compile) the whole first call, whose time is reported separately
    t0 = time.perf_counter()
    pipe.generate(lab, spec["sampler"] if spec.get("warmup") else "ddim", spec["steps"] if spec.get("warmup") else 1,
                  generator=gens)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    vol = pipe.generate(lab, spec["sampler"], spec["steps"], generator=[torch.Generator().manual_seed(k)
                                                                       for k in range(lab.shape[0])])
    seconds = time.perf_counter() - t0
    out = {"seconds_per_volume": seconds / lab.shape[0],
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if spec.get("warmup"):
        out["first_call_seconds"] = warm / lab.shape[0]
    latent_depth = lab.shape[2] // pipe.diffusion.unet.image_down[0]
    if latent_depth > pipe.window:
        windows = DepthWindows(latent_depth, pipe.window, pipe.overlap)
        borders = windows.borders(scale=pipe.diffusion.unet.image_down[0])
        out["seam_ratio"] = seam_ratio(vol[0, 0], borders, period=pipe.diffusion.unet.image_down[0])
        out["windows"] = len(windows)
    if spec.get("save"):
        torch.save(vol[0, 0].half(), spec["save"])
    return out


def child_train(spec: dict) -> dict:
    """Seconds per optimiser step (steps 6..N of a fresh run, after warm-up) and peak RSS."""
    from medlsdm.training.run import train_ldm, train_vqgan

    work = Path(spec["work"])
    cfg = work / f"{spec['name']}.yaml"
    cfg.write_text(spec["yaml"])
    warm, total = 5, spec["steps"]
    fn = train_vqgan if spec["stage"] == "vqgan" else train_ldm
    args = (spec["data"],) if spec["stage"] == "vqgan" else (spec["vqgan"], spec["data"])
    run = work / spec["name"]
    fn(*args, cfg, run, max_steps=warm, device="cpu", progress=False, overwrite=True)
    t0 = time.perf_counter()
    fn(*args, cfg, run, max_steps=total, resume=True, device="cpu", progress=False)
    return {"seconds_per_step": (time.perf_counter() - t0) / (total - warm),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def child_ranks(spec: dict) -> dict:
    """Wall time of ``medlsdm sample`` for a folder of label maps, one process or two under torchrun."""
    out = Path(spec["out"])
    base = ["-m", "medlsdm", "sample", "--model", spec["run"], "--labels", spec["labels"], "--out", str(out),
            "--steps", str(spec["steps"]), "--device", "cpu"]
    if spec["procs"] > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(spec["procs"]),
               "--master_port", "29533", *base]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // spec["procs"]))}
    else:
        cmd, env = [sys.executable, *base], dict(os.environ)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True, cwd=ROOT)
    return {"wall_seconds": time.perf_counter() - t0, "volumes": len(list(out.glob("*.nii.gz")))}


# ---- FLOPs -----------------------------------------------------------------------------------------
def flops(preset: str) -> dict:
    """Forward FLOPs of one U-Net call (batch 1) and one VQ-GAN decode at ``preset`` size (counted by
    ``torch.utils.flop_counter`` on the meta device: nothing is computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    from medlsdm.autoencoder.build import build_vqgan
    from medlsdm.config import load_config
    from medlsdm.pipeline import build_diffusion

    cfg = load_config(preset)
    d, h, w = cfg.data.shape
    f = cfg.vqgan.downsample
    latent = (1, cfg.vqgan.embedding_dim, d // f[0], h // f[1], w // f[2])
    unet, vq = build_diffusion(cfg).unet.eval().to("meta"), build_vqgan(cfg.vqgan).eval().to("meta")
    with torch.device("meta"):
        x, t = torch.zeros(latent), torch.zeros(1, dtype=torch.long)
        lab = torch.zeros(1, cfg.data.num_classes, d, h, w)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            unet(x, t, lab)
        unet_flops = counter.get_total_flops()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            vq.decode(x)
        dec_flops = counter.get_total_flops()
    return {"unet_gflops": unet_flops / 1e9, "decode_gflops": dec_flops / 1e9,
            "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6}


# ---- main ------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", type=Path, default=WORK / "ldm_v-codebook", help="LDM run (bench/ldm.py)")
    ap.add_argument("--steps", type=int, default=25, help="sampling steps (DDIM / DPM++) for the switch table")
    ap.add_argument("--quick", action="store_true", help="smoke test: few steps, short depths, no BENCHMARKS.md")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, spec = args.child[0], json.loads(args.child[1])
        print(json.dumps({"sample": child_sample, "train": child_train, "ranks": child_ranks}[kind](spec)))
        return

    run, steps, t_start = str(args.run), (2 if args.quick else args.steps), time.perf_counter()
    train_steps, ddpm_steps, depths = (7, 2, (16, 32, 64)) if args.quick else (25, 1000, (16, 32, 64, 128, 256))
    work = WORK / "speed"
    work.mkdir(parents=True, exist_ok=True)
    data = WORK / "phantoms_paper_60_16x64x64"  # bench/vqgan.py's phantom set

    def sample(depth=16, sampler="ddim", n=steps, **kw):
        return run_child(HERE, "sample", {"run": run, "depth": depth, "sampler": sampler, "steps": n, **kw})

    # 1. training steps
    train_rows = []
    for name, stage, yaml, extra in [
        ("vqgan", "vqgan", "base: tiny\nvqgan:\n  disc_start_step: 1\n", {}),
        ("ldm", "ldm", "base: tiny\n", {"vqgan": str(WORK / "vqgan_default")}),
        ("ldm-ckpt", "ldm", "base: tiny\nldm:\n  use_checkpoint: true\n", {"vqgan": str(WORK / "vqgan_default")}),
    ]:
        src = str(data) if stage == "vqgan" else str(WORK / "latents")
        r = run_child(HERE, "train", {"work": str(work), "name": name, "stage": stage, "yaml": yaml,
                                      "steps": train_steps, "data": src, **extra})
        train_rows.append((name, r))
        shutil.rmtree(work / name, ignore_errors=True)

    # 2. samplers at the training shape
    sampler_rows = [(f"{s.upper()}-{n}", sample(sampler=s, n=n)) for s, n in
                    [("ddim", 10), ("ddim", 25), ("ddim", 50), ("dpm++", 10), ("dpm++", 25)]]
    sampler_rows.append(("DDPM-1000", sample(sampler="ddpm", n=ddpm_steps)))

    # 3. switches (reference path: cache on, batch 1, window batch 1, fp32, eager)
    big = depths[-2]
    ref16, ref_big = sample(), sample(depth=big)
    switch_rows = [
        ("reference (SPADE cache, fp32, eager), 16 slices", ref16),
        ("SPADE cache off, 16 slices", sample(options={"spade_cache": False})),
        ("4 volumes per U-Net call, 16 slices", sample(batch=4)),
        ("bf16 autocast, 16 slices", sample(options={"sample_precision": "bf16"})),
        ("torch.compile (second call), 16 slices", sample(options={"sample_compile": True}, warmup=True)),
        (f"reference, {big} slices", ref_big),
        (f"4 depth windows per U-Net call, {big} slices", sample(depth=big, options={"window_batch": 4})),
    ]
    labels = work / "rank_labels"
    labels.mkdir(exist_ok=True)
    for k in range(4):
        lab = long_label_map(16, seed=20 + k)[0, 0].numpy().astype("uint8")
        nib.save(nib.Nifti1Image(lab.transpose(2, 1, 0), phantom_affine(PAPER_SPACING, lab.shape, ROI_CENTRE_MM)),
                 str(labels / f"case{k}.nii.gz"))
    ranks = {}
    for procs in (1, 2):
        shutil.rmtree(work / f"ranks{procs}", ignore_errors=True)
        ranks[procs] = run_child(HERE, "ranks", {"run": run, "labels": str(labels), "out": str(work / f"ranks{procs}"),
                                           "steps": steps, "procs": procs})

    # 4. depth
    depth_rows = [(d, sample(depth=d, save=str(work / f"long_{d}.pt") if d == depths[-1] else None))
                  for d in depths]
    # 5. FLOPs
    fl = {p: flops(p) for p in ("tiny", "paper")}

    # ---- report
    lines = ["## Speed and memory (`bench/speed.py`)", "", header(command_line()),
             f"LDM run: `{Path(run).relative_to(ROOT) if Path(run).is_relative_to(ROOT) else run}` (tiny preset, "
             f"16 x 64 x 64 volumes, latent 8 x 4 x 16 x 16). Every figure is one child process on this machine's "
             f"2 cores; memory is that process's peak RSS (model, data and Python included). Whole script "
             f"{{total}} min.", "",
             "**Training** (batch of the tiny preset; steps 6-25 of a fresh run):", "",
             "| stage | s / step | peak RSS (GiB) |", "|---|---|---|"]
    labels_ = {"vqgan": "VQ-GAN (generator + both discriminators)", "ldm": "LDM U-Net",
               "ldm-ckpt": "LDM U-Net, gradient checkpointing"}
    lines += [f"| {labels_[n]} | {r['seconds_per_step']:.3f} | {r['peak_rss_gib']:.2f} |" for n, r in train_rows]
    lines += ["", "**Sampling one 16-slice volume** (label map -> NIfTI-ready volume, VQ-GAN decode included):", "",
              "| sampler | s / volume | x faster than DDPM-1000 |", "|---|---|---|"]
    ddpm = sampler_rows[-1][1]["seconds_per_volume"]
    lines += [f"| {n} | {r['seconds_per_volume']:.2f} | {ddpm / r['seconds_per_volume']:.0f} |"
              for n, r in sampler_rows]
    lines += ["", f"**Sampling switches** (DDIM-{steps}; each row changes one thing against the reference):", "",
              "| setting | s / volume | vs reference | peak RSS (GiB) |", "|---|---|---|---|"]
    for n, r in switch_rows:
        ref = ref_big if f"{big} slices" in n else ref16
        extra = f" (first call {r['first_call_seconds']:.1f} s)" if "first_call_seconds" in r else ""
        lines.append(f"| {n}{extra} | {r['seconds_per_volume']:.2f} | "
                     f"{ref['seconds_per_volume'] / r['seconds_per_volume']:.2f}x | {r['peak_rss_gib']:.2f} |")
    lines += ["", "Ranks: 4 label maps with `medlsdm sample`, "
              f"1 process (2 threads) {ranks[1]['wall_seconds']:.1f} s, "
              f"2 processes under torchrun (1 thread each) {ranks[2]['wall_seconds']:.1f} s "
              "(process start-up included; "
              f"{ranks[2]['volumes']} volumes written, each once).", "",
              f"**Full-length volumes** (phantom label maps at the training slice spacing, 64 x 64 in-plane, depth "
              f"windows of 16 slices with half overlap, DDIM-{steps}):", "",
              "| slices | windows | s / volume | s / slice vs 32 slices | peak RSS (GiB) | seam ratio |",
              "|---|---|---|---|---|---|"]
    per32 = dict(depth_rows)[32]["seconds_per_volume"] / 32
    for d, r in depth_rows:
        lines.append(f"| {d} | {r.get('windows', 1)} | {r['seconds_per_volume']:.1f} | "
                     f"{r['seconds_per_volume'] / d / per32:.2f} | {r['peak_rss_gib']:.2f} | "
                     f"{r['seam_ratio']:.3f} |" if "seam_ratio" in r else
                     f"| {d} | 1 | {r['seconds_per_volume']:.1f} | {r['seconds_per_volume'] / d / per32:.2f} | "
                     f"{r['peak_rss_gib']:.2f} | - |")
    lines += ["", "Seam ratio: mean |x[b] - x[b-1]| across window borders b over the same at matching positions "
              "inside windows (`medlsdm.evaluation.metrics.seam_ratio`; 1 = no seam, target <= 1.1).", "",
              "**Model FLOPs** (forward, batch 1, counted on the meta device):", "",
              "| preset | latent | U-Net GFLOPs / step | U-Net params (M) | VQ-GAN decode GFLOPs |",
              "|---|---|---|---|---|"]
    shapes = {"tiny": "8 x 4 x 16 x 16", "paper": "8 x 8 x 64 x 64"}
    lines += [f"| {p} | {shapes[p]} | {r['unet_gflops']:.2f} | {r['unet_params_m']:.2f} | {r['decode_gflops']:.2f} |"
              for p, r in fl.items()]
    lines += ["",
              "On a GPU (paper size, bf16, achieved fraction of peak throughput): not measured, this issue had no GPU."]
    md = "\n".join(lines).replace("{total}", f"{(time.perf_counter() - t_start) / 60:.1f}")
    (work / "speed.json").write_text(json.dumps({"train": train_rows, "samplers": sampler_rows, "switches": switch_rows,
                                                 "ranks": ranks, "depth": depth_rows, "flops": fl}, indent=2))
    if not args.quick:
        write_section("speed", md)
    print(md)


if __name__ == "__main__":
    main()
