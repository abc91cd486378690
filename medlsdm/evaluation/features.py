"""Feature extractors for Fréchet distances, behind one interface, and the 2D / 3D FID helpers.

Every extractor says which network and which exact weights produced its numbers (``describe()``, printed
beside every FID). Nothing is ever downloaded: weights come from a file the user names (or, for the
Inception network, pytorch-fid's file in the torch hub cache), from an in-memory module, or are
randomly initialised with a fixed seed and then named "NOT pretrained".

* ``InceptionFID2D``: pytorch-fid's InceptionV3 (2048-d pool features) on 2D slices, (N, 1, H, W).
* ``MedicalNet3D``: Med3D 3D ResNet, global average pool of layer4, on volumes (N, 1, D, H, W).
* ``DomainFeatures``: any encoder (e.g. the evaluation segmentation network's), pooled like MedicalNet3D.

``fid_2d`` takes a 2D extractor (one feature vector per slice), ``fid_3d`` a 3D one (one per volume).
"""

from __future__ import annotations

import abc
import hashlib
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from medlsdm.errors import UserError
from medlsdm.evaluation.inception import FID_WEIGHTS_FILE, InceptionV3FID, random_inception
from medlsdm.evaluation.medicalnet import MedicalNetResNet, random_medicalnet
from medlsdm.evaluation.metrics import Volumes, frechet_from_features, shape_batches, slices_of
from medlsdm.io import file_sha256, load_checked

KINDS = ("inception", "random-inception", "medicalnet", "random-medicalnet", "domain")


def state_dict_sha256(module: nn.Module, length: int = 12) -> str:
    """Short SHA-256 of a module's state dict (names, shapes and values), for in-memory weights."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:length]


class FeatureExtractor(abc.ABC):
    """A frozen network mapping a batch to (N, F) features, with the identity of its weights.

    Attributes: ``name``, ``weights_path`` (file or None), ``weights_sha256`` (of the file, or of the
    state dict for in-memory/random weights), ``pretrained``, ``spatial_dims`` (2: ``features`` takes
    slices (N, 1, H, W); 3: volumes (N, 1, D, H, W)). Inputs are in [-1, 1].
    """

    spatial_dims: int = 2

    def __init__(self, net: nn.Module, name: str, pretrained: bool, weights_path: str | None = None,
                 weights_sha256: str | None = None, device: str | torch.device = "cpu"):
        self.net = net.to(device).eval()  # features are computed under no_grad; requires_grad is left alone
        self.name = name
        self.pretrained = pretrained
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256 or state_dict_sha256(net)
        self.device = torch.device(device)

    @abc.abstractmethod
    def features(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) slices or (N, 1, D, H, W) volumes -> (N, F) float32 on the CPU."""

    def plane_features(self, volumes: torch.Tensor, plane: str, chunk: int = 32) -> torch.Tensor:
        """(B, 1, D, H, W) -> (B * S, F): one feature vector per slice of ``plane`` (a 2D extractor's)."""
        slices = slices_of(volumes, plane)
        return torch.cat([self.features(slices[i : i + chunk]) for i in range(0, len(slices), chunk)])

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "weights": self.weights_path, "sha256": self.weights_sha256,
                "pretrained": self.pretrained}


class InceptionFID2D(FeatureExtractor):
    """pytorch-fid's InceptionV3 on 2D slices: [-1, 1] slices are repeated to 3 channels and resized to
    299x299 bilinearly (pytorch-fid's own resize, then its [0, 1] -> [-1, 1] step, which is the same)."""

    def __init__(self, weights_path: str | Path | None = None, device: str | torch.device = "cpu"):
        if weights_path is None:
            net = random_inception()
            super().__init__(net, "InceptionV3 (random init, NOT pretrained)", False, device=device)
        else:
            path = Path(weights_path).expanduser()
            net = InceptionV3FID()
            _load_checked(net, _read_state(path), path, "InceptionV3 of pytorch-fid")
            super().__init__(net, "InceptionV3 (pytorch-fid FID weights)", True, str(path), file_sha256(path), device)

    @torch.no_grad()
    def features(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, torch.float32).clamp(-1, 1).expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(x).float().cpu()


class _Pooled3D(FeatureExtractor):
    """A 3D encoder whose last feature map is globally average-pooled."""

    spatial_dims = 3

    def _prepare(self, volumes: torch.Tensor) -> torch.Tensor:
        return volumes

    @torch.no_grad()
    def feature_map(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> (B, C, d, h, w): the encoder's deepest map (the last one of a list)."""
        out = self.net(self._prepare(volumes.to(self.device, torch.float32)))
        out = out[-1] if isinstance(out, (list, tuple)) else out
        if out.dim() != 5:
            raise ValueError(f"{self.name}: expected a (B, C, d, h, w) feature map, got {tuple(out.shape)}")
        return out.float()

    def features(self, batch: torch.Tensor) -> torch.Tensor:
        return self.feature_map(batch).mean(dim=(2, 3, 4)).cpu()


class MedicalNet3D(_Pooled3D):
    """MedicalNet 3D ResNet on volumes z-scored per volume (MedicalNet's input normalisation, here over
    the whole volume); features = global average pool of layer4, 512-d (depth 10/18/34) or 2048-d (50)."""

    def __init__(self, weights_path: str | Path | None, depth: int = 10, device: str | torch.device = "cpu"):
        if weights_path is None:
            net = random_medicalnet(depth)
            super().__init__(net, f"MedicalNet ResNet-{depth} (random init, NOT pretrained)", False, device=device)
        else:
            path = Path(weights_path).expanduser()
            net = MedicalNetResNet(depth)
            state = _read_state(path)
            state = state.get("state_dict", state) if isinstance(state.get("state_dict"), dict) else state
            state = {k.removeprefix("module."): v for k, v in state.items()}
            state = {k: v for k, v in state.items() if not k.startswith(("conv_seg.", "fc."))}  # heads: unused
            _load_checked(net, state, path, f"MedicalNet ResNet-{depth}")
            super().__init__(net, f"MedicalNet ResNet-{depth}", True, str(path), file_sha256(path), device)

    def _prepare(self, volumes: torch.Tensor) -> torch.Tensor:
        flat = volumes.flatten(1)
        mean, std = flat.mean(1), flat.std(1).clamp_min(1e-6)
        return (volumes - mean.view(-1, 1, 1, 1, 1)) / std.view(-1, 1, 1, 1, 1)


class DomainFeatures(_Pooled3D):
    """Any module mapping (B, 1, D, H, W) in [-1, 1] to a feature map (B, C, d, h, w), or to a list of maps
    (the last, deepest one is used), e.g. the encoder of the evaluation segmentation network. The module
    is moved to ``device`` and put in eval mode; ``weights_sha256`` None hashes its state dict."""

    def __init__(self, encoder_module: nn.Module, weights_sha256: str | None = None,
                 name: str = "domain encoder", weights_path: str | None = None, pretrained: bool = True,
                 device: str | torch.device = "cpu"):
        super().__init__(encoder_module, name, pretrained, weights_path, weights_sha256, device)


def _read_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling / zip / EOF errors all mean the same to a user
        raise UserError(f"{path}: not a readable PyTorch weights file ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a state dict")
    return state


def _load_checked(net: nn.Module, state: dict[str, Any], path: Path, what: str) -> None:
    """Load ``state`` into ``net`` strictly (:func:`medlsdm.io.load_checked`); ``num_batches_tracked`` may be
    absent (files saved by old PyTorch versions)."""
    own = net.state_dict()
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for k in own:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = own[k]
    load_checked(net, state, path, what)


def default_inception_path() -> Path:
    """Where pytorch-fid (torch.hub) caches its Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def load_extractor(kind: str, weights: str | None = None, *, depth: int = 10,
                   encoder: nn.Module | None = None, encoder_sha256: str | None = None,
                   device: str | torch.device = "cpu") -> FeatureExtractor:
    """The extractor ``kind`` (one of ``KINDS``) with its weights.

    inception: ``weights`` or pytorch-fid's cached file; random-inception / random-medicalnet: seeded
    random weights (named NOT pretrained); medicalnet: ``weights`` (a MedicalNet ``.pth`` of ``depth``);
    domain: ``encoder`` (an nn.Module), ``encoder_sha256`` naming its weights (hashed if None).
    """
    if kind == "inception":
        path = Path(weights).expanduser() if weights else default_inception_path()
        if not path.is_file():
            raise UserError(f"{path}: Inception FID weights not found (give pytorch-fid's {FID_WEIGHTS_FILE}, "
                            "or use the 'random-inception' or 'domain' extractor)")
        return InceptionFID2D(path, device)
    if kind == "random-inception":
        return InceptionFID2D(None, device)
    if kind == "medicalnet":
        if not weights:
            raise UserError("config: the 'medicalnet' extractor needs a weights file (MedicalNet resnet_<depth>.pth)")
        return MedicalNet3D(weights, depth, device)
    if kind == "random-medicalnet":
        return MedicalNet3D(None, depth, device)
    if kind == "domain":
        if encoder is None:
            raise ValueError("the 'domain' extractor needs an encoder module")
        return DomainFeatures(encoder, encoder_sha256, weights_path=weights, device=device)
    raise UserError(f"config: feature extractor must be one of {', '.join(KINDS)}, got {kind!r}")


def _collect(volumes: Volumes, fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int, progress: bool,
             desc: str) -> torch.Tensor:
    """Run ``fn`` over (b, 1, D, H, W) batches of ``volumes`` (of one shape each) and concatenate its (n, F)
    outputs."""
    return torch.cat([fn(b) for b in tqdm(shape_batches(volumes, batch_size), desc=desc, disable=not progress)])


def fid_2d(real_vols: Volumes, synth_vols: Volumes, extractor: FeatureExtractor, plane: str = "axial",
           batch_size: int = 2, progress: bool = False) -> float:
    """Slice-wise FID with a 2D extractor: features of every ``plane`` slice of each volume set, then their
    Fréchet distance. Volumes (N, 1, D, H, W) or sequences of (1, D, H, W) in [-1, 1]."""
    if extractor.spatial_dims != 2:
        raise UserError(f"config: slice-wise FID needs a 2D feature extractor, {extractor.name} is 3D")
    fn = lambda v: extractor.plane_features(v, plane)  # noqa: E731
    real = _collect(real_vols, fn, batch_size, progress, f"FID-2D {plane} real")
    synth = _collect(synth_vols, fn, batch_size, progress, f"FID-2D {plane} synthetic")
    return frechet_from_features(real, synth)


def fid_3d(real_vols: Volumes, synth_vols: Volumes, extractor: FeatureExtractor, batch_size: int = 2,
           progress: bool = False) -> float:
    """Volume-wise FID with a 3D extractor (one feature vector per volume)."""
    if extractor.spatial_dims != 3:
        raise UserError(f"config: 3D FID needs a 3D feature extractor, {extractor.name} is 2D")
    real = _collect(real_vols, extractor.features, batch_size, progress, "FID-3D real")
    synth = _collect(synth_vols, extractor.features, batch_size, progress, "FID-3D synthetic")
    return frechet_from_features(real, synth)
