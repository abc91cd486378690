"""A shareable model folder: ``medlsdm export RUN --out MODEL``.

A training run folder holds what was derived from the training images (validation previews of real slices, as
PNGs and in the TensorBoard events, and while training the preprocessing cache). An export holds only what
sampling needs::

    MODEL/config.yaml               the run's config, local paths (cache, perceptual weights) removed
    MODEL/unet_ema.safetensors      the EMA semantic U-Net the pipeline samples with
    MODEL/latent_stats.json         latent min/max (and mean/std) for de-normalising (LDM only)
    MODEL/vqgan/config.yaml         the frozen VQ-GAN's config (LDM only)
    MODEL/vqgan/vqgan.safetensors   its weights
    MODEL/manifest.json             SHA-256 of every file above; verified before every load

:func:`verify_manifest` is what ``SynthesisPipeline.from_pretrained`` (and so ``sample``) runs on a folder with a
manifest: a changed, damaged or missing file stops with one line naming it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from medlsdm.config import save_config
from medlsdm.errors import UserError
from medlsdm.io import atomic_dir, atomic_write_text, file_sha256, folder_lock
from medlsdm.runs import latest_weights, run_config, selected_weights

__all__ = ["export_model", "verify_manifest", "MANIFEST", "FORMAT"]

MANIFEST = "manifest.json"
FORMAT = "medlsdm-export/1"


def _portable(cfg):
    """The config without local paths: they mean nothing on another machine and may name the user's folders."""
    cfg.data.cache_dir = None
    cfg.vqgan.perceptual_weights = None
    cfg.vqgan.perceptual_lpips_weights = None
    return cfg


def export_model(run_dir: Path, out: Path, overwrite: bool = False) -> Path:
    """Write the shareable model of LDM (or baseline) run ``run_dir`` into ``out`` (a new or empty folder, or an
    earlier export with ``overwrite``). Built in a hidden sibling and moved into place whole."""
    from medlsdm import __version__
    from medlsdm.diffusion.baselines import is_baseline

    run_dir, out = Path(run_dir), Path(out)
    cfg = run_config(run_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (overwrite and (out / MANIFEST).is_file()):
        raise UserError(f"{out}: exists and is not empty; export into a new folder (or pass --overwrite to replace "
                        "an earlier export)")
    if out.resolve() == run_dir.resolve():
        raise UserError(f"{out}: --out is the run folder itself; choose a new folder")
    files = {"unet_ema.safetensors": latest_weights(run_dir, "unet_ema")}
    if not is_baseline(cfg):
        files["latent_stats.json"] = run_dir / "latent_stats.json"
        files["vqgan/vqgan.safetensors"] = selected_weights(run_dir / "vqgan", "vqgan")
        for path in files.values():
            if not path.is_file():
                raise UserError(f"{path}: missing; is {run_dir} a finished LDM run folder?")
    with folder_lock(out), atomic_dir(out) as tmp:
        for name, src in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / name)
        save_config(_portable(cfg), tmp / "config.yaml")
        if not is_baseline(cfg):
            save_config(_portable(run_config(run_dir / "vqgan")), tmp / "vqgan" / "config.yaml")
        hashes = {p.relative_to(tmp).as_posix(): file_sha256(p, length=64)
                  for p in sorted(tmp.rglob("*")) if p.is_file()}
        atomic_write_text(tmp / MANIFEST, json.dumps({"format": FORMAT, "medlsdm": __version__, "files": hashes},
                                                     indent=2) + "\n")
    return out


def verify_manifest(folder: Path) -> dict[str, str]:
    """Check every file listed in ``folder/manifest.json`` against its SHA-256 (one-line UserError otherwise) and
    return the checked hashes (file name relative to ``folder`` -> full hex SHA-256), so that a caller that
    records a hash need not read a large file again. A folder without a manifest (a training run) is not checked:
    an empty dict."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not a medlsdm export manifest") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: export format {manifest.get('format')!r}, this medlsdm reads {FORMAT!r}")
    for name, expected in sorted(files.items()):
        target = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise UserError(f"{path}: lists a file outside the export ({name})")
        if not target.is_file():
            raise UserError(f"{target}: listed in {MANIFEST} but missing; the export is incomplete")
        if file_sha256(target, length=64) != expected:
            raise UserError(f"{target}: SHA-256 does not match {MANIFEST} (changed or damaged); export the "
                            "model again")
    return files
