"""Memorisation audit: planted copies of training scans are flagged, independent subjects are not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medlsdm.data.phantom import generate_phantom
from medlsdm.errors import UserError
from medlsdm.evaluation.pairing import VolumeSet
from medlsdm.evaluation.privacy import feature_distances, image_distances, privacy_audit

SHAPE = (16, 32, 32)


def _phantom(seed: int) -> torch.Tensor:
    """(1, D, H, W) CT phantom scaled to [-1, 1] like the data layer's window."""
    image, _ = generate_phantom(seed, SHAPE, "ct")
    return torch.from_numpy(np.clip(image / 1000.0, -1, 1))[None]


@pytest.fixture(scope="module")
def sets():
    train = {f"train_{i}": _phantom(i) for i in range(6)}
    heldout = {f"heldout_{i}": _phantom(100 + i) for i in range(8)}
    gen = torch.Generator().manual_seed(0)
    synthetic = {
        "copy": train["train_2"].clone(),
        "noisy_copy": (train["train_4"] + 0.02 * torch.randn(train["train_4"].shape, generator=gen)).clamp(-1, 1),
        "independent_a": _phantom(500),
        "independent_b": _phantom(501),
        "independent_c": _phantom(502),
    }
    return train, heldout, synthetic


def test_planted_copies_are_flagged_and_independent_subjects_are_not(sets, tmp_path):
    train, heldout, synthetic = sets
    audit = privacy_audit(train, heldout, synthetic, out_dir=tmp_path)
    image = audit["image"]
    assert set(image["flagged"]) == {"copy", "noisy_copy"}
    assert image["fraction_below"] == pytest.approx(2 / 5)
    assert audit["exact_copies"] == ["copy"]
    nearest = {r["id"]: r for r in image["synthetic"]}
    assert nearest["copy"]["nearest_train"] == "train_2" and nearest["copy"]["distance"] == pytest.approx(0, abs=1e-9)
    assert nearest["noisy_copy"]["nearest_train"] == "train_4"
    # the reference: real held-out subjects are never that close to a training scan
    assert image["threshold"] == pytest.approx(np.percentile([r["distance"] for r in image["heldout"]], 5))
    assert min(r["distance"] for r in image["heldout"]) > 0.05
    # closest pairs are sorted, named and drawn
    assert [p["synthetic"] for p in audit["closest_pairs"][:2]] == ["copy", "noisy_copy"]
    assert audit["closest_pairs"][0]["train"] == "train_2"
    assert len(audit["figures"]) == 1 and (tmp_path / "privacy_closest_pairs.png").stat().st_size > 1000
    assert audit["n_train"] == 6 and audit["n_heldout"] == 8 and audit["n_synthetic"] == 5


def test_feature_space_audit_with_an_extractor(sets):
    train, heldout, synthetic = sets
    extractor = lambda v: torch.nn.functional.avg_pool3d(v, 4).flatten(1)  # noqa: E731  (B, 1, D, H, W) -> (B, F)
    audit = privacy_audit(train, heldout, synthetic, extractor=extractor, extractor_name="pooled")
    feature = audit["feature"]
    assert "pooled" in feature["metric"]
    assert "copy" in feature["flagged"]
    assert not any(f.startswith("independent") for f in feature["flagged"])


def test_volume_set_input_and_distance_properties():
    a, b = _phantom(7), _phantom(8)
    d = image_distances([a, 2 * a + 0.1, b], [a])
    assert d.shape == (3, 1)
    assert float(d[0, 0]) == pytest.approx(0, abs=1e-9)
    assert float(d[1, 0]) == pytest.approx(0, abs=1e-6)  # z-scoring: a global contrast change is no disguise
    assert 0.05 < float(d[2, 0]) <= 2 ** 0.5 + 1e-9
    f = feature_distances(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 0.0]]))
    assert f[:, 0].tolist() == pytest.approx([0.0, 1.0])
    train = VolumeSet(ids=["t0", "t1"], images=[a, b])
    audit = privacy_audit(train, {"h": _phantom(9), "h2": _phantom(10)}, {"s": a.clone()})
    assert audit["image"]["flagged"] == ["s"] and audit["closest_pairs"][0]["train"] == "t0"


def test_bad_inputs_are_user_errors():
    a = _phantom(1)
    with pytest.raises(UserError, match="synthetic set is empty"):
        privacy_audit({"t": a}, {"h": a}, {})


def test_volumes_of_several_shapes_are_compared_on_their_shared_centre_and_the_audit_says_so():
    """Evaluation keeps volumes whole, so sets may mix shapes: a copy of a training scan's centre is still found."""
    a, b = _phantom(1), _phantom(2)
    big = torch.cat([torch.full((1, 4, 32, 32), -1.0), a, torch.full((1, 4, 32, 32), 0.5)], dim=1)  # 24 slices
    d = image_distances([a, b], [big])
    assert float(d[0, 0]) == pytest.approx(0.0, abs=1e-9) and float(d[1, 0]) > 0.1
    wide = torch.nn.functional.pad(a, (2, 2), value=0.7)  # W 36 vs D 24: the shared centre is ``a`` in both
    assert float(image_distances([wide], [big])[0, 0]) == pytest.approx(0.0, abs=1e-9)
    assert float(image_distances([wide], [a])[0, 0]) == pytest.approx(0.0, abs=1e-9)
    assert float(image_distances([torch.nn.functional.pad(a, (4, 0), value=0.7)], [a])[0, 0]) > 0.1  # off centre
    train = VolumeSet(ids=["t0", "t1"], images=[big, _phantom(3)])
    audit = privacy_audit(train, {"h": _phantom(9), "h2": _phantom(10)}, {"s": a.clone()},
                          extractor=lambda v: v.mean(dim=(2, 3, 4)))
    assert audit["image"]["flagged"] == ["s"] and audit["closest_pairs"][0]["train"] == "t0"
    assert "2 shapes" in audit["note_shapes"] and "central region" in audit["note_shapes"]
    assert "note_shapes" not in privacy_audit({"t": a}, {"h": b}, {"s": a.clone()})
