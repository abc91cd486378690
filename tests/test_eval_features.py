"""Feature extractors: published-key loaders, forwards, descriptions and the FID helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medlsdm.errors import UserError
from medlsdm.evaluation.features import (
    DomainFeatures,
    FeatureExtractor,
    InceptionFID2D,
    MedicalNet3D,
    fid_2d,
    fid_3d,
    load_extractor,
)
from medlsdm.evaluation.inception import InceptionV3FID
from medlsdm.evaluation.medicalnet import MedicalNetResNet
from medlsdm.io import file_sha256

# (key, shape) pairs of the published files, from pytorch-fid's / MedicalNet's architectures
INCEPTION_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_4a_3x3.bn.running_mean": (192,),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
    "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "fc.weight": (1008, 2048),
}
MEDICALNET10_KEYS = {
    "conv1.weight": (64, 1, 7, 7, 7),
    "layer1.0.conv1.weight": (64, 64, 3, 3, 3),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1, 1),
    "layer4.0.bn2.running_var": (512,),
}


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory):
    """A file shaped like pytorch-fid's: a plain state dict without BatchNorm's num_batches_tracked."""
    net = InceptionV3FID()
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("w") / "pt_inception.pth"
    torch.save(state, path)
    return path, state


def test_inception_has_the_published_keys_and_loads_them(inception_file, tmp_path):
    path, state = inception_file
    for key, shape in INCEPTION_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    ex = load_extractor("inception", str(path))
    assert isinstance(ex, InceptionFID2D) and ex.pretrained and ex.spatial_dims == 2
    assert torch.equal(ex.net.Mixed_6e.branch7x7dbl_5.conv.weight, state["Mixed_6e.branch7x7dbl_5.conv.weight"])
    assert ex.describe() == {"name": ex.name, "weights": str(path), "sha256": file_sha256(path), "pretrained": True}

    renamed = dict(state)
    renamed["Mixed_5b.branch1x1.conv.weightX"] = renamed.pop("Mixed_5b.branch1x1.conv.weight")
    bad = tmp_path / "renamed.pth"
    torch.save(renamed, bad)
    with pytest.raises(UserError, match=r"renamed\.pth.*missing.*Mixed_5b\.branch1x1\.conv\.weight"):
        load_extractor("inception", str(bad))
    tv_head = dict(state, **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})  # torchvision's
    torch.save(tv_head, bad)
    with pytest.raises(UserError, match="another shape"):
        load_extractor("inception", str(bad))
    with pytest.raises(UserError, match="not found"):
        load_extractor("inception", str(tmp_path / "absent.pth"))


def test_inception_forward_on_two_slices(inception_file):
    ex = InceptionFID2D(inception_file[0])
    slices = torch.rand(2, 1, 20, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    f = ex.features(slices)
    assert f.shape == (2, 2048) and f.dtype == torch.float32 and torch.isfinite(f).all()
    assert (f >= 0).all()  # average of ReLU outputs
    assert not torch.allclose(f[0], f[1], rtol=1e-3, atol=0.0)  # random weights give tiny features: compare relatively


def test_inception_uses_the_fid_variant_pooling():
    from medlsdm.evaluation.inception import _avg_pool_tf

    # TensorFlow's average pool ignores padded zeros: a constant image stays constant at the border
    assert torch.equal(_avg_pool_tf(torch.ones(1, 1, 5, 5)), torch.ones(1, 1, 5, 5))
    net = InceptionV3FID()
    assert net.Mixed_7c.max_pool and not net.Mixed_7b.max_pool  # only Mixed_7c max-pools in the FID graph


def test_random_inception_is_named_and_reproducible(monkeypatch, tmp_path):
    a, b = load_extractor("random-inception"), load_extractor("random-inception")
    assert a.name == "InceptionV3 (random init, NOT pretrained)" and not a.pretrained
    assert a.weights_sha256 == b.weights_sha256 and a.describe()["weights"] is None
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached pytorch-fid file there
    with pytest.raises(UserError, match="pt_inception-2015-12-05-6726825d.pth"):
        load_extractor("inception", None)


def _medicalnet_file(tmp_path, depth: int, rename: bool = False):
    state = {f"module.{k}": v for k, v in MedicalNetResNet(depth).state_dict().items()}
    if rename:
        state["module.layer1.0.conv1.wt"] = state.pop("module.layer1.0.conv1.weight")
    path = tmp_path / f"resnet_{depth}{'_bad' if rename else ''}.pth"
    torch.save({"state_dict": state}, path)
    return path


def test_medicalnet_loader_and_features(tmp_path):
    net10 = MedicalNetResNet(10).state_dict()
    for key, shape in MEDICALNET10_KEYS.items():
        assert tuple(net10[key].shape) == shape, key
    assert not any("downsample" in k for k in MedicalNetResNet(18).state_dict())  # shortcut A: no weights

    path = _medicalnet_file(tmp_path, 10)
    ex = load_extractor("medicalnet", str(path), depth=10)
    assert isinstance(ex, MedicalNet3D) and ex.pretrained and ex.weights_sha256 == file_sha256(path)
    vols = torch.rand(2, 1, 16, 24, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert ex.feature_map(vols).shape == (2, 512, 2, 3, 3)  # overall stride 8 (dilated layer3/4)
    f = ex.features(vols)
    assert f.shape == (2, 512) and torch.isfinite(f).all()
    # per-volume z-scoring: a global contrast/brightness change gives the same features
    assert torch.allclose(ex.features(0.5 * vols + 0.2), f, atol=1e-4)
    with pytest.raises(UserError, match="slice-wise FID needs a 2D feature extractor"):
        fid_2d(vols, vols, ex, "coronal")  # its deepest map has a few slabs per axis, not one feature per slice

    with pytest.raises(UserError, match=r"resnet_10_bad\.pth.*missing.*layer1\.0\.conv1\.weight"):
        load_extractor("medicalnet", str(_medicalnet_file(tmp_path, 10, rename=True)), depth=10)
    with pytest.raises(UserError, match="resnet_18.pth"):  # another depth's file
        load_extractor("medicalnet", str(_medicalnet_file(tmp_path, 18)), depth=10)
    with pytest.raises(UserError):
        load_extractor("medicalnet", None)


class _TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(1, 4, 3, stride=2, padding=1)
        self.b = nn.Conv3d(4, 6, 3, stride=2, padding=1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return [h, self.b(h)]  # skip list, deepest last


class _TinySlices(FeatureExtractor):
    """A cheap 2D extractor: one conv, globally average-pooled, per slice."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(nn.Conv2d(1, 4, 3, padding=1), "tiny 2D", False)

    @torch.no_grad()
    def features(self, batch):
        return torch.tanh(self.net(batch.float())).mean(dim=(2, 3))


def test_domain_features_and_fid_helpers():
    torch.manual_seed(0)
    enc = _TinyEncoder()
    ex = load_extractor("domain", encoder=enc)
    assert isinstance(ex, DomainFeatures) and ex.spatial_dims == 3
    sha = ex.weights_sha256
    with torch.no_grad():
        enc.b.weight.add_(1.0)
    assert DomainFeatures(enc).weights_sha256 != sha  # the hash follows the weights

    gen = torch.Generator().manual_seed(2)
    real = torch.rand(6, 1, 8, 8, 8, generator=gen) * 2 - 1
    assert ex.features(real).shape == (6, 6)
    assert fid_3d(real, list(real), ex) < 1e-6  # a tensor and a list of (1, D, H, W) volumes agree
    near = fid_3d(real, real + 0.05 * torch.randn(real.shape, generator=gen), ex)
    far = fid_3d(real, (real + 0.8).clamp(-1, 1), ex)
    assert 0 < near < far
    with pytest.raises(UserError, match="slice-wise FID needs a 2D feature extractor"):
        fid_2d(real, real, ex, "axial")
    slices = _TinySlices()
    assert slices.plane_features(real, "coronal").shape == (6 * 8, 4)  # one vector per slice
    assert fid_2d(real, list(real), slices, "axial") < 1e-6
    assert fid_2d(real, real.flip(2) * 0.3, slices, "sagittal") > 0
    with pytest.raises(UserError, match="3D feature extractor"):
        fid_3d(real, real, load_extractor("random-inception"))
    with pytest.raises(UserError, match="must be one of"):
        load_extractor("resnet")
