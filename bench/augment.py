"""Does synthetic data help a segmenter trained on scarce real data, and more than classical augmentation?

    python bench/augment.py [--n-real 4] [--seeds 0 1 2 3 4]

Four arms, paired by seed (same real subset, same steps, same seeds): real only; real + MONAI classical
augmentation; real + synthetic volumes from 16 other training label maps; real + synthetic volumes from 16 new
label maps derived from the real subset's own maps (`medlsdm derive-labels`). Model: `bench/_work/ldm_v-codebook`
(bench/ldm.py, tiny preset). Writes the `augment` section of BENCHMARKS.md.

    python bench/augment.py --mix-prob 1 --no-classical

derives the new label maps with class-preserving mixing among the subset's maps and writes `augment_mix`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import WORK, command_line, fmt, header, write_section
from vqgan import phantoms

from medlsdm.config import load_config
from medlsdm.data.derive import DeformConfig, derive_folder
from medlsdm.evaluation.pairing import real_cases
from medlsdm.evaluation.studies import run_augment_study
from medlsdm.pipeline import sample_to_folder

LABELS = {"real_only": "real only", "real_classical": "real + classical augmentation",
          "real_plus_synthetic": "real + synthetic (training label maps)",
          "real_plus_new": "real + synthetic (new label maps)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=60)
    ap.add_argument("--n-real", type=int, default=4)
    ap.add_argument("--n-synthetic", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--mix-prob", type=float, default=0.0,
                    help="derive the new label maps with class-preserving mixing (derive-labels --mix-prob) among the "
                         "real subset's maps; > 0 writes the `augment_mix` section instead of `augment`")
    ap.add_argument("--no-classical", action="store_true", help="leave out the classical-augmentation arm")
    args = ap.parse_args()
    tag = "" if args.mix_prob == 0 else f"_mix{args.mix_prob:g}"
    cfg = load_config("tiny")
    data, run = phantoms(args.cases, cfg.data.shape), WORK / f"ldm_{cfg.ldm.objective}-{cfg.ldm.latent_norm}"
    root = WORK / "augment4"
    t0 = time.perf_counter()
    train = real_cases(data, "train", "auto")
    pick = sorted(np.random.default_rng(0).choice(len(train), args.n_real, replace=False).tolist())  # subset_seed 0
    subset = [train[i] for i in pick]
    others = [c for i, c in enumerate(train) if i not in pick][: args.n_synthetic]
    other_labels = root / "other_labels"
    other_labels.mkdir(parents=True, exist_ok=True)
    for c in others:
        if not (other_labels / c.label.name).exists():
            (other_labels / c.label.name).symlink_to(c.label)
    new_labels = root / f"new_labels{tag}"
    if not new_labels.is_dir():
        per = -(-args.n_synthetic // args.n_real)
        src = root / "subset_labels"
        src.mkdir(parents=True, exist_ok=True)
        for c in subset:
            if not (src / c.label.name).exists():
                (src / c.label.name).symlink_to(c.label)
        body = cfg.data.label_names.index("body") if args.mix_prob else None  # the phantoms label the body
        derive_folder(src, new_labels, n_per_label=per, seed=0,
                      cfg=DeformConfig(mix_prob=args.mix_prob, body_class=body))
    how = dict(sampler=cfg.ldm.sampler, steps=cfg.ldm.sampling_steps, device="cpu", progress=False)
    sample_to_folder(run, other_labels, root / "synthetic_train", seed=1, **how)
    sample_to_folder(run, new_labels, root / f"synthetic_new{tag}", seed=2, **how)
    sample_s = time.perf_counter() - t0
    study_cfg = load_config(run / "config.yaml")
    study_cfg.seg = cfg.seg  # the preset's current segmenter (the run was trained before it changed)
    study = run_augment_study(data, root / "synthetic_train", root / f"study{tag}", cfg=study_cfg,
                              n_real=args.n_real, seeds=args.seeds, synthetic_new=root / f"synthetic_new{tag}",
                              new_labels=new_labels, device="cpu", progress=False, classical=not args.no_classical)
    total_s = time.perf_counter() - t0
    rows = ["| training data | mean Dice | std over seeds | per seed | gain over real only [95% CI] |",
            "|---|---|---|---|---|"]
    for arm in study["arms"]:
        a = study[arm]
        g = study["gains"].get(arm)
        gain = "-" if g is None else f"{g['mean']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]"
        rows.append(f"| {LABELS[arm]} | {fmt(a['mean'])} | {fmt(a['std'])} | "
                    + ", ".join(f"{v:.3f}" for v in a["per_seed"]) + f" | {gain} |")
    vs = study.get("synthetic_vs_classical", {})
    lines = [f"{LABELS[k]} minus classical: {v['mean']:+.3f} [{v['lo']:+.3f}, {v['hi']:+.3f}]" for k, v in vs.items()]
    mixing = ("" if not args.mix_prob else f" with class-preserving mixing among them (--mix-prob {args.mix_prob:g}: "
              "organs swapped between the subset's maps before the warp, body class 1)")
    md = "\n".join([
        ("## augment: scarce real data + classical augmentation vs + synthetic volumes (5 seeds, paired)" if not tag
         else "## augment_mix: new label maps with class-preserving mixing (paired with real only)"), "",
        header(command_line()),
        f"{args.n_real} real training volumes ({', '.join(c.id for c in subset)}) of {data.name}; "
        f"{study['n_synthetic']} synthetic volumes from other training label maps, {study['n_new']} from label maps "
        f"derived from the real subset's own (derive-labels, seed 0){mixing}; model `bench/_work/{run.name}`; "
        f"segmenter: the tiny preset's, {study['steps']} steps per run, seeds {study['seeds']}; Dice (foreground "
        f"mean) on the {study['n_test']} real test volumes. Sampling {sample_s:.0f} s, total {total_s / 60:.1f} "
        "min. Gains are paired by seed (same subset, steps and seed), 95% bootstrap interval over seeds.", "",
        *rows, *(["", "Synthetic vs classical (paired): " + "; ".join(lines) + "."] if lines else []),
    ])
    write_section("augment" + ("_mix" if tag else ""), md)
    print(md)


if __name__ == "__main__":
    main()
