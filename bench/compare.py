"""Med-LSDM against its two baselines on the same data, budget and sampler (issue: baselines side by side).

Trains, on the phantom training set of ``bench/vqgan.py`` and with the same wall-clock CPU budget each:
- ``lsdm``: VQ-GAN (``--vq-share`` of the budget) + latent semantic diffusion model (the rest);
- ``slice2d``: SegGuidedDiff-style 2D diffusion on axial slices, mask concatenated, slices stacked;
- ``pixel3d``: Med-DDPM-style 3D diffusion in image space, label map concatenated.
All use the ``tiny`` preset's U-Net widths, schedule, objective and EMA. Then each samples one volume per
held-out label map with the same sampler and seeds (in a child process, so its peak memory is its own),
and the evaluation suite scores it: FID per plane and 3D-FID (domain extractor: the encoder of one
segmentation network trained on the real training set, shared by all methods), LPIPS, SSIM, RMSE, PSNR,
inter-slice consistency, Dice of that segmenter on the synthetic volumes (paper Table 2 protocol) and the
label-following error of ``bench/ldm.py``, and where the anatomy is: PSNR / SSIM in the CT display window,
the grid-artifact ratio, each class's median HU (real vs synthetic) and label following per class in HU
(``medlsdm.evaluation.fidelity``). The tables go to BENCHMARKS.md.

    python bench/compare.py --minutes 10
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, WORK, command_line, fmt, header, write_section
from ldm import per_class_following
from vqgan import phantoms

from medlsdm.config import load_config
from medlsdm.data.layouts import find_cases
from medlsdm.data.transforms import load_case, load_image
from medlsdm.evaluation.evaluate import evaluate
from medlsdm.evaluation.metrics import label_following
from medlsdm.evaluation.stats import ratio_with_interval, with_interval
from medlsdm.runs import latest_step
from medlsdm.training.latents import encode_dataset
from medlsdm.training.run import train_ldm, train_vqgan

METHODS = ("lsdm", "slice2d", "pixel3d")
CMP = WORK / "compare"


def train(method: str, data: Path, minutes: float, vq_share: float, work: Path) -> tuple[Path, dict]:
    """Train ``method`` within ``minutes`` of wall time; returns its run folder and what it did."""
    root = work / method
    t0 = time.perf_counter()
    if method == "lsdm":
        vq = train_vqgan(data, "tiny", root / "vqgan", max_steps=100000, max_minutes=minutes * vq_share,
                         device="cpu", progress=False, overwrite=True)
        lat = encode_dataset(vq, data, root / "latents", device="cpu", progress=False)
        left = minutes - (time.perf_counter() - t0) / 60
        run = train_ldm(vq, lat, "tiny", root / "run", max_steps=100000, max_minutes=max(left, 0.1), device="cpu",
                        progress=False, overwrite=True)
    else:
        run = train_ldm(None, data, "tiny", root / "run", max_steps=100000, max_minutes=minutes, device="cpu",
                        progress=False, method=method, overwrite=True)
    return run, {"train_seconds": time.perf_counter() - t0, "steps": latest_step(run)}


def sample_child(run: Path, labels: Path, out: Path, steps: int, result: Path) -> None:
    """Runs in a child process: sample every label map, record seconds per volume and peak RSS."""
    from medlsdm.pipeline import sample_to_folder

    t0 = time.perf_counter()
    written = sample_to_folder(run, labels, out, sampler="ddim", steps=steps, seed=0, device="cpu", progress=False)
    seconds = time.perf_counter() - t0
    result.write_text(json.dumps({"volumes": len(written), "seconds_per_volume": seconds / max(1, len(written)),
                                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def follow(data: Path, synthetic: Path, cfg) -> dict:
    cases = find_cases(data, split="test")
    real, maps, syn = [], [], []
    for case in cases:
        item = load_case(case, cfg.data)
        real.append(item["image"][0])
        maps.append(item["label"][0])
        syn.append(load_image(synthetic / f"{case.id}_s0.nii.gz", cfg.data)[0][0])
    res = label_following(syn, real, maps, cfg.data.num_classes)
    res["per_class"] = per_class_following(syn, real, maps, cfg)  # in HU
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--minutes", type=float, default=10.0, help="training wall-time budget per method")
    ap.add_argument("--vq-share", type=float, default=0.45, help="lsdm: share of its budget for the VQ-GAN")
    ap.add_argument("--cases", type=int, default=60, help="phantom set size (as in bench/vqgan.py)")
    ap.add_argument("--steps", type=int, default=25, help="DDIM steps for every method")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--work", type=Path, default=CMP, help="folder for runs, volumes and reports")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone (dry runs)")
    ap.add_argument("--note", default=None, help="a remark written with the section (e.g. what else ran meanwhile)")
    ap.add_argument("--reuse", action="store_true",
                    help="evaluate the runs and volumes already in --work (from an earlier full run) again, without "
                         "training or sampling (e.g. after the evaluation changed); the table says so")
    ap.add_argument("--sample-child", nargs=4, metavar=("RUN", "LABELS", "OUT", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sample_child:
        run, labels, out, result = map(Path, args.sample_child)
        sample_child(run, labels, out, args.steps, result)
        return

    cfg = load_config("tiny")
    data = phantoms(args.cases, cfg.data.shape)
    rows, segmenter = {}, None
    earlier = json.loads((args.work / "compare.json").read_text()) if args.reuse else {}
    for method in args.methods:
        synthetic, result = args.work / method / "synthetic", args.work / method / "sampling.json"
        if args.reuse:  # training and sampling figures as recorded by the run that made the volumes
            run = args.work / method / "run"
            info = {k: earlier[method][k] for k in ("train_seconds", "steps")}
        else:
            run, info = train(method, data, args.minutes, args.vq_share, args.work)
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--steps", str(args.steps),
                            "--sample-child", str(run), str(data / "labelsTs"), str(synthetic), str(result)],
                           check=True, cwd=ROOT / "bench")
        info.update(json.loads(result.read_text()))
        run_cfg = load_config(run / "config.yaml")
        run_cfg.seg = cfg.seg  # the preset's current segmenter for every method (runs may predate it)
        m = evaluate(data, synthetic, args.work / method / "report", train=data, features="domain",
                     feature_weights=str(segmenter) if segmenter else None, cfg=run_cfg, device="cpu",
                     privacy=False, progress=False)
        if segmenter is None:  # the first method's evaluation trained it; every later method reuses it
            segmenter = args.work / method / "report" / "segmenter.safetensors"
        info["metrics"] = m
        info["follow"] = follow(data, synthetic, load_config(run / "config.yaml"))
        rows[method] = info
        # merged with the earlier record: a --reuse of some methods keeps the others' (their runs are still there)
        (args.work / "compare.json").write_text(json.dumps({**earlier, **rows}, indent=2, default=str))

    names = {"lsdm": "Med-LSDM (VQ-GAN + latent SPADE diffusion)",
             "slice2d": "slice2d (2D slices, SegGuidedDiff-style)",
             "pixel3d": "pixel3d (3D image space, Med-DDPM-style)"}
    head = ("| method | training steps | FID axial | FID coronal | FID sagittal | 3D-FID | LPIPS | SSIM | RMSE | "
            "PSNR (dB) | window PSNR / SSIM | grid ratio | inter-slice W1 | Dice on synthetic | class error "
            "(matched / mismatched) | s / volume | peak RSS sampling (GiB) |")
    table = [head, "|---" * 17 + "|"]
    classes = range(1, cfg.data.num_classes)
    per_class = ["| method | " + " | ".join(cfg.data.label_names[c] for c in classes) + " |",
                 "|---" * (len(classes) + 1) + "|"]
    hu = lambda v: "–" if v is None or v != v else f"{v:.0f}"  # noqa: E731
    real_dice = None
    for method, r in rows.items():
        m = r["metrics"]
        fid, p, dice = m["fid"]["domain"], m["paired"], m["dice"]["table"]
        real_dice = dice["real test"]["mean"]
        table.append(
            f"| {names[method]} | {r['steps']} | {fmt(fid['axial'])} | {fmt(fid['coronal'])} | "
            f"{fmt(fid['sagittal'])} | "
            f"{fmt(fid.get('3d'))} | {fmt(p.get('lpips', {}).get('mean'))} | {fmt(p['ssim']['mean'], 4)} | "
            f"{fmt(p['rmse']['mean'], 4)} | {fmt(p['psnr']['mean'], 2)} | "
            f"{fmt(m['fidelity']['window_metrics']['window']['psnr'], 2)} / "
            f"{fmt(m['fidelity']['window_metrics']['window']['ssim'], 3)} | {fmt(m['fidelity']['grid']['max'], 2)} | "
            f"{fmt(m['inter_slice'].get('wasserstein'))} | "
            f"{fmt(dice['synthetic']['mean'])} | {fmt(r['follow']['matched'])} / {fmt(r['follow']['mismatched'])} | "
            f"{r['seconds_per_volume']:.1f} | {r['peak_rss_gib']:.2f} |")
        med, f = {c["cls"]: c for c in m["fidelity"]["classes"]}, r["follow"]["per_class"]
        per_class.append(f"| {method} | " + " | ".join(
            (f"{hu(med[c]['other'])} ({hu(med[c]['real'])})" if c in med else "–")
            + f"; {hu(f['matched'][c])} / {hu(f['mismatched'][c])}" for c in classes) + " |")
    # Table 2 analogue: one segmenter (trained on the real training set) on the real test volumes and on each
    # method's synthetic volumes of the same label maps, per class, with 95% bootstrap intervals over volumes
    names_fg = [cfg.data.label_names[c] for c in classes]
    t2 = ["| data | mean (foreground) | " + " | ".join(names_fg) + " |", "|---" * (len(names_fg) + 2) + "|"]
    real_row = next(iter(rows.values()))["metrics"]["dice"]["table"]["real test"]
    dice_row = lambda label, d: (f"| {label} ({d['n']}) | **{with_interval(d['mean'], d['mean_ci'])}** | "  # noqa: E731
                                 + " | ".join(with_interval(d["per_class"][n], d["per_class_ci"][n]) for n in names_fg)
                                 + " |")
    t2.append(dice_row("real test", real_row))
    for method, r in rows.items():
        t2.append(dice_row(f"{method} synthetic", r["metrics"]["dice"]["table"]["synthetic"]))
    for method, r in rows.items():
        ratio = r["metrics"]["dice"]["ratio"]
        t2.append(f"| {method} synthetic / real test | **{ratio_with_interval(ratio['mean'])}** | "
                  + " | ".join(ratio_with_interval(ratio.get(n)) for n in names_fg) + " |")
    first = next(iter(rows.values()))["metrics"]
    ex = first["fid"]["domain"]["extractor"]
    lp = first["paired"].get("lpips", {}).get("backbone", "not run")
    md = "\n".join([
        "## Med-LSDM vs baselines on phantoms, equal CPU budget", "", header(command_line()),
        f"Each method trained for {args.minutes:g} min wall time on the same {len(find_cases(data, split='train'))} "
        f"phantom CT volumes (16 x 64 x 64); Med-LSDM spends {args.vq_share:.0%} of it on its VQ-GAN. The `tiny` "
        f"preset's U-Net widths, cosine schedule, {cfg.ldm.objective} objective and EMA for all three; one volume "
        f"per held-out label map ({first['inputs']['n_real']}), DDIM-{args.steps}, seed 0.", "",
        *table, "",
        f"FID: extractor {ex['name']} (sha256 {str(ex.get('sha256'))[:12]}, one segmenter for all methods, the tiny "
        f"preset's current segmenter settings); lower is better; per-plane FID is not reported for this 3D extractor "
        f"(see 3D-FID). LPIPS backbone: {lp}. Dice: foreground classes only, same segmenter; on the real test "
        f"volumes it scores {fmt(real_dice)}. Class error: label following as in `bench/ldm.py` (matched should be "
        "well below mismatched). Inter-slice W1: Wasserstein distance between real and synthetic adjacent-slice change "
        "distributions (lower = more real-like slice-to-slice continuity). Sampling time and peak memory are of a "
        "child process that loads the model and writes the volumes. Window PSNR / SSIM: in the CT display window "
        "-160..240 HU; grid ratio: periodic 4-/2-voxel structure vs the real volumes (1 = like real).", "",
        "Per class: synthetic median HU (real median HU); label following in HU where a label map and the next "
        "case's disagree, matched / mismatched (matched should be well below mismatched):", "",
        *per_class, "",
        "Table 2 analogue (paper Appendix B protocol): Dice of the one segmenter on the real test volumes and on each "
        "method's synthetic volumes of the same label maps, foreground classes; brackets: 95% bootstrap interval "
        "over volumes (a class counts only in volumes that have it); last rows: synthetic over real-test Dice "
        "(1 = the segmenter finds the anatomy as well as in real volumes), the two sets resampled independently.",
        "", *t2,
    ])
    if args.reuse:
        md = md.replace("## Med-LSDM vs baselines on phantoms, equal CPU budget\n", "## Med-LSDM vs baselines on "
                        "phantoms, equal CPU budget\n\nRe-evaluated (`--reuse`): the runs, training steps, sampling "
                        f"times and volumes are those of the earlier full run in {args.work.name}/ (trained "
                        f"{args.minutes:g} min each); only the evaluation ran again.\n", 1)
    if args.note:
        md += f"\n\nNote: {args.note}"
    if not args.no_write:
        write_section("compare", md)
    print(md)


if __name__ == "__main__":
    main()
