"""Shared fixtures: a micro config (tiny shapes, few steps) and a small phantom data set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# two cores: one intra-op thread per process keeps the 2-process DDP tests from oversubscribing
os.environ.setdefault("OMP_NUM_THREADS", "1")

# the test phantoms are whole-abdomen ones at their own voxel size: keep it (the tiny preset resamples to 3x2x2 mm)
MICRO = """
base: tiny
data:
  shape: [8, 32, 32]
  spacing: null
vqgan:
  channels: 4
  n_codes: 64
  disc_channels: 4
  disc_layers: 2
  disc_start_step: 2
ldm:
  model_channels: 8
  channel_mult: [1, 2]
  num_res_blocks: 1
  attention_levels: [1]
  num_heads: 2
  semantic_channels: 4
  num_timesteps: 50
  sampling_steps: 4
train_vqgan:
  batch_size: 2
  max_steps: 4
  log_every: 1
  val_every: 2
  ckpt_every: 2
  val_fraction: 0.2
train_ldm:
  batch_size: 2
  max_steps: 4
  log_every: 1
  val_every: 2
  ckpt_every: 2
  val_fraction: 0.2
"""


@pytest.fixture(scope="session")
def micro_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "micro.yaml"
    path.write_text(MICRO)
    return path


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medlsdm.data.phantom import write_phantom_dataset

    return write_phantom_dataset(tmp_path_factory.mktemp("data") / "ph", 8, modality="ct", shape=(8, 32, 32),
                                 seed=0, test_fraction=0.25, progress=False)
