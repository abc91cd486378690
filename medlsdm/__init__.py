"""medlsdm: 3D semantic label maps -> synthetic 3D medical volumes (Med-LSDM: 3D VQ-GAN + latent semantic diffusion).

Data flows one way: ``data`` -> ``autoencoder`` -> ``diffusion`` -> ``pipeline``; ``training``,
``evaluation`` and ``cli`` sit on top. Tensors are (B, C, D, H, W) throughout.
"""

__version__ = "0.1.0"
