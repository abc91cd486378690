"""The noise schedule: the one source of betas / alphas for training and every sampler (eqs. 10-12).

Betas come from MONAI's ``NoiseSchedules`` registry (``"cosine"`` is Nichol & Dhariwal's schedule with
betas clipped at 0.999; ``"linear_beta"``, ``"scaled_linear_beta"``, ``"sigmoid_beta"`` also work).
The tables are kept in float64 on the CPU; lookups return coefficients shaped ``(B, 1, 1, 1, 1)`` on
the device and in the dtype of the tensor they multiply.

Index convention: ``t`` in ``[0, T)``; ``alphas_cumprod[t]`` is alpha-bar after ``t + 1`` noising steps.
Objectives: ``"eps"`` (noise), ``"x0"`` (clean latent), ``"v"`` (``sqrt(ab) * eps - sqrt(1 - ab) * x0``).
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import NoiseSchedules

from medlsdm.errors import UserError

OBJECTIVES = ("eps", "x0", "v")


class NoiseSchedule:
    """``NoiseSchedule(num_timesteps, kind="cosine")``: tables ``betas``, ``alphas``, ``alphas_cumprod``,
    ``alphas_cumprod_prev`` (length T, float64) and the closed-form helpers built on them."""

    def __init__(self, num_timesteps: int = 1000, kind: str = "cosine") -> None:
        if kind not in NoiseSchedules.names:
            raise UserError(f"config: unknown noise schedule '{kind}' (choose from {', '.join(NoiseSchedules.names)})")
        if num_timesteps < 2:
            raise UserError(f"config: num_timesteps must be at least 2, got {num_timesteps}")
        out = NoiseSchedules[kind](num_train_timesteps=num_timesteps)
        betas = (out[0] if isinstance(out, tuple) else out).double()
        self.num_timesteps = num_timesteps
        self.kind = kind
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # q(x_{t-1} | x_t, x_0) = N(c0 * x0 + ct * x_t, posterior_variance)  (Ho et al. eqs. 6-7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_coef_x0 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_coef_xt = self.alphas.sqrt() * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self._cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"NoiseSchedule(num_timesteps={self.num_timesteps}, kind={self.kind!r})"

    # ---- lookups -------------------------------------------------------------------------------
    def lookup(self, name: str, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at timesteps ``t`` (int or (B,)) as ``(B, 1, 1, 1, 1)`` on ``like``'s device/dtype."""
        tables = self._cache.setdefault(like.device, {})
        if name not in tables:
            tables[name] = getattr(self, name).to(like.device)
        t = torch.as_tensor(t, device=like.device).long().reshape(-1)
        values = tables[name][t].to(like.dtype)
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(batch,)`` timesteps uniform in ``[0, T)`` on the generator's device (CPU by default)."""
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device)

    # ---- forward process ---------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """Eq. 12: ``x_t = sqrt(ab_t) * x0 + sqrt(1 - ab_t) * noise``."""
        ab = self.lookup("alphas_cumprod", t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def velocity(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """``v = sqrt(ab_t) * noise - sqrt(1 - ab_t) * x0``."""
        ab = self.lookup("alphas_cumprod", t, x0)
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def target(self, objective: str, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """What the network regresses for ``objective``."""
        check_objective(objective)
        if objective == "eps":
            return noise
        if objective == "x0":
            return x0
        return self.velocity(x0, t, noise)

    # ---- conversions between predictions -----------------------------------------------------
    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
        ab = self.lookup("alphas_cumprod", t, x_t)
        return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor | int, x0: torch.Tensor) -> torch.Tensor:
        ab = self.lookup("alphas_cumprod", t, x_t)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

    def predict_x0(
        self, objective: str, x_t: torch.Tensor, t: torch.Tensor | int, output: torch.Tensor
    ) -> torch.Tensor:
        """The clean latent implied by a model ``output`` for ``objective`` at ``(x_t, t)``."""
        check_objective(objective)
        if objective == "eps":
            return self.predict_x0_from_eps(x_t, t, output)
        if objective == "x0":
            return output
        ab = self.lookup("alphas_cumprod", t, x_t)
        return ab.sqrt() * x_t - (1 - ab).sqrt() * output

    def posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of ``q(x_{t-1} | x_t, x0)``; the variance is 0 at ``t = 0``."""
        mean = self.lookup("posterior_coef_x0", t, x_t) * x0 + self.lookup("posterior_coef_xt", t, x_t) * x_t
        return mean, self.lookup("posterior_variance", t, x_t)


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise UserError(f"config: unknown diffusion objective '{objective}' (choose from {', '.join(OBJECTIVES)})")
