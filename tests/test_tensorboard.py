"""TensorBoard event files beside metrics.csv: the same scalars, the validation previews, no duplicates on resume."""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from medlsdm.config import load_config
from medlsdm.training.distributed import DistContext
from medlsdm.training.engine import Task, Trainer

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


class Toy(Dataset):
    def __init__(self, n: int = 6) -> None:
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i]}


def _png(step: int) -> np.ndarray:
    """A distinct small RGB picture per step (what a preview PNG holds)."""
    return np.random.default_rng(step).integers(0, 256, (9, 13, 3), dtype=np.uint8)


class PreviewTask(Task):
    """A regression whose validation returns two metrics and writes a preview PNG at ``preview_steps``; training
    raises before step ``crash_at`` (an interrupted run)."""

    name = "toy"

    def __init__(self, preview_steps=(), crash_at=None) -> None:
        torch.manual_seed(0)
        self.net = nn.Linear(4, 4)
        self.preview_steps, self.crash_at = set(preview_steps), crash_at

    def modules(self):
        return {"net": self.net}

    def trainable(self):
        return {"net": self.net}

    def configure(self, device, wrapped, train):
        return {"opt": torch.optim.Adam(self.net.parameters(), lr=1e-2)}

    def training_losses(self, batch, step):
        if step + 1 == self.crash_at:
            raise RuntimeError("simulated crash")
        x = batch["x"]
        loss = (self.net(x) - x.flip(-1)).pow(2).mean()
        return loss, {"loss": loss.item(), "scaled": 1e-4 * loss.item()}

    def validate(self, loader, step, run_dir):
        if step in self.preview_steps:
            (run_dir / "previews").mkdir(parents=True, exist_ok=True)
            Image.fromarray(_png(step)).convert("RGBA").save(run_dir / "previews" / f"step_{step:07d}.png")
        w = self.net.weight.detach()
        return {"score": float(w.abs().mean()), "psnr_window": 20.0 + float(w.sum())}


def _trainer(run: Path, task: PreviewTask, val_every: int, ckpt_every: int) -> Trainer:
    cfg = load_config("tiny")
    tc = cfg.train_vqgan
    tc.batch_size, tc.grad_accum, tc.log_every, tc.keep_best = 2, 1, 1, None
    tc.val_every, tc.ckpt_every = val_every, ckpt_every
    return Trainer(task, cfg, tc, run, Toy(), Toy(2), DistContext(), progress=False)


def _csv(run: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    with open(run / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(f"{row['split']}/{row['name']}", []).append((int(row["step"]), float(row["value"])))
    return {k: sorted(v) for k, v in out.items()}


def _events(run: Path) -> EventAccumulator:
    files = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert files, "no TensorBoard event file beside metrics.csv"
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _assert_same_as_csv(run: Path) -> None:
    table, acc = _csv(run), _events(run)
    assert set(acc.Tags()["scalars"]) == set(table)
    for tag, rows in table.items():
        points = [(e.step, e.value) for e in acc.Scalars(tag)]
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), f"{tag}: duplicate steps {steps}"
        assert steps == [s for s, _ in rows], tag
        for (step, got), (_, want) in zip(points, rows):  # metrics.csv keeps 6 significant digits
            assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-12), (tag, step, got, want)


def _images(run: Path) -> dict[int, np.ndarray]:
    acc = _events(run)
    if "previews" not in acc.Tags()["images"]:
        return {}
    out = {}
    for e in acc.Images("previews"):
        img = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
        assert (e.width, e.height) == (img.shape[1], img.shape[0])
        out[e.step] = img
    return out


def test_events_hold_the_csv_scalars_and_the_previews(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    with SummaryWriter(str(run / "tensorboard")) as old:  # an earlier, overwritten run's events must not show
        old.add_scalar("train/old", 1.0, 1)
    (run / "previews").mkdir(parents=True)
    Image.fromarray(_png(99)).save(run / "previews" / "step_0000004.png")  # stale: validation at 4 writes none
    _trainer(run, PreviewTask(preview_steps={2}), val_every=2, ckpt_every=4).fit(4)
    table = _csv(run)
    assert {"train/loss", "train/scaled", "val/score", "val/psnr_window"} == set(table)
    assert [s for s, _ in table["val/score"]] == [2, 4] and [s for s, _ in table["train/loss"]] == [1, 2, 3, 4]
    _assert_same_as_csv(run)
    images = _images(run)
    assert sorted(images) == [2]  # the preview written at step 2; the stale step-4 file is not one of this run's
    assert np.array_equal(images[2], _png(2))


def test_resume_shows_no_duplicate_steps(tmp_path: Path) -> None:
    run = tmp_path / "run"
    crashing = _trainer(run, PreviewTask({3, 6}, crash_at=6), val_every=3, ckpt_every=3)
    with pytest.raises(RuntimeError, match="simulated crash"):  # checkpoint at 3, logged up to 5, then a crash
        crashing.fit(6)
    assert crashing.tb is None  # the writer was closed on the error (its thread and file released)
    crashed = _events(run)  # and steps 4 and 5 reached the event file
    assert [e.step for e in crashed.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    # event files are read in name order, which starts with the creation second: a real resume is a later process
    time.sleep(1.0)
    _trainer(run, PreviewTask({3, 6}), val_every=3, ckpt_every=3).fit(6, resume=True)
    _assert_same_as_csv(run)  # steps 4 and 5 once each; the checkpoint's step 3 (train and val) kept
    assert [s for s, _ in _csv(run)["train/loss"]] == [1, 2, 3, 4, 5, 6]
    images = _images(run)
    assert sorted(images) == [3, 6] and np.array_equal(images[6], _png(6))


def test_vqgan_stage_logs_its_preview(tmp_path: Path, phantoms: Path, micro_config: Path) -> None:
    from medlsdm.training.run import train_vqgan

    run = train_vqgan(phantoms, micro_config, tmp_path / "vq", max_steps=2, progress=False)
    _assert_same_as_csv(run)
    assert {"val/psnr", "val/psnr_window", "train/l1"} <= set(_csv(run))
    preview = np.asarray(Image.open(run / "previews" / "step_0000002.png").convert("RGB"))
    images = _images(run)
    assert sorted(images) == [2] and np.array_equal(images[2], preview)
