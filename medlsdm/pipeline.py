"""Label map in, synthetic volume out.

    pipe = SynthesisPipeline.from_pretrained("runs/ldm")
    for vol in pipe("label.nii.gz", n=2, seed=0):
        vol.save("synthetic.nii.gz")          # geometry (affine, shape) of label.nii.gz
    pipe("label.nii.gz", sampler="ddim", steps=50)                                   # a sampler by name
    pipe("label.nii.gz", sampler=pipe.diffusion.make_sampler("ddim", steps=50))      # or as an object

Steps: label map -> preprocessing exactly as in training -> one-hot (B, C, D, H, W) -> noise ->
denoise with the semantic U-Net (DDPM / DDIM, optional classifier-free guidance) -> de-normalise ->
quantise to the nearest codebook entries -> VQ-GAN decode -> inverse preprocessing -> NIfTI.
The baselines (``ldm.method`` slice2d / pixel3d, :mod:`medlsdm.diffusion.baselines`) have no VQ-GAN:
their sampler's output already is the volume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from medlsdm.autoencoder.normalize import LatentNormalizer
from medlsdm.config import Config
from medlsdm.data.checks import check_target_shape
from medlsdm.data.layouts import nifti_stem
from medlsdm.data.transforms import LabelGeometry, load_label_map, one_hot, save_volume
from medlsdm.devices import resolve_device
from medlsdm.diffusion.baselines import build_baseline, is_baseline
from medlsdm.diffusion.model import LatentDiffusion
from medlsdm.diffusion.options import SamplingOptions
from medlsdm.diffusion.samplers import Sampler
from medlsdm.diffusion.windows import DepthWindows
from medlsdm.errors import UserError
from medlsdm.export import verify_manifest
from medlsdm.io import atomic_write_text, file_sha256, folder_lock, load_into
from medlsdm.runs import latest_weights, load_vqgan, run_config


@dataclass
class GeneratedVolume:
    """One synthetic volume: ``array`` (D, H, W) in model space ([-1, 1]) and its label map's geometry."""

    array: torch.Tensor
    label: torch.Tensor  # (D, H, W) class indices, model space
    geometry: LabelGeometry | None
    cfg: Config

    def save(self, path: Path) -> Path:
        """NIfTI with the label map's affine and shape, intensities de-normalised (CT: HU)."""
        if self.geometry is None:
            raise UserError("this volume was generated from a tensor, not a file: no geometry to write with")
        save_volume(self.array[None], self.geometry, Path(path), self.cfg.data)
        return Path(path)


class SynthesisPipeline:
    """The frozen VQ-GAN + the (EMA) semantic U-Net of an LDM run, ready to sample (for a baseline run:
    ``vqgan`` and ``normalizer`` are None and the diffusion model works on the image itself).

    ``diffusion`` must clip where ``normalizer`` says the codebook ends (build it with
    ``build_diffusion(cfg, normalizer)``), so predicted clean latents stay within the codebook's range."""

    def __init__(self, vqgan: nn.Module | None, diffusion: LatentDiffusion, normalizer: LatentNormalizer | None,
                 cfg: Config) -> None:
        if normalizer is not None and diffusion.clip_value != normalizer.clip:
            raise ValueError(f"the diffusion model clips at {diffusion.clip_value} but the latents' range is "
                             f"{normalizer.clip}: build it with build_diffusion(cfg, normalizer)")
        self.vqgan, self.diffusion, self.normalizer, self.cfg = vqgan, diffusion, normalizer, cfg
        self.device = next(diffusion.parameters()).device
        # file -> full SHA-256 of an export's files, checked against its manifest by from_pretrained (else empty)
        self.verified_sha256: dict[Path, str] = {}

    @classmethod
    def from_pretrained(cls, run_dir: Path | str, device: str = "auto", use_ema: bool = True) -> "SynthesisPipeline":
        """Load an LDM run folder (``medlsdm train-ldm --out RUN_DIR``) or its export (``medlsdm export``, files
        checked against the manifest's hashes); nothing is downloaded."""
        run_dir = Path(run_dir)
        verified = verify_manifest(run_dir)  # an export (medlsdm export): every file must match its recorded SHA-256
        cfg = run_config(run_dir)
        dev = resolve_device(device)
        normalizer = None if is_baseline(cfg) else LatentNormalizer.load(run_dir / "latent_stats.json")
        diffusion = build_diffusion(cfg, normalizer)
        load_into(diffusion.unet, latest_weights(run_dir, "unet_ema" if use_ema else "unet"), what="semantic U-Net")
        diffusion.to(dev).eval().requires_grad_(False)
        if normalizer is None:
            pipe = cls(None, diffusion, None, cfg)
        else:
            vqgan, _ = load_vqgan(run_dir / "vqgan", dev)
            pipe = cls(vqgan, diffusion, normalizer, cfg)
        pipe.verified_sha256 = {run_dir / name: sha for name, sha in verified.items()}
        return pipe

    def sampling_options(self, sampler: str | Sampler | None = None, steps: int | None = None,
                         guidance: float | None = None, eta: float = 0.0) -> SamplingOptions:
        """The :class:`SamplingOptions` of this pipeline: the config's ``ldm`` section (sampler, steps, guidance,
        efficiency switches) and the depth windows of the training shape, with the given overrides (None: the
        config's). ``sampler``: a registered name or a :class:`Sampler` object (which brings its own steps)."""
        ldm = self.cfg.ldm
        scale = ldm.guidance_scale if guidance is None else guidance
        if not math.isfinite(scale):
            raise UserError(f"--guidance must be a finite number, got {scale}")
        if steps is not None and steps < 1:
            raise UserError(f"--steps must be at least 1, got {steps}")
        overrides = {"guidance_scale": scale, "eta": eta, "window": self.window, "overlap": self.overlap}
        if sampler is not None:
            overrides["sampler"] = sampler
        if steps is not None:
            overrides["steps"] = steps
        return SamplingOptions.from_config(ldm, **overrides)

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, sampler: str | Sampler | None = None, steps: int | None = None,
                 guidance: float | None = None, eta: float = 0.0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 progress: bool = False) -> torch.Tensor:
        """Class-index label maps (B, 1, D, H, W) -> volumes (B, 1, D, H, W) in [-1, 1], all B through each
        U-Net call. ``sampler``: a registered name (default ``ldm.sampler``, ``steps`` default
        ``ldm.sampling_steps``) or a :class:`Sampler` object of this model, e.g.
        ``DDIMSampler(pipe.diffusion.schedule, steps=50)`` or ``pipe.diffusion.make_sampler("ddim", 50)``.
        ``generator``: one, or one per label map (each volume then is the same in any batch).
        Label maps deeper than the training shape are denoised and decoded on overlapping depth windows of
        the training depth (``ldm.window_overlap``), so memory stays that of the training window."""
        options = self.sampling_options(sampler, steps, guidance, eta)
        onehot = one_hot(labels.to(self.device), self.cfg.data.num_classes)
        z = self.diffusion.sample(onehot, options, generator=generator, progress=progress)
        vol = self.decode_latents(z) if self.vqgan is not None else z.float().clamp(-1, 1)
        if not bool(torch.isfinite(vol).all()):  # never write a meaningless volume with exit 0
            raise UserError("sampling produced NaN or inf values: the model's weights or sampling settings are broken")
        return vol

    @property
    def window(self) -> int:
        """Latent slices of the training volumes: the depth window the U-Net and the decoder see at once."""
        return max(1, self.cfg.data.shape[0] // self.diffusion.unet.image_down[0])

    @property
    def overlap(self) -> int:
        """Latent slices shared by neighbouring depth windows (``ldm.window_overlap`` of a window)."""
        if not 0.0 <= self.cfg.ldm.window_overlap < 1.0:
            raise UserError(f"config: ldm.window_overlap must be in [0, 1), got {self.cfg.ldm.window_overlap}")
        return int(round(self.window * self.cfg.ldm.window_overlap))

    @property
    def keep_larger(self) -> tuple[int, int, int] | None:
        """How label maps larger than ``data.shape`` are kept whole (see ``load_label_map``): padded to a multiple
        of the VQ-GAN's down-sampling, or as they are for the pixel-space baselines (their U-Net takes any size)."""
        return tuple(self.cfg.vqgan.downsample) if self.vqgan is not None else (1, 1, 1)

    def configure(self, **ldm_options) -> "SynthesisPipeline":
        """Override sampling settings of ``cfg.ldm`` for this pipeline, e.g. ``spade_cache=False``,
        ``sample_precision="bf16"``, ``sample_compile=True``, ``window_overlap=0.25``, ``window_batch=2``."""
        unknown = set(ldm_options) - {f.name for f in dataclasses.fields(self.cfg.ldm)}
        if unknown:
            raise UserError(f"unknown sampling option(s) {sorted(unknown)}")
        self.cfg = dataclasses.replace(self.cfg, ldm=dataclasses.replace(self.cfg.ldm, **ldm_options))
        return self

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, E, d, h, w) -> de-normalise -> nearest codebook entries -> decode; latents
        deeper than the training window are decoded window by window and blended (bounded memory)."""
        z = self.normalizer.denormalize(z.float())
        q = self.vqgan.quantizer

        def decode(zw: torch.Tensor) -> torch.Tensor:
            return self.vqgan.decode(q.lookup(q.nearest(zw))).float()

        if z.shape[2] <= self.window:
            return decode(z).clamp(-1, 1)
        windows = DepthWindows(z.shape[2], self.window, self.overlap)
        return windows.blend(lambda s, e: decode(z[:, :, s:e]), scale=self.cfg.vqgan.downsample[0]).clamp(-1, 1)

    def __call__(
        self, label_map: Path | str | torch.Tensor, n: int = 1, seed: int = 0, **kwargs
    ) -> list[GeneratedVolume]:
        """``n`` volumes for one label map (a file, or a (D, H, W) class-index tensor in model space)."""
        if isinstance(label_map, torch.Tensor):
            label, geometry = label_map.long().reshape(1, *label_map.shape[-3:]), None
        else:
            label, geometry = load_label_map(Path(label_map), self.cfg.data, self.keep_larger)
        out = []
        for k in range(n):
            g = torch.Generator(self.device).manual_seed(seed + k)
            vol = self.generate(label[None], generator=g, **kwargs)[0, 0].cpu()
            out.append(GeneratedVolume(vol, label[0].cpu(), geometry, self.cfg))
        return out


def build_diffusion(cfg: Config, normalizer: LatentNormalizer | None = None) -> LatentDiffusion:
    """The LatentDiffusion of a config (latent channels and down-sampling come from the VQ-GAN section,
    the clip range from the latents' ``normalizer``: 1.0 without one), or the baseline model that
    ``cfg.ldm.method`` names (image data in [-1, 1], no normalizer)."""
    if is_baseline(cfg):
        return build_baseline(cfg)
    check_target_shape(cfg.data.shape, cfg.vqgan.downsample, "config data.shape")
    clip = normalizer.clip if normalizer is not None else 1.0
    return LatentDiffusion.from_config(cfg.ldm, num_classes=cfg.data.num_classes, image_down=cfg.vqgan.downsample,
                                       in_channels=cfg.vqgan.embedding_dim, clip_value=clip)


def label_files(labels: Path) -> list[Path]:
    """A NIfTI file, or every ``.nii``/``.nii.gz`` in a folder (sorted)."""
    labels = Path(labels)
    if labels.is_file():
        return [labels]
    if not labels.exists():
        raise UserError(f"{labels}: label map file or folder not found")
    files = sorted(p for p in labels.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    if not files:
        raise UserError(f"{labels}: no .nii / .nii.gz label maps in this folder")
    return files


def volume_seed(seed: int, name: str, k: int) -> int:
    """A stable per-volume seed: the same (seed, label file, sample index) always gives the same volume."""
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 31 + k) % (2**63 - 1)


SAMPLE_INFO = "sample_info.json"


def _claim_folder(out: Path, info: dict, overwrite: bool) -> None:
    """Make ``out`` a folder of volumes made with ``info`` (see :func:`sample_to_folder`), or stop with one line."""
    record = out / SAMPLE_INFO
    volumes = sorted(out.glob("*.nii.gz")) if out.is_dir() else []
    if record.is_file():
        try:
            old = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old != info and not overwrite:
            diff = "unreadable record" if not isinstance(old, dict) else ", ".join(
                f"{k} {old.get(k)!r} -> {info[k]!r}" for k in info if old.get(k) != info[k])
            raise UserError(f"{out}: holds volumes made with other settings ({diff}); use another --out, the same "
                            "settings, or --overwrite")
    elif volumes and not overwrite:
        raise UserError(f"{out}: holds {len(volumes)} volume(s) of unknown origin (no {SAMPLE_INFO}); use another "
                        "--out or --overwrite")
    if overwrite:
        for path in volumes + sorted(out.glob("*_s*.png")):
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, json.dumps(info, indent=2) + "\n")


MAX_PER_LABEL = 10_000  # volumes per label map in one call: a typo'd count stops at once, not after hours
MAX_BATCH = 256


def sample_to_folder(model: Path, labels: Path, out: Path, n_per_label: int = 1, sampler: str | None = None,
                     steps: int | None = None, guidance: float | None = None, seed: int = 0,
                     batch_size: int = 1, device: str = "auto", progress: bool = True,
                     rank: int = 0, world_size: int = 1, preview: bool = True,
                     options: dict | None = None, overwrite: bool = False) -> list[Path]:
    """Generate ``n_per_label`` volumes per label map into ``out`` (``<label>_s<k>.nii.gz`` + ``.png``).

    Resumable: volumes already present are skipped. Every volume depends only on (seed, label file name,
    k): each has its own noise generator, also when ``batch_size`` volumes (label maps of one shape) go
    through the U-Net together. Under torchrun each rank takes every ``world_size``-th job, so nothing is
    generated twice. ``options``: :meth:`SynthesisPipeline.configure` overrides (efficiency switches).

    ``out/sample_info.json`` records what made the volumes (model weights' hash, sampler, steps, guidance, seed,
    switches): resuming or adding volumes needs the same settings; other settings, or volumes of unknown origin,
    stop with one line unless ``overwrite`` (which removes the old volumes and previews first).
    """
    if not (1 <= n_per_label <= MAX_PER_LABEL and 1 <= batch_size <= MAX_BATCH):
        raise UserError(f"--n-per-label must be 1..{MAX_PER_LABEL} and --batch-size 1..{MAX_BATCH} "
                        f"(got {n_per_label} and {batch_size})")
    if overwrite and world_size > 1:  # one rank would delete what another has just written
        raise UserError("--overwrite needs a single process: remove the old volumes first, or run it without torchrun")
    out, labels = Path(out), Path(labels)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --out exists and is not a folder")
    if labels.is_dir() and out.resolve() == labels.resolve():
        raise UserError(f"{out}: --out is the --labels folder; a re-run would read the volumes as label maps")
    with folder_lock(out, enabled=rank == 0):  # ranks of one torchrun job share rank 0's lock
        return _sample_into(model, labels, out, n_per_label, sampler, steps, guidance, seed, batch_size, device,
                            progress, rank, world_size, preview, options, overwrite)


def _sample_into(model: Path, labels: Path, out: Path, n_per_label: int, sampler: str | None,
                 steps: int | None, guidance: float | None, seed: int, batch_size: int, device: str,
                 progress: bool, rank: int, world_size: int, preview: bool, options: dict | None,
                 overwrite: bool) -> list[Path]:
    from medlsdm.data.display import display_window
    from medlsdm.viz import save_preview

    pipe = SynthesisPipeline.from_pretrained(model, device).configure(**(options or {}))
    files = label_files(labels)
    opts = pipe.sampling_options(sampler, steps, guidance)
    weights = latest_weights(Path(model), "unet_ema")
    verified = pipe.verified_sha256.get(weights)  # an export's weights were hashed when loaded: not read again
    info = {"model_weights_sha256": verified[:12] if verified else file_sha256(weights),
            "sampler": opts.sampler_name, "steps": opts.steps,
            "guidance": opts.guidance_scale, "seed": seed,
            "switches": {k: v for k, v in sorted((options or {}).items())}}
    _claim_folder(out, info, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(f, k) for f in files for k in range(n_per_label)][rank::world_size]
    todo = [(f, k) for f, k in jobs if not (out / f"{nifti_stem(f)}_s{k}.nii.gz").exists()]

    def batches():  # consecutive jobs whose label maps have one shape; one label map in memory at a time
        batch: list = []
        current: tuple = (None, None)
        for f, k in todo:
            if current[0] != f:
                current = (f, load_label_map(f, pipe.cfg.data, pipe.keep_larger))
            label, geometry = current[1]
            if batch and (len(batch) == batch_size or batch[0][2].shape != label.shape):
                yield batch
                batch = []
            batch.append((f, k, label, geometry))
        if batch:
            yield batch

    written: list[Path] = []
    bar = tqdm(total=len(todo), desc="sample", unit="volume", disable=not progress)
    for batch in batches():
        labels_b = torch.stack([label for _, _, label, _ in batch])
        gens = [torch.Generator(pipe.device).manual_seed(volume_seed(seed, f.name, k)) for f, k, _, _ in batch]
        vols = pipe.generate(labels_b, sampler, steps, guidance, generator=gens)
        for (f, k, label, geometry), vol in zip(batch, vols):
            target = out / f"{nifti_stem(f)}_s{k}.nii.gz"
            save_volume(vol.cpu(), geometry, target, pipe.cfg.data)
            if preview:
                lo, hi = display_window(pipe.cfg.data, vol)
                save_preview(target.with_name(target.name.replace(".nii.gz", ".png")),
                             {"synthetic": vol[0].cpu().numpy()}, labels=label[0].numpy(),
                             title=f"{f.name} sample {k}", vmin=lo, vmax=hi)
            written.append(target)
        bar.update(len(batch))
    bar.close()
    return written

