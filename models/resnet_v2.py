"""Pre-activation ResNet v2 (He et al., ECCV 2016) with any normalizer, as the
authors' ``ResNetV2SN`` (their ResNet50v2+SN and ResNet101v2+SN of the model zoo).

Each block normalizes and activates its input first (``preact``); a block that
changes shape takes its shortcut from ``preact`` through a bare 1x1 conv. The
stem is conv -> norm -> ReLU -> max-pool, and after the last stage a final
norm ``bn_out`` and a ReLU (``relu_out``) precede the pooling. As in timm's
pre-activation ResNetV2, the stage features of ``features_only`` and
``forward_intermediates`` are the raw stage outputs; ``norm=True`` passes the
last one through ``bn_out`` and ``relu_out``.

The authors call the norms ``sn1``/``sn2``/``sn3``/``sn_out``; here they are
``bn1``/``bn2``/``bn3``/``bn_out`` (torchvision's names), so their checkpoints
load after a plain rename.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .resnet_v1 import NormLayer, ResNetBase, conv1x1, conv3x3, make_drop_path

__all__ = ["ResNetV2", "PreActBasicBlock", "PreActBottleneck"]


class PreActBasicBlock(nn.Module):
    """``conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut``."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, norm_layer: NormLayer = nn.BatchNorm2d,
                 drop_path: float = 0.0):
        super().__init__()
        self.bn1 = norm_layer(inplanes)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.drop_path = make_drop_path(drop_path)

    def norm_strides(self) -> Dict[str, int]:
        """Each norm's name and the stride of its input relative to the block input."""
        return {"bn1": 1, "bn2": self.stride}

    def zero_init_last(self):
        """The last op is a conv: zero it, so the block starts as its shortcut."""
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: Tensor) -> Tensor:
        preact = F.relu(self.bn1(x))  # not in place: with norm 'none', bn1(x) is x
        shortcut = x if self.downsample is None else self.downsample(preact)
        out = self.conv1(preact)
        out = self.conv2(self.relu(self.bn2(out)))
        if self.drop_path is not None:
            out = self.drop_path(out)
        return out + shortcut


class PreActBottleneck(nn.Module):
    """Pre-activation 1x1 reduce, 3x3 (strided), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, norm_layer: NormLayer = nn.BatchNorm2d,
                 drop_path: float = 0.0):
        super().__init__()
        self.bn1 = norm_layer(inplanes)
        self.conv1 = conv1x1(inplanes, planes)
        self.bn2 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = norm_layer(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.drop_path = make_drop_path(drop_path)

    def norm_strides(self) -> Dict[str, int]:
        return {"bn1": 1, "bn2": 1, "bn3": self.stride}

    def zero_init_last(self):
        nn.init.zeros_(self.conv3.weight)

    def forward(self, x: Tensor) -> Tensor:
        preact = F.relu(self.bn1(x))  # not in place: with norm 'none', bn1(x) is x
        shortcut = x if self.downsample is None else self.downsample(preact)
        out = self.conv1(preact)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        if self.drop_path is not None:
            out = self.drop_path(out)
        return out + shortcut


class ResNetV2(ResNetBase):
    """Pre-activation ResNet; arguments as ``ResNetBase``. The shortcut of a block
    that changes shape is a bare 1x1 conv (key ``downsample.weight``)."""

    final_norm = True

    def _make_downsample(self, inplanes: int, outplanes: int, stride: int,
                         norm_layer: NormLayer) -> nn.Module:
        return conv1x1(inplanes, outplanes, stride)
