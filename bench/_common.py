"""Shared bits of the benchmark scripts: machine description, peak memory, BENCHMARKS.md sections."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "_work"  # gitignored: data sets, runs and volumes made by the benchmarks
BENCHMARKS = ROOT / "BENCHMARKS.md"


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def peak_rss_gib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def header(command: str) -> str:
    today = datetime.date.today().isoformat()
    return f"Command: `{command}`  \nMachine: {machine()}  \nDate: {today}\n"


def write_section(name: str, markdown: str) -> None:
    """Replace (or append) the section between ``<!-- bench:name -->`` markers in BENCHMARKS.md."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = (BENCHMARKS.read_text() if BENCHMARKS.exists() else
            "# Benchmarks\n\nEvery figure here is written by a script in `bench/`; rerun it to refresh its section.\n")
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = BENCHMARKS.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(BENCHMARKS)


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def fmt(v, digits: int = 3) -> str:
    """A figure for a Markdown table: ``n/a`` for a missing value."""
    return "n/a" if v is None else f"{v:.{digits}f}"


def run_child(script: Path, kind: str, spec: dict) -> dict:
    """``script --child KIND SPEC_JSON`` in a fresh process (so its peak memory is its own); the last line it prints
    is its JSON result. A failing child raises with the end of its stderr."""
    proc = subprocess.run([sys.executable, str(script), "--child", kind, json.dumps(spec)], capture_output=True,
                          text=True, cwd=Path(script).parent)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {spec}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
