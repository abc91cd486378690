"""Atomic file writes and safe checkpoint loading.

Nothing is ever half-written: every file goes to a temporary sibling first and is moved into place
with ``os.replace``. Weights are stored as safetensors; training state (optimiser, RNG, step) with
``torch.save`` and read back with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medlsdm.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds. The file gets
    the mode an ordinary ``open`` would give it (0666 minus the umask), not mkstemp's private 0600, so that
    colleagues sharing a group folder can read the volumes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a hidden sibling folder to fill; if the block succeeds it replaces ``out`` whole (an old ``out`` is
    moved aside first and removed after), else it is removed and ``out`` stays as it was. Modes follow the umask
    (mkdtemp's private 0700 would keep colleagues out). For folders written as one piece: latents, exports,
    nnU-Net datasets."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        mask = _umask()
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
        old = out.with_name(f".{out.name}.old") if out.exists() else None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Save a state dict as safetensors, atomically (shared storage is cloned, tensors made contiguous)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, or raise a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable safetensors checkpoint ({exc})") from None


def load_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Load ``state`` into ``module`` strictly; keys or shapes that do not fit are a one-line UserError."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    detail = []
    if missing:
        detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        detail.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
    if detail:
        raise UserError(f"{path}: does not fit the {what}: " + "; ".join(detail))
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:  # a diverged run's weights would sample garbage without a word
        raise UserError(f"{path}: {len(broken)} tensors hold NaN or inf values (e.g. {broken[0]}): "
                        "the weights are broken")
    module.load_state_dict(state, strict=True)


def load_into(module: torch.nn.Module, path: Path, what: str = "model") -> None:
    """Load a safetensors file into ``module`` strictly (see :func:`load_checked`)."""
    load_checked(module, load_weights(path), Path(path), f"{what} architecture")


def save_state(obj: dict[str, Any], path: Path) -> None:
    """Save training state (optimiser, RNG, counters) with torch.save, atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_state(path: Path) -> dict[str, Any]:
    """Load training state with ``weights_only=True`` (no code execution)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: training state not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt / unsafe files
        raise UserError(f"{path}: not a readable training-state file ({type(exc).__name__})") from None


def file_sha256(path: Path, length: int = 12) -> str:
    """Short SHA-256 of a file, used to name the exact weights behind a metric or a run."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


@contextlib.contextmanager
def folder_lock(folder: Path, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on output folder ``folder`` while a block writes it; a second process that wants
    the same folder stops with one line instead of interleaving its files. The lock is ``flock`` on a hidden
    sibling file ``.<name>.lock`` (the folder itself may be swapped in whole); the kernel releases it when the
    holder dies, even by ``kill -9``, and the file is removed on a clean exit. Written by hand: the standard
    library has flock but no folder lock, and none of our dependencies offers one. ``enabled=False``: a no-op
    (ranks other than 0 of a torchrun job share rank 0's lock)."""
    import fcntl  # POSIX only, like the rest of the tool's multi-process support

    if not enabled:
        yield
        return
    folder = Path(folder).absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    path = folder.parent / f".{folder.name}.lock"
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{folder}: another medlsdm process is writing this folder; wait for it to finish, "
                            "or choose another --out") from None
        try:  # the holder before us may have removed the file between our open and flock: lock the live file only
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
