"""``LatentDiffusion``: the semantic U-Net + the noise schedule + the training objective + sampling.

Training (eq. 13): ``t ~ U[0, T)``, ``noise ~ N(0, I)``, ``x_t = q_sample(x0, t, noise)``, the label map
is dropped (null condition) with probability ``cond_drop_prob`` so the unconditional branch used by
guidance is trained too, and the U-Net regresses the objective's target with an L2 or L1 loss, optionally
weighted per latent voxel towards rare classes (:func:`class_weights`, ``ldm.class_weight_power``; 0 = the paper).
Sampling: a sampler from :mod:`medlsdm.diffusion.samplers` over ``guided_model_fn``, configured by
:class:`~medlsdm.diffusion.options.SamplingOptions`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medlsdm.config import LDMConfig
from medlsdm.diffusion.guidance import guided_model_fn
from medlsdm.diffusion.options import SamplingOptions
from medlsdm.diffusion.samplers import Sampler, make_sampler
from medlsdm.diffusion.samplers.base import DEFAULT_SAMPLER, ModelFn, randn
from medlsdm.diffusion.schedule import NoiseSchedule, check_objective
from medlsdm.diffusion.unet import SemanticUNet, cached_condition
from medlsdm.diffusion.windows import DepthWindows, windowed_model_fn
from medlsdm.errors import UserError

LOSSES = ("l2", "l1")


def class_weights(labels_onehot: torch.Tensor, latent: tuple[int, int, int], power: float) -> torch.Tensor:
    """Loss weight of every latent voxel, (B, 1, d, h, w), mean 1 per sample: each class c weighs f_c ** -power,
    f_c its share of the sample's label map (B, C, D, H, W), and a latent voxel the mean over its footprint.
    ``power`` 0 gives 1 everywhere; 0.5 makes a lesion of 0.5% weigh ~7x a liver of 25%."""
    onehot = labels_onehot.float()
    share = onehot.mean(dim=(2, 3, 4), keepdim=True)  # (B, C, 1, 1, 1)
    per_class = torch.where(share > 0, share.clamp_min(1e-6) ** -power, torch.zeros_like(share))
    voxel = (onehot * per_class).sum(1, keepdim=True)  # (B, 1, D, H, W)
    if tuple(voxel.shape[2:]) != tuple(latent):
        voxel = F.adaptive_avg_pool3d(voxel, latent)
    return voxel / voxel.mean(dim=(2, 3, 4), keepdim=True)


class LatentDiffusion(nn.Module):
    """``LatentDiffusion(unet, schedule, objective="eps", loss="l2", cond_drop_prob=0.1, clip_sample=True,
    class_weight_power=0.0, clip_value=1.0)``.

    ``unet`` is a :class:`SemanticUNet` (its ``in_channels`` and ``image_down`` define the latent shape).
    Only ``unet`` holds parameters; the schedule is rebuilt from the config when loading.
    ``clip_value``: the |x0| bound samplers clip to when ``clip_sample`` (the normalised codebook range in
    diffusion space, :attr:`medlsdm.autoencoder.normalize.LatentNormalizer.clip`; 1.0 for [-1, 1] data).
    """

    def __init__(
        self,
        unet: SemanticUNet,
        schedule: NoiseSchedule,
        objective: str = "eps",
        loss: str = "l2",
        cond_drop_prob: float = 0.1,
        clip_sample: bool = True,
        class_weight_power: float = 0.0,
        clip_value: float = 1.0,
    ) -> None:
        super().__init__()
        check_objective(objective)
        if loss not in LOSSES:
            raise UserError(f"config: unknown diffusion loss '{loss}' (choose from {', '.join(LOSSES)})")
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise UserError(f"config: cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        if class_weight_power < 0:
            raise UserError(f"config: ldm.class_weight_power must be >= 0, got {class_weight_power}")
        self.class_weight_power = class_weight_power
        self.unet = unet
        self.schedule = schedule
        self.objective = objective
        self.loss = loss
        self.cond_drop_prob = cond_drop_prob
        self.clip_sample = clip_sample
        if not clip_value > 0:
            raise ValueError(f"clip_value must be positive, got {clip_value}")
        self.clip_value = float(clip_value)

    @classmethod
    def from_config(
        cls,
        cfg: LDMConfig,
        num_classes: int,
        image_down: tuple[int, int, int],
        in_channels: int = 8,
        conditioning: str = "spade",
        clip_value: float = 1.0,
    ) -> "LatentDiffusion":
        """The model an ``ldm`` config section describes; the sizes of the data (classes, latent channels and
        down-sampling) and the clip range come from the caller (:func:`medlsdm.pipeline.build_diffusion`)."""
        unet = SemanticUNet.from_config(cfg, in_channels=in_channels, num_classes=num_classes, image_down=image_down,
                                        conditioning=conditioning)
        schedule = NoiseSchedule(cfg.num_timesteps, cfg.schedule)
        return cls(unet, schedule, cfg.objective, cfg.loss, cfg.cond_drop_prob, cfg.clip_sample, cfg.class_weight_power,
                   clip_value=clip_value, **cls._config_arguments(cfg))

    @classmethod
    def _config_arguments(cls, cfg: LDMConfig) -> dict:
        """Constructor arguments a subclass reads from the config beyond the shared ones."""
        return {}

    def view(self, unet: nn.Module, cond_drop_prob: float | None = None) -> "LatentDiffusion":
        """The same diffusion (schedule, objective, loss, clipping) over another U-Net: a DDP-wrapped
        training view or an EMA copy. Subclasses (the baselines) return their own type."""
        p = self.cond_drop_prob if cond_drop_prob is None else cond_drop_prob
        return LatentDiffusion(unet, self.schedule, self.objective, self.loss, p, self.clip_sample,
                               self.class_weight_power, clip_value=self.clip_value)

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, labels_onehot: torch.Tensor | None, drop: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The raw U-Net output for the objective, ``(B, 8, d, h, w)``."""
        return self.unet(x_t, t, labels_onehot, drop)

    def training_loss(
        self, x0: torch.Tensor, labels_onehot: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``x0`` (B, 8, d, h, w) latents in [-1, 1], ``labels_onehot`` (B, C, D, H, W) -> (scalar loss, logs).

        Randomness (t, noise, drop mask) comes from ``generator`` (on its device) when given.
        """
        b, device = x0.shape[0], x0.device
        src = generator.device if generator is not None else torch.device("cpu")
        t = self.schedule.sample_timesteps(b, generator).to(device)
        noise = randn(tuple(x0.shape), generator, device, x0.dtype)
        drop = (torch.rand(b, generator=generator, device=src) < self.cond_drop_prob).to(device)
        x_t = self.schedule.q_sample(x0, t, noise)
        output = self.unet(x_t, t, labels_onehot, drop)
        target = self.schedule.target(self.objective, x0, t, noise)
        diff = output.float() - target.float()
        err = diff.square() if self.loss == "l2" else diff.abs()
        if self.class_weight_power > 0:
            err = err * class_weights(labels_onehot, tuple(x0.shape[2:]), self.class_weight_power)
        err = err.mean()
        logs = {"loss": float(err.detach()), "t_mean": float(t.float().mean()), "drop_frac": float(drop.float().mean())}
        return err, logs

    def latent_shape(self, labels_onehot: torch.Tensor) -> tuple[int, ...]:
        """``(B, in_channels, D/fd, H/fh, W/fw)`` for a label map ``(B, C, D, H, W)``."""
        b, _, *spatial = labels_onehot.shape
        down = self.unet.image_down
        if any(s % f for s, f in zip(spatial, down)):
            raise ValueError(f"label map spatial shape {tuple(spatial)} is not divisible by image_down {down}")
        return (b, self.unet.in_channels, *(s // f for s, f in zip(spatial, down)))

    def make_sampler(self, sampler: str | Sampler = DEFAULT_SAMPLER, steps: int | None = None,
                     eta: float = 0.0) -> Sampler:
        """A sampler of this model: a registered name is built over the model's schedule, objective and clip
        (``clip_value`` when ``clip_sample``, else None); a :class:`Sampler` object must already match them
        (else a one-line UserError: it would silently sample another model) and is returned as it is."""
        clip = self.clip_value if self.clip_sample else None
        if not isinstance(sampler, Sampler):
            return make_sampler(sampler, self.schedule, steps, eta, self.objective, clip)
        ours, theirs = self.schedule, sampler.schedule
        if theirs is not ours and (theirs.num_timesteps != ours.num_timesteps
                                   or not torch.equal(theirs.alphas_cumprod, ours.alphas_cumprod)):
            raise UserError(f"sampler {sampler!r} has another noise schedule than the model's {ours!r}")
        if sampler.objective != self.objective or sampler.clip != clip:
            raise UserError(f"sampler {sampler!r} does not fit the model "
                            f"(objective {self.objective!r}, clip {clip!r}): "
                            f"build it with those, or use model.make_sampler({sampler.name!r}, ...)")
        return sampler

    @torch.no_grad()
    def sample(
        self,
        labels_onehot: torch.Tensor,
        *options: SamplingOptions | str | Sampler | int | float | None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        progress: bool = True,
        **fields,
    ) -> torch.Tensor:
        """Latents ``(B, 8, d, h, w)`` within ``clip_value`` (when clipping) for the label map ``(B, C, D, H, W)``.

        ``options``: a :class:`SamplingOptions`, or its fields positionally (sampler, steps, guidance_scale, eta,
        ...) and/or by keyword (``fields``), e.g. ``sample(labels, SamplingOptions("ddim", 50))``,
        ``sample(labels, "ddim", steps=50, guidance_scale=1.5)`` or ``sample(labels, DDIMSampler(schedule, 50))``.
        The sampler is "ddpm" (all T steps), "ddim" (``steps``, ``eta``), "dpm++" (``steps``) or a
        :class:`Sampler` object (:meth:`make_sampler`); the default is the config's
        (:data:`~medlsdm.diffusion.samplers.DEFAULT_SAMPLER`). The network runs in eval mode.
        ``generator``: one, or one per sample (a volume then does not depend on its batch).
        ``window``: latent slices the network sees at once (None: all); a deeper latent is denoised on
        overlapping depth windows (``overlap`` slices, default half a window) blended at every step, with
        ``window_batch`` windows per network call (:mod:`medlsdm.diffusion.windows`).
        Efficiency switches, measured by ``bench/speed.py``: ``cache`` computes the SPADE modulations once per
        label map (exact); ``precision`` "bf16" runs the network under bf16 autocast, "auto" does so on GPU
        only, "fp32" never; ``compile`` runs a ``torch.compile`` d U-Net (compiled once per model).
        """
        opts = SamplingOptions.of(*options, **fields)
        device = next(self.unet.parameters()).device
        labels_onehot = labels_onehot.to(device)
        shape = self.latent_shape(labels_onehot)
        chain = self.make_sampler(opts.sampler, opts.steps, opts.eta)
        bf16 = opts.precision == "bf16" or (opts.precision == "auto" and device.type == "cuda")
        net = self._compiled() if opts.compile else self.unet
        use_cache = opts.cache and hasattr(self.unet, "condition")

        def branch(labels: torch.Tensor) -> ModelFn:
            return guided_model_fn(cached_condition(self.unet, net) if use_cache else net, labels, opts.guidance_scale)

        if opts.window is not None and shape[2] > opts.window:
            windows, f = DepthWindows(shape[2], opts.window, opts.overlap), self.unet.image_down[0]
            model_fn = windowed_model_fn(windows, lambda starts: branch(torch.cat(
                [labels_onehot[:, :, s * f:(s + windows.size) * f] for s in starts])), opts.window_batch)
        else:
            model_fn = branch(labels_onehot)
        if bf16:
            fp32_fn = model_fn

            def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    return fp32_fn(x, t)

        was_training = self.training
        self.eval()
        try:
            return chain.sample(model_fn, shape, generator, progress, device)
        finally:
            self.train(was_training)

    def _compiled(self) -> nn.Module:
        """``torch.compile(self.unet)``, built once (kept outside the module tree: no extra state-dict keys)."""
        store = self.__dict__.setdefault("_compiled_unet", {})
        if "unet" not in store:
            store["unet"] = torch.compile(self.unet)
        return store["unet"]
