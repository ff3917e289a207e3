"""``build_model(name, ...)`` over the ResNets of the paper, and their timm entry points.

Names: ``resnet{18,34,50,101,152}_v1`` (torchvision's ResNet v1.5) and
``..._v2`` (pre-activation, the authors' ResNetV2SN). In timm (registered on
``import models``) the same names build SN models, and ``<name>_<norm>`` (e.g.
``resnet50_v1_bn``, ``resnet101_v2_ssn``) fix the normalizer; keyword
arguments of ``timm.create_model`` pass through to ``build_model``.
"""
from __future__ import annotations

import difflib
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch.nn as nn

from normalization import get_norm_layer, list_norms

from .resnet_v1 import BasicBlock, Bottleneck, ResNetBase, ResNetV1
from .resnet_v2 import PreActBasicBlock, PreActBottleneck, ResNetV2

__all__ = ["build_model", "list_models", "TIMM_NAMES"]

_DEPTHS: Dict[int, Tuple[bool, Sequence[int]]] = {  # depth -> (bottleneck, blocks per stage)
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
}
_VERSIONS: Dict[str, Tuple[Type[ResNetBase], Type[nn.Module], Type[nn.Module]]] = {
    "v1": (ResNetV1, BasicBlock, Bottleneck),
    "v2": (ResNetV2, PreActBasicBlock, PreActBottleneck),
}
_MODELS: Dict[str, Tuple[Type[ResNetBase], Type[nn.Module], Sequence[int]]] = {
    f"resnet{depth}_{version}": (cls, bottleneck_block if bottleneck else basic_block, layers)
    for version, (cls, basic_block, bottleneck_block) in _VERSIONS.items()
    for depth, (bottleneck, layers) in _DEPTHS.items()
}


def list_models() -> List[str]:
    """The names ``build_model`` accepts."""
    return list(_MODELS)


def build_model(name: str, num_classes: int = 1000, norm: str = "sn",
                norm_kwargs: Optional[dict] = None, *, zero_init_last: bool = True,
                dropout: float = 0.0, stem: str = "imagenet", width: int = 64,
                input_size: Optional[int] = 224, in_chans: int = 3) -> nn.Module:
    """The ResNet ``name`` with normalizer ``norm`` (see ``models.ResNetBase`` for the
    arguments). Unknown names raise ``ValueError`` listing the valid ones."""
    if name not in _MODELS:
        close = difflib.get_close_matches(str(name), _MODELS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; valid names: {', '.join(_MODELS)}")
    cls, block, layers = _MODELS[name]
    return cls(block, layers, num_classes, norm, norm_kwargs, zero_init_last=zero_init_last,
               dropout=dropout, stem=stem, width=width, input_size=input_size,
               in_chans=in_chans)


# -- timm ---------------------------------------------------------------------------
# Arguments timm's create_model passes that mean nothing here when unset.
_TIMM_IGNORED = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_model_args")
_TIMM_UNSUPPORTED = ("features_only", "out_indices", "drop_path_rate", "drop_block_rate",
                     "global_pool")


def _timm_kwargs(name: str, fixed_norm: Optional[str], kwargs: dict) -> dict:
    """create_model's keyword arguments, checked and mapped onto build_model's."""
    for key in _TIMM_IGNORED:
        kwargs.pop(key, None)
    for key in _TIMM_UNSUPPORTED:
        value = kwargs.pop(key, None)
        if value and not (key == "global_pool" and value == "avg"):
            raise ValueError(f"{name}: {key}={value!r} is not supported")
    if "drop_rate" in kwargs:  # timm's name for the classifier dropout
        kwargs.setdefault("dropout", kwargs.pop("drop_rate"))
    if fixed_norm is not None:
        norm = kwargs.setdefault("norm", fixed_norm)
        if get_norm_layer(norm) is not get_norm_layer(fixed_norm):  # aliases such as "BN" pass
            raise ValueError(f"{name} fixes norm={fixed_norm!r}; got norm={norm!r} "
                             f"(use {name[:-len(fixed_norm) - 1]} to choose the norm)")
    return kwargs


def _timm_entrypoint(arch: str, fixed_norm: Optional[str]) -> Callable[..., nn.Module]:
    name = arch if fixed_norm is None else f"{arch}_{fixed_norm}"

    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        if pretrained:
            raise ValueError(f"{name}: no pretrained weights are hosted for timm; use "
                             "pretrained=False and load a checkpoint "
                             "(create_model(..., checkpoint_path=...) or load_state_dict)")
        model = build_model(arch, **_timm_kwargs(name, fixed_norm, kwargs))
        model.pretrained_cfg = model.default_cfg = dict(_timm_cfg(model.num_classes),
                                                        architecture=name)
        return model

    # timm keys its registry on fn.__name__ and looks up sys.modules[fn.__module__].
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    norm_doc = f"norm={fixed_norm!r}" if fixed_norm else "norm='sn' unless given"
    entrypoint.__doc__ = f"timm entry point: models.build_model({arch!r}, {norm_doc}, **kwargs)."
    return entrypoint


def _timm_cfg(num_classes: int = 1000) -> dict:
    return dict(url="", num_classes=num_classes, input_size=(3, 224, 224), pool_size=(7, 7),
                crop_pct=0.875, interpolation="bilinear", mean=(0.485, 0.456, 0.406),
                std=(0.229, 0.224, 0.225), first_conv="conv1", classifier="fc")


def _register_timm() -> List[str]:
    """Register every entry point in timm; skip (with a warning) a name timm already
    has from elsewhere. Returns the registered names."""
    try:
        from timm.models import generate_default_cfgs, is_model, model_entrypoint, register_model
    except ImportError:  # timm is optional for the rest of the package
        return []
    norms = [n for n in list_norms() if n != "none"]
    pairs = [(arch, None) for arch in _MODELS] + [(a, n) for a in _MODELS for n in norms]
    entrypoints = [_timm_entrypoint(arch, norm) for arch, norm in pairs]
    # register_model reads pretrained cfgs from this module's default_cfgs.
    globals()["default_cfgs"] = generate_default_cfgs({fn.__name__: _timm_cfg()
                                                      for fn in entrypoints})
    registered, public = [], list(__all__)
    for fn in entrypoints:
        if is_model(fn.__name__):
            if getattr(model_entrypoint(fn.__name__), "__module__", None) != __name__:
                warnings.warn(f"timm already defines {fn.__name__}; not registering ours",
                              stacklevel=2)
                continue
        else:
            register_model(fn)
        globals()[fn.__name__] = fn
        registered.append(fn.__name__)
    __all__[:] = public  # register_model appends each name; keep star-imports small
    return registered


#: The names registered in timm (``timm.create_model(name, **build_model_kwargs)``).
TIMM_NAMES: List[str] = _register_timm()
