"""VQ-GAN losses, discriminators and the perceptual-model loader."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from medlsdm.autoencoder import (
    PatchDiscriminator3D,
    PerceptualLoss,
    SliceDiscriminator2D,
    build_perceptual,
    build_vqgan,
    build_vqgan_loss,
    sample_slices,
)
from medlsdm.autoencoder.perceptual import vgg16_features
from medlsdm.config import load_config
from medlsdm.errors import UserError


def tiny_cfg(**kw):
    """The tiny preset's VQ-GAN config with the paper's loss (no display-window L1 term) unless asked for."""
    kw.setdefault("window_l1_weight", 0.0)
    return dataclasses.replace(load_config("tiny").vqgan, **kw)


class MeanDisc(nn.Module):
    """A stub discriminator: logits = per-sample mean of the input, features = [input]."""

    def forward(self, x):
        return x.flatten(1).mean(1), [x]


# ------------------------------------------------------------------------------ adaptive weight
def test_adaptive_weight_equals_hand_computation():
    w = nn.Parameter(torch.tensor([[1.0, -2.0, 0.5]]))  # a linear "last layer"
    u, v = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])
    rec = 2.0 * (w @ u).sum()  # d rec / d w = 2u, norm 10
    gan = (w @ v).sum() ** 2  # d gan / d w = 2 (w.v) v = -4 v, norm 4
    loss = build_vqgan_loss(tiny_cfg())
    weight = loss.adaptive_weight(rec, gan, w, delta=1e-4)
    assert weight.item() == pytest.approx(10.0 / (4.0 + 1e-4), rel=1e-6)
    assert not weight.requires_grad and w.grad is None  # detached, and no .grad written
    assert loss.adaptive_weight(rec, gan, w, max_weight=2.0).item() == 2.0
    (rec + gan).backward()  # graphs were retained
    assert torch.allclose(w.grad, 2 * u - 4 * v)


# ------------------------------------------------------------------------------ discriminator loss
def test_discriminator_loss_is_zero_and_untouched_before_start():
    torch.manual_seed(0)
    disc2d, disc3d = SliceDiscriminator2D(8, 2), PatchDiscriminator3D(8, 2)
    calls = []
    for d in (disc2d, disc3d):
        d.register_forward_hook(lambda *a: calls.append(1))
    stats = [b.clone() for b in disc3d.buffers()]
    loss_fn = build_vqgan_loss(tiny_cfg(disc_start_step=10))
    x, x_rec = torch.rand(2, 1, 8, 16, 16), torch.rand(2, 1, 8, 16, 16)
    d_loss, logs = loss_fn.discriminator_loss(x, x_rec, disc2d, disc3d, step=9)
    d_loss.backward()
    assert d_loss.item() == 0.0 and logs["d_active"] == 0.0 and not calls
    assert all(p.grad is None for p in [*disc2d.parameters(), *disc3d.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(stats, disc3d.buffers()))
    d_loss, logs = loss_fn.discriminator_loss(x, x_rec, disc2d, disc3d, step=10)
    d_loss.backward()
    assert d_loss.item() > 0 and logs["d_active"] == 1.0 and len(calls) == 4
    assert all(p.grad is not None for p in disc3d.parameters())


@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_discriminator_loss_values(kind):
    x = torch.full((2, 1, 4, 8, 8), 0.5)  # stub logits: real 0.5, fake -2
    x_rec = torch.full((2, 1, 4, 8, 8), -2.0)
    loss_fn = build_vqgan_loss(tiny_cfg(gan_loss=kind, disc_start_step=0, image_gan_weight=1.0, volume_gan_weight=0.5))
    d_loss, logs = loss_fn.discriminator_loss(x, x_rec, MeanDisc(), MeanDisc(), step=0)
    if kind == "hinge":
        per_disc = 0.5 * (max(0.0, 1 - 0.5) + max(0.0, 1 - 2.0))
    else:
        softplus = lambda t: torch.nn.functional.softplus(torch.tensor(t)).item()  # noqa: E731
        per_disc = 0.5 * (softplus(-0.5) + softplus(-2.0))
    assert logs["d_loss_2d"] == pytest.approx(per_disc) and logs["d_loss_3d"] == pytest.approx(per_disc)
    assert d_loss.item() == pytest.approx(1.5 * per_disc)


# ------------------------------------------------------------------------------ generator loss
def _model_and_batch():
    torch.manual_seed(0)
    model = build_vqgan(tiny_cfg(n_codes=32)).train()
    x = torch.rand(2, 1, 8, 16, 16) * 2 - 1
    x_rec, vq = model(x)
    return model, x, x_rec, vq


def test_generator_loss_before_disc_start_is_l1_plus_commitment():
    model, x, x_rec, vq = _model_and_batch()
    cfg = tiny_cfg(disc_start_step=100, l1_weight=4.0)
    loss, logs = build_vqgan_loss(cfg).generator_loss(x, x_rec, vq, MeanDisc(), MeanDisc(), 99, model.last_layer)
    expected = 4.0 * (x_rec - x).abs().mean() + vq.commitment_loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert logs["g_gan"] == 0.0 and logs["adaptive_weight"] == 0.0 and logs["perceptual"] == 0.0
    assert all(isinstance(v, float) for v in logs.values())
    for key in ("l1", "commitment", "perplexity", "usage", "g_gan", "adaptive_weight", "feature_match"):
        assert key in logs


def test_generator_loss_with_discriminators_and_perceptual_term():
    model, x, x_rec, vq = _model_and_batch()
    cfg = tiny_cfg(disc_start_step=0, perceptual_backbone="random-vgg16", perceptual_weight=1.0, perceptual_slices=2)
    perceptual, description = build_perceptual(cfg)
    disc2d, disc3d = SliceDiscriminator2D(8, 2), PatchDiscriminator3D(8, 2)
    loss_fn = build_vqgan_loss(cfg, perceptual)
    loss, logs = loss_fn.generator_loss(x, x_rec, vq, disc2d, disc3d, 0, model.last_layer)
    assert "NOT pretrained" in description
    assert logs["perceptual"] > 0 and logs["adaptive_weight"] > 0 and logs["feature_match"] > 0
    assert logs["g_gan"] == pytest.approx(logs["g_gan_2d"] + logs["g_gan_3d"], rel=1e-5)
    assert model.last_layer.grad is None  # the adaptive weight did not write .grad
    loss.backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in perceptual.parameters())  # frozen backbone


def test_feature_match_sum_is_n_layers_times_mean():
    """``sum`` (the authors' code) = number of discriminator layers x ``mean`` (the default), in the loss too."""
    from medlsdm.autoencoder.losses import feature_matching

    model, x, x_rec, vq = _model_and_batch()
    torch.manual_seed(1)
    disc2d, disc3d = SliceDiscriminator2D(8, 3), PatchDiscriminator3D(8, 3)
    fake, real = disc3d(x_rec)[1], disc3d(x)[1]
    n = len(fake)
    assert n == 4  # 3-layer discriminators return 4 feature maps (as the authors')
    mean, total = feature_matching(fake, real, "mean"), feature_matching(fake, real, "sum")
    assert mean.item() > 0
    torch.testing.assert_close(total, n * mean)
    torch.testing.assert_close(mean, sum(torch.nn.functional.l1_loss(f, r) for f, r in zip(fake, real)) / n)
    logs = {}
    for red in ("mean", "sum"):
        cfg = tiny_cfg(disc_start_step=0, feature_match_reduction=red, image_gan_weight=1.0, volume_gan_weight=0.5)
        torch.manual_seed(2)  # the same random slice for the 2D discriminator
        logs[red] = build_vqgan_loss(cfg).generator_loss(x, x_rec, vq, disc2d, disc3d, 0, model.last_layer)[1]
    assert logs["mean"]["feature_match"] > 0
    assert logs["sum"]["feature_match"] == pytest.approx(n * logs["mean"]["feature_match"], rel=1e-5)
    assert logs["sum"]["g_gan"] == pytest.approx(logs["mean"]["g_gan"], rel=1e-6)  # only feature matching changed


def test_unknown_feature_match_reduction_is_refused(tmp_path):
    assert load_config("tiny").vqgan.feature_match_reduction == "mean"  # the default is unchanged
    path = tmp_path / "bad.yaml"
    path.write_text("base: tiny\nvqgan:\n  feature_match_reduction: max\n")
    with pytest.raises(UserError, match="unknown vqgan.feature_match_reduction 'max'"):
        load_config(path)
    with pytest.raises(UserError, match="feature_match_reduction"):
        tiny_cfg(feature_match_reduction="median")


def test_sample_slices_uses_the_same_index_for_real_and_fake():
    real = torch.arange(4.0).view(1, 1, 4, 1, 1).expand(3, 1, 4, 2, 2)
    a, b = sample_slices(real, real + 10.0)
    assert a.shape == (3, 1, 2, 2) and torch.equal(b, a + 10.0)


# ------------------------------------------------------------------------------ perceptual loader
def _fake_torchvision_vgg16(path):
    torch.manual_seed(0)
    state = {f"features.{k}": torch.randn_like(v) for k, v in vgg16_features().state_dict().items()}
    state["classifier.6.weight"] = torch.randn(10, 4)  # ignored (the real one is 1000 x 4096)
    torch.save(state, path)
    return state


def test_vgg16_weights_load_from_a_torchvision_format_file(tmp_path):
    state = _fake_torchvision_vgg16(tmp_path / "vgg16-397923af.pth")
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lin, tmp_path / "vgg.pth")
    cfg = tiny_cfg(
        perceptual_backbone="vgg16",
        perceptual_weights=str(tmp_path / "vgg16-397923af.pth"),
        perceptual_lpips_weights=str(tmp_path / "vgg.pth"),
    )
    module, description = build_perceptual(cfg)
    assert isinstance(module, PerceptualLoss) and "vgg16-397923af.pth" in description and "LPIPS" in description
    for k, v in module.features.state_dict().items():
        assert torch.equal(v, state[f"features.{k}"])
    assert torch.equal(module.lin3, lin["lin3.model.1.weight"].flatten())
    x = torch.rand(1, 1, 4, 32, 32) * 2 - 1
    assert module(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert module(x, -x).item() > 0


def test_vgg16_found_in_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    cfg = tiny_cfg(perceptual_backbone="vgg16")
    with pytest.raises(UserError, match="vgg16-397923af.pth: VGG16 weights not found"):
        build_perceptual(cfg)
    (tmp_path / "checkpoints").mkdir()
    _fake_torchvision_vgg16(tmp_path / "checkpoints" / "vgg16-397923af.pth")
    module, description = build_perceptual(cfg)
    assert module is not None and str(tmp_path) in description


def test_wrong_perceptual_files_are_one_line_user_errors(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    other = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(3, 3)}, other)
    for path, match in ((garbage, "not a readable"), (other, "not a torchvision VGG16 checkpoint")):
        with pytest.raises(UserError, match=match) as info:
            build_perceptual(tiny_cfg(perceptual_backbone="vgg16", perceptual_weights=str(path)))
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert build_perceptual(tiny_cfg(perceptual_backbone="none")) == (None, "none (no perceptual term)")
    with pytest.raises(UserError, match="perceptual_backbone"):
        build_perceptual(tiny_cfg(perceptual_backbone="resnet"))


def test_window_l1_weighs_soft_tissue_errors_and_ignores_them_outside_the_window():
    """Display window (-0.16, 0.24) in [-1, 1] units (-160..240 HU over -1000..1000): a 0.02 error (20 HU) inside
    it costs 0.02 * 2 / 0.4 = 0.1; the same error on bone (0.7 -> 0.72, outside) costs nothing."""
    model, _, _, vq = _model_and_batch()
    cfg = tiny_cfg(disc_start_step=100, l1_weight=4.0, window_l1_weight=2.0)
    loss_fn = build_vqgan_loss(cfg, window=lambda x: (-0.16, 0.24))
    x = torch.full((1, 1, 4, 8, 8), 0.04)
    assert loss_fn.window_l1(x, x + 0.02).item() == pytest.approx(0.1, rel=1e-5)
    bone = torch.full_like(x, 0.7)
    assert loss_fn.window_l1(bone, bone + 0.02).item() == 0.0
    loss, logs = loss_fn.generator_loss(x, x + 0.02, vq, MeanDisc(), MeanDisc(), 0, model.last_layer)
    assert logs["l1_window"] == pytest.approx(0.1, rel=1e-5)
    assert loss.item() == pytest.approx(4.0 * 0.02 + 2.0 * 0.1 + vq.commitment_loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="display window"):
        build_vqgan_loss(cfg)
