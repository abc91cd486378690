"""Device selection, a leaf module (imports nothing of medlsdm but its errors): any layer may use it."""

from __future__ import annotations

import torch

from medlsdm.errors import UserError


def resolve_device(name: str | None) -> torch.device:
    """``auto`` / None -> cuda when available else cpu; ``cuda`` without a GPU is a clear error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch on this machine")
    return torch.device(name)
