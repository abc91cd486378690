"""Perceptual loss on 2D slices (paper eq. 5), LPIPS-style, with a pluggable backbone.

:func:`perceptual_network` builds it from typed arguments for both stages: the VQ-GAN loss (through
``medlsdm.autoencoder.build.build_perceptual``, which maps ``vqgan.perceptual_*`` onto it) and the LPIPS
metric of the evaluation stage. Backbones (``backbone``; ``vqgan.perceptual_backbone`` in the config):

* ``"vgg16"``: VGG16 ``features`` whose state-dict keys match torchvision's ImageNet checkpoint
  (``vgg16-397923af.pth``), read from ``weights`` (``vqgan.perceptual_weights``) or from the torch hub cache
  (``torch.hub.get_dir()/checkpoints``). Nothing is downloaded. Optionally LPIPS's linear-layer weights
  (the lpips package's ``vgg.pth``) from ``lpips_weights`` (``vqgan.perceptual_lpips_weights``); without them
  every channel weighs the same.
* ``"random-vgg16"``: the same network randomly initialised (named so in every description).
* ``"none"``: no perceptual term.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medlsdm.errors import UserError

VGG16_FILE = "vgg16-397923af.pth"
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in ``features``
_TAP_CHANNELS = (64, 128, 256, 512, 512)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` layer for layer (same indices, hence the same state-dict keys)."""
    layers: list[nn.Module] = []
    cin = 3
    for v in _VGG16_LAYOUT:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.ReLU()]
            cin = int(v)
    return nn.Sequential(*layers)


class PerceptualLoss(nn.Module):
    """LPIPS-style distance between slices of two volumes, with a frozen VGG16 feature stack.

    forward(x, x_rec): x, x_rec (B, 1, D, H, W) in [-1, 1] -> scalar. ``n_slices`` slices per volume
    (the same indices for both; 0 = all D) are repeated to 3 channels and ImageNet-normalised; the
    features at five ReLU layers are unit-normalised over channels and their squared differences are
    weighted per channel (``lin{i}``, default 1/C), averaged over space and summed over layers.
    """

    def __init__(self, n_slices: int = 4):
        super().__init__()
        self.n_slices = n_slices
        self.features = vgg16_features()
        for i, c in enumerate(_TAP_CHANNELS):
            self.register_buffer(f"lin{i}", torch.full((c,), 1.0 / c))
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        return super().train(False)  # frozen: always in eval mode

    def _slices(self, x: torch.Tensor, x_rec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, D, H, W) pair -> (B * n, 3, H, W) pair of ImageNet-normalised slices."""
        b, c, d, h, w = x.shape
        n = d if self.n_slices <= 0 else min(self.n_slices, d)
        idx = torch.rand(b, d, device=x.device).argsort(dim=1)[:, :n]  # (B, n) distinct per volume
        rows = torch.arange(b, device=x.device).unsqueeze(1)
        out = []
        for v in (x, x_rec):
            s = v[rows, :, idx].reshape(b * n, c, h, w)  # (B, n, C, H, W) -> (B * n, C, H, W)
            s = s.expand(-1, 3, -1, -1) if c == 1 else s
            out.append(((s + 1) / 2 - self.mean) / self.std)
        return out[0], out[1]

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, layer in enumerate(self.features[: _TAPS[-1] + 1]):
            x = layer(x)
            if i in _TAPS:
                feats.append(x)
        return feats

    def forward(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        a, b = self._slices(x, x_rec)
        loss = x.new_zeros((), dtype=torch.float32)
        for i, (fa, fb) in enumerate(zip(self._taps(a), self._taps(b))):
            fa, fb = F.normalize(fa.float(), dim=1, eps=1e-10), F.normalize(fb.float(), dim=1, eps=1e-10)
            weight = getattr(self, f"lin{i}").view(1, -1, 1, 1)
            loss = loss + ((fa - fb).pow(2) * weight).sum(1).mean()
        return loss


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a torch.save file (weights_only) or a safetensors file, or a UserError."""
    try:
        if path.suffix == ".safetensors":
            from medlsdm.io import load_weights

            state = load_weights(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as exc:  # unpickling / zip / EOF errors all mean the same thing to a user
        raise UserError(f"{path}: not a readable PyTorch weights file ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return state


def _check_keys(path: Path, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    missing = [k for k in expected if k not in state]
    if missing:
        raise UserError(f"{path}: not {what} (missing key {missing[0]!r} and {len(missing) - 1} more)")
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        shapes = f"{tuple(state[k].shape)}, expected {tuple(expected[k].shape)}"
        raise UserError(f"{path}: not {what} ({k!r} has shape {shapes})")


def load_vgg16(module: PerceptualLoss, path: Path) -> None:
    """Copy ``features.*`` from a torchvision VGG16 checkpoint into ``module`` (classifier keys ignored)."""
    state = _read_state(path)
    expected = {f"features.{k}": v for k, v in module.features.state_dict().items()}
    _check_keys(path, state, expected, "a torchvision VGG16 checkpoint")
    module.features.load_state_dict({k[len("features.") :]: state[k] for k in expected})


def load_lpips_linear(module: PerceptualLoss, path: Path) -> None:
    """Copy LPIPS's per-channel weights (``lin{i}.model.1.weight``, shape (1, C, 1, 1)) into ``module``."""
    state = _read_state(path)
    expected = {f"lin{i}.model.1.weight": torch.empty(1, c, 1, 1) for i, c in enumerate(_TAP_CHANNELS)}
    _check_keys(path, state, expected, "an LPIPS VGG linear-layer file")
    for i in range(len(_TAP_CHANNELS)):
        getattr(module, f"lin{i}").copy_(state[f"lin{i}.model.1.weight"].flatten())


def default_vgg16_path() -> Path:
    """Where torchvision would have cached its ImageNet VGG16 weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


NO_PERCEPTUAL = "none (no perceptual term)"  # the description when there is no network


def perceptual_network(
    backbone: str = "random-vgg16",
    weights: str | Path | None = None,
    lpips_weights: str | Path | None = None,
    n_slices: int = 4,
    seed: int | None = None,
) -> tuple[PerceptualLoss | None, str]:
    """The frozen perceptual network named by ``backbone`` ("vgg16", "random-vgg16" or "none" -> None) and a
    one-line description naming it, its weights files and whether it is pretrained.

    weights: torchvision's VGG16 file for "vgg16" (None: the torch hub cache). lpips_weights: LPIPS's
    linear-layer file (None: every channel weighs the same). n_slices: slices per volume compared (0 = all).
    seed: "random-vgg16" drawn from this seed (the same network in every run, the global RNG untouched; named in
    the description) instead of the global RNG. Missing or wrong files are one-line UserErrors."""
    if backbone == "none":
        return None, NO_PERCEPTUAL
    if backbone == "random-vgg16":
        if seed is None:
            return PerceptualLoss(n_slices), "randomly initialised VGG16 (NOT pretrained)"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return PerceptualLoss(n_slices), f"randomly initialised (seed {seed}) VGG16 (NOT pretrained)"
    if backbone != "vgg16":
        choices = "'vgg16', 'random-vgg16' or 'none'"
        raise UserError(f"config: vqgan.perceptual_backbone must be {choices}, got {backbone!r}")
    path = Path(weights).expanduser() if weights else default_vgg16_path()
    if not path.is_file():
        raise UserError(
            f"{path}: VGG16 weights not found (give vqgan.perceptual_weights = torchvision's {VGG16_FILE}, "
            "or use perceptual_backbone 'random-vgg16' or 'none')"
        )
    module = PerceptualLoss(n_slices)
    load_vgg16(module, path)
    description = f"VGG16 (ImageNet weights from {path})"
    if lpips_weights:
        lin_path = Path(lpips_weights).expanduser()
        if not lin_path.is_file():
            raise UserError(f"{lin_path}: LPIPS linear-layer weights not found")
        load_lpips_linear(module, lin_path)
        description += f" + LPIPS linear layers from {lin_path}"
    return module, description
