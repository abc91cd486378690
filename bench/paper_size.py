"""Paper size, measured: every stage of the ``paper`` preset on 32 x 256 x 256 phantoms, a few steps each.

Records, each in its own child process (so peak memory is the stage's own):
- VQ-GAN training: seconds per optimiser step with the discriminators on (the costlier phase), peak memory;
- LDM training on latents of that VQ-GAN: seconds per step, peak memory;
- sampling one volume with the preset's sampler (DPM-Solver++, 25 steps, decode and quantisation included);
- one validation of each training run (the LDM's includes its preview, ``train.preview_steps`` DDIM steps of one
  volume), against the training time of the ``val_every`` steps it follows;
- the U-Net's and the decoder's forward FLOPs (counted on the meta device) and the achieved TFLOP/s of sampling.

The weights are a few steps old: the figures are about time and memory, never about quality. The perceptual
loss is off (the preset's ``perceptual_backbone: none``; with VGG16 weights a VQ-GAN step costs more).

    python bench/paper_size.py [--device cuda] [--train-steps 3] [--set keep_depth=true ...]

On a GPU (``--device cuda``) training and sampling run in bf16 (the ``auto`` precision) and peak memory is
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import torch
import yaml
from _common import WORK, command_line, header, run_child, write_section

HERE = Path(__file__).resolve()
SHAPE = (32, 256, 256)


def _peak(device: str) -> float:
    """Peak memory in GiB: the GPU's allocator peak on CUDA, else the process's peak RSS."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- children ----------------------------------------------------------------------------------------
def child_train(spec: dict) -> dict:
    """Seconds per optimiser step (the engine's own step, data loading included; steps after the first, which
    pays the set-up), seconds of one validation (VQ-GAN: reconstruction metrics of the validation volumes; LDM:
    diffusion loss and the sampled preview) and peak memory."""
    from medlsdm.training import engine
    from medlsdm.training.run import train_ldm, train_vqgan

    timings: dict[str, list[float]] = {"_train_step": [], "run_validation": []}
    for name in timings:  # time the engine's step and validation where they run, nothing else
        original = getattr(engine.Trainer, name)

        def timed(self, *a, _original=original, _name=name, **kw):
            _sync(spec["device"])
            t0 = time.perf_counter()
            out = _original(self, *a, **kw)
            _sync(spec["device"])
            timings[_name].append(time.perf_counter() - t0)
            return out

        setattr(engine.Trainer, name, timed)
    cfg, run, dev = Path(spec["config"]), Path(spec["run"]), spec["device"]
    if spec["stage"] == "vqgan":
        fn, args = train_vqgan, (Path(spec["data"]),)
    else:
        fn, args = train_ldm, (Path(spec["vqgan"]), Path(spec["data"]))
    fn(*args, cfg, run, max_steps=1 + spec["steps"], device=dev, progress=False)
    steps = timings["_train_step"][1:]
    return {"seconds_per_step": sum(steps) / len(steps), "validation_seconds": timings["run_validation"][-1],
            "peak_gib": _peak(dev)}


def child_sample(spec: dict) -> dict:
    """Seconds to sample one volume (sampler and guidance of the preset, decode included) and peak memory."""
    from medlsdm.data.layouts import find_cases
    from medlsdm.data.transforms import load_case
    from medlsdm.pipeline import SynthesisPipeline

    dev = spec["device"]
    pipe = SynthesisPipeline.from_pretrained(spec["run"], device=dev)
    case = next(iter(find_cases(Path(spec["data"]), split="test")))
    lab = load_case(case, pipe.cfg.data)["label"][None].to(pipe.device)  # (1, 1, D, H, W)
    pipe.generate(lab, "ddim", 1, generator=torch.Generator(pipe.device).manual_seed(0))  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    pipe.generate(lab, generator=torch.Generator(pipe.device).manual_seed(0))
    _sync(dev)
    sample_s = time.perf_counter() - t0
    return {"sample_seconds": sample_s, "peak_gib": _peak(dev), "sampler": pipe.cfg.ldm.sampler,
            "steps": pipe.cfg.ldm.sampling_steps, "guidance": pipe.cfg.ldm.guidance_scale}


def child_flops(spec: dict) -> dict:
    """Forward FLOPs of one U-Net call (batch 1) and one decode: ``bench/speed.py``'s counter on this config."""
    from speed import flops

    return flops(spec["config"])


CHILDREN = {"train": child_train, "sample": child_sample, "flops": child_flops}


# ---- main --------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--train-steps", type=int, default=2, help="timed optimiser steps per stage (after one)")
    ap.add_argument("--cases", type=int, default=6, help="phantom volumes (32 x 256 x 256)")
    ap.add_argument("--preset", default="paper", help="config preset (tiny: a quick smoke run of this script)")
    ap.add_argument("--shape", type=int, nargs=3, default=list(SHAPE), help="phantom volume shape D H W")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="another ldm config value (YAML), e.g. keep_depth=true; repeatable")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1]))))
        return

    from medlsdm.config import load_config
    from medlsdm.data.phantom import PAPER_SPACING, write_phantom_dataset
    from medlsdm.training.latents import encode_dataset

    extra = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    shape = tuple(args.shape)
    tag = (("paper_size" if args.preset == "paper" else f"size_{args.preset}")
           + "".join(f"-{k}={v}" for k, v in extra.items()))
    work = WORK / tag / args.device
    work.mkdir(parents=True, exist_ok=True)
    data = WORK / f"phantoms_{args.cases}_{'x'.join(map(str, shape))}"
    if not data.exists():
        write_phantom_dataset(data, args.cases, shape=shape, spacing=PAPER_SPACING, test_fraction=0.25,
                              progress=False)
    never = {"val_every": 10**9, "ckpt_every": 10**9}
    vq_cfg, ldm_cfg = work / "vqgan.yaml", work / "ldm.yaml"
    vq_cfg.write_text(yaml.safe_dump({"base": args.preset, "vqgan": {"disc_start_step": 1}, "train_vqgan": never}))
    ldm_cfg.write_text(yaml.safe_dump({"base": args.preset, "ldm": extra, "train_ldm": never}))
    cfg = load_config(str(ldm_cfg))
    t_start = time.perf_counter()

    vq_run, lat, ldm_run = work / "vqgan", work / "latents", work / "ldm"
    for path in (vq_run, lat, ldm_run):
        shutil.rmtree(path, ignore_errors=True)
    steps = args.train_steps
    vq = run_child(HERE, "train", {"stage": "vqgan", "config": str(vq_cfg), "run": str(vq_run), "device": args.device,
                             "steps": steps, "data": str(data)})
    encode_dataset(vq_run, data, lat, device=args.device, progress=False)
    ldm = run_child(HERE, "train", {"stage": "ldm", "config": str(ldm_cfg), "run": str(ldm_run), "device": args.device,
                              "steps": steps, "vqgan": str(vq_run), "data": str(lat)})
    smp = run_child(HERE, "sample", {"run": str(ldm_run), "device": args.device, "data": str(data)})
    fl = run_child(HERE, "flops", {"config": str(ldm_cfg)})
    calls = smp["steps"] * (2 if smp["guidance"] != 1.0 else 1)
    tflops = calls * fl["unet_gflops"] / 1e3 / smp["sample_seconds"]
    val_every = load_config(args.preset).train_ldm.val_every  # the preset's, not this script's "never"
    preview_steps = load_config(args.preset).train_ldm.preview_steps
    preview_share = ldm["validation_seconds"] / (val_every * ldm["seconds_per_step"])
    result = {"device": args.device, "overrides": extra, "vqgan": vq, "ldm": ldm, "sample": smp, "flops": fl,
              "achieved_tflops": tflops, "preview_share": preview_share,
              "bench_minutes": (time.perf_counter() - t_start) / 60}
    (WORK / f"{tag}_{args.device}.json").write_text(json.dumps(result, indent=2))

    mem = "peak GPU memory (GiB)" if args.device.startswith("cuda") else "peak RSS (GiB)"
    prec = "bf16 autocast" if args.device.startswith("cuda") else "fp32"
    md = "\n".join([
        f"## Paper size (`{args.preset}` preset, {' x '.join(map(str, shape))}), {args.device}"
        + (f", {', '.join(f'{k}={v}' for k, v in extra.items())}" if extra else ""), "",
        header(command_line()),
        f"Phantoms at 3 x 2 x 2 mm, batch {cfg.train_vqgan.batch_size} (VQ-GAN) and {cfg.train_ldm.batch_size} (LDM), "
        f"{prec}; each figure from its own process after one untimed step; weights a few steps old (time and memory "
        f"only). Perceptual loss off (`perceptual_backbone: none`). U-Net {fl['unet_params_m']:.1f} M parameters, "
        f"{fl['unet_gflops']:.0f} GFLOP per forward call; decode {fl['decode_gflops']:.0f} GFLOP.", "",
        f"| stage | seconds | {mem} |", "|---|---|---|",
        f"| VQ-GAN training, per step (discriminators on) | {vq['seconds_per_step']:.1f} | {vq['peak_gib']:.1f} |",
        f"| LDM training, per step | {ldm['seconds_per_step']:.1f} | {ldm['peak_gib']:.1f} |",
        f"| sampling one volume ({smp['sampler'].upper()}-{smp['steps']}, guidance {smp['guidance']:g}, decode "
        f"included) | {smp['sample_seconds']:.1f} | {smp['peak_gib']:.1f} |",
        f"| VQ-GAN validation (metrics on the validation volumes, one preview) | {vq['validation_seconds']:.1f} | |",
        f"| LDM validation (diffusion loss, one DDIM-{min(preview_steps, cfg.ldm.sampling_steps)} preview volume) | "
        f"{ldm['validation_seconds']:.1f} | |", "",
        f"Sampling achieves {tflops:.2f} TFLOP/s on the U-Net's counted FLOPs ({calls} calls). An LDM validation costs "
        f"{preview_share * 100:.2f}% of the {val_every} training steps it follows (`train_ldm.val_every`), i.e. as "
        f"much as {ldm['validation_seconds'] / ldm['seconds_per_step']:.1f} steps; `train_ldm.preview_steps` sets "
        "the preview's steps (0: no preview).",
    ])
    if args.preset == "paper":  # other presets are smoke runs of this script
        write_section(f"{tag}-{args.device}", md)
    print(md)


if __name__ == "__main__":
    main()
