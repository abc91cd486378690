"""Stage-2 switches side by side: one row per ``bench/ldm.py`` run (``bench/_work/ldm_*_bench.json``).

Each run trains the ``tiny`` LDM for the same wall-clock budget on the same VQ-GAN and latents, with the config
values it names (``--set``), and samples the 12 held-out label maps with the default sampler. This script only
reads those results and writes the comparison (guidance 2.5, the tiny default) to BENCHMARKS.md:

    python bench/ldm.py --minutes 15 --ddpm-cases 4                  # the defaults (full sampler tables)
    python bench/ldm.py --minutes 15 --quick --set keep_depth=true --set depth_positions=relative
    python bench/ldm.py --minutes 15 --quick --set class_weight_power=0.5
    python bench/ldm.py --minutes 15 --quick --lesions hypo          # the same phantoms, every lesion hypodense
    python bench/switches.py
"""

from __future__ import annotations

import json

from _common import WORK, command_line, header, write_section

GUIDANCE = 2.5
CLASSES = ("liver", "kidney", "spine", "lesion")


def row(result: dict) -> str:
    name = ", ".join(f"`{k}: {v}`" for k, v in result.get("overrides", {}).items()
                     if k not in ("objective", "latent_norm")) or "defaults"
    g = str(GUIDANCE)
    default = next(r for r in result["all_cases"] if r["guidance"] == GUIDANCE and r["cases"] > 4
                   and r["sampler"].startswith("DPM++-25"))
    fid = result["fidelity"][g]
    contrast = {c["name"]: c["ratio"] for c in fid.get("contrast", [])}
    seams = result["seams"]["ratios"]
    cells = [name, str(result["ldm_steps"]), f"{default['overall_error']:.3f}", f"{default['matched_error']:.3f}",
             f"{fid['window_metrics']['window']['ssim']:.3f}", f"{fid['grid']['max']:.2f}",
             f"{result['inter_slice'][g]['wasserstein']:.4f}", f"{sum(seams) / len(seams):.2f}",
             *[f"{contrast.get(c, float('nan')):.2f}" for c in CLASSES]]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    runs = sorted(WORK.glob("ldm_*_bench.json"))
    results = [json.loads(p.read_text()) for p in runs]
    results = [r for r in results if "seams" in r and str(GUIDANCE) in r.get("fidelity", {})]
    results.sort(key=lambda r: len(set(r.get("overrides", {})) - {"objective", "latent_norm"}))  # defaults first
    if not results:
        raise SystemExit("no bench/ldm.py results with seams: run bench/ldm.py first")
    md = "\n".join([
        "## Stage-2 switches side by side (`tiny`, 15 CPU minutes of LDM training each, one run each)", "",
        header(command_line()),
        f"Default sampler (DPM++-25), guidance {GUIDANCE:g}, the 12 held-out label maps. Class error as in the "
        "`ldm-*` sections (overall and where two label maps differ); SSIM in the CT display window; grid ratio (1 = "
        "like real); W1 of adjacent-slice changes (inter-slice consistency, lower = more like real); seam ratio of "
        "two 48-slice volumes made in depth windows (1 = no seam); contrast ratio = how conspicuous a class is "
        "against the tissue around it, synthetic / real (1 = as in the real volumes, 0 = invisible). One training "
        "run per row: differences of a few per cent are within run-to-run noise. How many steps a run reached in its "
        "budget depends on the machine's load at the time (other work ran beside the first row's run). `lesions: hypo` "
        "is not a model switch but the same phantoms with every liver lesion hypodense (`bench/ldm.py --lesions "
        "hypo`), where the phantom default draws hypo- or hyperdense lesions per subject and the label map cannot "
        "tell which.", "",
        "| switches | LDM steps | class error | matched | window SSIM | grid | W1 | seam | "
        + " | ".join(f"{c} contrast" for c in CLASSES) + " |",
        "|---" * (8 + len(CLASSES)) + "|",
        *[row(r) for r in results],
    ])
    write_section("ldm-switches", md)
    print(md)


if __name__ == "__main__":
    main()
