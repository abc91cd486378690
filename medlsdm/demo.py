"""``medlsdm demo``: the whole job on built-in phantom data with the ``tiny`` config, on CPU.

phantoms -> train the VQ-GAN -> encode latents -> train the LDM -> sample the held-out label maps
-> NIfTI volumes (with their label maps' geometry) + previews + SUMMARY.md. Re-running the command
resumes: finished stages are skipped, an interrupted training continues from its checkpoint.

The phantoms are a 128 x 128 x 48 mm region at the paper's AutoPET voxel size (3 x 2 x 2 mm) around the right
kidney, the spine and the liver, so that organs span as many voxels as in the paper's data. Their liver lesions
are all hypodense (``lesions="hypo"``): with the phantom default, where each subject's lesions are hypo- or
hyperdense at random and the label map does not say which, the model draws the average of the two, i.e. no
lesion (BENCHMARKS.md, ``ldm-switches``: lesion contrast ratio 0.17 mixed vs 1.07 hypo). SUMMARY.md
holds, for the held-out label maps, the per-class table (median HU of each class, real vs synthetic), the
window metrics and the grid-artifact ratio (``medlsdm.evaluation.fidelity``); ``samples/real_vs_synthetic.png``
shows real and synthetic volumes side by side in the CT display window.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medlsdm.config import Config, load_config
from medlsdm.data.phantom import PAPER_SPACING, ROI_CENTRE_MM, write_phantom_dataset
from medlsdm.evaluation.evaluate import paired_fidelity
from medlsdm.evaluation.fidelity import markdown
from medlsdm.evaluation.pairing import load_cases, load_synthetic, real_cases
from medlsdm.evaluation.report import montage_figure
from medlsdm.io import atomic_write_text
from medlsdm.pipeline import sample_to_folder
from medlsdm.runs import latest_step
from medlsdm.training.latents import encode_dataset
from medlsdm.training.run import train_ldm, train_vqgan

DEMO_LESIONS = "hypo"  # one lesion appearance per label class: see the module docstring
# sized so the demo finishes within 15 minutes on 2 CPU cores (measured 2026-12-03: ~0.42 s per VQ-GAN step without
# discriminators, ~0.25 s per LDM step; README gives the measured total). The VQ-GAN gets 800 steps because its
# display-window PSNR still rises steeply there (bench/vqgan.py, variant window-l1-gan-at-1000: 23.5 dB at step
# 400, 25.4 at 1000) and trains without its discriminators (they would start after its last step): at CPU budgets
# the GAN phase only costs reconstruction quality (same run: 22.3 dB 200 GAN steps later).
DEMO = {"cases": 40, "vqgan_steps": 800, "disc_start": 801, "ldm_steps": 1600}
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
              test_fraction=0.2, spacing=PAPER_SPACING, centre=ROI_CENTRE_MM, lesions=DEMO_LESIONS)
    if not _done(vq_run, plan["vqgan_steps"]):
        stage("train VQ-GAN", train_vqgan, data, config, vq_run, max_steps=plan["vqgan_steps"],
              resume=latest_step(vq_run) is not None, device=device)
    stage("encode", encode_dataset, vq_run, data, latents, device=device)
    if not _done(ldm_run, plan["ldm_steps"]):
        stage("train LDM", train_ldm, vq_run, latents, config, ldm_run, max_steps=plan["ldm_steps"],
              resume=latest_step(ldm_run) is not None, device=device)
    test_labels = data / "labelsTs"
    stage("sample", sample_to_folder, ldm_run, test_labels, samples, n_per_label=1, seed=0, device=device)
    return _summary(out, data, samples, timings, plan, load_config(ldm_run / "config.yaml"))


def _anatomy(data: Path, samples: Path, cfg: Config) -> list[str]:
    """Window metrics, per-class table and grid ratio of the synthetic volumes vs the real held-out ones, and a
    real-vs-synthetic montage in the display window (``samples/real_vs_synthetic.png``)."""
    cases = real_cases(data, "test")
    real = load_cases(cases, cfg.data)
    synth, partner = load_synthetic(samples, cases, real, cfg.data)
    fid = paired_fidelity(real, synth, partner, cfg)
    montage_figure(samples / "real_vs_synthetic.png", real, synth, partner, cfg)
    return ["## Synthetic vs real, where the anatomy is", "",
            f"{len(synth)} synthetic volumes vs the real volumes of the same held-out label maps; "
            f"`{(samples / 'real_vs_synthetic.png').name}` shows four of them side by side. "
            "The phantoms' liver lesions are "
            f"all {DEMO_LESIONS}dense here: where a label class covers two appearances (the phantom default, "
            "`--lesions mixed`), the model draws their average and the lesion disappears (README).", "",
            *markdown(fid), ""]


def _summary(out: Path, data: Path, samples: Path, timings: dict[str, float], plan: dict, cfg: Config) -> Path:
    rows = []
    for vol in sorted(samples.glob("*.nii.gz")):
        label = data / "labelsTs" / (vol.name.rsplit("_s", 1)[0] + ".nii.gz")
        v, lab = nib.load(str(vol)), nib.load(str(label))
        same = v.shape == lab.shape and np.allclose(v.affine, lab.affine, atol=1e-4)
        rows.append(f"| {vol.name} | {label.name} | {v.shape} | {'yes' if same else 'NO'} |")
    vq_metrics = _last_val(out / "vqgan" / "metrics.csv")
    best_file = out / "vqgan" / "best" / "best.json"
    best = json.loads(best_file.read_text()) if best_file.is_file() else None
    used = (f"weights used: step {best['step']} (best validation {best['metric']})" if best
            else "weights used: the last step")
    text = "\n".join([
        "# medlsdm demo summary", "",
        f"Phantom CT data set: `{data}` ({plan['cases']} cases, nnU-Net layout; a region at {PAPER_SPACING} mm, "
        "the paper's voxel size). Config: `tiny` (16 x 64 x 64).", "",
        "| stage | seconds |", "|---|---|", *[f"| {k} | {v} |" for k, v in timings.items()], "",
        f"VQ-GAN validation (last): {json.dumps(vq_metrics)}; {used}; discriminators "
        + (f"from step {plan['disc_start']}" if plan["disc_start"] <= plan["vqgan_steps"] else
           f"off (they would start after the {plan['vqgan_steps']} steps: too few for the GAN phase to help)")
        + ".", "",
        "| synthetic volume | from label map | shape | same geometry as label map |", "|---|---|---|---|", *rows, "",
        *_anatomy(data, samples, cfg),
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
