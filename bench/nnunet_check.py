"""Does `medlsdm sample --dataset` write what nnU-Net accepts? Runs nnU-Net's own integrity check on it.

    python bench/nnunet_check.py --model RUN --labels LABELS_DIR --real DATA --nnunet-python /path/to/python

Samples one volume per label map into an nnU-Net raw dataset (with the real training cases of DATA merged in),
then calls ``nnunetv2.experiment_planning.verify_dataset_integrity.verify_dataset_integrity`` with a Python that
has nnunetv2 installed (nnunetv2 is not a medlsdm dependency: ``python -m venv V && V/bin/pip install nnunetv2``).
Writes the `nnunet-check` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK, command_line, header, write_section  # noqa: E402

CHECK = ("import sys; from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity; "
         "verify_dataset_integrity(sys.argv[1], 1); print('nnU-Net integrity check passed')")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=WORK / "ldm_v-codebook")
    p.add_argument("--labels", type=Path, default=WORK / "phantoms_paper_60_16x64x64" / "labelsTs")
    p.add_argument("--real", type=Path, default=WORK / "phantoms_paper_60_16x64x64")
    p.add_argument("--nnunet-python", required=True, help="a python with nnunetv2 installed")
    a = p.parse_args()
    from medlsdm.cli import main as medlsdm

    root = WORK / "nnunet_check"
    shutil.rmtree(root, ignore_errors=True)
    syn, ds = root / "synthetic", root / "nnUNet_raw" / "Dataset501_MedlsdmSynth"
    start = time.perf_counter()
    rc = medlsdm(["sample", "--model", str(a.model), "--labels", str(a.labels), "--out", str(syn), "--device", "cpu",
                  "--no-progress", "--dataset", str(ds), "--with-real", str(a.real)])
    if rc != 0:
        raise SystemExit(f"sample --dataset failed (exit {rc})")
    seconds = time.perf_counter() - start
    version = subprocess.run([a.nnunet_python, "-c", "import importlib.metadata as m; print(m.version('nnunetv2'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    proc = subprocess.run([a.nnunet_python, "-c", CHECK, str(ds)], capture_output=True, text=True)
    meta = json.loads((ds / "dataset.json").read_text())
    kinds = [line.split(",")[1] for line in (ds / "cases.csv").read_text().splitlines()[1:]]
    verdict = "**passed**" if proc.returncode == 0 else f"**failed** (exit {proc.returncode})"
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    md = "\n".join([
        "## nnunet-check: `sample --dataset` against nnU-Net's own dataset rules", "",
        header(command_line()),
        f"Dataset: {ds.name}, {meta['numTraining']} training cases ({kinds.count('synthetic')} synthetic, "
        f"{kinds.count('real')} real), channel {meta['channel_names']['0']}, {len(meta['labels'])} labels; written "
        f"in {seconds:.0f} s (sampling included).",
        f"nnunetv2 {version}, `verify_dataset_integrity(folder, 1)`: {verdict}.", "",
        "Last lines it printed:", "", "```", *tail, "```",
    ])
    write_section("nnunet-check", md)
    print(md)
    if proc.returncode != 0:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
