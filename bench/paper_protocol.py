"""The paper's evaluation protocol on the phantom set (analogues of its Tables 2 and 3), plus the
augmentation study and the privacy audit.

Uses the LDM trained by ``bench/ldm.py`` with the tiny preset's defaults (``bench/_work/ldm_v-codebook``).
Generates one volume per held-out (test) label map for the paper's tables and one per training label map
for the augmentation study, then runs
``medlsdm.evaluation`` (domain features from the Dice-protocol segmenter, and a randomly initialised
MedicalNet ResNet-10 named as such: no pretrained FID weights exist on this machine; a random
InceptionV3 over every slice of three planes takes about an hour on 2 CPU cores, so it is left out).

    python bench/paper_protocol.py
"""

from __future__ import annotations

import argparse
import time

from _common import WORK, command_line, fmt, header, peak_rss_gib, write_section
from vqgan import phantoms

from medlsdm.config import load_config
from medlsdm.evaluation.evaluate import evaluate
from medlsdm.evaluation.stats import ratio_with_interval, with_interval
from medlsdm.evaluation.studies import run_augment_study
from medlsdm.pipeline import sample_to_folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", type=int, default=60, help="phantom set size (as in bench/vqgan.py)")
    ap.add_argument("--aug-real", type=int, default=4, help="real cases in the augmentation study's small subset")
    ap.add_argument("--aug-synthetic", type=int, default=16, help="synthetic volumes added in the study")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    cfg = load_config("tiny")
    data, run = phantoms(args.cases, cfg.data.shape), WORK / f"ldm_{cfg.ldm.objective}-{cfg.ldm.latent_norm}"
    t0 = time.perf_counter()
    syn_test, syn_train = WORK / "synthetic_test", WORK / "synthetic_train"
    how = dict(sampler=cfg.ldm.sampler, steps=cfg.ldm.sampling_steps)  # the preset's default sampler
    sample_to_folder(run, data / "labelsTs", syn_test, seed=0, device="cpu", **how)
    train_labels = sorted((data / "labelsTr").glob("*.nii.gz"))[: args.aug_synthetic]
    aug_labels = WORK / "aug_labels"
    aug_labels.mkdir(exist_ok=True)
    for f in train_labels:
        if not (aug_labels / f.name).exists():
            (aug_labels / f.name).symlink_to(f)
    sample_to_folder(run, aug_labels, syn_train, seed=1, device="cpu", **how)
    sample_s = time.perf_counter() - t0

    report = WORK / "report"
    run_cfg = load_config(run / "config.yaml")
    run_cfg.seg = cfg.seg  # the preset's current segmenter (the run was trained before it changed)
    m = evaluate(data, syn_test, report, train=data, features="domain,random-medicalnet", cfg=run_cfg,
                 device="cpu", progress=False)
    aug = run_augment_study(data, syn_train, WORK / "augment", cfg=run_cfg, n_real=args.aug_real,
                            seeds=args.seeds, device="cpu", progress=False, classical=False)
    total_s = time.perf_counter() - t0

    dice = m["dice"]["table"]
    names = [n for n in cfg.data.label_names[1:]]
    t2 = ["| data | " + " | ".join(names) + " | mean (foreground) |", "|---" * (len(names) + 2) + "|"]
    def ci(value, bounds) -> str:
        return with_interval(value, bounds, missing="n/a")

    for row in ("real train", "real test", "synthetic"):
        d = dice[row]
        t2.append(f"| {row} ({d['n']}) | " + " | ".join(ci(d["per_class"].get(n), d["per_class_ci"][n]) for n in names)
                  + f" | **{ci(d['mean'], d['mean_ci'])}** |")
    ratio = m["dice"].get("ratio", {})

    def rr(x: dict) -> str:
        return ratio_with_interval(x, missing="n/a")

    t2.append("| synthetic / real test | " + " | ".join(rr(ratio.get(n)) for n in names)
              + f" | **{rr(ratio.get('mean'))}** |")
    p = m["paired"]
    t3 = ["| extractor | FID axial | FID coronal | FID sagittal | 3D-FID |", "|---|---|---|---|---|"]
    for kind, f in m["fid"].items():
        ex = f["extractor"]
        t3.append(f"| {ex['name']} (sha256 {str(ex.get('sha256'))[:12]}, pretrained: {ex.get('pretrained')}) | "
                  f"{fmt(f['axial'])} | {fmt(f['coronal'])} | {fmt(f['sagittal'])} | {fmt(f.get('3d'))} |")
    inter = m["inter_slice"]
    priv = m.get("privacy", {})
    img = priv.get("image", {})
    feat = priv.get("feature", {})
    md = "\n".join([
        "## Paper protocol on phantoms (Tables 2 and 3 analogues), augmentation, privacy", "", header(command_line()),
        f"Model: `bench/_work/{run.name}` from `bench/ldm.py` "
        f"(tiny preset, {cfg.ldm.sampler.upper()}-{cfg.ldm.sampling_steps}). "
        f"{m['inputs']['n_synthetic']} synthetic volumes from the held-out label maps; "
        f"sampling took {sample_s:.0f} s, "
        f"the whole protocol {total_s / 60:.1f} min; peak RSS {peak_rss_gib():.2f} GiB.", "",
        f"**Table 2 analogue: Dice of a 3D U-Net trained on the real training set** "
        f"(segmenter sha256 {str(m['dice']['segmenter'].get('sha256'))[:12]}, the tiny preset's current settings; "
        "background excluded from every mean; brackets: 95% bootstrap interval over volumes)",
        "", *t2, "",
        "**Table 3 analogue: synthetic vs real volumes of the same label maps**", "",
        "| LPIPS | SSIM | RMSE (normalised [-1, 1] units) | PSNR (dB) |", "|---|---|---|---|",
        f"| {fmt(p.get('lpips', {}).get('mean'))} ({p.get('lpips', {}).get('backbone', 'not run')}) | "
        f"{fmt(p['ssim']['mean'], 4)} | "
        f"{fmt(p['rmse']['mean'], 4)} | {fmt(p['psnr']['mean'], 2)} |", "",
        *t3, "",
        "FIDs from different extractors are not comparable; the randomly initialised MedicalNet is a sanity check, "
        "not a published FID. The domain extractor is the encoder of the Table 2 segmenter. InceptionV3 (2D FID as in "
        "the paper) needs pytorch-fid's weights file, which this machine does not have.", "",
        f"Inter-slice consistency (normalised adjacent-slice change, real vs synthetic): real mean "
        f"{fmt(inter.get('real_mean'))}, synthetic mean {fmt(inter.get('synthetic_mean'))}, 1D Wasserstein "
        f"{fmt(inter.get('wasserstein'))}.", "",
        f"**Augmentation study** ({aug['n_real']} real training volumes, plus {aug['n_synthetic']} synthetic volumes "
        f"from other training label maps; {aug['steps']} steps per run; seeds {aug['seeds']}; "
        f"Dice on {aug['n_test']} real test volumes):", "",
        "| training data | mean Dice | std over seeds |", "|---|---|---|",
        f"| real only | {fmt(aug['real_only']['mean'])} | {fmt(aug['real_only']['std'])} |",
        f"| real + synthetic | {fmt(aug['real_plus_synthetic']['mean'])} | "
        f"{fmt(aug['real_plus_synthetic']['std'])} |", "",
        f"Gain: {aug['gain']:+.3f}, paired by seed [{aug['gains']['real_plus_synthetic']['lo']:+.3f}, "
        f"{aug['gains']['real_plus_synthetic']['hi']:+.3f}] (95% bootstrap over seeds; the four-arm study with "
        "classical augmentation and 5 seeds is `bench/augment.py`, section `augment`).", "",
        f"**Privacy audit** ({priv.get('n_synthetic')} synthetic, {priv.get('n_heldout')} real held-out, "
        f"{priv.get('n_train')} training volumes): fraction of synthetic volumes closer to a training scan "
        "than the 5th "
        f"percentile of real-held-out-to-training distances: image space {fmt(img.get('fraction_below'))}, "
        f"feature space {fmt(feat.get('fraction_below'))}; exact copies: {len(priv.get('exact_copies', []))}. "
        f"Median nearest-training distance (image space): synthetic {fmt(img.get('synthetic_median'))}, "
        f"real held-out {fmt(img.get('heldout_median'))}.", "",
        "Report with figures: `bench/_work/report/report.md` (regenerated by this script, not committed).",
    ])
    write_section("paper_protocol", md)
    print(md)


if __name__ == "__main__":
    main()
