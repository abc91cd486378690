"""Stage 2 end to end on micro phantoms: train, exact resume, DDP, sample CLI, geometry, bad label maps."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medlsdm.cli import main
from medlsdm.errors import UserError
from medlsdm.io import load_weights
from medlsdm.pipeline import SynthesisPipeline, sample_to_folder
from medlsdm.training.latents import encode_dataset
from medlsdm.training.run import train_ldm, train_vqgan


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, phantoms: Path, micro_config: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ldm")
    vq = train_vqgan(phantoms, micro_config, root / "vq", max_steps=2, progress=False)
    lat = encode_dataset(vq, phantoms, root / "lat", progress=False)
    ldm = train_ldm(vq, lat, micro_config, root / "ldm", max_steps=4, progress=False)
    return {"vq": vq, "lat": lat, "ldm": ldm, "root": root}


def _latest(run: Path, name: str) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_weights(run / "checkpoints" / latest / f"{name}.safetensors")


def test_run_is_self_contained(runs: dict[str, Path]) -> None:
    ldm = runs["ldm"]
    assert (ldm / "vqgan" / "vqgan.safetensors").is_file() and (ldm / "vqgan" / "config.yaml").is_file()
    stats = json.loads((ldm / "latent_stats.json").read_text())
    assert stats["zmin"] < stats["zmax"]
    assert {"unet", "unet_ema"} <= {p.stem for p in (ldm / "checkpoints" / "step_0000004").glob("*.safetensors")}
    assert list((ldm / "previews").glob("*.png"))
    ema, raw = _latest(ldm, "unet_ema"), _latest(ldm, "unet")
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)  # the EMA copy is a different average


def test_preview_steps_zero_skips_the_preview(tmp_path: Path, runs: dict[str, Path], micro_config: Path) -> None:
    """train_ldm.preview_steps: 0 validates (loss) but draws no preview; the module's run (25) drew one."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(micro_config.read_text().replace("train_ldm:\n", "train_ldm:\n  preview_steps: 0\n", 1))
    run = train_ldm(runs["vq"], runs["lat"], cfg, tmp_path / "ldm", max_steps=2, progress=False)
    assert "loss_ema" in (run / "metrics.csv").read_text()
    assert not list((run / "previews").glob("*.png"))


def test_resume_equals_uninterrupted(tmp_path: Path, runs: dict[str, Path], micro_config: Path) -> None:
    run = tmp_path / "ldm"
    train_ldm(runs["vq"], runs["lat"], micro_config, run, max_steps=2, progress=False)
    train_ldm(runs["vq"], runs["lat"], micro_config, run, max_steps=4, resume=True, progress=False)
    for name in ("unet", "unet_ema"):
        a, b = _latest(runs["ldm"], name), _latest(run, name)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}.{k}"
    # the log of a resumed run is the log of an uninterrupted one: no step twice (keys, not the float values)
    rows = [tuple(r.split(",")[:3]) for r in (run / "metrics.csv").read_text().splitlines()]
    assert len(rows) == len(set(rows))
    assert rows == [tuple(r.split(",")[:3]) for r in (runs["ldm"] / "metrics.csv").read_text().splitlines()]


def test_metrics_after_the_checkpoint_are_dropped_on_resume(tmp_path: Path, runs: dict[str, Path],
                                                           micro_config: Path) -> None:
    """A run killed after logging step 3 but before its step-4 checkpoint resumes from step 2: rows 3.. go."""
    run = tmp_path / "ldm"
    train_ldm(runs["vq"], runs["lat"], micro_config, run, max_steps=2, progress=False)
    with open(run / "metrics.csv", "a") as f:
        f.write("3,train,loss,9.0\n3,train,loss_ema,9.0\n")
    train_ldm(runs["vq"], runs["lat"], micro_config, run, max_steps=3, resume=True, progress=False)
    assert [r for r in (run / "metrics.csv").read_text().splitlines() if r.endswith(",9.0")] == []


def test_on_the_fly_encoding_matches_cached_latents(tmp_path: Path, runs: dict[str, Path], phantoms: Path,
                                                   micro_config: Path) -> None:
    run = train_ldm(runs["vq"], phantoms, micro_config, tmp_path / "fly", max_steps=1, progress=False)
    assert (run / "checkpoints" / "latest").is_file()
    assert not (run / "cache").exists()  # the preprocessed training images are gone once training has ended


def test_sample_cli_writes_volumes_with_label_geometry(tmp_path: Path, runs: dict[str, Path], phantoms: Path) -> None:
    out = tmp_path / "syn"
    labels = phantoms / "labelsTs"
    argv = ["sample", "--model", str(runs["ldm"]), "--labels", str(labels), "--out", str(out),
            "--n-per-label", "2", "--steps", "3", "--seed", "5", "--device", "cpu"]
    assert main(argv) == 0
    vols = sorted(out.glob("*.nii.gz"))
    assert len(vols) == 2 * len(list(labels.glob("*.nii.gz")))
    for v in vols:
        lab = nib.load(str(labels / (v.name.rsplit("_s", 1)[0] + ".nii.gz")))
        img = nib.load(str(v))
        assert img.shape == lab.shape and np.allclose(img.affine, lab.affine)
        assert img.header["descrip"].tobytes().strip(b"\x00") == b""  # nothing copied from the source header
        assert v.with_name(v.name.replace(".nii.gz", ".png")).is_file()
    first = nib.load(str(vols[0])).get_fdata()
    before = vols[0].stat().st_mtime_ns
    assert main(argv) == 0  # resumable: existing volumes are kept, not regenerated
    assert vols[0].stat().st_mtime_ns == before
    vols[0].unlink()
    assert main(argv) == 0  # regenerating one volume reproduces it exactly (seeded per volume)
    assert np.array_equal(nib.load(str(vols[0])).get_fdata(), first)


def test_python_api_and_guidance(runs: dict[str, Path], phantoms: Path) -> None:
    pipe = SynthesisPipeline.from_pretrained(runs["ldm"], device="cpu")
    label = sorted((phantoms / "labelsTs").glob("*.nii.gz"))[0]
    a = pipe(label, n=1, seed=3, steps=3)[0]
    b = pipe(label, n=1, seed=3, steps=3)[0]
    assert a.array.shape == (8, 32, 32) and torch.equal(a.array, b.array)
    c = pipe(label, n=1, seed=4, steps=3)[0]
    assert not torch.equal(a.array, c.array)
    # guidance acts on the latents (decoded volumes may coincide after quantisation in an untrained model)
    onehot = torch.nn.functional.one_hot(pipe(label, n=1, steps=1)[0].label.long(), 6).permute(3, 0, 1, 2)[None].float()
    lat = {g: pipe.diffusion.sample(onehot, "ddim", 3, g, generator=torch.Generator().manual_seed(0), progress=False)
           for g in (1.0, 3.0)}
    assert not torch.equal(lat[1.0], lat[3.0])


def test_bad_label_maps_are_user_errors(tmp_path: Path, runs: dict[str, Path], phantoms: Path) -> None:
    label = sorted((phantoms / "labelsTs").glob("*.nii.gz"))[0]
    img = nib.load(str(label))
    data = np.asanyarray(img.dataobj).copy()
    data[0, 0, 0] = 9  # a class the model does not know
    bad = tmp_path / "unknown.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), str(bad))
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(data[:, :, 0], img.affine), str(flat))
    for path, msg in ((bad, "9"), (flat, "3D")):
        with pytest.raises(UserError, match=msg):
            SynthesisPipeline.from_pretrained(runs["ldm"], device="cpu")(path, steps=2)


@pytest.mark.slow
def test_two_process_ddp_ldm(tmp_path: Path, runs: dict[str, Path], micro_config: Path) -> None:
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
           "-m", "medlsdm", "train-ldm", "--vqgan", str(runs["vq"]), "--data", str(runs["lat"]),
           "--config", str(micro_config), "--out", str(run), "--max-steps", "3", "--no-progress", "--device", "cpu"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = json.loads((run / "ddp_check.json").read_text())
    assert check["world_size"] == 2 and check["identical"]


def test_full_length_label_map_is_one_volume_with_its_geometry(tmp_path: Path, runs: dict[str, Path],
                                                                   phantoms: Path) -> None:
    """A label map 4x deeper than the training shape is generated as one volume (depth windows) with the
    label map's exact shape and affine."""
    from medlsdm.data.phantom import generate_phantom, phantom_affine, phantom_spacing

    _, lab = generate_phantom(7, (32, 32, 32))
    path = tmp_path / "long.nii.gz"
    nib.save(nib.Nifti1Image(lab.transpose(2, 1, 0), phantom_affine(phantom_spacing(7, (32, 32, 32)), (32, 32, 32))),
             str(path))
    out = tmp_path / "syn"
    assert main(["sample", "--model", str(runs["ldm"]), "--labels", str(path), "--out", str(out), "--steps", "2",
                 "--device", "cpu"]) == 0
    img, ref = nib.load(str(out / "long_s0.nii.gz")), nib.load(str(path))
    assert img.shape == ref.shape == (32, 32, 32) and np.allclose(img.affine, ref.affine)
    assert np.isfinite(img.get_fdata()).all()


@pytest.mark.slow
def test_two_process_sampling_splits_the_label_maps(tmp_path: Path, runs: dict[str, Path], phantoms: Path) -> None:
    labels = tmp_path / "labels"
    labels.mkdir()
    src = sorted((phantoms / "labelsTs").glob("*.nii.gz"))[0]
    for k in range(3):
        (labels / f"case{k}.nii.gz").write_bytes(src.read_bytes())
    out = tmp_path / "syn"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29521",
           "-m", "medlsdm", "sample", "--model", str(runs["ldm"]), "--labels", str(labels), "--out", str(out),
           "--n-per-label", "2", "--steps", "2", "--device", "cpu"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stdout.splitlines() if line.startswith("wrote")]
    counts = sorted(int(line.split()[1]) for line in said)
    assert counts == [3, 3], proc.stdout  # 6 jobs, 3 per rank: nothing twice, nothing left out
    names = sorted(p.name for p in out.glob("*.nii.gz"))
    assert names == sorted(f"case{k}_s{s}.nii.gz" for k in range(3) for s in range(2))
    # each volume is what a single process makes for it (per-volume seeds, whichever rank made it)
    single = tmp_path / "single"
    assert main(["sample", "--model", str(runs["ldm"]), "--labels", str(labels), "--out", str(single),
                 "--n-per-label", "2", "--steps", "2", "--device", "cpu"]) == 0
    for name in names:
        assert np.array_equal(nib.load(str(out / name)).get_fdata(), nib.load(str(single / name)).get_fdata())


def test_previews_use_the_display_window(tmp_path: Path, runs: dict[str, Path], phantoms: Path, monkeypatch) -> None:
    """Every preview `sample` writes is drawn in the config's display window (CT: -160..240 HU by default), not
    over the whole normalised range where soft tissue is a few grey levels."""
    import medlsdm.viz
    from medlsdm.pipeline import sample_to_folder

    seen = []
    monkeypatch.setattr(medlsdm.viz, "save_preview", lambda path, volumes, **kw: seen.append(kw))
    sample_to_folder(runs["ldm"], phantoms / "labelsTs", tmp_path / "syn", steps=2, device="cpu", progress=False)
    assert seen and all((kw["vmin"], kw["vmax"]) == pytest.approx((-0.16, 0.24)) for kw in seen)


def test_garbage_settings_and_broken_weights_stop_with_one_line(tmp_path: Path, runs: dict[str, Path]) -> None:
    """Non-finite guidance, zero steps and weights holding NaN never write meaningless volumes with exit 0."""
    from safetensors.torch import save_file

    pipe = SynthesisPipeline.from_pretrained(runs["ldm"], device="cpu")
    d, h, w = pipe.cfg.data.shape
    label = torch.zeros(1, 1, d, h, w, dtype=torch.long)
    for kw, msg in (({"guidance": float("nan")}, "finite"), ({"guidance": float("inf")}, "finite"),
                    ({"steps": 0}, "at least 1")):
        with pytest.raises(UserError, match=msg):
            pipe.generate(label, **kw)
    pipe.decode_latents = lambda z: torch.full((1, 1, d, h, w), float("nan"))  # a decoder gone wrong
    with pytest.raises(UserError, match="NaN or inf"):
        pipe.generate(label, steps=1)
    broken = tmp_path / "ldm"
    shutil.copytree(runs["ldm"], broken)
    latest = (broken / "checkpoints" / "latest").read_text().strip()
    path = broken / "checkpoints" / latest / "unet_ema.safetensors"
    state = load_weights(path)
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(path))
    with pytest.raises(UserError, match=r"unet_ema\.safetensors: 1 tensors hold NaN"):
        SynthesisPipeline.from_pretrained(broken, device="cpu")
    for n, b in ((20_000_000, 1), (0, 1), (1, 10_000_000)):  # counts are bounded before any work or allocation
        with pytest.raises(UserError, match="--n-per-label must be 1..10000 and --batch-size 1..256"):
            sample_to_folder(runs["ldm"], tmp_path / "none", tmp_path / "out", n_per_label=n, batch_size=b)
    assert not (tmp_path / "out").exists()


def test_export_is_shareable_verified_and_samples_the_same(tmp_path: Path, runs: dict[str, Path], phantoms: Path,
                                                           capsys) -> None:
    """medlsdm export: only what sampling needs (no previews, caches, logs or absolute paths), hashes that sample
    verifies, and the same volumes as the run folder."""
    model = tmp_path / "model"
    assert main(["export", str(runs["ldm"]), "--out", str(model)]) == 0
    files = sorted(p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file())
    assert files == ["config.yaml", "latent_stats.json", "manifest.json", "unet_ema.safetensors", "vqgan/config.yaml",
                     "vqgan/vqgan.safetensors"]
    root = str(runs["root"].parent)
    for name in ("config.yaml", "latent_stats.json", "manifest.json", "vqgan/config.yaml"):
        assert root not in (model / name).read_text(), name  # no path of the machine it was made on
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no lock or temporary folder left
    label = sorted((phantoms / "labelsTs").glob("*.nii.gz"))[0]
    a, b = tmp_path / "from_run", tmp_path / "from_export"
    for src, out in ((runs["ldm"], a), (model, b)):
        assert main(["sample", "--model", str(src), "--labels", str(label), "--out", str(out), "--steps", "2",
                     "--device", "cpu", "--no-progress"]) == 0
    name = label.name.replace(".nii.gz", "_s0.nii.gz")
    assert np.array_equal(nib.load(str(a / name)).get_fdata(), nib.load(str(b / name)).get_fdata())
    assert json.loads((a / "sample_info.json").read_text()) == json.loads((b / "sample_info.json").read_text())
    capsys.readouterr()
    assert main(["export", str(runs["ldm"]), "--out", str(model)]) == 2  # never over an existing folder by default
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(runs["ldm"]), "--out", str(model), "--overwrite"]) == 0
    weights = model / "vqgan" / "vqgan.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1  # one flipped bit in the VQ-GAN
    weights.write_bytes(bytes(blob))
    assert main(["sample", "--model", str(model), "--labels", str(label), "--out", str(tmp_path / "c"),
                 "--device", "cpu", "--no-progress"]) == 2
    assert "vqgan.safetensors: SHA-256 does not match manifest.json" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_run_folders_hold_no_training_images_or_paths(runs: dict[str, Path]) -> None:
    """The preprocessing cache (copies of the training images) goes when training ends; run_info.json and
    latents' stats.json name the VQ-GAN run by folder name, not by absolute path."""
    assert not (runs["vq"] / "cache").exists()
    root = str(runs["root"].parent)
    for path in (runs["ldm"] / "run_info.json", runs["lat"] / "stats.json", runs["vq"] / "run_info.json"):
        assert root not in path.read_text(), path


def test_sample_no_progress_prints_no_bar(tmp_path: Path, runs: dict[str, Path], phantoms: Path, capsys) -> None:
    label = sorted((phantoms / "labelsTs").glob("*.nii.gz"))[0]
    base = ["sample", "--model", str(runs["ldm"]), "--labels", str(label), "--steps", "1", "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert "volume" in capsys.readouterr().err  # the bar ("sample: ... volume/s") on stderr
    assert main([*base, "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "volume" not in out.err and "wrote 1 volume(s)" in out.out


def test_sample_output_side_errors_are_one_line(tmp_path: Path, runs: dict[str, Path], phantoms: Path, capsys,
                                               monkeypatch) -> None:
    """--out a file, --out the labels folder, a read-only --out, a full disk: exit 2, one line, nothing written."""
    labels = tmp_path / "labels"
    labels.mkdir()
    src = sorted((phantoms / "labelsTs").glob("*.nii.gz"))[0]
    (labels / src.name).write_bytes(src.read_bytes())
    base = ["sample", "--model", str(runs["ldm"]), "--labels", str(labels), "--steps", "1", "--device", "cpu"]
    (tmp_path / "file").write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    cases = [("file", "exists and is not a folder"), ("labels", "is the --labels folder")]
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        cases.append(("ro", "Permission denied"))
    for out, msg in cases:
        assert main([*base, "--out", str(tmp_path / out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in labels.iterdir()) == [src.name]
    ro.chmod(0o755)

    import errno

    import medlsdm.pipeline

    def full(volume, geometry, path, cfg):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(medlsdm.pipeline, "save_volume", full)
    assert main([*base, "--out", str(tmp_path / "full"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not list((tmp_path / "full").glob("*.nii.gz"))


def test_sample_folder_knows_what_made_it(tmp_path: Path, runs: dict[str, Path], phantoms: Path, capsys) -> None:
    """sample_info.json records the settings; other settings or foreign volumes stop unless --overwrite."""
    label = sorted((phantoms / "labelsTs").glob("*.nii.gz"))[0]
    out = tmp_path / "syn"
    base = ["sample", "--model", str(runs["ldm"]), "--labels", str(label), "--out", str(out), "--steps", "1",
            "--device", "cpu", "--no-progress"]
    assert main([*base, "--seed", "0"]) == 0
    info = json.loads((out / "sample_info.json").read_text())
    assert info["seed"] == 0 and info["steps"] == 1 and len(info["model_weights_sha256"]) == 12
    assert "/" not in json.dumps(info)  # no paths: the folder may be shared
    first = nib.load(str(next(out.glob("*.nii.gz")))).get_fdata()
    assert main([*base, "--seed", "0", "--n-per-label", "2"]) == 0  # same settings: adds a volume
    assert len(list(out.glob("*.nii.gz"))) == 2
    capsys.readouterr()
    assert main([*base, "--seed", "1"]) == 2
    assert "seed 0 -> 1" in capsys.readouterr().err
    assert main([*base, "--seed", "1", "--overwrite"]) == 0
    assert len(list(out.glob("*.nii.gz"))) == 1  # the seed-0 volumes are gone, one seed-1 volume written
    assert not np.array_equal(nib.load(str(next(out.glob("*.nii.gz")))).get_fdata(), first)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "other_s0.nii.gz").write_bytes(label.read_bytes())
    assert main([*base[:6], str(foreign), *base[7:]]) == 2
    assert "unknown origin" in capsys.readouterr().err


def test_a_new_run_or_encode_never_mixes_with_an_old_one(tmp_path: Path, runs: dict[str, Path], phantoms: Path,
                                                          micro_config: Path, monkeypatch) -> None:
    """Training into a folder that holds a run needs --resume or --overwrite (checked before anything is written);
    encode replaces a latents folder whole, refuses other folders, and a failed encode leaves the old one intact."""
    info = (runs["ldm"] / "run_info.json").read_bytes()
    with pytest.raises(UserError, match="already holds a training run"):
        train_ldm(runs["vq"], runs["lat"], micro_config, runs["ldm"], max_steps=2, progress=False)
    assert (runs["ldm"] / "run_info.json").read_bytes() == info
    run = tmp_path / "again"
    shutil.copytree(runs["ldm"], run)
    train_ldm(runs["vq"], runs["lat"], micro_config, run, max_steps=2, progress=False, overwrite=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")) == ["step_0000002"]

    lat = tmp_path / "lat"
    shutil.copytree(runs["lat"], lat)
    (lat / "stale_case.safetensors").write_bytes((lat / next(p.name for p in lat.glob("*.safetensors"))).read_bytes())
    encode_dataset(runs["vq"], phantoms, lat, progress=False)
    assert not (lat / "stale_case.safetensors").exists()  # re-encoding replaces, never mixes
    assert sorted(p.name for p in lat.iterdir()) == sorted(p.name for p in runs["lat"].iterdir())
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(UserError, match="not a latents folder"):
        encode_dataset(runs["vq"], phantoms, other, progress=False)
    before = sorted(p.name for p in lat.iterdir())

    import medlsdm.training.latents as latents

    def broken(*a, **k):
        raise UserError("disk gone")

    monkeypatch.setattr(latents, "save_weights", broken)
    with pytest.raises(UserError, match="disk gone"):
        encode_dataset(runs["vq"], phantoms, lat, progress=False)
    assert sorted(p.name for p in lat.iterdir()) == before and (lat / "stats.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_batching_changes_a_volume_only_by_float_rounding(
    tmp_path: Path, runs: dict[str, Path], phantoms: Path
) -> None:
    """--batch-size 3 vs 1: each volume keeps its own noise; batched kernels round differently, so the README
    promises equality to float rounding (measured 0.025 HU at most), not bit-identity. A batch sharing or
    swapping noise between volumes would differ by tens of HU."""
    labels = tmp_path / "labels"
    labels.mkdir()
    for k, src in enumerate([*sorted((phantoms / "labelsTs").glob("*.nii.gz"))] * 2):
        shutil.copy(src, labels / f"case{k}.nii.gz")  # each name has its own seed
    one = sample_to_folder(runs["ldm"], labels, tmp_path / "b1", steps=2, batch_size=1, device="cpu",
                           progress=False, preview=False)
    sample_to_folder(runs["ldm"], labels, tmp_path / "b3", steps=2, batch_size=3, device="cpu", progress=False,
                     preview=False)
    assert len(one) == 4
    for path in one:
        a, b = nib.load(str(path)).get_fdata(), nib.load(str(tmp_path / "b3" / path.name)).get_fdata()
        assert np.abs(a - b).max() <= 0.5, path.name
        assert np.abs(a - b).max() < np.abs(a - np.roll(a, 1, axis=0)).max()  # not vacuous: volumes vary


def test_sample_writes_an_nnunet_dataset_with_real_cases(tmp_path: Path, runs: dict[str, Path], phantoms: Path) -> None:
    """sample --dataset: nnU-Net's raw layout and names, label maps on the image's grid with consecutive class
    values, dataset.json from the model's classes, cases.csv marking synthetic and real cases, fresh headers."""
    import csv

    labels = phantoms / "labelsTs"
    out, ds = tmp_path / "syn", tmp_path / "Dataset501_Synth"
    assert main(["sample", "--model", str(runs["ldm"]), "--labels", str(labels), "--out", str(out), "--steps", "1",
                 "--device", "cpu", "--no-progress", "--dataset", str(ds), "--with-real", str(phantoms)]) == 0
    meta = json.loads((ds / "dataset.json").read_text())
    real_ids = sorted(p.name.replace(".nii.gz", "") for p in (phantoms / "labelsTr").glob("*.nii.gz"))
    syn = sorted(f"syn_{p.name.replace('.nii.gz', '')}_s0" for p in labels.glob("*.nii.gz"))
    cases = sorted(syn + [f"real_{i}" for i in real_ids])
    assert meta["channel_names"] == {"0": "CT"} and meta["file_ending"] == ".nii.gz"
    assert meta["labels"] == {n: i for i, n in enumerate(["background", "body", "liver", "kidney", "spine", "lesion"])}
    assert meta["numTraining"] == len(cases)
    assert sorted(p.name for p in (ds / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in cases]
    assert sorted(p.name for p in (ds / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in cases]
    rows = list(csv.DictReader((ds / "cases.csv").open()))
    assert {r["case"]: r["kind"] for r in rows} == {c: "synthetic" if c.startswith("syn_") else "real" for c in cases}
    for c in cases:
        img, lab = nib.load(str(ds / "imagesTr" / f"{c}_0000.nii.gz")), nib.load(str(ds / "labelsTr" / f"{c}.nii.gz"))
        assert img.shape == lab.shape and np.allclose(img.affine, lab.affine), c
        assert set(np.unique(np.asanyarray(lab.dataobj))) <= set(range(6))
        assert img.header["descrip"].tobytes().strip(b"\x00") == b"", c  # geometry-only header
    first = sorted(labels.glob("*.nii.gz"))[0]
    src = nib.load(str(first))
    written = nib.load(str(ds / "labelsTr" / f"syn_{first.name.replace('.nii.gz', '')}_s0.nii.gz"))
    assert np.array_equal(np.asanyarray(written.dataobj), np.rint(np.asanyarray(src.dataobj)))
    assert main(["sample", "--model", str(runs["ldm"]), "--labels", str(labels), "--out", str(out), "--steps", "1",
                 "--device", "cpu", "--no-progress", "--dataset", str(ds)]) == 2  # never over a dataset silently
