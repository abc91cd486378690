"""Can the Dice-protocol segmenter tell? Real held-out Dice per class (95% bootstrap intervals) for settings of the
tiny preset's segmenter, on the 60-phantom set of bench/vqgan.py (48 training, 12 test volumes), and on a larger
held-out set of other phantom subjects (generator seed 1, ``--held-out`` volumes), so that the lesion, present in
only 8 of the 12 test volumes, is measured on more than 8 cases.

    python bench/segmenter.py

Variants: the old tiny setting (8-16-32 U-Net, 120 steps, the model's -1000..1000 HU input), the display-window
input alone, with equal class-balanced crops, and with inverse-square-root class-balanced crops (the new default).
Writes the `segmenter` section of BENCHMARKS.md.

    python bench/segmenter.py --scaling

Is the lesion limited by the number of training subjects? The default with a poly learning rate and 2400 steps, and a
32-256-wide network with 4800 steps (under 10 CPU minutes), trained on the 48 training phantoms alone and with 144 or
336 more subjects (generator seed 2), scored on both test sets. Writes the `segmenter_scaling` section.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from _common import command_line, header, write_section
from vqgan import phantoms

from medlsdm.config import load_config
from medlsdm.evaluation.pairing import load_real
from medlsdm.evaluation.segmentation import evaluate_dice, train_segmenter
from medlsdm.evaluation.stats import with_interval

BIG = dict(channels=(16, 32, 64, 128), patch=(16, 32, 32), batch_size=4, steps=1200, lr=2e-3)
WIDE = dict(channels=(32, 64, 128, 256))
VARIANTS = {
    "old tiny (8-16-32, 120 steps, model input)": dict(channels=(8, 16, 32), patch=(16, 32, 32), batch_size=4,
                                                       lr=1e-3, epochs=10, steps=0, input_window="model",
                                                       crop_balance="none"),
    "16-128, 1200 steps, display window": dict(BIG, input_window="display", crop_balance="none"),
    "+ equal class crops": dict(BIG, input_window="display", class_ratios=[0.5, 1, 1, 1, 1, 1]),
    "+ inverse-sqrt class crops (default)": dict(BIG, input_window="display", crop_balance="inverse_sqrt"),
    "+ 32-256 widths": dict(BIG, input_window="display", crop_balance="inverse_sqrt", **WIDE),
    "+ 32-256 widths, poly lr, 2400 steps": dict(BIG, input_window="display", crop_balance="inverse_sqrt", **WIDE,
                                                  lr_schedule="poly", steps=2400),
}
LESION = "lesion"


def lesion_cases(test, d: dict, cls: int) -> str:
    """Per test volume with a lesion (class ``cls``): its voxel count, whether it touches the volume's border, its
    Dice."""
    c = list(test.ids)
    out = []
    for i, dice in enumerate(d["per_class_cases"][LESION]):
        if dice is None:
            continue
        m = test.labels[i][0] == cls
        edge = bool(m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any() or m[:, :, 0].any()
                    or m[:, :, -1].any())
        out.append(f"{c[i]} {int(m.sum())} vox{' (at the border)' if edge else ''}: {dice:.2f}")
    return "; ".join(out)


SIZE_BINS = (200, 600)  # lesion voxels: small < 200 <= medium < 600 <= large


def lesion_groups(test, d: dict, cls: int, liver: int) -> str:
    """Mean lesion Dice (and volume count) by the lesion's voxels in the volume (small / medium / large, see
    SIZE_BINS) and by its appearance: darker (hypodense) or brighter (hyperdense) than the rest of the liver."""
    groups: dict[str, list[float]] = {k: [] for k in ("small", "medium", "large", "hypo", "hyper")}
    for i, dice in enumerate(d["per_class_cases"][LESION]):
        if dice is None:
            continue
        lab, img = test.labels[i][0], test.images[i][0]
        n = int((lab == cls).sum())
        groups["small" if n < SIZE_BINS[0] else "medium" if n < SIZE_BINS[1] else "large"].append(dice)
        groups["hyper" if float(img[lab == cls].mean()) > float(img[lab == liver].mean()) else "hypo"].append(dice)
    return " | ".join(f"{sum(v) / len(v):.2f} ({len(v)})" if v else "-" for v in groups.values())


def ci(d: dict, name: str | None = None) -> str:
    value, bounds = (d["mean"], d["mean_ci"]) if name is None else (d["per_class"][name], d["per_class_ci"][name])
    return with_interval(value, bounds)


def train_and_score(base, spec: dict, images: list, labels: list, sets: list) -> tuple[float, dict, list[dict]]:
    """Train the tiny segmenter with ``spec`` over ``base.seg`` (seed 0) and score it on each VolumeSet of ``sets``:
    (training seconds, training info, one Dice dict per set)."""
    cfg = dataclasses.replace(base, seg=dataclasses.replace(base.seg, **spec))
    t = time.perf_counter()
    model, info = train_segmenter(images, labels, cfg, seed=0)
    seconds = time.perf_counter() - t
    return seconds, info, [evaluate_dice(model, s.images, s.labels, cfg) for s in sets]


POLY = dict(lr_schedule="poly")
SCALING = [  # (setting, its seg settings, training phantoms added to the 48: generator seed 2, in no other set)
    *[("default, poly lr, 2400 steps", dict(POLY, steps=2400), more) for more in (0, 144, 336)],
    *[("32-256 widths, poly lr, 4800 steps", dict(POLY, **WIDE, steps=4800), more) for more in (0, 144)],
]


def scaling(base, train, test, extra, names: list[str], cls: int, liver: int, data) -> None:
    """The `segmenter_scaling` section: settings trained on 1x, 4x and 8x the training subjects."""
    groups = " lesion: small | medium | large | hypodense | hyperdense |"
    rows = [f"| setting | training subjects | train s | {len(test.images)} test: mean | lesion | "
            f"{len(extra.images)} others: mean | " + " | ".join(names) + " |" + groups,
            "|---" * (len(names) + 11) + "|"]
    added = {more: load_real(phantoms(more, base.data.shape, seed=2, test_fraction=0.0), base.data, "train",
                             need_labels=True) for more in sorted({m for _, _, m in SCALING} - {0})}
    for label, spec, more in SCALING:
        images, labels = list(train.images), list(train.labels)
        if more:
            images, labels = images + list(added[more].images), labels + list(added[more].labels)
        seconds, _, (d, e) = train_and_score(base, spec, images, labels, [test, extra])
        rows.append(f"| {label} | {len(images)}{' (the training split)' if not more else ''} | {seconds:.0f} | "
                    f"{ci(d)} | {ci(d, LESION)} | **{ci(e)}** | " + " | ".join(ci(e, n) for n in names) + " | "
                    + lesion_groups(extra, e, cls, liver) + " |")
        print(rows[-1], flush=True)
    md = "\n".join([
        "## segmenter_scaling: is the lesion limited by the number of training subjects?", "",
        header(command_line()),
        f"Segmenter settings of the tiny preset trained on the {len(train.images)} training phantoms of {data.name} "
        f"alone and with {' or '.join(map(str, added))} other subjects (generator seed 2; the same steps for every "
        f"size); Dice on the {len(test.images)} test volumes and on the {len(extra.images)} other held-out subjects "
        "(generator seed 1) of the `segmenter` section, 95% bootstrap intervals over volumes; the lesion groups as "
        "there. Seed 0, one run per row.", "",
        *rows,
    ])
    write_section("segmenter_scaling", md)
    print(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=60)
    ap.add_argument("--held-out", type=int, default=48, help="phantoms of the larger held-out set (generator seed 1)")
    ap.add_argument("--scaling", action="store_true",
                    help="train on 1x, 4x and 8x the training subjects instead (the `segmenter_scaling` section)")
    args = ap.parse_args()
    base = load_config("tiny")
    data = phantoms(args.cases, base.data.shape)
    train = load_real(data, base.data, "train", need_labels=True)
    test = load_real(data, base.data, "test", need_labels=True)
    # other subjects (generator seed 1, none in the seed-0 set), all of them held out
    extra = load_real(phantoms(args.held_out, base.data.shape, seed=1, test_fraction=0.0), base.data, "train",
                      need_labels=True)
    cls, liver = base.data.label_names.index(LESION), base.data.label_names.index("liver")
    names = list(base.data.label_names[1:])
    if args.scaling:
        return scaling(base, train, test, extra, names, cls, liver, data)
    rows = ["| setting | train s | steps | mean | " + " | ".join(names) + " |", "|---" * (len(names) + 4) + "|"]
    groups = " | lesion: small | medium | large | hypodense | hyperdense |"
    rows_extra = ["| setting | mean | " + " | ".join(names) + groups,
                  "|---" * (len(names) + 7) + "|"]
    per_lesion = {}
    for label, spec in VARIANTS.items():
        seconds, info, (d, e) = train_and_score(base, spec, train.images, train.labels, [test, extra])
        rows.append(f"| {label} | {seconds:.0f} | {info['steps']} | **{ci(d)}** | "
                    + " | ".join(ci(d, n) for n in names) + " |")
        per_lesion[label] = lesion_cases(test, d, cls)
        rows_extra.append(f"| {label} | **{ci(e)}** | " + " | ".join(ci(e, n) for n in names) + " | "
                          + lesion_groups(extra, e, cls, liver) + " |")
        print(rows[-1], per_lesion[label], rows_extra[-1], flush=True)
    n_lesion = sum(v is not None for v in d["per_class_cases"][LESION])
    n_lesion_extra = sum(v is not None for v in e["per_class_cases"][LESION])
    md = "\n".join([
        "## segmenter: real held-out Dice of the Dice-protocol network (tiny preset)", "",
        header(command_line()),
        f"Phantoms: {len(train.images)} training and {len(test.images)} test volumes ({data.name}, lesions hypo- or "
        "hyperdense at random). Dice on the real test volumes, foreground classes; brackets: 95% bootstrap "
        f"interval over volumes (a class counts only in volumes that have it; the lesion is in {n_lesion} of "
        f"{len(test.images)}).", "",
        *rows, "",
        "The display window (-160..240 HU mapped to [-1, 1]) lets the network see soft tissue, where kidney and "
        "liver differ by a few per cent of the -1000..1000 HU model range; class-balanced crops let it see the "
        "lesion. Lesion Dice per test volume (voxels; whether the lesion touches the border of the volume, i.e. is "
        "cut by the field of view):", "",
        *[f"- {label}: {text}" for label, text in per_lesion.items() if label != next(iter(VARIANTS))], "",
        f"The same networks on {len(extra.images)} other phantom subjects (generator seed 1, never trained on; the "
        f"lesion is in {n_lesion_extra} of them). Last five columns: mean lesion Dice (volumes) by the lesion's "
        f"voxels in the volume, small < {SIZE_BINS[0]} <= medium < {SIZE_BINS[1]} <= large, and by whether it is "
        "darker (hypodense) or brighter (hyperdense) than the rest of the liver in the image.", "",
        *rows_extra,
    ])
    write_section("segmenter", md)
    print(md)


if __name__ == "__main__":
    main()
