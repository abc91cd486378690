"""Stage 2: the latent semantic diffusion model (SPADE U-Net, noise schedule, samplers, guidance)."""

from medlsdm.diffusion.guidance import guided_model_fn
from medlsdm.diffusion.model import LatentDiffusion
from medlsdm.diffusion.samplers import DDIMSampler, DDPMSampler, Sampler, make_sampler
from medlsdm.diffusion.schedule import NoiseSchedule
from medlsdm.diffusion.semantic_encoder import SemanticEncoder
from medlsdm.diffusion.unet import SemanticUNet

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "LatentDiffusion",
    "NoiseSchedule",
    "Sampler",
    "SemanticEncoder",
    "SemanticUNet",
    "guided_model_fn",
    "make_sampler",
]
