"""Stage 1 of Med-LSDM: the 3D VQ-GAN, its codebook, discriminators, perceptual model and losses."""

from medlsdm.autoencoder.build import build_perceptual, build_vqgan, build_vqgan_loss
from medlsdm.autoencoder.discriminators import PatchDiscriminator3D, SliceDiscriminator2D, sample_slices
from medlsdm.autoencoder.losses import VQGANLoss
from medlsdm.autoencoder.perceptual import PerceptualLoss, perceptual_network
from medlsdm.autoencoder.quantizer import QuantizerOutput, VectorQuantizer
from medlsdm.autoencoder.vqgan import VQGAN, Decoder, Encoder

__all__ = [
    "VQGAN",
    "Decoder",
    "Encoder",
    "PatchDiscriminator3D",
    "PerceptualLoss",
    "QuantizerOutput",
    "SliceDiscriminator2D",
    "VQGANLoss",
    "VectorQuantizer",
    "build_perceptual",
    "build_vqgan",
    "build_vqgan_loss",
    "perceptual_network",
    "sample_slices",
]
