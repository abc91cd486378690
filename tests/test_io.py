"""Atomic writes (medlsdm.io): the mode of a written file follows the umask like an ordinary open()."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from medlsdm.io import atomic_write_text


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path: Path, mask: int, mode: int) -> None:
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary file left behind
