"""ResNet v1 and v2 (18/34/50/101/152) with any normalizer of ``normalization``.

``build_model(name, num_classes, norm, norm_kwargs, ...)`` builds them by name
(``list_models()``); importing this package also registers them in timm
(``TIMM_NAMES``), so ``timm.create_model("resnet50_v1_sn")`` works, with timm's
model API (``features_only``, ``forward_intermediates``, ``num_classes=0``,
``global_pool``, ``set_grad_checkpointing``, fx feature extraction through the
norm layers registered as leaves, ``FX_LEAF_MODULES``).
``load_model(path)`` rebuilds a model from a checkpoint (ours or the authors').
"""
from .checkpoint import load_model
from .layers import POOL_TYPES, DropPath, GlobalPool2d
from .registry import FX_LEAF_MODULES, TIMM_NAMES, build_model, list_models
from .resnet_v1 import STEM_POOLS, STEMS, BasicBlock, Bottleneck, ResNetBase, ResNetV1
from .resnet_v2 import PreActBasicBlock, PreActBottleneck, ResNetV2

__all__ = [
    "build_model", "list_models", "load_model", "TIMM_NAMES", "FX_LEAF_MODULES",
    "ResNetBase", "ResNetV1", "ResNetV2",
    "BasicBlock", "Bottleneck", "PreActBasicBlock", "PreActBottleneck",
    "GlobalPool2d", "DropPath", "POOL_TYPES", "STEMS", "STEM_POOLS",
]
