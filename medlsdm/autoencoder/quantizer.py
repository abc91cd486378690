"""Vector quantiser: nearest-code search, straight-through estimator, EMA codebook, dead-code restarts.

The nearest-code search runs in fp32 (autocast disabled) and in chunks of ``chunk`` latent vectors, so
the full N x K distance matrix is never built. Under DDP the EMA statistics are all-reduced and every
random choice (initialisation, restarts) is broadcast from rank 0, so all ranks hold the same codebook.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class QuantizerOutput(NamedTuple):
    """What :class:`VectorQuantizer` returns for latents ``z`` of shape (B, E, d, h, w)."""

    z_q: torch.Tensor  # (B, E, d, h, w) fp32, straight-through (gradients flow to z)
    indices: torch.Tensor  # (B, d, h, w) long
    commitment_loss: torch.Tensor  # scalar: beta * ||z - sg(z_q)||^2
    codebook_loss: torch.Tensor  # scalar: ||sg(z) - z_q||^2 ("loss" update), 0 with EMA updates
    perplexity: torch.Tensor  # scalar: exp(entropy of this batch's code histogram)
    usage: torch.Tensor  # scalar: fraction of the K codes used in this batch


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's copy of ``t`` on every rank (a no-op without torch.distributed)."""
    if _distributed():
        dist.broadcast(t, src=0)
    return t


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _random_rows(flat: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` random rows of ``flat`` (N, E), without replacement when N >= n."""
    if flat.shape[0] >= n:
        idx = torch.randperm(flat.shape[0], device=flat.device)[:n]
    else:
        idx = torch.randint(flat.shape[0], (n,), device=flat.device)
    return flat[idx]


class VectorQuantizer(nn.Module):
    """Codebook of ``n_codes`` vectors of size ``dim`` (paper eqs. 1 and 3).

    Args:
        n_codes: codebook size K.
        dim: code dimension E (= latent channels).
        beta: commitment weight.
        update: ``"ema"`` (exponential moving averages of cluster sizes and sums, Laplace smoothed) or
            ``"loss"`` (the codebook is a parameter trained by the codebook loss).
        decay: EMA decay for the cluster statistics.
        dead_code_threshold: codes whose EMA cluster size falls below this are re-initialised from
            random encoder outputs of the current batch (0 disables restarts).
        chunk: latent vectors per distance-matrix chunk.
        eps: Laplace smoothing constant.
    """

    def __init__(
        self,
        n_codes: int,
        dim: int,
        beta: float = 0.25,
        update: str = "ema",
        decay: float = 0.99,
        dead_code_threshold: float = 1.0,
        chunk: int = 4096,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if update not in ("ema", "loss"):
            raise ValueError(f"update must be 'ema' or 'loss', got {update!r}")
        self.n_codes, self.dim, self.beta = n_codes, dim, beta
        self.update, self.decay, self.eps = update, decay, eps
        self.dead_code_threshold, self.chunk = dead_code_threshold, chunk
        init = torch.randn(n_codes, dim)
        if update == "loss":
            self.embedding = nn.Parameter(init)
        else:
            self.register_buffer("embedding", init)
        self.register_buffer("cluster_size", torch.ones(n_codes))
        self.register_buffer("embed_sum", init.clone())
        self.register_buffer("initialized", torch.tensor(False))

    # ----------------------------------------------------------------------------- public helpers
    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Indices of the nearest codes: z (B, E, d, h, w) -> (B, d, h, w) long."""
        b, e, *spatial = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.detach().float().movedim(1, -1).reshape(-1, e)
            return self._nearest_flat(flat).view(b, *spatial)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors for ``indices`` (B, d, h, w) -> (B, E, d, h, w) fp32."""
        return F.embedding(indices, self.embedding.float()).movedim(-1, 1)

    # ----------------------------------------------------------------------------- forward
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantise ``z`` (B, E, d, h, w); in training mode also update the codebook."""
        b, e, *spatial = z.shape
        if e != self.dim:
            raise ValueError(f"expected {self.dim} latent channels, got {e}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.float().movedim(1, -1).reshape(-1, e)  # (N, E)
            if self.training and not bool(self.initialized):
                self._init_codebook(flat.detach())
            indices = self._nearest_flat(flat.detach())
            counts = torch.bincount(indices, minlength=self.n_codes).float()
            z_q = F.embedding(indices, self.embedding.float())  # a copy: later codebook updates leave it
            if self.training:
                self._update_statistics(flat.detach(), indices, counts.clone())
            commitment = self.beta * F.mse_loss(flat, z_q.detach())
            if self.update == "loss":
                codebook_loss = F.mse_loss(z_q, flat.detach())
            else:
                codebook_loss = flat.new_zeros(())
            z_q = flat + (z_q - flat).detach()  # straight-through estimator
            probs = counts / counts.sum()
            perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
            usage = (counts > 0).float().mean()
        z_q = z_q.view(b, *spatial, e).movedim(-1, 1)
        return QuantizerOutput(z_q, indices.view(b, *spatial), commitment, codebook_loss, perplexity, usage)

    # ----------------------------------------------------------------------------- internals
    def _nearest_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """argmin_k ||x - e_k||^2 for flat (N, E) fp32, ``chunk`` rows at a time -> (N,) long."""
        codes = self.embedding.detach().float()
        codes_sq = codes.pow(2).sum(1)  # ||x||^2 is constant per row and irrelevant for the argmin
        out = [torch.addmm(codes_sq, part, codes.t(), alpha=-2.0).argmin(1) for part in flat.split(self.chunk)]
        return torch.cat(out) if out else flat.new_zeros(0, dtype=torch.long)

    @torch.no_grad()
    def _init_codebook(self, flat: torch.Tensor) -> None:
        """Codebook = random encoder outputs of the first training batch (rank 0's on every rank)."""
        codes = _broadcast(_random_rows(flat, self.n_codes).contiguous())
        self.embedding.data.copy_(codes)
        self.embed_sum.copy_(codes)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update_statistics(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        """EMA of cluster sizes (all modes) and sums (EMA mode); then dead-code restarts."""
        counts = _all_reduce_sum(counts)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.update == "ema":
            sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat)
            sums = _all_reduce_sum(sums)
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + self.n_codes * self.eps) * n
            self.embedding.copy_(self.embed_sum / smoothed.unsqueeze(1))
        if self.dead_code_threshold > 0:
            dead = self.cluster_size < self.dead_code_threshold
            if bool(dead.any()):
                candidates = _broadcast(_random_rows(flat, self.n_codes).contiguous())
                self.embedding.data[dead] = candidates[dead]
                self.cluster_size[dead] = self.dead_code_threshold
                self.embed_sum[dead] = candidates[dead] * self.dead_code_threshold
