"""Display windows, window metrics, the per-class table and the grid-artifact ratio (medlsdm.evaluation.fidelity)."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.layers import GaussianFilter

from medlsdm.config import DataConfig
from medlsdm.data.display import display_window
from medlsdm.evaluation.fidelity import class_table, contrast_table, fidelity, grid_ratio, markdown, window_metrics

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


def test_contrast_table_sees_a_structure_only_where_it_stands_out():
    """A lesion 40 HU below its organ: kept -> ratio 1; painted like the organ (right everywhere else, invisible)
    -> ratio 0; hyper- instead of hypodense -> ratio 1 but sign 0 (a label map may not say which)."""
    lab = torch.zeros(16, 32, 32, dtype=torch.long)
    lab[2:14, 4:28, 4:28] = 1  # organ
    lab[6:10, 12:18, 12:18] = 2  # lesion inside it
    organ, lesion = lab == 1, lab == 2
    ref = torch.where(lesion, hu(20.0), torch.where(organ, hu(60.0), hu(-1000.0)))
    rows = {r["name"]: r for r in contrast_table([ref], [ref], [lab], CT)}
    assert rows["bone"]["real"] == pytest.approx(40.0, abs=1e-3)  # class 2 is named "bone" in CT above
    assert rows["bone"]["ratio"] == pytest.approx(1.0) and rows["bone"]["same_sign"] == 1.0
    invisible = torch.where(lesion, hu(60.0), ref)
    assert contrast_table([invisible], [ref], [lab], CT)[1]["ratio"] == pytest.approx(0.0, abs=1e-6)
    flipped = torch.where(lesion, hu(100.0), ref)
    row = contrast_table([flipped], [ref], [lab], CT)[1]
    assert row["ratio"] == pytest.approx(1.0, abs=1e-4) and row["same_sign"] == 0.0
    # the organ's shell is the lesion inside it only (background excluded): 40 HU above it
    assert rows["organ"]["real"] == pytest.approx(40.0, abs=1e-3)


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
