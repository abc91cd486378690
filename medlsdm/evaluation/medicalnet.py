"""MedicalNet (Med3D, Chen et al. 2019) 3D ResNet backbone, for 3D feature statistics.

Same modules and parameter names as Tencent's ``models/resnet.py`` (without the segmentation head), so
the published ``resnet_{10,18,34,50}[_23dataset].pth`` files (``{"state_dict": {"module.<key>": ...}}``)
load strictly once the ``module.`` prefix is removed. As in MedicalNet: conv1 7x7x7 stride 2, 3x3x3
max pool stride 2, layer2 stride 2, layer3 and layer4 stride 1 with dilation 2 and 4 (overall stride 8).
Shortcuts follow the published files: type "B" (1x1x1 conv + BN, no bias) for depths 10 and 50,
type "A" (parameter-free: strided subsampling and zero channels) for 18 and 34.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEPTHS = {10: ("basic", (1, 1, 1, 1)), 18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
          50: ("bottleneck", (3, 4, 6, 3))}
SHORTCUT = {10: "B", 18: "A", 34: "A", 50: "B"}


def _conv3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class ZeroPadShortcut(nn.Module):
    """Shortcut "A": subsample by ``stride`` and append zero channels up to ``cout``."""

    def __init__(self, cout: int, stride: int):
        super().__init__()
        self.cout, self.stride = cout, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, 0, 0, self.cout - x.shape[1]))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3(cin, planes, stride, dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = _conv3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class MedicalNetResNet(nn.Module):
    """MedicalNet 3D ResNet-``depth`` encoder. forward(x (B, 1, D, H, W)) -> layer4 map
    (B, C, ~D/8, ~H/8, ~W/8), C = 512 (depth 10/18/34) or 2048 (depth 50)."""

    def __init__(self, depth: int = 10):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"MedicalNet depth must be one of {sorted(DEPTHS)}, got {depth}")
        kind, layers = DEPTHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.shortcut = SHORTCUT[depth]
        self.out_channels = 512 * block.expansion
        self.inplanes = 64
        self.conv1 = nn.Conv3d(1, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.layer1 = self._layer(block, 64, layers[0])
        self.layer2 = self._layer(block, 128, layers[1], stride=2)
        self.layer3 = self._layer(block, 256, layers[2], dilation=2)
        self.layer4 = self._layer(block, 512, layers[3], dilation=4)

    def _layer(self, block: type, planes: int, n: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        cout = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != cout:
            if self.shortcut == "A":
                downsample = ZeroPadShortcut(cout, stride)
            else:
                downsample = nn.Sequential(nn.Conv3d(self.inplanes, cout, 1, stride=stride, bias=False),
                                           nn.BatchNorm3d(cout))
        blocks = [block(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = cout
        blocks += [block(cout, planes, dilation=dilation) for _ in range(1, n)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool3d(x, 3, stride=2, padding=1)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def random_medicalnet(depth: int = 10, seed: int = 0) -> MedicalNetResNet:
    """A randomly initialised MedicalNetResNet, the same for a given seed (He-normal, fan-out, as MedicalNet)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MedicalNetResNet(depth)
        for m in model.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model
