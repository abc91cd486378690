"""train-ldm checks its VQ-GAN: against the weights the latents were encoded with, and on --resume against the
weights the run was started with; --allow-vqgan-mismatch (allow_vqgan_mismatch=True) overrides both."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medlsdm.cli import main
from medlsdm.errors import UserError
from medlsdm.io import file_sha256
from medlsdm.runs import latest_step, selected_weights
from medlsdm.training.latents import encode_dataset
from medlsdm.training.run import train_ldm, train_vqgan


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, phantoms: Path, micro_config: Path) -> dict[str, Path]:
    """A VQ-GAN run (step 2), latents encoded with it, and a later checkpoint of the same run (step 3)."""
    root = tmp_path_factory.mktemp("link")
    vq = train_vqgan(phantoms, micro_config, root / "vq", max_steps=2, progress=False)
    lat = encode_dataset(vq, phantoms, root / "lat", progress=False)
    later = root / "vq_later"
    shutil.copytree(vq, later)
    shutil.rmtree(later / "best", ignore_errors=True)  # its weights are then those of step 3, whatever it scores
    train_vqgan(phantoms, None, later, max_steps=3, resume=True, progress=False)
    return {"vq": vq, "lat": lat, "later": later}


def _sha(run: Path) -> str:
    """The hash of the weights train-ldm and encode use (the same helper as theirs)."""
    return file_sha256(selected_weights(run, "vqgan"))


def test_the_fixture_differs_where_it_should(runs: dict[str, Path]) -> None:
    stats = json.loads((runs["lat"] / "stats.json").read_text())
    assert stats["vqgan_weights_sha256"] == _sha(runs["vq"]) != _sha(runs["later"])


def test_latents_of_another_checkpoint_are_refused(tmp_path: Path, runs: dict[str, Path], micro_config: Path) -> None:
    out = tmp_path / "ldm"
    with pytest.raises(UserError) as err:
        train_ldm(runs["later"], runs["lat"], micro_config, out, max_steps=1, progress=False, device="cpu")
    msg = str(err.value)
    assert str(runs["lat"]) in msg and _sha(runs["vq"]) in msg and _sha(runs["later"]) in msg
    assert "--allow-vqgan-mismatch" in msg and "\n" not in msg
    assert not out.exists()  # refused before any training work


def test_cli_refuses_and_the_override_flag_trains(tmp_path: Path, runs: dict[str, Path], micro_config: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ldm"
    argv = ["train-ldm", "--vqgan", str(runs["later"]), "--data", str(runs["lat"]), "--config", str(micro_config),
            "--out", str(out), "--max-steps", "1", "--no-progress", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medlsdm: error:") and len(err.splitlines()) == 1
    assert _sha(runs["vq"]) in err and _sha(runs["later"]) in err
    assert not out.exists()
    assert main([*argv, "--allow-vqgan-mismatch"]) == 0
    assert latest_step(out) == 1
    assert json.loads((out / "run_info.json").read_text())["vqgan_weights_sha256"] == _sha(runs["later"])


def test_resume_keeps_the_runs_vqgan(tmp_path: Path, runs: dict[str, Path], phantoms: Path,
                                    micro_config: Path) -> None:
    run = tmp_path / "ldm"
    train_ldm(runs["vq"], runs["lat"], micro_config, run, max_steps=1, progress=False, device="cpu")  # matching
    own = run / "vqgan" / "vqgan.safetensors"
    assert file_sha256(own) == _sha(runs["vq"])
    assert json.loads((run / "run_info.json").read_text())["vqgan_weights_sha256"] == _sha(runs["vq"])
    # image data (encoded on the fly) leaves the latents check out: this is the resume check alone
    with pytest.raises(UserError) as err:
        train_ldm(runs["later"], phantoms, None, run, max_steps=2, resume=True, progress=False, device="cpu")
    msg = str(err.value)
    assert str(run) in msg and _sha(runs["vq"]) in msg and _sha(runs["later"]) in msg and "\n" not in msg
    assert file_sha256(own) == _sha(runs["vq"]) and latest_step(run) == 1  # decoder not replaced, nothing trained
    # the run's own copy (what the message suggests) resumes, with the latents of the same VQ-GAN
    train_ldm(run / "vqgan", runs["lat"], None, run, max_steps=2, resume=True, progress=False, device="cpu")
    assert latest_step(run) == 2
    # the override replaces the decoder knowingly
    train_ldm(runs["later"], phantoms, None, run, max_steps=3, resume=True, progress=False, device="cpu",
              allow_vqgan_mismatch=True)
    assert latest_step(run) == 3 and file_sha256(own) == _sha(runs["later"])
