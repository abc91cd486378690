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


def test_folder_lock_stops_a_second_writer_and_dies_with_its_holder(tmp_path: Path) -> None:
    """Two processes cannot write one folder; a holder killed with -9 leaves no stale lock behind."""
    import signal
    import subprocess
    import sys

    from medlsdm.errors import UserError
    from medlsdm.io import folder_lock

    out = tmp_path / "syn"
    with folder_lock(out):
        with pytest.raises(UserError, match="another medlsdm process is writing this folder"):
            with folder_lock(out):
                pass
    assert list(tmp_path.iterdir()) == []  # released on exit, lock file removed
    code = ("import sys, time; from medlsdm.io import folder_lock\n"
            f"with folder_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="another medlsdm process"):
            with folder_lock(out):
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with folder_lock(out):  # the kernel dropped the dead holder's lock
        pass
    with folder_lock(out, enabled=False), folder_lock(out):  # disabled: rank > 0 of a torchrun job
        pass
