"""Stage 1 built from typed arguments: the config maps onto them in one place (medlsdm.autoencoder.build), the
weights' layout is unchanged, and evaluation's LPIPS uses the same perceptual network without a VQGANConfig."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch

import medlsdm
from medlsdm.autoencoder import (
    VQGAN,
    PerceptualLoss,
    VQGANLoss,
    build_perceptual,
    build_vqgan,
    build_vqgan_loss,
    perceptual_network,
)
from medlsdm.config import load_config
from medlsdm.evaluation.metrics import lpips

PACKAGE = Path(medlsdm.__file__).parent


def layout_sha(module: torch.nn.Module) -> str:
    """SHA-256 of the state dict's ``key:shape`` lines, in order (what a weights file must match to load)."""
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in module.state_dict().items())
    return hashlib.sha256(lines.encode()).hexdigest()


# Measured on 2026-12-03 with the former constructor VQGAN(load_config(preset).vqgan), at commit 6b1942b,
# before the typed arguments: (parameters, state-dict keys, layout_sha). Weight files of older runs have this
# layout, so these numbers must never change.
OLD_LAYOUT = {
    "tiny": (292089, 72, "ff5b2c7b361b2263b9ea63d412de7591d5ffa36dd16c6844bceb089135b70784"),
    "paper": (1391081, 72, "479a5f89b42a7d153344b7ba2aad2f84ef9a05f84ac8a9187306000ad31b3cdc"),
}
# Same date and commit: build_perceptual of the tiny preset with perceptual_backbone "random-vgg16" (parameters,
# keys, layout_sha), and the VQGANLoss holding it (its state dict is the perceptual network's, prefixed).
OLD_PERCEPTUAL = (14714688, 33, "1a63536d8888a72917de486918f5c8e829687fcf5200e9579a1ac911c4af2e4d")
OLD_LOSS_SHA = "a2bc3bcd9822e83cdc86f34b6af953ba51d1c3542338b042d9e0824e87185461"


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_build_vqgan_keeps_the_parameter_count_and_state_dict_keys(preset):
    model = build_vqgan(load_config(preset).vqgan)
    n_params = sum(p.numel() for p in model.parameters())
    assert (n_params, len(model.state_dict()), layout_sha(model)) == OLD_LAYOUT[preset]


def test_typed_defaults_are_the_paper_preset():
    assert layout_sha(VQGAN()) == OLD_LAYOUT["paper"][2]
    paper = load_config("paper").vqgan
    model = VQGAN(channels=paper.channels, downsample=paper.downsample, embedding_dim=paper.embedding_dim,
                  n_codes=paper.n_codes, upsample=paper.upsample)
    assert layout_sha(model) == OLD_LAYOUT["paper"][2]


def test_build_vqgan_maps_every_model_field():
    cfg = dataclasses.replace(load_config("tiny").vqgan, channels=4, downsample=(1, 2, 4), embedding_dim=3,
                              n_codes=16, num_res_blocks=2, upsample="transpose", decoder_tanh=True,
                              commitment_beta=0.5, codebook_update="loss", ema_decay=0.9, dead_code_threshold=0.5,
                              quantize_chunk=128)
    model = build_vqgan(cfg)
    q = model.quantizer
    assert model.downsample == (1, 2, 4) and model.encoder.conv_in.out_channels == 4
    assert q.embedding.shape == (16, 3) and len(model.encoder.levels[0]) == 1 + 2 and model.decoder.tanh
    typed = VQGAN(channels=4, downsample=(1, 2, 4), embedding_dim=3, n_codes=16, num_res_blocks=2,
                  upsample="transpose", decoder_tanh=True, commitment_beta=0.5, codebook_update="loss",
                  ema_decay=0.9, dead_code_threshold=0.5, quantize_chunk=128)
    assert layout_sha(typed) == layout_sha(model)
    assert (q.beta, q.update, q.decay, q.dead_code_threshold, q.chunk) == (0.5, "loss", 0.9, 0.5, 128)


def test_the_former_config_calls_say_what_to_use():
    cfg = load_config("tiny").vqgan
    with pytest.raises(TypeError, match="build_vqgan"):
        VQGAN(cfg)
    with pytest.raises(TypeError, match="build_vqgan_loss"):
        VQGANLoss(cfg)


def test_build_vqgan_loss_maps_every_loss_field():
    cfg = dataclasses.replace(load_config("tiny").vqgan, l1_weight=2.5, window_l1_weight=0.5, perceptual_weight=0.3,
                              disc_start_step=7, gan_loss="vanilla", image_gan_weight=0.2, volume_gan_weight=0.7,
                              feature_match_weight=1.5, feature_match_reduction="sum", adaptive_weight_max=9.0)
    def window(x):
        return -0.5, 0.5

    loss = build_vqgan_loss(cfg, None, window)
    for name in ("l1_weight", "window_l1_weight", "perceptual_weight", "disc_start_step", "gan_loss",
                 "image_gan_weight", "volume_gan_weight", "feature_match_weight", "feature_match_reduction",
                 "adaptive_weight_max"):
        assert getattr(loss, name) == getattr(cfg, name), name
    assert loss.window is window and loss.perceptual is None
    with pytest.raises(ValueError, match="reduction"):
        VQGANLoss(feature_match_reduction="max")


def test_perceptual_network_layout_and_descriptions_are_unchanged():
    cfg = dataclasses.replace(load_config("tiny").vqgan, perceptual_backbone="random-vgg16", perceptual_weight=1.0)
    module, description = build_perceptual(cfg)
    assert isinstance(module, PerceptualLoss) and module.n_slices == cfg.perceptual_slices
    n = sum(p.numel() for p in module.parameters())
    assert (n, len(module.state_dict()), layout_sha(module)) == OLD_PERCEPTUAL
    assert layout_sha(build_vqgan_loss(cfg, module)) == OLD_LOSS_SHA
    assert description == "randomly initialised VGG16 (NOT pretrained)"
    assert perceptual_network("random-vgg16", n_slices=1)[1] == description
    assert perceptual_network("none") == (None, "none (no perceptual term)")
    assert build_perceptual(dataclasses.replace(cfg, perceptual_weight=0.0)) == (None, "none (no perceptual term)")
    a = torch.rand(1, 1, 8, 8, 8) * 2 - 1
    # the LPIPS metric builds its random network from a fixed seed and says which
    assert lpips(a, a, planes=("axial",))[1] == "randomly initialised (seed 0) VGG16 (NOT pretrained)"


def test_lpips_reads_vgg16_files_from_typed_arguments(tmp_path):
    from medlsdm.autoencoder.perceptual import vgg16_features

    torch.save({f"features.{k}": torch.randn_like(v) for k, v in vgg16_features().state_dict().items()},
               tmp_path / "vgg16-397923af.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))},
               tmp_path / "vgg.pth")
    weights, lin = str(tmp_path / "vgg16-397923af.pth"), str(tmp_path / "vgg.pth")
    a = torch.rand(1, 1, 4, 32, 32) * 2 - 1
    value, description = lpips(a, -a, planes=("axial",), weights=weights, lpips_weights=lin, backbone="vgg16")
    assert value > 0
    assert description == f"VGG16 (ImageNet weights from {weights}) + LPIPS linear layers from {lin}"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_autoencoder_imports_nothing_downstream_and_evaluation_no_vqgan_config():
    downstream = ("medlsdm.diffusion", "medlsdm.pipeline", "medlsdm.training", "medlsdm.evaluation")
    for path in sorted((PACKAGE / "autoencoder").glob("*.py")):
        bad = [m for m in _imports(path) if m.startswith(downstream)]
        assert not bad, (path.name, bad)
    for path in sorted((PACKAGE / "evaluation").glob("*.py")):
        assert "VQGANConfig" not in path.read_text(), path.name
