"""Latent export: encode a labelled data set once with the frozen VQ-GAN, read it back for diffusion training.

Latents folder::

    LATENTS_DIR/stats.json            codebook range (zmin, zmax), per-channel mean/std, VQ-GAN run + hash, shapes
    LATENTS_DIR/config.yaml           the VQ-GAN run's resolved config (preprocessing included)
    LATENTS_DIR/<case>.safetensors    latent (E, d, h, w) float32 pre-quantisation; label (1, D, H, W) uint8
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from medlsdm.autoencoder.normalize import ChannelStats, LatentNormalizer
from medlsdm.config import save_config
from medlsdm.data.dataset import VolumeDataset
from medlsdm.data.layouts import find_cases
from medlsdm.errors import UserError
from medlsdm.io import atomic_dir, file_sha256, folder_lock, load_weights, save_weights
from medlsdm.runs import load_vqgan, selected_weights
from medlsdm.training.distributed import resolve_device


def is_latents_dir(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "stats.json").is_file()


@torch.no_grad()
def encode_dataset(vqgan_dir: Path, data: Path, out: Path, layout: str = "auto", label_dir: Path | None = None,
                   split: str = "train", device: str = "auto", progress: bool = True) -> Path:
    """Encode every labelled case of ``data`` with the VQ-GAN of ``vqgan_dir`` into ``out``."""
    dev = resolve_device(device)
    vqgan, cfg = load_vqgan(vqgan_dir, dev)
    cases = find_cases(Path(data), layout=layout, split=split, label_dir=label_dir)
    if any(c.label is None for c in cases):
        missing = next(c for c in cases if c.label is None)
        raise UserError(f"{missing.image}: no label map; diffusion training needs image/label pairs")
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_latents_dir(out))):
        raise UserError(f"{out}: exists and is not a latents folder; encode into a new or empty folder")
    # written aside and swapped in whole: a failed encode leaves the old folder as it was, and a re-encode
    # replaces the old latents instead of mixing with them
    with folder_lock(out), atomic_dir(out) as tmp:
        _encode_into(tmp, vqgan, cfg, vqgan_dir, cases, dev, progress)
    return out


def _encode_into(out: Path, vqgan, cfg, vqgan_dir: Path, cases: list, dev: torch.device, progress: bool) -> None:
    dataset = VolumeDataset(cases, cfg.data, with_images=True, with_labels=True, cache_dir=cfg.data.cache_dir)
    stats = ChannelStats()
    for i in tqdm(range(len(dataset)), desc="encode", disable=not progress):
        item = dataset[i]
        z = vqgan.encode(item["image"][None].to(dev)).float()[0].cpu()
        stats.add(z[None])
        save_weights({"latent": z, "label": item["label"].to(torch.uint8)}, out / f"{item['id']}.safetensors")
    zmin, zmax = vqgan.codebook_range()
    weights = selected_weights(vqgan_dir, "vqgan")
    mean, std = stats.result()
    LatentNormalizer(zmin, zmax, "codebook", mean, std).save(
        out / "stats.json", vqgan_run=Path(vqgan_dir).name, vqgan_weights_sha256=file_sha256(weights),
        cases=len(dataset), image_shape=list(cfg.data.shape), latent_shape=list(z.shape))
    save_config(cfg, out / "config.yaml")


class LatentDataset(Dataset):
    """Items ``{"latent": (E, d, h, w), "label": (1, D, H, W) long, "id": str}`` read lazily from a latents folder."""

    def __init__(self, root: Path, ids: list[str] | None = None) -> None:
        self.root = Path(root)
        if not is_latents_dir(self.root):
            raise UserError(f"{self.root}: not a latents folder (stats.json missing); run 'medlsdm encode' first")
        self.ids = (ids if ids is not None
                    else sorted(p.name[: -len(".safetensors")] for p in self.root.glob("*.safetensors")))
        if not self.ids:
            raise UserError(f"{self.root}: latents folder holds no encoded cases")
        self.stats = json.loads((self.root / "stats.json").read_text())

    def normalizer(self, kind: str) -> LatentNormalizer:
        return LatentNormalizer.load(self.root / "stats.json", kind)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        t = load_weights(self.root / f"{self.ids[i]}.safetensors")
        return {"latent": t["latent"], "label": t["label"].long(), "id": self.ids[i]}
