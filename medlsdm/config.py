"""Typed configuration: dataclasses, YAML presets (``tiny``, ``paper``) and the resolved-config file.

Every run writes ``config.yaml`` (the fully resolved config) beside its outputs, so a run directory is
self-describing: ``load_config(run_dir / "config.yaml")`` rebuilds exactly what produced it.

Axis convention used everywhere inside medlsdm: spatial shapes are ``(D, H, W)`` (slices, rows,
columns) and tensors are ``(B, C, D, H, W)``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from medlsdm.errors import UserError

_UNIONS = (typing.Union, types.UnionType)  # Optional[X] and X | None
PRESETS_DIR = Path(__file__).parent / "configs"
PRESETS = ("tiny", "paper")

# The choices of every enumerated setting: the Literal types annotate the dataclass fields (checked when a config is
# loaded or built), the tuples are what other modules import. tests/test_config_validation.py checks each against
# the module that consumes it, so a value the code supports is never refused.
Modality = Literal["ct", "mr"]
ResizeMode = Literal["crop_pad", "resize"]
CodebookUpdate = Literal["ema", "loss"]  # medlsdm.autoencoder.quantizer
VQGANUpsample = Literal["transpose", "nearest_conv"]
PerceptualBackbone = Literal["vgg16", "random-vgg16", "none"]  # medlsdm.autoencoder.perceptual
GANLoss = Literal["hinge", "vanilla"]
FeatureMatchReduction = Literal["mean", "sum"]
LDMMethod = Literal["lsdm", "slice2d", "pixel3d"]
DepthPositions = Literal["none", "relative"]  # medlsdm.diffusion.blocks.DEPTH_POSITIONS
Schedule = Literal["cosine", "linear_beta", "scaled_linear_beta", "sigmoid_beta"]  # MONAI's NoiseSchedules
Objective = Literal["eps", "x0", "v"]  # medlsdm.diffusion.schedule.OBJECTIVES
DiffusionLoss = Literal["l2", "l1"]  # medlsdm.diffusion.model.LOSSES
LatentNorm = Literal["codebook", "standardize"]  # medlsdm.autoencoder.normalize.KINDS
SamplerName = Literal["ddpm", "ddim", "dpm++"]  # medlsdm.diffusion.samplers
Precision = Literal["auto", "bf16", "fp32"]  # fp16 deliberately not offered (NaN losses)

VQGAN_UPSAMPLE = typing.get_args(VQGANUpsample)
LDM_METHODS = typing.get_args(LDMMethod)  # Med-LSDM and the two baselines (see medlsdm.diffusion.baselines)
FEATURE_MATCH_REDUCTIONS = typing.get_args(FeatureMatchReduction)  # over discriminator layers (autoencoder.losses)
SAMPLERS = typing.get_args(SamplerName)  # ldm.sampler; the sampler registry (medlsdm.diffusion.samplers) matches it

_DEFAULT_LABEL_NAMES = ("background", "body", "liver", "kidney", "spine", "lesion")
# the dotted key of the section being built while a config is loaded ("train_ldm"), so that the checks in
# __post_init__ name the key a user wrote; a dataclass built directly is named by its usual section
_SECTION: contextvars.ContextVar[str | None] = contextvars.ContextVar("medlsdm_config_section", default=None)


def _closest(value: Any, choices: Sequence[str]) -> str | None:
    """The valid choice nearest to ``value`` (case-insensitive, difflib), or None when none is close."""
    if not isinstance(value, str):
        return None
    lowered = {c.lower(): c for c in choices}
    v = value.strip().lower()
    extended = [c for c in lowered if c.startswith(v)] if v else []  # 'dpm' -> 'dpm++', not the closer 'ddpm'
    hit = difflib.get_close_matches(v, extended or list(lowered), n=1, cutoff=0.0 if extended else 0.6)
    return lowered[hit[0]] if hit else None


def _choice_error(key: str, value: Any, choices: Sequence[str]) -> UserError:
    near = _closest(value, choices)
    hint = f" (did you mean '{near}'?)" if near else ""
    return UserError(f"config: unknown {key} {value!r}: must be one of {', '.join(choices)}{hint}")


def _bad(key: str, rule: str, value: Any) -> UserError:
    return UserError(f"config: '{key}' must be {rule}, got {value!r}")


def _key(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def _section(default: str) -> str:
    return _SECTION.get() or default


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_choices(obj: Any, section: str) -> None:
    """Every Literal-typed field of ``obj`` holds one of its choices (also for dataclasses built directly)."""
    for name, tp in _hints(type(obj)).items():
        value = getattr(obj, name)
        if typing.get_origin(tp) in _UNIONS:
            if value is None:
                continue
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
            raise _choice_error(_key(section, name), value, typing.get_args(tp))


def _check_range(obj: Any, section: str, name: str, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> None:
    """``obj.<name>`` (a number, or each number of a tuple / list; None passes) is finite and within the bounds."""
    value = getattr(obj, name)
    if value is None:
        return
    many = isinstance(value, (tuple, list))
    if lo is not None and hi is not None:
        bounds = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        bounds = f"{'>' if lo_open else '>='} {lo:g}"
    else:
        bounds = f"{'<' if hi_open else '<='} {hi:g}" if hi is not None else ""
    for v in value if many else (value,):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            what = ("finite numbers, all " if many else "a finite number ") + bounds
            raise _bad(_key(section, name), what.rstrip(", "), value)
        too_low = lo is not None and (v <= lo if lo_open else v < lo)
        if too_low or (hi is not None and (v >= hi if hi_open else v > hi)):
            raise _bad(_key(section, name), ("all " if many else "") + bounds, value)


@dataclass
class DataConfig:
    """How raw images / label maps become training tensors (see ``medlsdm.data.transforms``)."""

    shape: tuple[int, int, int] = (32, 256, 256)  # target (D, H, W) after crop/pad or resize
    modality: Modality = "ct"  # "ct" (window clip) or "mr" (percentile clip)
    ct_window: tuple[float, float] = (-1000.0, 1000.0)  # HU range mapped to [-1, 1]
    mr_percentiles: tuple[float, float] = (0.5, 99.5)  # percentile range mapped to [-1, 1]
    # what a person looks at (previews, report figures, window metrics; see medlsdm.data.display): CT a
    # soft-tissue window in HU (level 40, width 400), MR these percentiles of the volume shown
    ct_display_window: tuple[float, float] = (-160.0, 240.0)
    mr_display_percentiles: tuple[float, float] = (1.0, 99.0)
    orientation: str = "RAS"
    spacing: tuple[float, float, float] | None = None  # target voxel size (D, H, W) in mm; None keeps it
    resize_mode: ResizeMode = "crop_pad"  # "crop_pad" (centre crop / pad) or "resize" (trilinear / nearest)
    num_classes: int = 6  # C, background included
    # original label value -> class index; None means the values already are 0..C-1
    label_remap: dict[int, int] | None = None
    # one name per class (num_classes of them); left at this default with another num_classes: class_0, class_1, ...
    label_names: list[str] = field(default_factory=lambda: list(_DEFAULT_LABEL_NAMES))
    cache_dir: str | None = None  # preprocessed samples are cached here when set
    num_workers: int = 0

    def __post_init__(self) -> None:
        s = _section("data")
        _check_choices(self, s)
        for name in ("ct_window", "ct_display_window", "mr_percentiles", "mr_display_percentiles"):
            _check_range(self, s, name)
            lo, hi = getattr(self, name)
            if not lo < hi or (name.startswith("mr") and not 0 <= lo < hi <= 100):
                raise UserError(f"config: {s}.{name} must be (low, high) with low < high"
                                + (" within 0..100" if name.startswith("mr") else "") + f", got {[lo, hi]}")
        _check_range(self, s, "shape", 1)
        _check_range(self, s, "spacing", 0, lo_open=True)
        _check_range(self, s, "num_classes", 2)
        _check_range(self, s, "num_workers", 0)
        axes = [{"L", "R"}, {"A", "P"}, {"S", "I"}]
        if (not isinstance(self.orientation, str) or len(self.orientation) != 3
                or sorted(next((i for i, a in enumerate(axes) if c in a), 3) for c in self.orientation) != [0, 1, 2]):
            raise _bad(f"{s}.orientation", "three axis codes, one of L/R, A/P and S/I each (e.g. RAS, LPS)",
                       self.orientation)
        if self.label_remap is not None:
            bad = sorted(v for v in set(self.label_remap.values()) if not 0 <= v < self.num_classes)
            if bad:
                raise UserError(f"config: {s}.label_remap maps to class(es) {bad} outside 0..{self.num_classes - 1} "
                                f"({s}.num_classes is {self.num_classes})")
        if list(self.label_names) == list(_DEFAULT_LABEL_NAMES) and self.num_classes != len(_DEFAULT_LABEL_NAMES):
            self.label_names = [f"class_{i}" for i in range(self.num_classes)]  # the default names another C
        if len(self.label_names) != self.num_classes:
            raise UserError(f"config: '{s}.label_names' must name each of the {self.num_classes} classes "
                            f"({s}.num_classes, background first), got {len(self.label_names)} names")


@dataclass
class VQGANConfig:
    """Stage 1: 3D VQ-GAN (paper section 3.2)."""

    channels: int = 16  # width of the first encoder stage (doubled at each downsampling)
    downsample: tuple[int, int, int] = (4, 4, 4)  # compression per axis (D, H, W)
    embedding_dim: int = 8  # latent channels = code dimension
    n_codes: int = 16384  # codebook size K
    num_res_blocks: int = 1
    commitment_beta: float = 0.25
    codebook_update: CodebookUpdate = "ema"  # "ema" (EMA updates) or "loss" (codebook loss, eq. 3)
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
    upsample: VQGANUpsample = "transpose"
    decoder_tanh: bool = False  # a final tanh on the decoder output (the authors' final runs have one)
    perceptual_weight: float = 1.0
    # perceptual backbone: "vgg16" (needs perceptual_weights, torchvision's ImageNet file),
    # "random-vgg16" (randomly initialised, named as such in logs) or "none" (no perceptual term)
    perceptual_backbone: PerceptualBackbone = "none"
    perceptual_weights: str | None = None
    perceptual_lpips_weights: str | None = None  # optional LPIPS linear-layer file (lpips' vgg.pth)
    perceptual_slices: int = 4  # slices per volume (along D) compared by the perceptual loss; 0 = all
    disc_channels: int = 64
    disc_layers: int = 3
    disc_start_step: int = 2000  # discriminators switch on at this step
    gan_loss: GANLoss = "hinge"  # "hinge" or "vanilla" (non-saturating)
    image_gan_weight: float = 1.0  # 2D slice discriminator
    volume_gan_weight: float = 1.0  # 3D patch discriminator
    # discriminator feature matching (L1 between fake and real features of each discriminator layer); the
    # paper's text has none: feature_match_weight: 0. Over the layers: "mean" (default) or "sum" (the authors'
    # code: n_layers times "mean", 4x with disc_layers: 3, whose discriminators return 4 feature maps)
    feature_match_weight: float = 4.0
    feature_match_reduction: FeatureMatchReduction = "mean"
    adaptive_weight_max: float = 1e4

    def __post_init__(self) -> None:
        s = _section("vqgan")
        _check_choices(self, s)
        for name in ("channels", "embedding_dim", "n_codes", "quantize_chunk", "disc_channels"):
            _check_range(self, s, name, 1)
        _check_range(self, s, "downsample", 1)
        if any(f & (f - 1) for f in self.downsample):
            raise _bad(f"{s}.downsample", "powers of two (1, 2, 4, ...)", list(self.downsample))
        for name in ("num_res_blocks", "perceptual_slices", "disc_layers", "disc_start_step", "commitment_beta",
                     "dead_code_threshold", "l1_weight", "window_l1_weight", "perceptual_weight", "image_gan_weight",
                     "volume_gan_weight", "feature_match_weight", "adaptive_weight_max"):
            _check_range(self, s, name, 0)
        _check_range(self, s, "ema_decay", 0, 1, hi_open=True)


@dataclass
class LDMConfig:
    """Stage 2: latent semantic diffusion model (paper section 3.3), or one of the baselines (``method``)."""

    # "lsdm" (Med-LSDM: SPADE U-Net on VQ-GAN latents), "slice2d" (SegGuidedDiff-style: 2D slices, mask
    # concatenated, stacked) or "pixel3d" (Med-DDPM-style: 3D image space, label map concatenated)
    method: LDMMethod = "lsdm"
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
    depth_positions: DepthPositions = "none"
    dropout: float = 0.0
    num_timesteps: int = 1000  # T (authors' code: 500)
    schedule: Schedule = "cosine"  # MONAI NoiseSchedules: cosine, linear_beta, scaled_linear_beta, sigmoid_beta
    objective: Objective = "eps"  # "eps" (paper) or "x0" / "v"
    loss: DiffusionLoss = "l2"  # "l2" (paper eq. 13) or "l1" (authors' code)
    # > 0: weigh the loss of each latent voxel by its classes' share of the label map ** -power (mean weight 1),
    # so small structures (a lesion) count; 0 = the paper's uniform loss
    class_weight_power: float = 0.0
    # "codebook" (the paper: min-max to [-1, 1] from the codebook range) or "standardize" (per-channel
    # mean/std of the encoded training set); both are measured in BENCHMARKS.md
    latent_norm: LatentNorm = "codebook"
    cond_drop_prob: float = 0.1  # label map dropped with this probability (trains the unconditional branch)
    # classifier-free guidance uncond + s * (cond - uncond); 1.0 = conditional model only. The authors' code
    # computes cond + 1.5 * (cond - uncond), which is s = 2.5 in this convention
    guidance_scale: float = 1.0
    ema_decay: float = 0.999
    sampler: SamplerName = "dpm++"  # ddpm (all T steps, the paper), ddim or dpm++; chosen by bench/ldm.py's table
    sampling_steps: int = 25
    clip_sample: bool = True  # clip the predicted x0 to [-1, 1] at every sampling step
    use_checkpoint: bool = False  # gradient checkpointing in the U-Net (saves memory on large volumes)
    # sampling: full-length volumes and efficiency switches (each measured by bench/speed.py)
    window_overlap: float = 0.5  # label maps deeper than data.shape: share of a depth window overlapping the next
    window_batch: int = 1  # depth windows per U-Net call (memory grows with it)
    spade_cache: bool = True  # compute SPADE's label-map modulations once per label map, not at every step (exact)
    sample_precision: Precision = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU), "bf16" or "fp32"
    sample_compile: bool = False  # torch.compile the U-Net for sampling (pays off for many volumes)

    def __post_init__(self) -> None:
        s = _section("ldm")
        _check_choices(self, s)
        for name in ("model_channels", "channel_mult", "num_heads", "semantic_channels", "sampling_steps",
                     "window_batch"):
            _check_range(self, s, name, 1)
        for name in ("slices_per_volume", "num_res_blocks", "class_weight_power", "guidance_scale"):
            _check_range(self, s, name, 0)
        _check_range(self, s, "num_timesteps", 2)  # the noise schedule needs two
        for name in ("dropout", "cond_drop_prob"):
            _check_range(self, s, name, 0, 1)
        for name in ("ema_decay", "window_overlap"):
            _check_range(self, s, name, 0, 1, hi_open=True)
        if not self.channel_mult:
            raise _bad(f"{s}.channel_mult", "a non-empty list (one multiplier per U-Net level)", [])
        _check_range(self, s, "attention_levels", 0, len(self.channel_mult), hi_open=True)
        for level in self.attention_levels:
            width = self.model_channels * self.channel_mult[level]
            if width % self.num_heads:
                raise UserError(f"config: '{s}.num_heads' ({self.num_heads}) must divide the width of every attention "
                                f"level ({s}.model_channels x channel_mult[{level}] = {width})")


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
    precision: Precision = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "bf16", "fp32"
    grad_clip: float = 1.0
    val_fraction: float = 0.1
    # a validation metric (higher is better, e.g. "psnr_window" for the VQ-GAN) whose best weights are kept in
    # RUN/best/ and used for encoding and decoding instead of the latest ones; None = always the latest
    keep_best: str | None = None
    # LDM validation preview: DDIM steps of one sampled volume (0 = no preview); at paper size on CPU one
    # preview costs minutes (BENCHMARKS.md, paper_size)
    preview_steps: int = 25

    def __post_init__(self) -> None:
        s = _section("train")
        _check_choices(self, s)
        _check_range(self, s, "lr", 0, lo_open=True)
        _check_range(self, s, "betas", 0, 1, hi_open=True)
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "val_every", "ckpt_every"):
            _check_range(self, s, name, 1)
        _check_range(self, s, "grad_clip", 0)  # 0 = no clipping
        _check_range(self, s, "val_fraction", 0, 1, hi_open=True)
        _check_range(self, s, "preview_steps", 0)  # 0 = no preview


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
    # crops centred on each class in these proportions (RandCropByLabelClassesd; one ratio per class, background
    # first) instead of pos_fraction: small classes get seen; None keeps pos_fraction
    class_ratios: list[float] | None = None
    # without class_ratios: "inverse_sqrt" centres crops on each class c in proportion to
    # min(4, sqrt(largest class share / share of c)) in the training labels (background 0.5): small classes are
    # seen up to 4x as often as large ones; "none" keeps pos_fraction
    crop_balance: Literal["none", "inverse_sqrt"] = "none"
    # what the network sees: "model" the volume as normalised for the models, "display" the modality's display
    # window (CT soft tissue) mapped to [-1, 1], where organs differ by more than a few per cent of the range
    input_window: Literal["model", "display"] = "model"
    lr_schedule: Literal["constant", "poly"] = "constant"  # poly: lr * (1 - step / steps) ** 0.9 (nnU-Net)
    sw_batch_size: int = 4
    sw_overlap: float = 0.25

    def __post_init__(self) -> None:
        s = _section("seg")
        if self.class_ratios is not None and (any(r < 0 for r in self.class_ratios) or sum(self.class_ratios) <= 0):
            raise _bad(f"{s}.class_ratios", "non-negative ratios, at least one above 0", self.class_ratios)
        _check_choices(self, s)
        if len(self.channels) < 2:
            raise _bad(f"{s}.channels", "at least two widths (one per U-Net level)", list(self.channels))
        for name in ("channels", "patch", "batch_size", "sw_batch_size"):
            _check_range(self, s, name, 1)
        for name in ("num_res_units", "epochs", "steps"):
            _check_range(self, s, name, 0)
        if self.steps == 0 and self.epochs < 1:
            raise _bad(f"{s}.epochs", f">= 1 when {s}.steps is 0 (no fixed number of steps)", self.epochs)
        _check_range(self, s, "lr", 0, lo_open=True)
        _check_range(self, s, "pos_fraction", 0, 1)
        _check_range(self, s, "sw_overlap", 0, 1, hi_open=True)


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

    def __post_init__(self) -> None:
        _check_range(self, _SECTION.get() or "", "seed", 0)

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))


def _plain(obj: Any) -> Any:
    """Tuples -> lists, recursively, so YAML stays readable."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# YAML 1.2 floats with an exponent that PyYAML (YAML 1.1: a dot and a signed exponent) reads as strings: 1e-4, 1.0e5
_FLOAT_TEXT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+")


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check a YAML value against the dataclass field type ``tp`` (tuples, Optionals, dicts, Literals, nested)
    and convert it (lists -> tuples, ints -> floats). Scalars are strict: a bool only from a YAML bool, an int
    only from an int, a float from an int or a float, a str only from a str."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        if origin in _UNIONS and type(None) in args:
            return None
        raise UserError(f"config: '{where}' may not be empty")
    if origin in _UNIONS:
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(inner, value, where)
    if origin is Literal:
        if value not in args or not isinstance(value, str):
            raise _choice_error(where, value, args)
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _bad(where, "a mapping of settings", value)
        return _from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _bad(where, "a list", value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise UserError(f"config: '{where}' must have {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _bad(where, "a list", value)
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _bad(where, "a mapping (e.g. {0: 0, 255: 1})", value)
        return {_coerce(args[0], k, f"{where} key {k!r}"): _coerce(args[1], v, f"{where}[{k!r}]")
                for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise _bad(where, "true or false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(where, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(where, "a number", value)
        if not math.isfinite(value):
            raise _bad(where, "a finite number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _bad(where, "a string", value)
        return value
    return value


def _from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = _hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        section = f"in '{where}'" if where else "at the top level"
        named = []
        for k in unknown:
            near = _closest(k, names)
            named.append((f"{k!r}", f" (did you mean '{near}'?)" if near else ""))
        if len(named) == 1:
            raise UserError(f"config: unknown key {named[0][0]} {section}{named[0][1]}")
        raise UserError(f"config: unknown keys {section}: {', '.join(k + hint for k, hint in named)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    token = _SECTION.set(where)
    try:
        return cls(**kwargs)
    finally:
        _SECTION.reset(token)


def deep_update(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
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
        if base not in PRESETS:
            raise _choice_error("base", base, PRESETS)
        data = deep_update(_read_yaml(PRESETS_DIR / f"{base}.yaml"), data)
        data.pop("base", None)
    cfg = _from_dict(Config, data)
    _check_loaded(cfg)
    return cfg


def _check_loaded(cfg: Config) -> None:
    """Checks across fields that hold for a loaded config but not for every dataclass built in code (a test
    builds an LDMConfig with few timesteps and the default sampling_steps, and passes steps when it samples)."""
    ldm = cfg.ldm
    if ldm.sampler != "ddpm" and ldm.sampling_steps > ldm.num_timesteps:
        raise UserError(f"config: 'ldm.sampling_steps' must be at most ldm.num_timesteps ({ldm.num_timesteps}) for "
                        f"the {ldm.sampler} sampler, got {ldm.sampling_steps}")


def load_config(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Load a preset by name (``tiny``/``paper``) or a YAML file; ``overrides`` is a nested dict (see
    :func:`parse_overrides`), merged into the file and validated with it."""
    key = str(name_or_path)
    path = PRESETS_DIR / f"{key}.yaml" if key in PRESETS else Path(key)
    data = _read_yaml(path)
    if overrides:
        data = deep_update(data, overrides)
    return config_from_dict(data)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["ldm.sampler=ddim", "train_ldm.lr=1e-4", "data.shape=[16,64,64]"]`` -> the nested dict
    ``{"ldm": {"sampler": "ddim"}, "train_ldm": {"lr": "1e-4"}, "data": {"shape": [16, 64, 64]}}`` for
    ``load_config(name, overrides=...)``, which checks keys and values as it checks a file. Each value is read as
    YAML (``null``, ``true``, ``[1, 2]``, ``{0: 0, 255: 1}``); a later item for the same key wins."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or any(not p.strip() for p in parts):
            raise UserError(f"config override {item!r}: expected KEY=VALUE with a dotted key, e.g. ldm.sampler=ddim")
        try:
            value = yaml.safe_load(text)  # an empty value is null
        except yaml.YAMLError as exc:
            raise UserError(f"config override {item!r}: value is not valid YAML "
                            f"({str(exc).splitlines()[0]})") from None
        node = out
        for depth, part in enumerate(parts[:-1]):
            part = part.strip()
            if not isinstance(node.get(part), dict):
                if part in node:
                    raise UserError(f"config override {item!r}: '{'.'.join(parts[:depth + 1])}' was set to a value "
                                    "by an earlier override")
                node[part] = {}
            node = node[part]
        node[parts[-1].strip()] = value
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from medlsdm.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
