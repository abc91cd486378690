"""Stage 2: the latent semantic diffusion model (SPADE U-Net, noise schedule, samplers, guidance)."""

from medlsdm.diffusion.guidance import guided_model_fn
from medlsdm.diffusion.model import LatentDiffusion
from medlsdm.diffusion.options import SamplingOptions
from medlsdm.diffusion.samplers import (
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPPSampler,
    Sampler,
    make_sampler,
)
from medlsdm.diffusion.schedule import NoiseSchedule
from medlsdm.diffusion.semantic_encoder import SemanticEncoder
from medlsdm.diffusion.unet import SemanticUNet

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "DEFAULT_SAMPLER",
    "DEFAULT_STEPS",
    "DPMSolverPPSampler",
    "LatentDiffusion",
    "NoiseSchedule",
    "SAMPLERS",
    "Sampler",
    "SamplingOptions",
    "SemanticEncoder",
    "SemanticUNet",
    "guided_model_fn",
    "make_sampler",
]
