"""``medlsdm demo``: the whole job on built-in phantom data with the ``tiny`` config, on CPU.

phantoms -> train the VQ-GAN -> encode latents -> train the LDM -> sample the held-out label maps
-> NIfTI volumes (with their label maps' geometry) + previews + SUMMARY.md. Re-running the command
resumes: finished stages are skipped, an interrupted training continues from its checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medlsdm.config import load_config
from medlsdm.data.phantom import write_phantom_dataset
from medlsdm.io import atomic_write_text
from medlsdm.pipeline import sample_to_folder
from medlsdm.runs import latest_step
from medlsdm.training.latents import encode_dataset
from medlsdm.training.run import train_ldm, train_vqgan

# sized so the demo finishes within ~15 minutes on 2 CPU cores: measured 2026-12-02 ~0.4 s per VQ-GAN step
# (no discriminators) and ~0.25 s per LDM step, so ~10 minutes with room for a slower machine (bench/ and
# BENCHMARKS.md show what longer training reaches). The demo's VQ-GAN trains without its
# discriminators (they would start after its last step): in a few hundred CPU steps the GAN phase only costs
# reconstruction quality (bench/vqgan.py: validation PSNR 32.0 dB at step 400, 27.7 dB 200 GAN steps later).
DEMO = {"cases": 40, "vqgan_steps": 400, "disc_start": 401, "ldm_steps": 1600}
FAST = {"cases": 10, "vqgan_steps": 4, "disc_start": 2, "ldm_steps": 4}


def _done(run: Path, steps: int) -> bool:
    return latest_step(run) == steps


def run_demo(out: Path, device: str = "cpu", fast: bool = False) -> Path:
    plan = FAST if fast else DEMO
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config("tiny")
    config = out / "demo_config.yaml"  # the tiny preset with the demo's discriminator start (FAST: within its steps)
    atomic_write_text(config, f"base: tiny\nvqgan:\n  disc_start_step: {plan['disc_start']}\n")
    timings: dict[str, float] = {}
    data, vq_run, latents, ldm_run, samples = (out / p for p in ("data", "vqgan", "latents", "ldm", "samples"))

    def stage(name: str, fn, *args, **kw):
        print(f"\n== {name}")
        t0 = time.perf_counter()
        fn(*args, **kw)
        timings[name] = round(time.perf_counter() - t0, 1)

    if not (data / "dataset.json").is_file():
        stage("phantoms", write_phantom_dataset, data, plan["cases"], modality="ct", shape=cfg.data.shape, seed=0,
              test_fraction=0.2)
    if not _done(vq_run, plan["vqgan_steps"]):
        stage("train VQ-GAN", train_vqgan, data, config, vq_run, max_steps=plan["vqgan_steps"],
              resume=latest_step(vq_run) is not None, device=device)
    stage("encode", encode_dataset, vq_run, data, latents, device=device)
    if not _done(ldm_run, plan["ldm_steps"]):
        stage("train LDM", train_ldm, vq_run, latents, config, ldm_run, max_steps=plan["ldm_steps"],
              resume=latest_step(ldm_run) is not None, device=device)
    test_labels = data / "labelsTs"
    stage("sample", sample_to_folder, ldm_run, test_labels, samples, n_per_label=1, seed=0, device=device)
    return _summary(out, data, samples, timings, plan)


def _summary(out: Path, data: Path, samples: Path, timings: dict[str, float], plan: dict) -> Path:
    rows = []
    for vol in sorted(samples.glob("*.nii.gz")):
        label = data / "labelsTs" / (vol.name.rsplit("_s", 1)[0] + ".nii.gz")
        v, l = nib.load(str(vol)), nib.load(str(label))
        same = v.shape == l.shape and np.allclose(v.affine, l.affine, atol=1e-4)
        rows.append(f"| {vol.name} | {label.name} | {v.shape} | {'yes' if same else 'NO'} |")
    vq_metrics = _last_val(out / "vqgan" / "metrics.csv")
    text = "\n".join([
        "# medlsdm demo summary", "",
        f"Phantom CT data set: `{data}` ({plan['cases']} cases, nnU-Net layout). Config: `tiny` (16 x 64 x 64).", "",
        "| stage | seconds |", "|---|---|", *[f"| {k} | {v} |" for k, v in timings.items()], "",
        f"VQ-GAN validation (last): {json.dumps(vq_metrics)}; discriminators "
        + (f"from step {plan['disc_start']}" if plan["disc_start"] <= plan["vqgan_steps"] else
           f"off (they would start after the {plan['vqgan_steps']} steps: too few for the GAN phase to help)") + ".", "",
        "| synthetic volume | from label map | shape | same geometry as label map |", "|---|---|---|---|", *rows, "",
        f"Outputs: VQ-GAN run `{out / 'vqgan'}`, latents `{out / 'latents'}`, LDM run `{out / 'ldm'}`,",
        f"synthetic volumes and previews (PNG) in `{samples}`.",
    ])
    atomic_write_text(out / "SUMMARY.md", text + "\n")
    print("\n" + text)
    return out / "SUMMARY.md"


def _last_val(csv_path: Path) -> dict[str, float]:
    if not csv_path.is_file():
        return {}
    vals: dict[str, float] = {}
    for line in csv_path.read_text().splitlines()[1:]:
        step, split, name, value = line.split(",")
        if split == "val":
            vals[name] = float(value)
    return vals
