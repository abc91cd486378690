"""Display windows, window metrics, the per-class table and the grid-artifact ratio (medlsdm.evaluation.fidelity)."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.layers import GaussianFilter

from medlsdm.config import DataConfig
from medlsdm.data.display import display_window
from medlsdm.evaluation.fidelity import class_table, fidelity, grid_ratio, markdown, window_metrics

CT = DataConfig(modality="ct", ct_window=(-1000.0, 1000.0), ct_display_window=(-160.0, 240.0), num_classes=3,
                label_names=["background", "organ", "bone"])


def hu(x: torch.Tensor) -> torch.Tensor:
    """HU -> the normalised [-1, 1] scale of CT above."""
    return x / 1000.0


def smooth(seed: int, shape=(16, 32, 32)) -> torch.Tensor:
    """Smooth random volume around 40 HU (soft tissue), std ~60 HU, normalised units."""
    n = torch.randn(shape, generator=torch.Generator().manual_seed(seed))[None, None]
    n = GaussianFilter(3, 2.0)(n)[0, 0]
    return hu(40 + 60 * n / n.std())


def test_ct_display_window_in_normalised_units():
    assert display_window(CT) == pytest.approx((-0.16, 0.24))
    mr = DataConfig(modality="mr", mr_display_percentiles=(10.0, 90.0))
    v = torch.linspace(-1, 1, 1001)
    assert display_window(mr, v) == pytest.approx((-0.8, 0.8), abs=1e-3)
    with pytest.raises(ValueError):
        display_window(mr)


def test_window_metrics_match_hand_computed_values():
    ref = torch.full((16, 16, 16), hu(40.0))
    pred = ref + hu(20.0)  # 20 HU off everywhere, inside the window
    m = window_metrics([pred], [ref], CT)
    assert m["full"]["mae"] == pytest.approx(20.0, rel=1e-4)
    assert m["window"]["mae"] == pytest.approx(20.0, rel=1e-4)
    assert m["window"]["psnr"] == pytest.approx(10 * math.log10(1 / (20 / 400) ** 2), abs=1e-3)  # 26.02 dB
    assert m["full"]["psnr"] == pytest.approx(10 * math.log10(4 / 0.02**2), abs=1e-3)  # 40.00 dB
    # a 400 HU error on bone (500 vs 900 HU) is outside the window: it counts over the full range only
    ref2, pred2 = ref.clone(), ref.clone()
    ref2[:4], pred2[:4] = hu(500.0), hu(900.0)
    m2 = window_metrics([pred2], [ref2], CT)
    assert m2["window"]["mae"] == pytest.approx(0.0, abs=1e-4)
    assert m2["full"]["mae"] == pytest.approx(100.0, rel=1e-3)


def test_class_table_zero_for_identical_and_exact_for_a_shifted_class():
    ref = smooth(0)
    lab = torch.zeros(ref.shape, dtype=torch.long)
    lab[4:12, 8:24, 8:24] = 1
    lab[:, :4, :4] = 2
    rows = class_table([ref], [ref], [lab], CT)
    assert [r["name"] for r in rows] == ["background", "organ", "bone"]
    assert all(r["error"] == 0 for r in rows)
    assert rows[1]["voxels"] == 8 * 16 * 16
    pred = torch.where(lab == 1, ref + hu(30.0), ref)
    rows = class_table([pred], [ref], [lab], CT)
    assert rows[1]["error"] == pytest.approx(30.0, abs=1e-3)
    assert rows[0]["error"] == 0 and rows[2]["error"] == 0


def test_grid_ratio_flags_a_4_voxel_checkerboard_and_passes_smooth_volumes():
    refs = [smooth(s) for s in (1, 2)]
    others = [smooth(s) for s in (3, 4)]
    ok = grid_ratio(others, refs, CT)
    assert 0.7 < ok["max"] < 1.2  # another smooth volume looks like the real ones
    d, h, w = torch.meshgrid(*(torch.arange(n) for n in refs[0].shape), indexing="ij")
    board = torch.where(((d // 2 + h // 2 + w // 2) % 2) == 0, 1.0, -1.0)  # period 4 along every axis
    bad = grid_ratio([v + hu(15.0) * board for v in others], refs, CT)  # +-15 HU
    assert bad["max"] > 3
    assert set(bad["per_axis"]) == {"D/4", "D/2", "H/4", "H/2", "W/4", "W/2"}
    assert min(bad["per_axis"][k] for k in ("D/4", "H/4", "W/4")) > 3


def test_fidelity_markdown_lists_every_class():
    ref = smooth(5)
    lab = (ref > hu(40)).long()
    f = fidelity([ref], [ref], [lab], CT)
    text = "\n".join(markdown(f))
    assert "| background |" in text and "| organ |" in text and "-160..240 HU" in text
    assert f["window_metrics"]["window"]["mae"] == 0
