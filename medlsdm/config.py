"""Typed configuration: dataclasses, YAML presets (``tiny``, ``paper``) and the resolved-config file.

Every run writes ``config.yaml`` (the fully resolved config) beside its outputs, so a run directory is
self-describing: ``load_config(run_dir / "config.yaml")`` rebuilds exactly what produced it.

Axis convention used everywhere inside medlsdm: spatial shapes are ``(D, H, W)`` (slices, rows,
columns) and tensors are ``(B, C, D, H, W)``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from medlsdm.errors import UserError

PRESETS_DIR = Path(__file__).parent / "configs"
PRESETS = ("tiny", "paper")
VQGAN_UPSAMPLE = ("transpose", "nearest_conv")
LDM_METHODS = ("lsdm", "slice2d", "pixel3d")  # Med-LSDM and the two baselines (see medlsdm.diffusion.baselines)
FEATURE_MATCH_REDUCTIONS = ("mean", "sum")  # over discriminator layers (see medlsdm.autoencoder.losses)


@dataclass
class DataConfig:
    """How raw images / label maps become training tensors (see ``medlsdm.data.transforms``)."""

    shape: tuple[int, int, int] = (32, 256, 256)  # target (D, H, W) after crop/pad or resize
    modality: str = "ct"  # "ct" (window clip) or "mr" (percentile clip)
    ct_window: tuple[float, float] = (-1000.0, 1000.0)  # HU range mapped to [-1, 1]
    mr_percentiles: tuple[float, float] = (0.5, 99.5)  # percentile range mapped to [-1, 1]
    # what a person looks at (previews, report figures, window metrics; see medlsdm.data.display): CT a
    # soft-tissue window in HU (level 40, width 400), MR these percentiles of the volume shown
    ct_display_window: tuple[float, float] = (-160.0, 240.0)
    mr_display_percentiles: tuple[float, float] = (1.0, 99.0)
    orientation: str = "RAS"
    spacing: Optional[tuple[float, float, float]] = None  # target voxel size (D, H, W) in mm; None keeps it
    resize_mode: str = "crop_pad"  # "crop_pad" (centre crop / pad) or "resize" (trilinear / nearest)
    num_classes: int = 6  # C, background included
    # original label value -> class index; None means the values already are 0..C-1
    label_remap: Optional[dict[int, int]] = None
    label_names: list[str] = field(default_factory=lambda: ["background", "body", "liver", "kidney", "spine", "lesion"])
    cache_dir: Optional[str] = None  # preprocessed samples are cached here when set
    num_workers: int = 0

    def __post_init__(self) -> None:
        for name in ("ct_window", "ct_display_window", "mr_percentiles", "mr_display_percentiles"):
            lo, hi = getattr(self, name)
            if not lo < hi or (name.startswith("mr") and not 0 <= lo < hi <= 100):
                raise UserError(f"config: data.{name} must be (low, high) with low < high"
                                + (" within 0..100" if name.startswith("mr") else "") + f", got {[lo, hi]}")


@dataclass
class VQGANConfig:
    """Stage 1: 3D VQ-GAN (paper section 3.2)."""

    channels: int = 16  # width of the first encoder stage (doubled at each downsampling)
    downsample: tuple[int, int, int] = (4, 4, 4)  # compression per axis (D, H, W)
    embedding_dim: int = 8  # latent channels = code dimension
    n_codes: int = 16384  # codebook size K
    num_res_blocks: int = 1
    commitment_beta: float = 0.25
    codebook_update: str = "ema"  # "ema" (EMA updates) or "loss" (codebook loss, eq. 3)
    ema_decay: float = 0.99
    dead_code_threshold: float = 1.0  # codes with EMA usage below this are re-initialised from encoder outputs
    quantize_chunk: int = 4096  # latent vectors per distance-matrix chunk (never the full N x K matrix)
    l1_weight: float = 4.0
    # L1 inside the display window (data.ct_display_window; scaled so the window spans 2 units): 0 = the paper
    # (L1 over the whole normalised range, where soft tissue is a few per cent of it); see BENCHMARKS.md vqgan
    window_l1_weight: float = 0.0
    # decoder up-sampling: "transpose" (strided 4x4x4 transposed convs, the paper's code; Appendix A's parameter
    # counts) or "nearest_conv" (nearest-neighbour x2 then a 3x3x3 conv, as taming's VQ-GAN and MONAI's
    # AutoencoderKL: no checkerboard from uneven kernel overlap); see BENCHMARKS.md vqgan
    upsample: str = "transpose"
    decoder_tanh: bool = False  # a final tanh on the decoder output (the authors' final runs have one)
    perceptual_weight: float = 1.0
    # perceptual backbone: "vgg16" (needs perceptual_weights, torchvision's ImageNet file),
    # "random-vgg16" (randomly initialised, named as such in logs) or "none" (no perceptual term)
    perceptual_backbone: str = "none"
    perceptual_weights: Optional[str] = None
    perceptual_lpips_weights: Optional[str] = None  # optional LPIPS linear-layer file (lpips' vgg.pth)
    perceptual_slices: int = 4  # slices per volume (along D) compared by the perceptual loss; 0 = all
    disc_channels: int = 64
    disc_layers: int = 3
    disc_start_step: int = 2000  # discriminators switch on at this step
    gan_loss: str = "hinge"  # "hinge" or "vanilla" (non-saturating)
    image_gan_weight: float = 1.0  # 2D slice discriminator
    volume_gan_weight: float = 1.0  # 3D patch discriminator
    # discriminator feature matching (L1 between fake and real features of each discriminator layer); the
    # paper's text has none: feature_match_weight: 0. Over the layers: "mean" (default) or "sum" (the authors'
    # code: n_layers times "mean", 4x with disc_layers: 3, whose discriminators return 4 feature maps)
    feature_match_weight: float = 4.0
    feature_match_reduction: str = "mean"
    adaptive_weight_max: float = 1e4

    def __post_init__(self) -> None:
        if self.feature_match_reduction not in FEATURE_MATCH_REDUCTIONS:
            raise UserError(f"config: unknown vqgan.feature_match_reduction '{self.feature_match_reduction}' "
                            f"(choose from {', '.join(FEATURE_MATCH_REDUCTIONS)})")
        if self.upsample not in VQGAN_UPSAMPLE:
            raise UserError(f"config: unknown vqgan.upsample '{self.upsample}' "
                            f"(choose from {', '.join(VQGAN_UPSAMPLE)})")
        if self.window_l1_weight < 0:
            raise UserError(f"config: vqgan.window_l1_weight must be >= 0, got {self.window_l1_weight}")


@dataclass
class LDMConfig:
    """Stage 2: latent semantic diffusion model (paper section 3.3), or one of the baselines (``method``)."""

    # "lsdm" (Med-LSDM: SPADE U-Net on VQ-GAN latents), "slice2d" (SegGuidedDiff-style: 2D slices, mask
    # concatenated, stacked) or "pixel3d" (Med-DDPM-style: 3D image space, label map concatenated)
    method: str = "lsdm"
    slices_per_volume: int = 4  # slice2d: random axial slices per training volume and step (0 = all)
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (1, 2)  # U-Net levels (0 = full latent res) with attention
    num_heads: int = 4
    semantic_channels: int = 32  # width of the semantic-map encoder features
    # True: down-sample in-plane only, so cross-slice attention sees every latent slice at every level (the
    # authors' code); False halves the latent depth where even (8 -> 4 -> 2 for paper)
    keep_depth: bool = False
    # position information of cross-slice attention: "none" (order-blind) or "relative" (a learned bias per head
    # and slice offset, as the authors' code; offsets mean the same in every depth window)
    depth_positions: str = "none"
    dropout: float = 0.0
    num_timesteps: int = 1000  # T (authors' code: 500)
    schedule: str = "cosine"
    objective: str = "eps"  # "eps" (paper) or "x0" / "v"
    loss: str = "l2"  # "l2" (paper eq. 13) or "l1" (authors' code)
    # > 0: weigh the loss of each latent voxel by its classes' share of the label map ** -power (mean weight 1),
    # so small structures (a lesion) count; 0 = the paper's uniform loss
    class_weight_power: float = 0.0
    # "codebook" (the paper: min-max to [-1, 1] from the codebook range) or "standardize" (per-channel
    # mean/std of the encoded training set); both are measured in BENCHMARKS.md
    latent_norm: str = "codebook"
    cond_drop_prob: float = 0.1  # label map dropped with this probability (trains the unconditional branch)
    # classifier-free guidance uncond + s * (cond - uncond); 1.0 = conditional model only. The authors' code
    # computes cond + 1.5 * (cond - uncond), which is s = 2.5 in this convention
    guidance_scale: float = 1.0
    ema_decay: float = 0.999
    sampler: str = "dpm++"  # "ddpm" (all T steps, the paper), "ddim" or "dpm++"; chosen by bench/ldm.py's table
    sampling_steps: int = 25
    clip_sample: bool = True  # clip the predicted x0 to [-1, 1] at every sampling step
    use_checkpoint: bool = False  # gradient checkpointing in the U-Net (saves memory on large volumes)
    # sampling: full-length volumes and efficiency switches (each measured by bench/speed.py)
    window_overlap: float = 0.5  # label maps deeper than data.shape: share of a depth window overlapping the next
    window_batch: int = 1  # depth windows per U-Net call (memory grows with it)
    spade_cache: bool = True  # compute SPADE's label-map modulations once per label map, not at every step (exact)
    sample_precision: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU), "bf16" or "fp32"
    sample_compile: bool = False  # torch.compile the U-Net for sampling (pays off for many volumes)

    def __post_init__(self) -> None:
        if self.method not in LDM_METHODS:
            raise UserError(f"config: unknown ldm.method '{self.method}' (choose from {', '.join(LDM_METHODS)})")
        if self.depth_positions not in ("none", "relative"):
            raise UserError(f"config: ldm.depth_positions must be 'none' or 'relative', got '{self.depth_positions}'")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping for one training stage."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 2
    grad_accum: int = 1
    max_steps: int = 100000
    log_every: int = 10
    val_every: int = 1000
    ckpt_every: int = 1000
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp32"
    grad_clip: float = 1.0
    val_fraction: float = 0.1
    # a validation metric (higher is better, e.g. "psnr_window" for the VQ-GAN) whose best weights are kept in
    # RUN/best/ and used for encoding and decoding instead of the latest ones; None = always the latest
    keep_best: Optional[str] = None
    # LDM validation preview: DDIM steps of one sampled volume (0 = no preview); at paper size on CPU one
    # preview costs minutes (BENCHMARKS.md, paper_size)
    preview_steps: int = 25

    def __post_init__(self) -> None:
        if self.preview_steps < 0:
            raise UserError(f"config: preview_steps must be >= 0 (0 = no preview), got {self.preview_steps}")


@dataclass
class SegConfig:
    """The segmentation network of the Dice protocol and the augmentation study (paper Appendix B)."""

    channels: tuple[int, ...] = (16, 32, 64, 128, 256)  # MONAI UNet widths, one per level
    num_res_units: int = 2
    patch: tuple[int, int, int] = (64, 64, 64)  # (D, H, W) training crop and sliding-window roi (capped at data.shape)
    batch_size: int = 4
    lr: float = 5e-5  # Adam
    epochs: int = 10  # one epoch = one random crop from every training volume
    steps: int = 0  # > 0 overrides epochs with a fixed number of optimiser steps
    pos_fraction: float = 0.5  # share of crops centred on foreground (RandCropByPosNegLabeld)
    sw_batch_size: int = 4
    sw_overlap: float = 0.25


@dataclass
class Config:
    """Everything a run needs."""

    name: str = "custom"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    ldm: LDMConfig = field(default_factory=LDMConfig)
    train_vqgan: TrainConfig = field(default_factory=TrainConfig)
    train_ldm: TrainConfig = field(default_factory=TrainConfig)
    seg: SegConfig = field(default_factory=SegConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))


def _plain(obj: Any) -> Any:
    """Tuples -> lists, recursively, so YAML stays readable."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the dataclass field type ``tp`` (tuples, Optionals, dicts, nested)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        if origin is typing.Union and type(None) in args:
            return None
        raise UserError(f"config: '{where}' may not be empty")
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(inner, value, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"config: '{where}' must be a mapping")
        return _from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config: '{where}' must be a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        if len(value) != len(args):
            raise UserError(f"config: '{where}' must have {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if origin is list:
        return [_coerce(args[0], v, where) for v in value]
    if origin is dict:
        return {_coerce(args[0], k, where): _coerce(args[1], v, where) for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and not isinstance(value, tp):
        try:
            return tp(value) if tp is not bool else bool(value)
        except (TypeError, ValueError):
            raise UserError(f"config: '{where}' must be {tp.__name__}, got {value!r}") from None
    return value


def _from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise UserError(f"config: unknown key(s) {sorted(unknown)} in '{where or 'top level'}'")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _deep_update(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must be a mapping")
    return data


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a Config from a (possibly partial) dict; a ``base`` key names a preset to start from."""
    data = dict(data)
    base = data.pop("base", None)
    if base is not None:
        data = _deep_update(_read_yaml(PRESETS_DIR / f"{base}.yaml"), data)
        data.pop("base", None)
    return _from_dict(Config, data)


def load_config(name_or_path: str | Path, overrides: Optional[dict[str, Any]] = None) -> Config:
    """Load a preset by name (``tiny``/``paper``) or a YAML file; ``overrides`` is a nested dict."""
    key = str(name_or_path)
    path = PRESETS_DIR / f"{key}.yaml" if key in PRESETS else Path(key)
    data = _read_yaml(path)
    if overrides:
        data = _deep_update(data, overrides)
    return config_from_dict(data)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from medlsdm.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
