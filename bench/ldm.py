"""Stage-2 benchmark: does the latent semantic diffusion model follow the label map, and how fast?

Uses the VQ-GAN trained by ``bench/vqgan.py --variant default`` (its training time counts towards the budget), encodes
the phantom set, trains the ``tiny`` LDM for the remaining budget, then generates one volume per
held-out label map and records in BENCHMARKS.md:
- label following (:func:`medlsdm.evaluation.metrics.label_following`): per-class intensity error
  (|median synthetic - median real| per class / spread of the real class medians) on all voxels, and,
  where a label map and the next case's disagree, for matched pairs against the control that scores
  the volume made for the *other* label map: a model that follows its label map is much better matched;
- SSIM / PSNR to the real volume of the same label map;
- quality vs sampling steps for DDIM and DPM-Solver++ (10, 25, 50, 100) and DDPM-1000, with seconds per
  volume, and DDIM-50 with guidance scale 2.5 (the authors' cond + 1.5 (cond - uncond));
- for the default sampler: PSNR / SSIM / MAE in the CT display window and over the full range, the per-class
  median table (HU), the grid-artifact ratio (``medlsdm.evaluation.fidelity``) and label following per class
  in HU (matched vs mismatched), so that small classes (kidney, lesion) are seen.

With ``--quick`` only the default sampler is run (guidance 1 and 2.5), and the section adds inter-slice
consistency (W1 of adjacent-slice changes, real vs synthetic) and the seam ratio of two volumes three times the
training depth generated in overlapping depth windows: enough to compare architecture switches, e.g.

    python bench/ldm.py --minutes 15 --ddpm-cases 4 [--latent-norm standardize] [--objective eps]
    python bench/ldm.py --minutes 15 --quick --set keep_depth=true --set depth_positions=relative
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

import torch
import yaml
from _common import WORK, command_line, header, peak_rss_gib, write_section
from vqgan import phantoms

from medlsdm.config import load_config
from medlsdm.data.layouts import find_cases
from medlsdm.data.transforms import denormalize, load_case
from medlsdm.diffusion.windows import DepthWindows
from medlsdm.evaluation.fidelity import fidelity, markdown
from medlsdm.evaluation.metrics import inter_slice_consistency, label_following, psnr, seam_ratio, ssim
from medlsdm.io import file_sha256
from medlsdm.pipeline import SynthesisPipeline
from medlsdm.runs import latest_step, selected_weights
from medlsdm.training.latents import encode_dataset, is_latents_dir
from medlsdm.training.run import train_ldm


def per_class_following(synth, reals, maps, cfg) -> dict:
    """Label following per class in native units (HU): matched vs mismatched where label maps disagree.
    ``synth[i]``, ``reals[i]``, ``maps[i]``: (D, H, W) of case i (normalised volumes, class indices)."""
    hu = lambda vs: [denormalize(v, cfg.data) for v in vs]  # noqa: E731
    return label_following(hu(synth), hu(reals), maps, cfg.data.num_classes)["per_class"]


def per_class_lines(pc: dict, real_pc: dict, cfg) -> list[str]:
    names = cfg.data.label_names
    fmt = lambda v: "–" if v != v else f"{v:.1f}"  # noqa: E731
    return ["| class | matched (HU) | mismatched, control (HU) | real volumes' own control (HU) |",
            "|---|---|---|---|",
            *[f"| {names[c]} | {fmt(pc['matched'][c])} | {fmt(pc['mismatched'][c])} | {fmt(real_pc['mismatched'][c])} |"
              for c in range(1, cfg.data.num_classes)]]


def long_volume_seams(pipe, guidance: float, factor: int = 3, maps: int = 2) -> dict:
    """Seam ratio (``medlsdm.evaluation.metrics.seam_ratio``) of ``maps`` phantom label maps ``factor`` times the
    training depth, generated in overlapping depth windows with the default sampler."""
    import medlsdm.data.phantom as ph

    d, h, w = pipe.cfg.data.shape
    down = pipe.diffusion.unet.image_down[0]
    ratios, n_windows = [], 0
    for seed in range(maps):
        _, lab = ph.generate_phantom(500 + seed, (factor * d, h, w), spacing=ph.PAPER_SPACING, centre=ph.ROI_CENTRE_MM)
        lab = torch.from_numpy(lab).long()[None, None]
        vol = pipe.generate(lab, guidance=guidance, generator=torch.Generator().manual_seed(seed))
        windows = DepthWindows(factor * d // down, pipe.window, pipe.overlap)
        n_windows = len(windows)
        ratios.append(seam_ratio(vol[0, 0], windows.borders(scale=down), period=down))
    return {"depth": factor * d, "windows": n_windows, "ratios": ratios}


def score(pipe, cases, sampler: str, steps: int, num_classes: int, guidance: float = 1.0) -> dict:
    synth, times = [], []
    for i, (real, label) in enumerate(cases):
        g = torch.Generator().manual_seed(1000 + i)
        t0 = time.perf_counter()
        vol = pipe.generate(label[None], sampler=sampler, steps=steps, guidance=guidance, generator=g)[0, 0]
        times.append(time.perf_counter() - t0)
        synth.append(vol)
    n = len(cases)
    follow = label_following(synth, [c[0][0] for c in cases], [c[1][0] for c in cases], num_classes)
    reals = torch.stack([c[0] for c in cases])
    name = f"{sampler.upper()}-{steps if sampler != 'ddpm' else pipe.diffusion.schedule.num_timesteps}"
    return {"sampler": name, "guidance": guidance, "cases": n, "seconds_per_volume": sum(times) / n,
            "overall_error": follow["overall"], "matched_error": follow["matched"],
            "mismatched_error": follow["mismatched"],
            "ssim": ssim(torch.stack(synth)[:, None], reals), "psnr": psnr(torch.stack(synth)[:, None], reals),
            "volumes": synth}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=15.0, help="LDM training wall-time budget")
    ap.add_argument("--cases", type=int, default=60, help="phantom set size (must match bench/vqgan.py)")
    ap.add_argument("--ddpm-cases", type=int, default=4, help="held-out label maps sampled with DDPM-1000")
    ap.add_argument("--latent-norm", choices=["codebook", "standardize"], default=None,
                    help="latent normalisation (default: the tiny preset's)")
    ap.add_argument("--objective", choices=["eps", "x0", "v"], default=None,
                    help="diffusion objective (default: the tiny preset's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="another ldm config value (YAML), e.g. keep_depth=true; repeatable, named in the section")
    ap.add_argument("--lesions", choices=["mixed", "hypo", "hyper"], default="mixed",
                    help="phantom lesions (medlsdm phantom --lesions): is a lesion drawn when its label says how it "
                         "looks?")
    ap.add_argument("--quick", action="store_true",
                    help="only the default sampler (guidance 1 and 2.5), plus inter-slice consistency and seams")
    args = ap.parse_args()
    overrides = {k: v for k, v in (("latent_norm", args.latent_norm), ("objective", args.objective)) if v}
    extra = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    overrides.update(extra)
    cfg = load_config("tiny", {"ldm": overrides})
    tag = f"{cfg.ldm.objective}-{cfg.ldm.latent_norm}" + "".join(f"-{k}={v}" for k, v in extra.items())
    data = phantoms(args.cases, cfg.data.shape, "paper", args.lesions)
    if args.lesions != "mixed":
        tag += f"-lesions={args.lesions}"
    lat_name = "latents" if args.lesions == "mixed" else f"latents_{args.lesions}"
    vq_run, lat, run = WORK / "vqgan_default", WORK / lat_name, WORK / f"ldm_{tag}"
    config = WORK / f"ldm_{tag}.yaml"
    config.write_text("base: tiny\nldm:\n" + "".join(f"  {k}: {v}\n" for k, v in overrides.items()) if overrides
                      else "base: tiny\n")
    vq_info = json.loads((WORK / "vqgan_default.json").read_text())  # run bench/vqgan.py --variant default first
    sha = file_sha256(selected_weights(vq_run, "vqgan"))
    if not is_latents_dir(lat) or json.loads((lat / "stats.json").read_text()).get("vqgan_weights_sha256") != sha:
        shutil.rmtree(lat, ignore_errors=True)  # latents of another VQ-GAN: encode again
        encode_dataset(vq_run, data, lat, device="cpu", progress=False)
    t0 = time.perf_counter()
    if latest_step(run) is None:
        train_ldm(vq_run, lat, config, run, max_steps=100000, max_minutes=args.minutes, device="cpu", progress=False)
        (run / "bench_train_seconds").write_text(f"{time.perf_counter() - t0:.1f}\n")
    train_s = float((run / "bench_train_seconds").read_text())
    steps = latest_step(run)

    pipe = SynthesisPipeline.from_pretrained(run, device="cpu")
    cases = []
    for case in find_cases(data, split="test"):
        item = load_case(case, pipe.cfg.data)
        cases.append((item["image"], item["label"]))
    k = cfg.data.num_classes
    if args.quick:
        rows = [score(pipe, cases, cfg.ldm.sampler, cfg.ldm.sampling_steps, k, guidance=g) for g in (1.0, 2.5)]
        rows_sub = []
    else:
        rows = [score(pipe, cases, name, steps_, k) for name in ("ddim", "dpm++") for steps_ in (10, 25, 50, 100)]
        rows.append(score(pipe, cases, "ddim", 50, k, guidance=2.5))  # the authors' cond + 1.5 (cond - uncond)
        rows.append(score(pipe, cases, cfg.ldm.sampler, cfg.ldm.sampling_steps, k, guidance=2.5))
        sub = cases[: args.ddpm_cases]
        rows_sub = [score(pipe, sub, "ddpm", 1000, k), score(pipe, sub, "ddim", 50, k),
                    score(pipe, sub, "dpm++", 25, k)]
    reals, maps = [c[0][0] for c in cases], [c[1][0] for c in cases]
    real_control = label_following(reals, reals, maps, k)["mismatched"]  # the control's value for a perfect model
    name = f"{cfg.ldm.sampler.upper()}-{cfg.ldm.sampling_steps}"
    default = {g: next(r for r in rows if r["sampler"] == name and r["guidance"] == g) for g in (1.0, 2.5)}
    fid = {g: fidelity(r["volumes"], reals, maps, cfg.data) for g, r in default.items()}
    pc = {g: per_class_following(r["volumes"], reals, maps, cfg) for g, r in default.items()}
    real_pc = per_class_following(reals, reals, maps, cfg)
    torch.save({g: torch.stack(r["volumes"]).half() for g, r in default.items()}, WORK / f"ldm_{tag}_volumes.pt")
    slices = {str(g): inter_slice_consistency(reals, r["volumes"]) for g, r in default.items()}
    seams = long_volume_seams(pipe, cfg.ldm.guidance_scale)
    for r in rows + rows_sub:
        r.pop("volumes")
    result = {"real_mismatched": real_control, "ldm_steps": steps, "ldm_train_seconds": round(train_s, 1),
              "vqgan_train_seconds": vq_info["train_seconds"], "all_cases": rows, "ddpm_subset": rows_sub,
              "fidelity": {str(g): f for g, f in fid.items()},
              "per_class_following": {str(g): p for g, p in pc.items()},
              "real_per_class_following": real_pc, "inter_slice": slices, "seams": seams,
              "overrides": {**overrides, **({"lesions": args.lesions} if args.lesions != "mixed" else {})},
              "peak_rss_gib": round(peak_rss_gib(), 2)}
    (WORK / f"ldm_{tag}_bench.json").write_text(json.dumps(result, indent=2))

    def line(r: dict) -> str:
        return (f"| {r['sampler']} | {r['guidance']:g} | {r['cases']} | {r['overall_error']:.3f} | "
                f"{r['matched_error']:.3f} | {r['mismatched_error']:.3f} | {r['ssim']:.3f} | {r['psnr']:.2f} | "
                f"{r['seconds_per_volume']:.2f} |")

    total_min = (vq_info["train_seconds"] + train_s) / 60

    def versus(r: dict) -> str:
        ddpm = rows_sub[0]
        rel = (r["overall_error"] - ddpm["overall_error"]) / max(ddpm["overall_error"], 1e-9) * 100
        return (f"{r['sampler']} class error {r['overall_error']:.3f} vs DDPM-1000 {ddpm['overall_error']:.3f} "
                f"({rel:+.0f}%), PSNR {r['psnr']:.2f} vs {ddpm['psnr']:.2f} dB, "
                f"{ddpm['seconds_per_volume'] / r['seconds_per_volume']:.0f}x less sampling time")

    md = "\n".join([
        f"## Latent semantic diffusion (stage 2), `tiny` preset on CPU, objective = {cfg.ldm.objective}, "
        f"latent_norm = {cfg.ldm.latent_norm}" + "".join(f", {k} = {v}" for k, v in extra.items())
        + (f", phantom lesions always {args.lesions}dense" if args.lesions != "mixed" else ""), "",
        header(command_line()),
        f"VQ-GAN from `bench/vqgan.py` ({vq_info['steps']} steps, {vq_info['train_seconds'] / 60:.1f} min); LDM "
        f"{steps} steps of batch {cfg.train_ldm.batch_size} in {train_s / 60:.1f} min (total training "
        f"{total_min:.1f} min). Cosine schedule, T = {cfg.ldm.num_timesteps}, {cfg.ldm.objective} objective, "
        f"{cfg.ldm.loss.upper()} loss, EMA weights. One volume per held-out phantom label map.", "",
        "Class error = mean over classes of |median synthetic - median real| / std of the real class medians "
        "(lower is better), on all voxels (*overall*) and on the voxels where a label map and the next case's "
        "disagree: *matched* scores the volume made for this label map, *mismatched* the volume made for the other "
        "one. A model that ignores its label map scores the same on both; the real volumes themselves score "
        f"0 matched and {real_control:.3f} mismatched.", "",
        "| sampler | guidance | label maps | class error, overall | matched (where maps differ) | mismatched "
        "(control) | SSIM | PSNR (dB) | s / volume |",
        "|---|---|---|---|---|---|---|---|---|", *[line(r) for r in rows], *[line(r) for r in rows_sub], "",
        (f"On the same {args.ddpm_cases} label maps: {versus(rows_sub[1])}; "
         f"{versus(rows_sub[2])}. " if rows_sub else "") + f"Peak memory (RSS): {result['peak_rss_gib']} GiB.", "",
        "Inter-slice consistency (W1 between real and synthetic adjacent-slice changes, lower = more like real; "
        "mean change per slice pair / std, real vs synthetic): " + "; ".join(
            f"guidance {g}: W1 {v['wasserstein']:.4f}, {v['real_mean']:.3f} vs {v['synthetic_mean']:.3f}"
            for g, v in slices.items()) + ". Seam ratio of " + f"{len(seams['ratios'])} volumes of "
        f"{seams['depth']} slices made in {seams['windows']} overlapping depth windows (1 = no seam, guidance "
        f"{cfg.ldm.guidance_scale:g}): " + ", ".join(f"{x:.3f}" for x in seams["ratios"]) + ".", "",
        *[line for g in (1.0, 2.5) for line in (
            f"### Where the anatomy is ({name}, the default sampler, guidance {g:g}, {len(cases)} held-out label maps)",
            "", *markdown(fid[g]), "",
            "Label following per class (|median synthetic - median real| in HU where a label map and the next case's "
            "disagree; *control*: the volume made for the other label map; the last column is the control for the "
            "real volumes themselves, i.e. how far apart the classes are):", "",
            *per_class_lines(pc[g], real_pc, cfg), "")],
        "Paper size on a GPU: not measured, this issue had no GPU.",
    ])
    write_section(f"ldm-{tag}", md)
    print(md)


if __name__ == "__main__":
    main()
