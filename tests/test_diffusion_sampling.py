"""Noise schedule, samplers, guidance and the LatentDiffusion wrapper (medlsdm.diffusion)."""

import math

import pytest
import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDPMScheduler

from medlsdm.config import LDMConfig
from medlsdm.diffusion import (
    DDIMSampler,
    DDPMSampler,
    LatentDiffusion,
    NoiseSchedule,
    guided_model_fn,
    make_sampler,
)
from medlsdm.errors import UserError

LATENT = (2, 4, 4)
DOWN = (2, 2, 2)


def tiny_model(objective: str = "eps", num_timesteps: int = 20, **kw) -> LatentDiffusion:
    torch.manual_seed(0)
    cfg = LDMConfig(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
                    semantic_channels=8, num_timesteps=num_timesteps, objective=objective, **kw)
    return LatentDiffusion.from_config(cfg, num_classes=3, image_down=DOWN, in_channels=8)


def labels(b: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, 3, (b, *(s * f for s, f in zip(LATENT, DOWN))), generator=g)
    return F.one_hot(index, 3).permute(0, 4, 1, 2, 3).float()


def fixed_model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed, timestep-dependent stand-in for a trained network."""
    return 0.6 * x + torch.sin(t.float() / 7.0).view(-1, 1, 1, 1, 1) * 0.3


# ---- schedule ------------------------------------------------------------------------------------
def test_cosine_schedule_matches_closed_form():
    T, s = 1000, 0.008
    sched = NoiseSchedule(T, "cosine")
    f = lambda n: math.cos((n / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    closed = torch.tensor([f(n + 1) / f(0) for n in range(T)], dtype=torch.float64)
    # before the 0.999 clip takes over (the last few steps) alpha-bar is the cos^2 formula
    torch.testing.assert_close(sched.alphas_cumprod[:990], closed[:990], rtol=1e-4, atol=1e-7)
    assert sched.betas.max() == pytest.approx(0.999) and sched.betas[-1] == pytest.approx(0.999)
    assert (sched.betas[1:] >= sched.betas[:-1]).all()  # cosine-increasing betas
    torch.testing.assert_close(sched.alphas_cumprod, torch.cumprod(1 - sched.betas, 0))
    assert sched.posterior_variance[0] == 0


def test_q_sample_statistics():
    sched = NoiseSchedule(100)
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1, 1), 0.7)
    for t in (0, 40, 99):
        x_t = sched.q_sample(x0, torch.full((20000,), t), torch.randn(x0.shape, generator=g))
        ab = float(sched.alphas_cumprod[t])
        assert x_t.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=0.02)
        assert x_t.std().item() == pytest.approx(math.sqrt(1 - ab), abs=0.02)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_targets_invert_to_x0(objective):
    sched = NoiseSchedule(50)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(3, 2, 2, 2, 2, generator=g) * 2 - 1, torch.randn(3, 2, 2, 2, 2, generator=g)
    t = torch.tensor([0, 20, 45])
    x_t = sched.q_sample(x0, t, noise)
    target = sched.target(objective, x0, t, noise)
    torch.testing.assert_close(sched.predict_x0(objective, x_t, t, target), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sched.predict_eps_from_x0(x_t, t, x0), noise, atol=1e-4, rtol=1e-4)


def test_bad_config_values_raise_user_errors():
    with pytest.raises(UserError):
        NoiseSchedule(100, "quadratic")
    with pytest.raises(UserError):
        make_sampler("euler", NoiseSchedule(10))
    with pytest.raises(UserError):
        tiny_model(objective="score")


# ---- samplers ------------------------------------------------------------------------------------
def test_ddim_timesteps():
    sched = NoiseSchedule(1000)
    assert DDIMSampler(sched, steps=1000).timesteps() == list(range(999, -1, -1))
    steps = DDIMSampler(sched, steps=25).timesteps()
    assert len(steps) == 25 and steps[0] == 999 and steps[-1] == 0
    assert all(a > b for a, b in zip(steps, steps[1:]))


def test_ddpm_step_matches_monai():
    """One ancestral step equals MONAI's DDPMScheduler.step (same cosine betas, same noise draw)."""
    T = 50
    sched = NoiseSchedule(T, "cosine")
    monai = DDPMScheduler(num_train_timesteps=T, schedule="cosine", clip_sample=True)
    ours = DDPMSampler(sched, "eps", clip=1.0)
    x = torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    for t in (T - 1, 25, 1, 0):
        out = fixed_model_fn(x, torch.full((2,), t))
        expected, _ = monai.step(out, t, x, generator=torch.Generator().manual_seed(t))
        got = ours.step(out, t, t - 1, x, torch.Generator().manual_seed(t))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_ddim_eta1_full_steps_equals_ddpm():
    """DDIM with S = T and eta = 1 has sigma_t^2 = the DDPM posterior variance and
    sqrt(1 - ab_{t-1} - sigma_t^2) * eps = the x_t part of the DDPM posterior mean (both with the same
    clipped x0), so with the same generator the two samplers produce the same chain."""
    sched = NoiseSchedule(30)
    shape = (2, 3, 2, 4, 4)
    ddpm = DDPMSampler(sched).sample(fixed_model_fn, shape, torch.Generator().manual_seed(3), progress=False)
    ddim = DDIMSampler(sched, steps=30, eta=1.0).sample(fixed_model_fn, shape, torch.Generator().manual_seed(3),
                                                        progress=False)
    torch.testing.assert_close(ddim, ddpm, atol=1e-5, rtol=1e-4)
    assert ddpm.abs().max() <= 1.0  # the last step returns the clipped x0 prediction


@pytest.mark.parametrize("steps", [30, 7])
def test_ddim_eta0_is_deterministic_and_exact_for_an_oracle(steps):
    """For data concentrated at one point x*, the ideal eps-model is (x_t - sqrt(ab) x*) / sqrt(1 - ab).
    Deterministic DDIM (eta = 0) must land exactly on x* for any S, regardless of the initial noise,
    and so must the DDPM posterior mean chain."""
    sched = NoiseSchedule(30)
    target = torch.linspace(-0.9, 0.9, 2 * 3 * 2 * 4 * 4).reshape(2, 3, 2, 4, 4)

    def oracle(x, t):
        return sched.predict_eps_from_x0(x, t, target)

    for seed in (0, 1):
        out = DDIMSampler(sched, steps=steps, eta=0.0).sample(oracle, target.shape, torch.Generator().manual_seed(seed),
                                                              progress=False)
        torch.testing.assert_close(out, target, atol=1e-5, rtol=1e-5)
    ddpm = DDPMSampler(sched).sample(oracle, target.shape, torch.Generator().manual_seed(0), progress=False)
    torch.testing.assert_close(ddpm, target, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5)])
def test_seeded_sampling_is_reproducible(name, eta):
    sampler = make_sampler(name, NoiseSchedule(20), steps=None if name == "ddpm" else 8, eta=eta)
    shape = (1, 2, 2, 3, 3)
    a = sampler.sample(fixed_model_fn, shape, torch.Generator().manual_seed(5), progress=False)
    b = sampler.sample(fixed_model_fn, shape, torch.Generator().manual_seed(5), progress=False)
    c = sampler.sample(fixed_model_fn, shape, torch.Generator().manual_seed(6), progress=False)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


# ---- guidance ------------------------------------------------------------------------------------
class Recorder(torch.nn.Module):
    """A stand-in U-Net that records which branch was called."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def forward(self, x, t, labels, drop=None):
        self.calls.append("uncond" if labels is None else "cond")
        return x * 0.5 if labels is None else x + labels.mean()


def test_guidance_scale_one_calls_only_the_conditional_branch():
    unet, lab = Recorder(), torch.ones(1, 2, 2, 2, 2)
    x, t = torch.randn(1, 2, 2, 2, 2), torch.tensor([3])
    assert torch.equal(guided_model_fn(unet, lab, 1.0)(x, t), x + 1)
    assert unet.calls == ["cond"]
    unet.calls.clear()
    torch.testing.assert_close(guided_model_fn(unet, lab, 1.5)(x, t), 0.5 * x + 1.5 * (x + 1 - 0.5 * x))
    assert sorted(unet.calls) == ["cond", "uncond"]


def test_guidance_scale_one_equals_conditional_unet_exactly():
    model = tiny_model()
    for p in model.parameters():  # non-zero output convs so both branches differ
        p.data.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    x, t, lab = torch.randn(2, 8, *LATENT), torch.tensor([3, 9]), labels()
    with torch.no_grad():
        cond = model.unet(x, t, lab)
        uncond = model.unet(x, t, None)
        assert torch.equal(guided_model_fn(model.unet, lab, 1.0)(x, t), cond)
        torch.testing.assert_close(guided_model_fn(model.unet, lab, 2.0)(x, t), uncond + 2.0 * (cond - uncond))
    assert (cond - uncond).abs().max() > 1e-4


# ---- LatentDiffusion -----------------------------------------------------------------------------
@pytest.mark.parametrize("objective,loss", [("eps", "l2"), ("v", "l1")])
def test_training_steps_reduce_loss_on_a_fixed_batch(objective, loss):
    """Same batch, same t / noise / drop mask (same generator seed) every step: Adam must reduce it."""
    model = tiny_model(objective, loss=loss, cond_drop_prob=0.3)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x0 = torch.rand(2, 8, *LATENT, generator=torch.Generator().manual_seed(1)) * 2 - 1
    lab = labels()
    losses = []
    for _ in range(6):
        loss_value, logs = model.training_loss(x0, lab, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss_value.backward()
        opt.step()
        losses.append(logs["loss"])
    assert losses[-1] < 0.8 * losses[0]
    assert set(logs) >= {"loss", "t_mean", "drop_frac"}


def test_sample_shape_range_and_reproducibility():
    model = tiny_model(num_timesteps=10)
    lab = labels()
    a = model.sample(lab, "ddim", steps=4, guidance_scale=1.5, generator=torch.Generator().manual_seed(0),
                     progress=False)
    b = model.sample(lab, "ddim", steps=4, guidance_scale=1.5, generator=torch.Generator().manual_seed(0),
                     progress=False)
    c = model.sample(lab, "ddpm", generator=torch.Generator().manual_seed(1), progress=False)
    assert a.shape == (2, 8, *LATENT) and c.shape == a.shape
    assert torch.equal(a, b)
    assert a.abs().max() <= 1.0 and c.abs().max() <= 1.0
    assert model.training  # sampling restores the train/eval mode
