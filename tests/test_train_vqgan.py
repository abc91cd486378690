"""Stage-1 training end to end on micro phantoms: outputs, exact resume, latent export, 2-process DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medlsdm.errors import UserError
from medlsdm.io import load_weights
from medlsdm.training.latents import LatentDataset, encode_dataset
from medlsdm.training.run import train_vqgan


def _weights(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    out = {}
    for f in sorted((run / "checkpoints" / latest).glob("*.safetensors")):
        out.update({f"{f.stem}.{k}": v for k, v in load_weights(f).items()})
    return out


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory: pytest.TempPathFactory, phantoms: Path, micro_config: Path) -> Path:
    run = tmp_path_factory.mktemp("vq") / "run"
    train_vqgan(phantoms, micro_config, run, max_steps=4, progress=False)
    return run


def test_run_folder_contents(vq_run: Path) -> None:
    assert (vq_run / "config.yaml").is_file()
    info = json.loads((vq_run / "run_info.json").read_text())
    assert "perceptual" in info and "no perceptual" in info["perceptual"].lower()  # the fallback is named
    rows = (vq_run / "metrics.csv").read_text().splitlines()
    names = {r.split(",")[2] for r in rows[1:]}
    assert {"l1", "psnr", "ssim", "codebook_usage", "perplexity"} <= names
    assert list((vq_run / "previews").glob("*.png"))
    w = _weights(vq_run)
    assert any(k.startswith("vqgan.") for k in w) and any(k.startswith("disc3d.") for k in w)


def test_resume_equals_uninterrupted(tmp_path: Path, phantoms: Path, micro_config: Path, vq_run: Path) -> None:
    run = tmp_path / "run"
    train_vqgan(phantoms, micro_config, run, max_steps=2, progress=False)  # stops at the step-2 checkpoint
    train_vqgan(phantoms, micro_config, run, max_steps=4, resume=True, progress=False)
    a, b = _weights(vq_run), _weights(run)
    assert a.keys() == b.keys()
    for k in a:  # the discriminators switch on at step 2, so the resumed half trains them too
        assert torch.equal(a[k], b[k]), k


def test_encode_writes_latents_and_codebook_range(tmp_path: Path, phantoms: Path, vq_run: Path) -> None:
    out = encode_dataset(vq_run, phantoms, tmp_path / "lat", progress=False)
    ds = LatentDataset(out)
    assert len(ds) == 6  # the training split of 8 phantoms
    item = ds[0]
    assert item["latent"].shape == (8, 2, 8, 8) and item["label"].shape == (1, 8, 32, 32)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["zmin"] < stats["zmax"] and stats["vqgan_weights_sha256"]


def test_bad_checkpoint_path_is_a_user_error(tmp_path: Path, phantoms: Path) -> None:
    with pytest.raises(UserError, match="run folder not found"):
        encode_dataset(tmp_path / "missing", phantoms, tmp_path / "lat")


@pytest.mark.slow
def test_two_process_ddp_ranks_hold_identical_weights(tmp_path: Path, phantoms: Path, micro_config: Path) -> None:
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "medlsdm", "train-vqgan", "--data", str(phantoms), "--config", str(micro_config),
           "--out", str(run), "--max-steps", "3", "--no-progress", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = json.loads((run / "ddp_check.json").read_text())
    assert check["world_size"] == 2 and check["step"] == 3
    assert check["identical"] and len(set(check["fingerprints"])) == 1


def test_checkpoint_of_another_architecture_is_a_user_error(tmp_path: Path, vq_run: Path) -> None:
    import shutil

    from medlsdm.runs import load_vqgan

    other = tmp_path / "other"
    shutil.copytree(vq_run, other)
    cfg = (other / "config.yaml").read_text().replace("channels: 4\n", "channels: 8\n", 1)
    (other / "config.yaml").write_text(cfg)
    with pytest.raises(UserError, match="does not fit the VQ-GAN architecture"):
        load_vqgan(other)
