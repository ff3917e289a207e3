"""ResNet v1 (He et al., 2016) with any normalizer: the networks of the paper's Sec. 4.1.

v1 is torchvision's ResNet v1.5 (the stride of a bottleneck sits in its 3x3
conv, as in the authors' ``ResNetV1SN``), with torchvision's attribute names,
so that ``norm="bn"`` gives exactly the state_dict of
``torchvision.models.resnet*`` and its weights load unchanged.

``ResNetBase`` holds what v1 and v2 (``resnet_v2.py``) share: the stem, the
stages, the head, the initialisation, and the paper's practice 5 of Table 11
("do not put SN after global pooling when the feature map is 1x1"): every norm
position whose feature map would be 1x1 at the training crop ``input_size``
is built with BN instead of an SN-family norm.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Type

import torch.nn as nn
from torch import Tensor

from normalization import SWITCH_LAYERS, get_norm_layer

__all__ = ["ResNetBase", "ResNetV1", "BasicBlock", "Bottleneck", "conv1x1", "conv3x3", "STEMS"]

NormLayer = Callable[[int], nn.Module]

#: ``imagenet``: 7x7 stride-2 conv and 3x3 stride-2 max-pool; ``small``: one 3x3
#: stride-1 conv and no pooling, for 32-64 px images.
STEMS = ("imagenet", "small")

# Arguments of the SN family that BN also takes, kept when practice 5 swaps SN for BN.
# (SN's momentum follows the authors' opposite convention, so it is not carried over.)
_BN_KWARGS = ("ghost_batch_size", "eps")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


def _downsampled(size: int, stride: int) -> int:
    """Output size of our strided convs and pools (3x3/pad 1, 1x1/pad 0, 7x7/pad 3)."""
    return (size - 1) // stride + 1


class BasicBlock(nn.Module):
    """Two 3x3 convs; ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def norm_strides(self) -> Dict[str, int]:
        """Each norm's name and the stride of its input relative to the block input."""
        strides = {"bn1": self.stride, "bn2": self.stride}
        if self.downsample is not None:
            strides["downsample.1"] = self.stride
        return strides

    def zero_init_last(self):
        """gamma = 0 in the last norm: the block starts as ``relu(shortcut(x))``."""
        _zero_weight(self.bn2)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand by 4, each followed by a norm."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def norm_strides(self) -> Dict[str, int]:
        strides = {"bn1": 1, "bn2": self.stride, "bn3": self.stride}
        if self.downsample is not None:
            strides["downsample.1"] = self.stride
        return strides

    def zero_init_last(self):
        _zero_weight(self.bn3)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


def _zero_weight(norm: nn.Module):
    """Zero a norm's gamma; a norm without one (``none``) is left as it is."""
    weight = getattr(norm, "weight", None)
    if isinstance(weight, nn.Parameter):
        nn.init.zeros_(weight)


class ResNetBase(nn.Module):
    """Stem, four stages, global average pooling, dropout and a linear classifier.

    Subclasses set ``final_norm`` (a norm + ReLU after the last stage, v2) and
    ``_make_downsample``. The norm is resolved once here; blocks only call
    ``norm_layer(channels)``.

    Args:
        block: the residual block class (``expansion`` 1 or 4).
        layers: number of blocks in each of the four stages.
        num_classes: outputs of ``fc``.
        norm, norm_kwargs: a name of ``normalization.list_norms()`` and its arguments.
        zero_init_last: call every block's ``zero_init_last()`` (each starts as its shortcut).
        dropout: probability of the dropout before ``fc`` (paper Table 11, practice 3).
        stem: ``"imagenet"`` or ``"small"`` (see ``STEMS``).
        width: channels of the stem and of the first stage (64 as in the paper);
            the stages have ``width * (1, 2, 4, 8) * expansion`` output channels.
        input_size: the training crop; norm positions with a 1x1 feature map at
            this size get BN instead of SN (practice 5). None: no replacement.
        in_chans: input channels.
    """

    final_norm = False

    def __init__(self, block: Type[nn.Module], layers: Sequence[int], num_classes: int = 1000,
                 norm: str = "sn", norm_kwargs: Optional[dict] = None, *,
                 zero_init_last: bool = True, dropout: float = 0.0, stem: str = "imagenet",
                 width: int = 64, input_size: Optional[int] = 224, in_chans: int = 3):
        super().__init__()
        norm_kwargs = dict(norm_kwargs or {})
        _check_args(layers, stem, width, dropout, norm_kwargs)
        norm_layer = get_norm_layer(norm, **norm_kwargs)
        self.norm_name, self.norm_kwargs = norm, norm_kwargs
        self.stem, self.num_classes = stem, num_classes
        self.inplanes = width

        small = stem == "small"
        self.conv1 = (conv3x3(in_chans, width) if small else
                      nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False))
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small else nn.MaxPool2d(3, stride=2, padding=1)
        for i, blocks in enumerate(layers):
            stage = self._make_layer(block, width * 2 ** i, blocks, 1 if i == 0 else 2, norm_layer)
            self.add_module(f"layer{i + 1}", stage)
        self.num_features = self.inplanes
        if self.final_norm:
            self.bn_out = norm_layer(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(self.num_features, num_classes)

        self.norm_overrides: List[str] = self._no_sn_on_1x1(input_size)
        self.init_weights(zero_init_last)

    # -- construction ---------------------------------------------------------------
    def _make_downsample(self, inplanes: int, outplanes: int, stride: int,
                         norm_layer: NormLayer) -> nn.Module:
        raise NotImplementedError

    def _make_layer(self, block: Type[nn.Module], planes: int, blocks: int, stride: int,
                    norm_layer: NormLayer) -> nn.Sequential:
        outplanes = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != outplanes:
            downsample = self._make_downsample(self.inplanes, outplanes, stride, norm_layer)
        stage = [block(self.inplanes, planes, stride, downsample, norm_layer=norm_layer)]
        self.inplanes = outplanes
        stage += [block(outplanes, planes, norm_layer=norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def blocks(self) -> List[nn.Module]:
        """The residual blocks, in order."""
        return [b for i in range(1, 5) for b in getattr(self, f"layer{i}")]

    def norm_sizes(self, input_size: int) -> Dict[str, int]:
        """The name of every norm and the side of its (square) input at an
        ``input_size`` crop, derived from the strides of the architecture."""
        imagenet = self.stem == "imagenet"
        size = _downsampled(input_size, 2) if imagenet else input_size
        sizes = {"bn1": size}
        size = _downsampled(size, 2) if imagenet else size
        for i in range(1, 5):
            for j, block in enumerate(getattr(self, f"layer{i}")):
                for name, stride in block.norm_strides().items():
                    sizes[f"layer{i}.{j}.{name}"] = _downsampled(size, stride)
                size = _downsampled(size, block.stride)
        if self.final_norm:
            sizes["bn_out"] = size
        return sizes

    def norm_names(self) -> List[str]:
        """Module names of all normalization layers (built by ``norm_layer``)."""
        return list(self.norm_sizes(224))

    def _no_sn_on_1x1(self, input_size: Optional[int]) -> List[str]:
        """Paper Table 11, practice 5: IN and LN are degenerate on a 1x1 map, so
        SN-family norms there are replaced by BN. Returns the replaced names."""
        if input_size is None:
            return []
        bn_kwargs = {k: v for k, v in self.norm_kwargs.items() if k in _BN_KWARGS}
        # a synchronised SN keeps its statistics synchronised as SyncBN
        bn_layer = get_norm_layer("syncbn" if self.norm_name == "syncsn" else "bn", **bn_kwargs)
        replaced = []
        for name, size in self.norm_sizes(int(input_size)).items():
            module = self.get_submodule(name)
            if size == 1 and isinstance(module, SWITCH_LAYERS):
                self.set_submodule(name, bn_layer(module.num_features))
                replaced.append(name)
        return replaced

    def init_weights(self, zero_init_last: bool = True):
        """Kaiming-normal convs (fan_out); every norm by its own ``reset_parameters()``;
        then, optionally, each block's ``zero_init_last()``."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for name in self.norm_names():
            reset = getattr(self.get_submodule(name), "reset_parameters", None)
            if reset is not None:  # ``none`` has nothing to reset
                reset()
        if zero_init_last:
            for block in self.blocks():
                block.zero_init_last()

    # -- timm-style interface --------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int):
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.final_norm:
            x = self.relu(self.bn_out(x))
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.dropout(self.avgpool(x).flatten(1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _check_args(layers: Sequence[int], stem: str, width: int, dropout: float, norm_kwargs: dict):
    if len(layers) != 4 or any(int(n) < 1 for n in layers):
        raise ValueError(f"layers must be 4 positive block counts, got {list(layers)}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; valid stems: {', '.join(STEMS)}")
    if int(width) < 1:
        raise ValueError(f"width must be a positive number of channels, got {width}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if norm_kwargs.get("last_gamma"):
        raise ValueError("norm_kwargs last_gamma=True would zero the gamma of every norm; "
                         "use zero_init_last=True (each block's last norm only)")


class ResNetV1(ResNetBase):
    """ResNet v1.5 with any normalizer; torchvision's layout and state_dict keys.

    The shortcut of a block that changes shape is ``Sequential(conv1x1, norm)``
    (keys ``downsample.0.weight``, ``downsample.1.*``).
    """

    def _make_downsample(self, inplanes: int, outplanes: int, stride: int,
                         norm_layer: NormLayer) -> nn.Module:
        return nn.Sequential(conv1x1(inplanes, outplanes, stride), norm_layer(outplanes))
