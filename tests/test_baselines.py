"""The baselines (slice2d, pixel3d): concat conditioning, slice-wise sampling, training and sampling end to end,
and the CLI's method checks."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medlsdm.cli import main
from medlsdm.config import LDMConfig, load_config
from medlsdm.diffusion import SemanticUNet
from medlsdm.diffusion.baselines import SliceDiffusion, build_baseline, slice_seed
from medlsdm.diffusion.blocks import SPADE, PlainNorm
from medlsdm.errors import UserError
from medlsdm.pipeline import SynthesisPipeline
from medlsdm.training.run import train_ldm

SMALL = dict(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
             semantic_channels=4, num_timesteps=50)


def onehot(index: torch.Tensor, num_classes: int = 6) -> torch.Tensor:
    """(B, D, H, W) class indices -> (B, C, D, H, W) float one-hot."""
    return F.one_hot(index, num_classes).permute(0, 4, 1, 2, 3).float()


def randomise_(module: torch.nn.Module, std: float = 0.2) -> None:
    """Random values for every parameter (undoes the zero-initialised output convolutions)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def concat_unet(**kw) -> SemanticUNet:
    torch.manual_seed(0)
    unet = SemanticUNet.from_config(LDMConfig(**{**SMALL, **kw}), in_channels=1, num_classes=6, image_down=(1, 1, 1),
                                    conditioning="concat")
    randomise_(unet)
    return unet.eval()


def test_concat_conditioning_uses_the_label_map_and_zero_is_the_null_condition() -> None:
    unet = concat_unet()
    assert unet.semantic is None and unet.input_conv.in_channels == 1 + 6
    assert (not any(isinstance(m, SPADE) for m in unet.modules())
            and any(isinstance(m, PlainNorm) for m in unet.modules()))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 1, 4, 16, 16, generator=g), torch.tensor([5, 30])
    a, b = (onehot(torch.randint(0, 6, (2, 4, 16, 16), generator=g)) for _ in range(2))
    with torch.no_grad():
        out_a, out_b = unet(x, t, a), unet(x, t, b)
        null = unet(x, t, None)
        dropped = unet(x, t, a, drop=torch.tensor([True, False]))
        zeros = unet(x, t, torch.zeros_like(a))
    assert not torch.allclose(out_a, out_b, atol=1e-4)  # the label map changes the output
    assert torch.equal(null, zeros)  # null condition = an all-zero label block
    assert torch.equal(dropped[0], null[0]) and torch.allclose(dropped[1], out_a[1], atol=1e-5)


def test_spade_path_is_the_default_and_unchanged_by_the_concat_option() -> None:
    cfg = LDMConfig(**SMALL)
    torch.manual_seed(0)
    default = SemanticUNet.from_config(cfg, in_channels=8, num_classes=6, image_down=(4, 4, 4))
    torch.manual_seed(0)
    spade = SemanticUNet.from_config(cfg, in_channels=8, num_classes=6, image_down=(4, 4, 4), conditioning="spade")
    assert default.semantic is not None and default.input_conv.in_channels == 8
    assert not any(isinstance(m, PlainNorm) for m in default.modules())
    sd, ss = default.state_dict(), spade.state_dict()
    assert sd.keys() == ss.keys() and all(torch.equal(sd[k], ss[k]) for k in sd)
    with pytest.raises(ValueError, match="conditioning"):
        SemanticUNet.from_config(cfg, conditioning="film")


def test_slice_seeds_differ_and_slices_are_generated_independently() -> None:
    seeds = [slice_seed(123, k) for k in range(64)]
    assert len(set(seeds)) == 64 and seeds == [slice_seed(123, k) for k in range(64)]
    cfg = load_config("tiny", {"ldm": {**SMALL, "method": "slice2d"}})
    model = build_baseline(cfg)
    assert isinstance(model, SliceDiffusion)
    randomise_(model.unet, std=0.05)
    lab = torch.randint(0, 6, (1, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    same = onehot(lab.expand(1, 4, 16, 16).contiguous())  # four identical 2D masks

    def run(labels: torch.Tensor, seed: int = 7) -> torch.Tensor:
        return model.sample(labels, "ddim", 3, generator=torch.Generator().manual_seed(seed), progress=False)

    vol = run(same)
    assert vol.shape == (1, 1, 4, 16, 16)
    for k in range(1, 4):  # identical masks, different per-slice seeds -> different slices
        assert not torch.allclose(vol[:, :, 0], vol[:, :, k], atol=1e-3)
    assert torch.equal(run(same), vol)  # deterministic per volume seed
    other = same.clone()
    other[:, :, 0] = onehot(torch.zeros(1, 1, 16, 16, dtype=torch.long))[:, :, 0]
    changed = run(other)  # a different mask on slice 0 only changes slice 0: no slice sees another
    assert not torch.allclose(changed[:, :, 0], vol[:, :, 0], atol=1e-3)
    assert torch.allclose(changed[:, :, 1:], vol[:, :, 1:], atol=1e-6)
    # each slice is exactly a one-slice chain driven by its own generator
    seed = SliceDiffusion.volume_seeds(1, torch.Generator().manual_seed(7))[0]
    g2 = torch.Generator().manual_seed(slice_seed(seed, 2))
    alone = super(SliceDiffusion, model).sample(same[:, :, 2:3], "ddim", 3, generator=g2, progress=False)
    assert torch.allclose(alone[:, :, 0], vol[:, :, 2], atol=1e-6)
    # one generator per volume (as `medlsdm sample` passes them): a volume is the same alone and in a batch,
    # and the pipeline's switches reach every slice's chain
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    pair = model.sample(torch.cat([same, other]), "ddim", 3, generator=[g(7), g(8)], progress=False, cache=True)
    assert torch.allclose(pair[:1], vol, atol=1e-5)
    assert torch.allclose(pair[1:], model.sample(other, "ddim", 3, generator=[g(8)], progress=False), atol=1e-5)


def test_slice2d_training_loss_draws_slices_from_volumes() -> None:
    cfg = load_config("tiny", {"ldm": {**SMALL, "method": "slice2d", "slices_per_volume": 3}})
    model = build_baseline(cfg)
    x0 = torch.rand(2, 1, 5, 16, 16) * 2 - 1
    labels = onehot(torch.randint(0, 6, (2, 5, 16, 16)))
    loss, logs = model.training_loss(x0, labels, torch.Generator().manual_seed(0))
    assert logs["slices"] == 6 and torch.isfinite(loss)
    loss.backward()
    assert model.unet.input_conv.weight.grad is not None


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, phantoms: Path, micro_config: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("baselines")
    return {m: train_ldm(None, phantoms, micro_config, root / m, max_steps=2, progress=False, method=m)
            for m in ("slice2d", "pixel3d")}


@pytest.mark.parametrize("method", ["slice2d", "pixel3d"])
def test_baseline_trains_and_samples_a_volume(method: str, runs: dict[str, Path], phantoms: Path) -> None:
    run = runs[method]
    assert (run / "checkpoints" / "latest").is_file() and not (run / "vqgan").exists()
    assert json.loads((run / "run_info.json").read_text())["method"] == method
    assert load_config(run / "config.yaml").ldm.method == method
    assert list((run / "previews").glob("*.png"))
    pipe = SynthesisPipeline.from_pretrained(run, device="cpu")
    assert pipe.vqgan is None
    label = sorted((phantoms / "labelsTs").glob("*.nii.gz"))[0]
    a = pipe(label, n=1, seed=3, steps=2)[0]
    assert a.array.shape == (8, 32, 32) and torch.isfinite(a.array).all() and a.array.abs().max() <= 1
    assert torch.equal(pipe(label, n=1, seed=3, steps=2)[0].array, a.array)
    assert not torch.equal(pipe(label, n=1, seed=4, steps=2)[0].array, a.array)


@pytest.mark.parametrize("method", ["slice2d", "pixel3d"])
def test_baseline_samples_a_label_map_larger_than_the_config_whole(method: str, runs: dict[str, Path],
                                                                   phantoms: Path, tmp_path: Path) -> None:
    """A label map 4 slices deeper and 8 columns wider than data.shape (8, 32, 32) is generated whole, as Med-LSDM
    does: no crop, and the extra slices are drawn from their labels, not written as air."""
    src = nib.load(str(sorted((phantoms / "labelsTs").glob("*.nii.gz"))[0]))
    arr = np.asarray(src.dataobj)  # (W, H, D) = (32, 32, 8)
    big = np.concatenate([arr, arr[:8]], axis=0)
    big = np.concatenate([big, big[:, :, :4]], axis=2)  # (40, 32, 12)
    path = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(big.astype(np.int16), src.affine), str(path))
    pipe = SynthesisPipeline.from_pretrained(runs[method], device="cpu")
    vol = pipe(path, n=1, seed=0, steps=2)[0]
    assert vol.array.shape == (12, 32, 40)
    out = nib.load(str(vol.save(tmp_path / "syn.nii.gz")))
    hu = np.asarray(out.dataobj, dtype=np.float32)
    assert out.shape == big.shape and np.allclose(out.affine, src.affine)
    # a centre crop to (8, 32, 32) would drop 4 columns at each side and 2 slices at each end (written as air)
    for slab in (np.s_[:4], np.s_[-4:], np.s_[:, :, :2], np.s_[:, :, -2:]):
        inside = big[slab] > 0
        assert inside.any() and float(hu[slab][inside].mean()) > -900, slab


def test_sample_cli_works_for_a_baseline_run(tmp_path: Path, runs: dict[str, Path], phantoms: Path) -> None:
    out, labels = tmp_path / "syn", phantoms / "labelsTs"
    argv = ["sample", "--model", str(runs["pixel3d"]), "--labels", str(labels), "--out", str(out), "--steps", "2",
            "--device", "cpu"]
    assert main(argv) == 0
    vols = sorted(out.glob("*.nii.gz"))
    assert len(vols) == len(list(labels.glob("*.nii.gz")))
    for v in vols:
        lab = nib.load(str(labels / (v.name.rsplit("_s", 1)[0] + ".nii.gz")))
        img = nib.load(str(v))
        assert img.shape == lab.shape and np.allclose(img.affine, lab.affine)


@pytest.mark.parametrize("argv, fragment", [
    (["--method", "gan3d"], "unknown method 'gan3d' (choose from lsdm, slice2d, pixel3d)"),
    ([], "--vqgan is required for method lsdm"),
])
def test_train_ldm_cli_rejects_bad_methods_in_one_line(argv: list[str], fragment: str, tmp_path: Path,
                                                       phantoms: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train-ldm", "--data", str(phantoms), "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medlsdm: error:") and fragment in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_config_rejects_an_unknown_method(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: tiny\nldm:\n  method: slice3d\n")
    with pytest.raises(UserError, match="unknown ldm.method 'slice3d'"):
        load_config(bad)
