"""VQ-GAN model and quantiser: shapes, straight-through gradients, chunked fp32 search, EMA, DDP sync, counts."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp

import pytest
import torch

from medlsdm.autoencoder import VQGAN, PatchDiscriminator3D, SliceDiscriminator2D, VectorQuantizer, build_vqgan
from medlsdm.config import load_config
from medlsdm.errors import UserError


def tiny_cfg(**kw):
    return dataclasses.replace(load_config("tiny").vqgan, **kw)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "shape, downsample",
    [((16, 64, 64), (4, 4, 4)), ((8, 32, 48), (4, 4, 4)), ((8, 32, 48), (1, 4, 4)), ((8, 16, 24), (2, 4, 1))],
)
def test_shapes_through_encode_quantize_decode(shape, downsample):
    torch.manual_seed(0)
    model = build_vqgan(tiny_cfg(downsample=downsample, n_codes=64)).eval()
    x = torch.rand(1, 1, *shape) * 2 - 1
    latent = tuple(s // f for s, f in zip(shape, downsample))
    assert model.latent_shape(shape) == latent
    with torch.no_grad():
        z = model.encode(x)
        assert z.shape == (1, 8, *latent)
        vq = model.quantize(z)
        assert vq.z_q.shape == z.shape and vq.z_q.dtype == torch.float32
        assert vq.indices.shape == (1, *latent) and vq.indices.dtype == torch.long
        assert model.decode(vq.z_q).shape == x.shape


def test_forward_and_decode_indices_agree():
    torch.manual_seed(0)
    model = build_vqgan(tiny_cfg(n_codes=64)).eval()
    x = torch.rand(2, 1, 8, 16, 24) * 2 - 1
    with torch.no_grad():
        rec, vq = model(x)
        assert rec.shape == x.shape
        # z_q holds exactly the looked-up codes, so decoding the indices gives the same volume
        assert torch.allclose(model.quantizer.lookup(vq.indices), vq.z_q, atol=1e-6)
        assert torch.allclose(model.decode_indices(vq.indices), rec, atol=1e-5)


@pytest.mark.parametrize("upsample", ["transpose", "nearest_conv"])
def test_axis_with_factor_one_is_never_strided(upsample):
    model = build_vqgan(tiny_cfg(downsample=(1, 4, 4), upsample=upsample))
    assert model.encoder.levels[0][0].stride == (1, 2, 2)
    up = model.decoder.levels[0][0]
    if upsample == "transpose":
        assert up.stride == (1, 2, 2)
    else:  # nearest doubling of H and W only, then a stride-1 conv
        assert tuple(up[0].scale_factor) == (1.0, 2.0, 2.0) and up[1].stride == (1, 1, 1)


def test_bad_shapes_and_factors_are_user_errors():
    model = build_vqgan(tiny_cfg())
    with pytest.raises(UserError, match="not divisible"):
        model.encode(torch.zeros(1, 1, 15, 64, 64))
    with pytest.raises(UserError, match="powers of two"):
        build_vqgan(tiny_cfg(downsample=(3, 4, 4)))


def test_straight_through_gradients_reach_the_encoder():
    torch.manual_seed(0)
    model = build_vqgan(tiny_cfg(n_codes=32)).train()
    x = torch.rand(2, 1, 4, 16, 16) * 2 - 1
    rec, vq = model(x)
    (rec - x).abs().mean().backward()  # reconstruction only: no commitment term
    for p in (model.encoder.conv_in.weight, model.pre_quant.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_chunked_search_matches_brute_force_cdist():
    torch.manual_seed(0)
    vq = VectorQuantizer(n_codes=50, dim=4, chunk=7).eval()
    z = torch.randn(3, 4, 2, 3, 5)  # N = 90 vectors, chunk 7 < N
    flat = z.movedim(1, -1).reshape(-1, 4)
    expected = torch.cdist(flat, vq.embedding).argmin(1).view(3, 2, 3, 5)
    assert torch.equal(vq.nearest(z), expected)
    assert torch.equal(vq(z).indices, expected)


def test_quantisation_stays_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    vq = VectorQuantizer(n_codes=300, dim=8, chunk=64).eval()
    z = torch.randn(2, 8, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z)
        idx = vq.nearest(z)
    expected = torch.cdist(z.movedim(1, -1).reshape(-1, 8), vq.embedding).argmin(1).view(2, 4, 6, 6)
    assert out.z_q.dtype == torch.float32 and out.commitment_loss.dtype == torch.float32
    assert torch.equal(out.indices, expected) and torch.equal(idx, expected)
    assert torch.isfinite(out.z_q).all()


def _fixed_quantizer(threshold: float) -> VectorQuantizer:
    vq = VectorQuantizer(n_codes=4, dim=2, decay=0.5, dead_code_threshold=threshold).train()
    codes = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0], [10.0, -10.0]])
    vq.embedding.copy_(codes)
    vq.embed_sum.copy_(codes)
    vq.initialized.fill_(True)
    return vq


def _batch_near(point: tuple[float, float], n: int = 8) -> torch.Tensor:
    """(1, 2, n, 1, 1) latents scattered around ``point``."""
    torch.manual_seed(1)
    flat = torch.tensor(point) + 0.1 * torch.randn(n, 2)
    return flat.t().reshape(1, 2, n, 1, 1)


def test_ema_moves_used_codes_towards_their_vectors():
    vq = _fixed_quantizer(threshold=0.0)
    z = _batch_near((2.0, 2.0))
    out = vq(z)
    assert (out.indices == 0).all()
    mean = z.flatten(2)[0].mean(1)  # (2,)
    # cluster size 0.5 * 1 + 0.5 * 8 and sum 0.5 * 0 + 0.5 * 8 * mean (Laplace smoothing is ~1e-5 here)
    assert torch.allclose(vq.embedding[0], 4.0 * mean / 4.5, atol=1e-3)
    assert (vq.embedding[0] - mean).norm() < mean.norm()  # closer than before (code was at the origin)
    assert torch.allclose(vq.embedding[1:], torch.tensor([[10.0, 10.0], [-10.0, 10.0], [10.0, -10.0]]), atol=1e-3)
    assert torch.allclose(vq.cluster_size, torch.tensor([4.5, 0.5, 0.5, 0.5]))
    assert out.usage.item() == pytest.approx(0.25) and out.perplexity.item() == pytest.approx(1.0)


def test_dead_codes_are_reinitialised_from_batch_vectors():
    vq = _fixed_quantizer(threshold=1.0)
    z = _batch_near((2.0, 2.0))
    vq(z)
    batch = z.flatten(2).squeeze(0).t()  # (8, 2)
    for k in (1, 2, 3):  # EMA size 0.5 < 1: restarted onto one of the batch's vectors
        assert (vq.embedding[k] - batch).norm(dim=1).min() < 1e-6
    assert (vq.cluster_size[1:] == 1.0).all()
    assert (vq.embedding[0] - batch.mean(0)).norm() < 2.0  # the used code is not restarted


def test_eval_mode_leaves_the_codebook_alone():
    vq = _fixed_quantizer(threshold=1.0).eval()
    before = vq.embedding.clone()
    vq(_batch_near((2.0, 2.0)))
    assert torch.equal(vq.embedding, before)


def test_first_batch_initialises_codebook_and_loss_mode_trains_it():
    torch.manual_seed(0)
    vq = VectorQuantizer(n_codes=6, dim=3, update="loss", dead_code_threshold=0.0).train()
    z = torch.randn(2, 3, 4, 2, 2, requires_grad=True)
    out = vq(z)
    flat = z.detach().movedim(1, -1).reshape(-1, 3)
    for code in vq.embedding.detach():  # every code is one of the first batch's vectors
        assert (code - flat).norm(dim=1).min() < 1e-6
    (out.commitment_loss + out.codebook_loss).backward()
    assert out.codebook_loss.item() > 0 and vq.embedding.grad.abs().sum() > 0
    assert z.grad.abs().sum() > 0


def test_codebook_range_is_min_max_of_codebook():
    model = build_vqgan(tiny_cfg(n_codes=16))
    model.quantizer.embedding.copy_(torch.linspace(-3.0, 5.0, 16 * 8).view(16, 8))
    assert model.codebook_range() == (pytest.approx(-3.0), pytest.approx(5.0))
    assert model.last_layer is model.decoder.conv_out.weight


def test_paper_preset_parameter_counts_match_appendix_a():
    cfg = load_config("paper").vqgan
    model = build_vqgan(cfg)
    counts = {
        "encoder": n_params(model.encoder),
        "decoder": n_params(model.decoder),
        "disc2d": n_params(SliceDiscriminator2D(cfg.disc_channels, cfg.disc_layers)),
        "disc3d": n_params(PatchDiscriminator3D(cfg.disc_channels, cfg.disc_layers)),
    }
    paper = {"encoder": 441.5e3, "decoder": 948.6e3, "disc2d": 2.8e6, "disc3d": 11.0e6}
    for name, value in paper.items():
        assert abs(counts[name] - value) / value < 0.02, (name, counts[name])


# ------------------------------------------------------------------------------------------ DDP
def _ddp_worker(rank: int, world: int, tmp: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)  # different data and different local random choices on each rank
    out = {}
    for threshold in (0.0, 1.0):  # without / with dead-code restarts
        vq = VectorQuantizer(n_codes=16, dim=4, decay=0.8, dead_code_threshold=threshold).train()
        for step in range(3):
            g = torch.Generator().manual_seed(10 * step + rank)
            vq(torch.randn(2, 4, 3, 2, 2, generator=g))  # 24 vectors per rank and step
        out[f"embedding{threshold}"], out[f"cluster_size{threshold}"] = vq.embedding, vq.cluster_size
    torch.save(out, f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_ranks_hold_identical_all_reduced_codebooks(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for key in r0:  # ranks saw different data and seeds, yet hold the same codebook and statistics
        assert torch.equal(r0[key], r1[key]), key
    # 3 steps, decay 0.8, 2 ranks x 24 vectors a step: sum = 16 * 0.8^3 + 48 * 0.2 * (0.8^2 + 0.8 + 1)
    assert r0["cluster_size0.0"].sum().item() == pytest.approx(16 * 0.512 + 48 * 0.2 * 2.44, rel=1e-5)


@pytest.mark.parametrize("downsample", [(4, 4, 4), (1, 4, 4), (2, 4, 4)])
def test_nearest_conv_decoder_keeps_shapes_and_has_no_transposed_convs(downsample):
    model = VQGAN(channels=4, downsample=downsample, embedding_dim=4, n_codes=16, upsample="nearest_conv",
                  decoder_tanh=True)
    x = torch.rand(1, 1, 8, 16, 16) * 2 - 1
    y, _ = model(x)
    assert y.shape == x.shape
    assert y.abs().max() < 1  # the final tanh
    assert not any(isinstance(m, torch.nn.ConvTranspose3d) for m in model.modules())


@pytest.mark.parametrize("upsample,uniform", [("nearest_conv", True), ("transpose", False)])
def test_constant_latent_decodes_to_a_uniform_interior_only_without_transposed_convs(upsample, uniform):
    """Nearest doubling + 3x3x3 convs map a constant latent to a constant volume away from the zero-padded
    border; stride-2 transposed 4x4x4 convs give a periodic (checkerboard) pattern everywhere."""
    from medlsdm.autoencoder.vqgan import Decoder

    torch.manual_seed(0)
    dec = Decoder(4, (4, 4, 4), upsample=upsample).eval()
    with torch.no_grad():
        out = dec(torch.full((1, dec.in_channels, 12, 12, 12), 0.3))[0, 0, 20:28, 20:28, 20:28]
    assert (float(out.std()) < 1e-5) == uniform


def test_unknown_upsample_is_a_user_error():
    from medlsdm.config import config_from_dict

    with pytest.raises(UserError, match="vqgan.upsample"):
        config_from_dict({"base": "tiny", "vqgan": {"upsample": "pixelshuffle"}})
