"""The command line: subcommands, one-line errors with exit status 2, the prepare summary."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from medlsdm.cli import build_parser, main

COMMANDS = ["phantom", "prepare", "train-vqgan", "encode", "train-ldm", "sample", "evaluate", "segtest",
            "augment-study", "demo"]


def test_every_subcommand_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in COMMANDS:
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args([cmd, "--help"])
        assert exc.value.code == 0
        assert len(capsys.readouterr().out.splitlines()) > 3


def test_every_subcommand_runs_a_command() -> None:
    from medlsdm.cli import COMMANDS as RUNNERS

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert sorted(sub.choices) == sorted(RUNNERS)


def test_phantom_then_prepare_prints_a_correct_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ph"
    assert main(["phantom", "--out", str(out), "--n", "5", "--shape", "8", "32", "32", "--seed", "3"]) == 0
    assert len(list((out / "imagesTr").glob("*_0000.nii.gz"))) == 4  # 5 cases, 20% held out
    assert len(list((out / "labelsTs").glob("*.nii.gz"))) == 1
    capsys.readouterr()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("base: tiny\ndata:\n  shape: [8, 32, 32]\n")
    assert main(["prepare", "--data", str(out), "--config", str(cfg), "--no-cache"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert f"dataset {out} (layout nnunet): 4 case(s), 4 with label maps" in lines  # the 4 training cases
    header = next(line for line in lines if line.startswith("case "))
    assert header.split()[-6:] == ["background", "body", "liver", "kidney", "spine", "lesion"]  # from dataset.json
    for case in (out / "imagesTr").glob("*_0000.nii.gz"):
        assert case.name.replace("_0000.nii.gz", "") in text


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["prepare", "--data", "/nonexistent/folder"], "/nonexistent/folder"),
        (["train-vqgan", "--data", "/nonexistent", "--out", "/tmp/x"], "/nonexistent"),
        (["sample", "--model", "/nonexistent/run", "--labels", "/tmp", "--out", "/tmp/y"], "/nonexistent/run"),
        (["evaluate", "--real", "/nonexistent/real", "--synthetic", "/tmp", "--out", "/tmp/r"], "/nonexistent/real"),
        (["phantom", "--out", "/tmp/z", "--n", "0"], "--n"),
        # numbers and devices are checked when the arguments are parsed, before any work (issue 15)
        (["sample", "--model", "/m", "--labels", "/l", "--out", "/o", "--steps", "0"], "--steps: must be at least 1"),
        (["train-vqgan", "--data", "/d", "--out", "/o", "--max-steps", "0"], "--max-steps: must be at least 1"),
        (["train-vqgan", "--data", "/d", "--out", "/o", "--max-steps", "-5"], "--max-steps: must be at least 1"),
        (["train-vqgan", "--data", "/d", "--out", "/o", "--device", "tpu"], "--device: must be auto, cpu"),
        (["sample", "--model", "/m", "--labels", "/l", "--out", "/o", "--guidance", "nan"], "--guidance: must be"),
        (["sample", "--model", "/m", "--labels", "/l", "--out", "/o", "--sampler", "dpm"], "invalid choice: 'dpm'"),
        (["train-vqgan", "--data", "/d", "--out", "/o", "--max-minutes", "0"], "--max-minutes: must be a finite"),
        (["plan", "--data", "/d", "--out", "/o.yaml", "--gpu-memory", "-1"], "--gpu-memory: must be a finite"),
        (["prepare", "--data", "/d", "--config", "tiny", "--set", "ldm.samplr=ddim"], "did you mean 'sampler'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medlsdm: error:") and fragment in err
    assert len(err.splitlines()) == 1


def test_no_traceback_from_the_installed_entry_point(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "medlsdm", "prepare", "--data", str(empty)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and str(empty) in proc.stderr
