"""One training loop for both stages.

The :class:`Trainer` owns everything that is not specific to a model: devices and DDP, bf16
autocast, gradient accumulation, gradient clipping, the deterministic resumable data order, CSV
logs, progress bars, periodic validation, and atomic checkpoints that ``--resume`` continues from
exactly. A :class:`Task` says only what differs between stages: its modules, optimisers, losses,
per-step hooks (EMA) and validation.

Run directory::

    RUN_DIR/config.yaml                  resolved config
    RUN_DIR/metrics.csv                  step,split,name,value (long format)
    RUN_DIR/previews/*.png               validation previews
    RUN_DIR/tensorboard/events.out.*     the same values as metrics.csv (tag ``split/name``) and the previews
                                         (tag ``previews``), for TensorBoard; metrics.csv stays the record
    RUN_DIR/checkpoints/step_000200/     <module>.safetensors, state.pt, rng_rank<r>.pt
    RUN_DIR/checkpoints/latest           name of the newest complete checkpoint
    RUN_DIR/best/step_000400/            <module>.safetensors: the weights with the best validation
    RUN_DIR/best/best.json               ``train.keep_best`` metric so far, and which folder holds them (only when
                                         that is set; a new run without --resume starts a new record)
"""

from __future__ import annotations

import abc
import contextlib
import csv
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from medlsdm.config import Config, TrainConfig, save_config
from medlsdm.errors import UserError
from medlsdm.io import atomic_path, atomic_write_text, load_into, load_state, save_state, save_weights
from medlsdm.runs import latest_checkpoint
from medlsdm.training.distributed import DistContext
from medlsdm.training.run_dir import claim_run_dir


class ResumableSampler(Sampler[int]):
    """Endless, deterministic index stream: epoch ``e`` is ``randperm(n, seed + e)`` split over ranks.

    The stream is a pure function of (seed, rank, world size), so resuming only needs to skip the
    number of indices already consumed (``start``): no sample is seen twice or skipped.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        self.n, self.seed, self.rank, self.world, self.start = n, seed, rank, world_size, start
        self.per_rank = max(1, n // world_size)

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
            mine = perm[self.rank :: self.world][: self.per_rank].tolist()
            yield from mine[offset:]
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # endless; DataLoader only needs a number
        return 2**62


class Task(abc.ABC):
    """What a training stage must provide. Subclasses fill in the hooks."""

    name = "task"
    progress_keys: tuple[str, ...] = ("loss",)  # logged values shown on the progress bar
    best_metrics: tuple[str, ...] = ()  # validation metrics (higher is better) that ``train.keep_best`` may name

    @abc.abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """Every module saved in a checkpoint (trainable ones and e.g. an EMA copy)."""

    @abc.abstractmethod
    def trainable(self) -> dict[str, nn.Module]:
        """The modules that receive gradients (wrapped in DDP under torchrun)."""

    @abc.abstractmethod
    def configure(
        self, device: torch.device, wrapped: Mapping[str, nn.Module], train: TrainConfig
    ) -> dict[str, torch.optim.Optimizer]:
        """Called once after the modules moved to ``device``; ``wrapped`` holds the (DDP) training views.
        Returns the optimisers by name."""

    @abc.abstractmethod
    def training_losses(self, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss of one micro-batch (summed over optimisers; their graphs must be disjoint) and logs."""

    def after_step(self, step: int) -> None:
        """Called after the optimisers stepped (e.g. EMA update)."""

    @torch.no_grad()
    def validate(self, loader: DataLoader, step: int, run_dir: Path) -> dict[str, float]:
        """Validation metrics (main rank only); may write previews under ``run_dir / 'previews'``."""
        return {}


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def use_bf16(precision: str, device: torch.device) -> bool:
    """``auto``: bf16 autocast on GPU, fp32 on CPU. fp16 is deliberately not offered (NaN losses)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"config: precision must be auto, bf16 or fp32, got {precision!r}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


class CSVLogger:
    """Appends ``step,split,name,value`` rows; survives resume (appends to the same file)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def drop_after(self, step: int) -> None:
        """Remove rows logged after ``step`` (a resumed run repeats the steps after its last checkpoint; without
        this, metrics.csv would hold those steps twice)."""
        if not self.path.is_file():
            return
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
        if len(kept) == len(rows):
            return
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(kept)

    def log(self, step: int, split: str, values: Mapping[str, float]) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "split", "name", "value"])
            for k, v in values.items():
                w.writerow([step, split, k, f"{float(v):.6g}"])


class Trainer:
    """Runs a :class:`Task` on a dataset for ``max_steps`` optimiser steps, resumably."""

    def __init__(
        self,
        task: Task,
        cfg: Config,
        train_cfg: TrainConfig,
        run_dir: Path,
        train_set: Dataset,
        val_set: Dataset | None,
        dist: DistContext,
        progress: bool = True,
    ) -> None:
        self.task, self.cfg, self.tc, self.dist = task, cfg, train_cfg, dist
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.train_set, self.val_set = train_set, val_set
        self.progress = progress and dist.is_main
        self.bf16 = use_bf16(train_cfg.precision, dist.device)
        self.logger = CSVLogger(self.run_dir / "metrics.csv")
        self.tb: Any = None  # SummaryWriter on the main rank while fit runs
        for m in task.modules().values():
            m.to(dist.device)
        self.wrapped = {k: self._wrap(m) for k, m in task.trainable().items()}
        self.optimizers = task.configure(dist.device, self.wrapped, train_cfg)
        self.step = 0
        if train_cfg.keep_best is not None and train_cfg.keep_best not in task.best_metrics:
            raise UserError(f"config: keep_best '{train_cfg.keep_best}' is not a validation metric of {task.name} to "
                            f"maximise (choose from {', '.join(task.best_metrics) or 'none'}, or null)")

    def _wrap(self, module: nn.Module) -> nn.Module:
        if not self.dist.enabled:
            return module
        ids = [self.dist.local_rank] if self.dist.device.type == "cuda" else None
        return DDP(module, device_ids=ids, find_unused_parameters=True)

    # ------------------------------------------------------------------ checkpoints
    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.run_dir)

    def save_checkpoint(self) -> Path:
        """Write the checkpoint to a temporary folder and rename it into place; then move ``latest``."""
        name = f"step_{self.step:07d}"
        final = self.ckpt_root / name
        tmp = self.ckpt_root / f".tmp_{name}"
        if self.tb is not None:  # a killed run then still holds every TensorBoard point up to its checkpoint
            self.tb.flush()
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        save_state(rng, tmp / f"rng_rank{self.dist.rank}.pt")
        if self.dist.is_main:
            for key, module in self.task.modules().items():
                save_weights(module.state_dict(), tmp / f"{key}.safetensors", metadata={"step": str(self.step)})
            state = {"step": self.step, "world_size": self.dist.world_size,
                     "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()}}
            save_state(state, tmp / "state.pt")
        self.dist.barrier()
        if self.dist.is_main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            atomic_write_text(self.ckpt_root / "latest", name + "\n")
            self._prune(keep=2)
        self.dist.barrier()
        return final

    def _prune(self, keep: int) -> None:
        done = sorted(p for p in self.ckpt_root.glob("step_*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        for key, module in self.task.modules().items():
            load_into(module, path / f"{key}.safetensors", what=f"{self.task.name} '{key}'")
        state = load_state(path / "state.pt")
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][k])
        self.step = int(state["step"])
        rng_file = path / f"rng_rank{self.dist.rank}.pt"
        if state.get("world_size", 1) == self.dist.world_size and rng_file.is_file():
            rng = load_state(rng_file)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])

    # ------------------------------------------------------------------ loop
    def _loader(self, dataset: Dataset, start: int) -> Iterator[dict[str, Any]]:
        sampler = ResumableSampler(len(dataset), self.cfg.seed, self.dist.rank, self.dist.world_size, start)
        loader = DataLoader(dataset, batch_size=self.tc.batch_size, sampler=sampler,
                            num_workers=self.cfg.data.num_workers, drop_last=True,
                            generator=torch.Generator().manual_seed(self.cfg.seed))  # keeps the global RNG untouched
        return iter(loader)

    # ------------------------------------------------------------------ logs
    def _open_tensorboard(self, resume: bool) -> None:
        """Main rank: a SummaryWriter in ``RUN_DIR/tensorboard``. A resumed run writes a purge marker at the step
        after its checkpoint, so TensorBoard hides the old run's points after the checkpoint (they are logged again,
        as ``CSVLogger.drop_after`` does for metrics.csv); a new run starts without an earlier run's events."""
        if not self.dist.is_main:
            return
        logdir = self.run_dir / "tensorboard"
        if not resume:
            shutil.rmtree(logdir, ignore_errors=True)
        try:
            from torch.utils.tensorboard import SummaryWriter  # imported here: slow, and only training needs it
        except ImportError as e:
            warnings.warn(f"TensorBoard logging is off ({e}); metrics.csv holds the values", stacklevel=3)
            return
        # TensorBoard keeps the points before purge_step: the checkpoint's own step is not logged again
        self.tb = SummaryWriter(log_dir=str(logdir), purge_step=self.step + 1 if resume else None)

    def _close_tensorboard(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def _log(self, step: int, split: str, values: Mapping[str, float]) -> None:
        """One set of values into metrics.csv and (tag ``split/name``) TensorBoard; main rank only."""
        self.logger.log(step, split, values)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{split}/{k}", float(v), step)

    def _preview_state(self) -> tuple[int, int] | None:
        """(mtime, size) of this step's preview PNG, or None: tells whether validation (re)wrote it."""
        try:
            st = (self.run_dir / "previews" / f"step_{self.step:07d}.png").stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _log_preview(self, before: tuple[int, int] | None) -> None:
        """The preview PNG the task wrote for this step (if it wrote one) as TensorBoard image ``previews``."""
        now = self._preview_state()
        if self.tb is None or now is None or now == before:
            return
        import numpy as np
        from PIL import Image

        path = self.run_dir / "previews" / f"step_{self.step:07d}.png"
        try:
            with Image.open(path) as im:
                img = np.asarray(im.convert("RGB"))
        except OSError as e:
            warnings.warn(f"{path}: preview not logged to TensorBoard ({e})", stacklevel=2)
            return
        self.tb.add_image("previews", img, self.step, dataformats="HWC")

    # ------------------------------------------------------------------ loop
    def fit(self, max_steps: int | None = None, resume: bool = False,
            max_seconds: float | None = None) -> dict[str, float]:
        """Train until ``max_steps`` (default: the config's) or, when given, until ``max_seconds`` of wall
        time have passed (then a checkpoint is written at the current step); returns the last logged values."""
        try:
            return self._fit(max_steps, resume, max_seconds)
        finally:  # also on an error: what was logged reaches the event file (append-only, so never half a state)
            self._close_tensorboard()

    def _fit(self, max_steps: int | None, resume: bool, max_seconds: float | None) -> dict[str, float]:
        max_steps = self.tc.max_steps if max_steps is None else max_steps
        if resume:
            ckpt = self.latest_checkpoint()
            if ckpt is None:
                raise UserError(f"{self.run_dir}: --resume given but no checkpoint was found there")
            self.load_checkpoint(ckpt)
            if self.dist.is_main:
                self.logger.drop_after(self.step)
        else:
            # the entry points claimed the folder already (removing an old run's outputs on --overwrite); for a
            # direct caller this stops a new run that would mix its checkpoints and logs with an old one's
            claim_run_dir(self.run_dir, resume=False)
            torch.manual_seed(self.cfg.seed * 1000 + self.dist.rank)
            if self.dist.is_main:  # a new run keeps no best weights of an earlier one
                shutil.rmtree(self.run_dir / "best", ignore_errors=True)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
        self._open_tensorboard(resume)
        if len(self.train_set) < self.tc.batch_size * self.dist.world_size:
            raise UserError(f"training set has {len(self.train_set)} cases, fewer than batch_size x ranks "
                            f"= {self.tc.batch_size * self.dist.world_size}")
        accum = max(1, self.tc.grad_accum)
        batches = self._loader(self.train_set, self.step * accum * self.tc.batch_size)
        bar = tqdm(total=max_steps, initial=self.step, desc=self.task.name, disable=not self.progress,
                   dynamic_ncols=True)
        last: dict[str, float] = {}
        started = time.perf_counter()
        while self.step < max_steps:
            last = self._train_step(batches, accum)
            self.step += 1
            self.task.after_step(self.step)
            bar.update(1)
            if self.step % self.tc.log_every == 0 or self.step == max_steps:
                logged = {k: self.dist.all_reduce_mean(v) for k, v in sorted(last.items())}
                if self.dist.is_main:
                    self._log(self.step, "train", logged)
                bar.set_postfix({k: f"{logged[k]:.3g}" for k in self.task.progress_keys if k in logged})
            if self.val_set is not None and (self.step % self.tc.val_every == 0 or self.step == max_steps):
                self.run_validation()
            out_of_time = max_seconds is not None and self._agree(time.perf_counter() - started > max_seconds)
            if self.step % self.tc.ckpt_every == 0 or self.step == max_steps or out_of_time:
                self.save_checkpoint()
            if out_of_time:
                break
        bar.close()
        if self.dist.enabled:
            self.check_ranks_in_sync()
            # a last barrier, so that no rank tears the gloo group down (and exits) while another still has
            # collective traffic in flight: that aborted rank 0 once in ~10 two-process CI runs
            self.dist.barrier()
        return last

    def check_ranks_in_sync(self) -> list[str]:
        """Hash every rank's weights (after taking rank 0's buffers); record them in ``ddp_check.json``; fail if
        ranks differ."""
        h = hashlib.sha256()
        for key, module in sorted(self.task.modules().items()):
            for buf in module.buffers():  # rank 0's running statistics are authoritative, as in DDP's forward
                torch.distributed.broadcast(buf.data, src=0)
            for name, tensor in sorted(module.state_dict().items()):
                h.update(f"{key}.{name}".encode())
                h.update(tensor.detach().float().cpu().numpy().tobytes())
        prints: list[str] = [""] * self.dist.world_size
        torch.distributed.all_gather_object(prints, h.hexdigest())
        same = len(set(prints)) == 1
        if self.dist.is_main:
            atomic_write_text(self.run_dir / "ddp_check.json", json.dumps(
                {"step": self.step, "world_size": self.dist.world_size, "fingerprints": prints, "identical": same},
                indent=2))
        if not same:
            raise RuntimeError(f"DDP ranks hold different weights after step {self.step}: {prints}")
        return prints

    def _agree(self, flag: bool) -> bool:
        """Rank 0's decision, so that every rank stops at the same step."""
        if not self.dist.enabled:
            return flag
        t = torch.tensor([float(flag)], device=self.dist.device)
        torch.distributed.broadcast(t, src=0)
        return bool(t.item())

    def run_validation(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.dist.is_main and self.val_set is not None and len(self.val_set) > 0:
            loader = DataLoader(self.val_set, batch_size=1, shuffle=False, num_workers=0)
            for m in self.task.modules().values():
                m.eval()
            preview = self._preview_state()
            with torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                metrics = self.task.validate(loader, self.step, self.run_dir)
            for m in self.task.trainable().values():
                m.train()
            self._log(self.step, "val", metrics)
            self._log_preview(preview)
            if self.tb is not None:
                self.tb.flush()
            if self.tc.keep_best:
                self._keep_if_best(metrics)
        self.dist.barrier()
        return metrics

    def _keep_if_best(self, metrics: Mapping[str, float]) -> None:
        """Keep the modules' weights in ``RUN_DIR/best/step_N/`` when ``metrics[keep_best]`` (finite) beats the
        best value so far. The folder is complete before ``best/best.json`` (written atomically) points to it;
        then older folders go: a crash at any point leaves the previous best usable."""
        key, value = self.tc.keep_best, float(metrics[self.tc.keep_best])
        root, record = self.run_dir / "best", self.run_dir / "best" / "best.json"
        if not math.isfinite(value) or (record.is_file() and json.loads(record.read_text())["value"] >= value):
            return
        name = f"step_{self.step:07d}"
        tmp = root / f".tmp_{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for module_name, module in self.task.modules().items():
            save_weights(module.state_dict(), tmp / f"{module_name}.safetensors", metadata={"step": str(self.step)})
        shutil.rmtree(root / name, ignore_errors=True)
        os.replace(tmp, root / name)
        atomic_write_text(record, json.dumps({"metric": key, "value": value, "step": self.step, "folder": name}) + "\n")
        for old in root.iterdir():
            if old.is_dir() and old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def _train_step(self, batches: Iterator[dict[str, Any]], accum: int) -> dict[str, float]:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for micro in range(accum):
            batch = _to_device(next(batches), self.dist.device)
            sync = micro == accum - 1 or not self.dist.enabled
            ctxs = [m.no_sync() for m in self.wrapped.values() if isinstance(m, DDP)] if not sync else []
            with contextlib.ExitStack() as stack:
                for c in ctxs:
                    stack.enter_context(c)
                with torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    loss, logs = self.task.training_losses(batch, self.step)
                if loss.requires_grad:
                    (loss / accum).backward()
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(v) / accum
        for opt in self.optimizers.values():
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            if not params:
                continue
            if self.tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, self.tc.grad_clip)
            opt.step()
        bad = [k for k, v in sums.items() if not math.isfinite(v)]
        if bad:
            raise RuntimeError(f"non-finite training values at step {self.step}: {bad}")
        return sums
