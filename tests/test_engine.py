"""The shared training engine: exact resume, atomic checkpoints, deterministic data order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from medlsdm.config import load_config
from medlsdm.errors import UserError
from medlsdm.training.distributed import DistContext
from medlsdm.training.engine import ResumableSampler, Task, Trainer


class Toy(Dataset):
    def __init__(self, n: int = 10) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i]}


class ToyTask(Task):
    """A regression with dropout (uses the global RNG) and an EMA-like buffer updated after each step."""

    name = "toy"

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 4))
        self.ema = nn.Linear(4, 4)

    def modules(self):
        return {"net": self.net, "ema": self.ema}

    def trainable(self):
        return {"net": self.net}

    def configure(self, device, wrapped, train):
        self.view = wrapped["net"]
        return {"opt": torch.optim.Adam(self.net.parameters(), lr=1e-2)}

    def training_losses(self, batch, step):
        x = batch["x"]
        loss = (self.view(x) - x.flip(-1)).pow(2).mean()
        return loss, {"loss": loss.item()}

    def after_step(self, step):
        with torch.no_grad():
            self.ema.weight.mul_(0.9).add_(0.1 * self.net[2].weight[:, :4])


def _trainer(run: Path, max_steps: int = 6) -> Trainer:
    cfg = load_config("tiny")
    tc = cfg.train_vqgan
    tc.batch_size, tc.grad_accum, tc.ckpt_every, tc.log_every, tc.val_every = 3, 2, 3, 1, 1000
    tc.max_steps, tc.keep_best = max_steps, None  # the toy task has no validation metric
    return Trainer(ToyTask(), cfg, tc, run, Toy(), None, DistContext(), progress=False)


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    full = _trainer(tmp_path / "full")
    full.fit(6)
    part = _trainer(tmp_path / "part")
    part.fit(3)  # "interrupted" after the checkpoint at step 3
    resumed = _trainer(tmp_path / "part")
    resumed.fit(6, resume=True)
    assert resumed.step == 6
    for key in ("net", "ema"):
        a, b = full.task.modules()[key].state_dict(), resumed.task.modules()[key].state_dict()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{key}.{name} differs after resume"
    # a fresh run from scratch differs from a resumed one only if resume were broken; sanity: training moved weights
    fresh = ToyTask()
    assert not torch.equal(fresh.net[0].weight, resumed.task.net[0].weight)


def test_checkpoints_are_complete_and_pruned(tmp_path: Path) -> None:
    t = _trainer(tmp_path / "run", max_steps=9)
    t.fit()
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_0000009"
    kept = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert kept == ["step_0000006", "step_0000009"]  # two newest kept, no temporary folders left
    files = {p.name for p in (root / "step_0000009").iterdir()}
    assert {"net.safetensors", "ema.safetensors", "state.pt", "rng_rank0.pt"} <= files
    assert (tmp_path / "run" / "config.yaml").is_file()
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,split,name,value" and len(rows) == 1 + 9


def test_resume_without_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no checkpoint"):
        _trainer(tmp_path / "empty").fit(2, resume=True)


def test_checkpoint_of_other_architecture_is_a_user_error(tmp_path: Path) -> None:
    t = _trainer(tmp_path / "run", max_steps=3)
    t.fit()
    other = _trainer(tmp_path / "run")
    other.task.net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 4))
    with pytest.raises(UserError, match="does not fit"):
        other.load_checkpoint(other.latest_checkpoint())


def test_sampler_is_deterministic_and_resumable() -> None:
    def take(s, k):
        it = iter(s)
        return [next(it) for _ in range(k)]

    whole = take(ResumableSampler(7, seed=3), 20)
    assert take(ResumableSampler(7, seed=3, start=9), 11) == whole[9:]
    assert sorted(whole[:7]) == list(range(7))  # each epoch is a permutation
    r0, r1 = take(ResumableSampler(8, 3, 0, 2), 4), take(ResumableSampler(8, 3, 1, 2), 4)
    assert not set(r0) & set(r1)  # ranks see disjoint samples within an epoch


class ScoredToyTask(ToyTask):
    """Validation returns a scripted score per step (higher is better), so the best step is known."""

    best_metrics = ("score",)
    SCORES = {2: 1.0, 4: 3.0, 6: 2.0, 8: float("nan"), 10: 2.5}

    def validate(self, loader, step, run_dir):
        return {"score": self.SCORES[step]}


def _scored_trainer(run: Path, keep_best) -> Trainer:
    cfg = load_config("tiny")
    tc = cfg.train_vqgan
    tc.batch_size, tc.grad_accum, tc.ckpt_every, tc.log_every, tc.val_every = 3, 1, 2, 1, 2
    tc.keep_best = keep_best
    return Trainer(ScoredToyTask(), cfg, tc, run, Toy(), Toy(2), DistContext(), progress=False)


def test_keep_best_keeps_the_best_validation_weights_across_resume(tmp_path: Path) -> None:
    import json

    from medlsdm.io import load_weights
    from medlsdm.runs import selected_weights

    run = tmp_path / "run"
    t = _scored_trainer(run, "score")
    t.fit(4)  # best so far: step 4 (score 3.0)
    at4 = {k: v.clone() for k, v in t.task.net.state_dict().items()}
    t = _scored_trainer(run, "score")
    t.fit(10, resume=True)  # steps 6 (2.0), 8 (NaN: never "best") and 10 (2.5) are worse: step 4 stays
    assert json.loads((run / "best" / "best.json").read_text()) == {"metric": "score", "value": 3.0, "step": 4,
                                                                    "folder": "step_0000004"}
    kept = selected_weights(run, "net")
    assert kept == run / "best" / "step_0000004" / "net.safetensors"
    assert all(torch.equal(load_weights(kept)[k], at4[k]) for k in at4)
    assert not all(torch.equal(load_weights(kept)[k], t.task.net.state_dict()[k]) for k in at4)  # latest differs
    assert sorted(p.name for p in (run / "best").iterdir()) == ["best.json", "step_0000004"]  # nothing half-written
    with pytest.raises(UserError, match="already holds a training run"):
        _scored_trainer(run, "score").fit(2)  # a new run (no --resume) would mix with the old one's files
    from medlsdm.training.run_dir import claim_run_dir

    claim_run_dir(run, resume=False, overwrite=True)  # what --overwrite does: the old run's outputs go
    assert not (run / "checkpoints").exists() and not (run / "best").exists()
    _scored_trainer(run, "score").fit(2)  # and the new run starts a new record
    assert json.loads((run / "best" / "best.json").read_text())["step"] == 2


def test_without_keep_best_the_latest_weights_are_used(tmp_path: Path) -> None:
    from medlsdm.runs import selected_weights

    run = tmp_path / "run"
    _scored_trainer(run, None).fit(4)
    assert not (run / "best").exists()
    assert selected_weights(run, "net") == run / "checkpoints" / "step_0000004" / "net.safetensors"
    with pytest.raises(UserError, match="keep_best 'psnr' is not a validation metric"):
        _scored_trainer(tmp_path / "other", "psnr")  # refused before any work, on every rank
