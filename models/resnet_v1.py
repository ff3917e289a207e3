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

``ResNetBase`` also carries timm's model API (that of ``timm/models/resnet.py``):
``feature_info``, ``forward_intermediates``, ``prune_intermediate_layers``,
``global_pool`` / ``num_classes=0`` / ``reset_classifier``, ``head_hidden_size``,
``set_grad_checkpointing``, ``group_matcher`` and stochastic depth
(``drop_path_rate``, off by default so the paper's recipes are unchanged).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
from torch import Tensor

from normalization import SWITCH_LAYERS, get_norm_layer

from .layers import DropPath, GlobalPool2d, checkpoint_blocks, drop_path_rates, take_indices

__all__ = ["ResNetBase", "ResNetV1", "BasicBlock", "Bottleneck", "conv1x1", "conv3x3", "STEMS",
           "STEM_POOLS", "make_stem_pool", "make_drop_path"]

NormLayer = Callable[[int], nn.Module]

#: ``imagenet``: 7x7 stride-2 conv and 3x3 stride-2 max-pool; ``small``: one 3x3
#: stride-1 conv and no pooling, for 32-64 px images.
STEMS = ("imagenet", "small")

#: The ``imagenet`` stem's 3x3 stride-2 max-pool: ``torchvision`` pads by 1 (torchvision's
#: ResNet, the authors' ResNetV1SN/V2SN); ``ceil`` has no padding and rounds the output size
#: up, as the authors' ResNetV1SSN (Sparse_SwitchNorm, ``models/resnet_v1_ssn.py``) and
#: Caffe's pooling. Same output size at 224 px; most pooled values differ.
STEM_POOLS = ("torchvision", "ceil")

# Arguments of the SN family that BN also takes, kept when practice 5 swaps SN for BN.
# (SN's momentum follows the authors' opposite convention, so it is not carried over.)
_BN_KWARGS = ("ghost_batch_size", "eps")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


def make_drop_path(drop_prob: float) -> Optional[DropPath]:
    """A block's stochastic depth on its residual branch; None (no module, no graph node)
    at probability 0, so models built without it are unchanged."""
    return DropPath(drop_prob) if drop_prob > 0 else None


def _downsampled(size: int, stride: int) -> int:
    """Output size of our strided convs and pools (3x3/pad 1, 1x1/pad 0, 7x7/pad 3)."""
    return (size - 1) // stride + 1


def _ceil_pooled(size: int) -> int:
    """Output size of the ``ceil`` stem pool (3x3, stride 2, no padding, ceil mode)."""
    return (size - 2) // 2 + 1


def make_stem_pool(stem: str = "imagenet", stem_pool: str = "torchvision") -> nn.Module:
    """The stem's max-pool (see ``STEM_POOLS``); the ``small`` stem has none."""
    if stem == "small":
        return nn.Identity()
    if stem_pool == "ceil":
        return nn.MaxPool2d(3, stride=2, padding=0, ceil_mode=True)
    return nn.MaxPool2d(3, stride=2, padding=1)


class BasicBlock(nn.Module):
    """Two 3x3 convs; ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, norm_layer: NormLayer = nn.BatchNorm2d,
                 drop_path: float = 0.0):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self.drop_path = make_drop_path(drop_path)

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
        if self.drop_path is not None:
            out = self.drop_path(out)
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand by 4, each followed by a norm."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, norm_layer: NormLayer = nn.BatchNorm2d,
                 drop_path: float = 0.0):
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
        self.drop_path = make_drop_path(drop_path)

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
        if self.drop_path is not None:
            out = self.drop_path(out)
        return self.relu(out + shortcut)


def _zero_weight(norm: nn.Module):
    """Zero a norm's gamma; a norm without one (``none``) is left as it is."""
    weight = getattr(norm, "weight", None)
    if isinstance(weight, nn.Parameter):
        nn.init.zeros_(weight)


class ResNetBase(nn.Module):
    """Stem, four stages, global pooling, dropout and a linear classifier.

    Subclasses set ``final_norm`` (a norm + ReLU after the last stage, v2) and
    ``_make_downsample``. The norm is resolved once here; blocks only call
    ``norm_layer(channels)``.

    Args:
        block: the residual block class (``expansion`` 1 or 4).
        layers: number of blocks in each of the four stages.
        num_classes: outputs of ``fc``; 0: no classifier, the model returns the
            pooled features (``head_hidden_size`` of them), as in timm.
        norm, norm_kwargs: a name of ``normalization.list_norms()`` and its arguments.
        zero_init_last: call every block's ``zero_init_last()`` (each starts as its shortcut).
        dropout: probability of the dropout before ``fc`` (paper Table 11, practice 3).
        stem: ``"imagenet"`` or ``"small"`` (see ``STEMS``).
        stem_pool: the ``imagenet`` stem's max-pool, ``"torchvision"`` (padding 1) or
            ``"ceil"`` (no padding, ceil mode: the authors' ResNetV1SSN); see ``STEM_POOLS``.
        width: channels of the stem and of the first stage (64 as in the paper);
            the stages have ``width * (1, 2, 4, 8) * expansion`` output channels.
        input_size: the training crop; norm positions with a 1x1 feature map at
            this size get BN instead of SN (practice 5). None: no replacement.
        in_chans: input channels.
        global_pool: ``'avg'`` (the paper), ``'max'``, ``'avgmax'``, ``'catavgmax'``,
            or ``''`` (no pooling; needs ``num_classes=0``).
        drop_path_rate: stochastic depth of the last block (linear decay from 0 over
            the blocks, as timm); 0, the default, builds no drop-path module at all.
    """

    final_norm = False

    def __init__(self, block: Type[nn.Module], layers: Sequence[int], num_classes: int = 1000,
                 norm: str = "sn", norm_kwargs: Optional[dict] = None, *,
                 zero_init_last: bool = True, dropout: float = 0.0, stem: str = "imagenet",
                 width: int = 64, input_size: Optional[int] = 224, in_chans: int = 3,
                 global_pool: str = "avg", drop_path_rate: float = 0.0,
                 stem_pool: str = "torchvision"):
        super().__init__()
        norm_kwargs = dict(norm_kwargs or {})
        _check_args(layers, stem, width, dropout, norm_kwargs)
        _check_stem_pool(stem, stem_pool)
        norm_layer = get_norm_layer(norm, **norm_kwargs)
        self.norm_name, self.norm_kwargs = norm, norm_kwargs
        self.stem, self.stem_pool, self.num_classes = stem, stem_pool, num_classes
        self.inplanes = width
        self.grad_checkpointing = False

        small = stem == "small"
        self.conv1 = (conv3x3(in_chans, width) if small else
                      nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False))
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = make_stem_pool(stem, stem_pool)
        rates = iter(drop_path_rates(drop_path_rate, sum(int(n) for n in layers)))
        for i, blocks in enumerate(layers):
            stage = self._make_layer(block, width * 2 ** i, blocks, 1 if i == 0 else 2,
                                     norm_layer, [next(rates) for _ in range(blocks)])
            self.add_module(f"layer{i + 1}", stage)
        self.num_features = self.inplanes
        self.feature_info = self._feature_info(width)
        if self.final_norm:
            self.bn_out = norm_layer(self.num_features)
            self.relu_out = nn.ReLU()  # not in place: with norm 'none', bn_out(x) is x
        self.global_pool, fc, self.head_hidden_size = self._make_head(num_classes, global_pool)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = fc

        self.norm_overrides: List[str] = self._no_sn_on_1x1(input_size)
        self.init_weights(zero_init_last)

    # -- construction ---------------------------------------------------------------
    def _make_downsample(self, inplanes: int, outplanes: int, stride: int,
                         norm_layer: NormLayer) -> nn.Module:
        raise NotImplementedError

    def _make_layer(self, block: Type[nn.Module], planes: int, blocks: int, stride: int,
                    norm_layer: NormLayer, drop_paths: Sequence[float]) -> nn.Sequential:
        outplanes = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != outplanes:
            downsample = self._make_downsample(self.inplanes, outplanes, stride, norm_layer)
        stage = [block(self.inplanes, planes, stride, downsample, norm_layer=norm_layer,
                       drop_path=drop_paths[0])]
        self.inplanes = outplanes
        stage += [block(outplanes, planes, norm_layer=norm_layer, drop_path=drop_paths[j])
                  for j in range(1, blocks)]
        return nn.Sequential(*stage)

    def _feature_info(self, width: int) -> List[dict]:
        """timm's ``feature_info``: the stem (after its ReLU, before the max-pool) and the
        output of each stage, with channels and reduction (stride) from the input."""
        reduction = 2 if self.stem == "imagenet" else 1
        info = [dict(num_chs=width, reduction=reduction, module="relu")]
        reduction *= 2 if self.stem == "imagenet" else 1  # the stem's max-pool
        for i in range(1, 5):
            stage = getattr(self, f"layer{i}")
            reduction *= stage[0].stride
            info.append(dict(num_chs=self._stage_channels(stage), reduction=reduction,
                             module=f"layer{i}"))
        return info

    @staticmethod
    def _stage_channels(stage: nn.Sequential) -> int:
        last = stage[-1]
        return (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels

    def _make_head(self, num_classes: int, global_pool: str) -> Tuple[nn.Module, nn.Module, int]:
        """Global pooling and classifier as timm's ``create_classifier``; returns them and
        the width of the pooled features (``head_hidden_size``)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: no classifier), "
                             f"got {num_classes!r}")
        pool = GlobalPool2d(global_pool)
        if pool.is_identity() and num_classes > 0:
            raise ValueError(f"global_pool='' (no pooling) returns feature maps: it needs "
                             f"num_classes=0, got num_classes={num_classes}")
        hidden = self.num_features * pool.feat_mult()
        fc = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()
        return pool, fc, hidden

    def blocks(self) -> List[nn.Module]:
        """The residual blocks, in order."""
        return [b for i in range(1, 5) for b in getattr(self, f"layer{i}")]

    def norm_sizes(self, input_size: int) -> Dict[str, int]:
        """The name of every norm and the side of its (square) input at an
        ``input_size`` crop, derived from the strides of the architecture."""
        imagenet = self.stem == "imagenet"
        size = _downsampled(input_size, 2) if imagenet else input_size
        sizes = {"bn1": size}
        if imagenet:
            size = _ceil_pooled(size) if self.stem_pool == "ceil" else _downsampled(size, 2)
        for i in range(1, 5):
            for j, block in enumerate(getattr(self, f"layer{i}")):
                for name, stride in block.norm_strides().items():
                    sizes[f"layer{i}.{j}.{name}"] = _downsampled(size, stride)
                size = _downsampled(size, block.stride)
        if self.final_norm and not isinstance(self.bn_out, nn.Identity):  # not pruned
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

    # -- timm's model API (timm/models/resnet.py) ------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, object]:
        """Parameter groups for timm's layer-wise optimizers (``group_parameters``, layer
        decay): the stem, then each block (``coarse``: each stage), v2's ``bn_out`` joining
        the last one (timm's ``(99999,)`` suffix, as its ResNetV2); the classifier,
        unmatched, comes last."""
        stem = r"^(?:conv1|bn1)\."  # no capture group: timm sorts groups by the captures
        blocks = r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"
        if self.final_norm:
            return dict(stem=stem, blocks=[(blocks, None), (r"^bn_out\.", (99999,))])
        return dict(stem=stem, blocks=blocks)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        """Checkpoint every residual block (``models.layers.checkpoint_blocks``) in
        ``forward_features`` and ``forward_intermediates`` while gradients are recorded."""
        self.grad_checkpointing = bool(enable)

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """A new classifier of ``num_classes`` outputs (0: none) after ``global_pool``
        (None: keep the current pooling), on the model's device and dtype, as timm."""
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        pool, fc, hidden = self._make_head(num_classes, global_pool)
        fc.to(device=self.conv1.weight.device, dtype=self.conv1.weight.dtype)
        self.global_pool, self.fc = pool.train(self.training), fc.train(self.training)
        self.num_classes, self.head_hidden_size = num_classes, hidden

    def _stem(self, x: Tensor) -> Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def _stage(self, i: int, x: Tensor) -> Tensor:
        stage = getattr(self, f"layer{i}")
        if self.grad_checkpointing and torch.is_grad_enabled() \
                and not isinstance(x, torch.fx.Proxy) and not torch.jit.is_scripting():
            return checkpoint_blocks(stage, x)
        return stage(x)

    def _final(self, x: Tensor) -> Tensor:
        """v2's final norm and ReLU after the last stage; nothing for v1."""
        return self.relu_out(self.bn_out(x)) if self.final_norm else x

    def forward_intermediates(
            self, x: Tensor, indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
            intermediates_only: bool = False) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """timm's ``forward_intermediates``: the features ``indices`` selects among the 5 of
        ``feature_info`` (stem, layer1..4; see ``layers.take_indices``), and unless
        ``intermediates_only`` the output of ``forward_features`` too. ``norm``: the last
        stage's feature goes through v2's final norm + ReLU. ``stop_early``: stages after
        the last selected one are skipped, and the features returned are those where it
        stopped."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, max_index = take_indices(len(self.feature_info), indices)
        intermediates = []
        x = self._stem(x)
        if 0 in take:
            intermediates.append(x)
        x = self.maxpool(x)
        last = max_index if stop_early else 4
        for i in range(1, last + 1):
            x = self._stage(i, x)
            if i == 4 and (norm or not intermediates_only):
                final = self._final(x)  # computed once: its norm may update running stats
                x, raw = final, x
                if i in take:
                    intermediates.append(final if norm else raw)
            elif i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1,
                                  prune_norm: bool = False, prune_head: bool = True) -> List[int]:
        """timm's pruning for a feature backbone: stages after the last index in
        ``indices`` become empty, v2's final norm goes when it is not needed (``prune_norm``
        or a truncated network), and the head is removed (``reset_classifier(0, '')``)
        when ``prune_head`` or truncated. Returns the absolute indices."""
        take, max_index = take_indices(len(self.feature_info), indices)
        for i in range(max_index + 1, 5):
            setattr(self, f"layer{i}", nn.Sequential())
        if max_index == 0:
            self.maxpool = nn.Identity()
        truncated = max_index < 4
        if self.final_norm and (prune_norm or truncated):
            self.bn_out, self.relu_out = nn.Identity(), nn.Identity()
        if truncated:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or truncated:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self._stem(x))
        for i in range(1, 5):
            x = self._stage(i, x)
        return self._final(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.dropout(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _check_stem_pool(stem: str, stem_pool: str):
    if stem_pool not in STEM_POOLS:
        raise ValueError(f"unknown stem_pool {stem_pool!r}; valid: {', '.join(STEM_POOLS)}")
    if stem == "small" and stem_pool != "torchvision":
        raise ValueError(f"stem_pool={stem_pool!r} needs stem='imagenet' (the small stem has "
                         "no pooling)")


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
