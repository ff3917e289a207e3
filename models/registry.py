"""``build_model(name, ...)`` over the ResNets of the paper, and their timm entry points.

Names: ``resnet{18,34,50,101,152}_v1`` (torchvision's ResNet v1.5) and
``..._v2`` (pre-activation, the authors' ResNetV2SN). In timm (registered on
``import models``) the same names build SN models, and ``<name>_<norm>`` (e.g.
``resnet50_v1_bn``, ``resnet101_v2_ssn``) fix the normalizer; keyword
arguments of ``timm.create_model`` pass through to ``build_model``. They are
built by timm's ``build_model_with_cfg``, so ``features_only``, ``out_indices``
and ``feature_cls`` work as for timm's own models, and ``pretrained=True`` loads
a local checkpoint (``pretrained_cfg_overlay=dict(file=PATH)``) through our
converter. Our normalization layers are registered as timm fx leaf modules.
"""
from __future__ import annotations

import difflib
import functools
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Type

import torch.nn as nn
from torch import Tensor

from normalization import get_norm_layer, list_norms

from .resnet_v1 import BasicBlock, Bottleneck, ResNetBase, ResNetV1
from .resnet_v2 import PreActBasicBlock, PreActBottleneck, ResNetV2

__all__ = ["build_model", "list_models", "TIMM_NAMES", "FX_LEAF_MODULES"]

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
                input_size: Optional[int] = 224, in_chans: int = 3, global_pool: str = "avg",
                drop_path_rate: float = 0.0, stem_pool: str = "torchvision") -> nn.Module:
    """The ResNet ``name`` with normalizer ``norm`` (see ``models.ResNetBase`` for the
    arguments). Unknown names raise ``ValueError`` listing the valid ones."""
    if name not in _MODELS:
        close = difflib.get_close_matches(str(name), _MODELS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; valid names: {', '.join(_MODELS)}")
    cls, block, layers = _MODELS[name]
    return cls(block, layers, num_classes, norm, norm_kwargs, zero_init_last=zero_init_last,
               dropout=dropout, stem=stem, width=width, input_size=input_size,
               in_chans=in_chans, global_pool=global_pool, drop_path_rate=drop_path_rate,
               stem_pool=stem_pool)


# -- timm ---------------------------------------------------------------------------
# create_model arguments of timm's ResNet that we do not implement: an error unless unset.
_TIMM_UNSUPPORTED = {"drop_block_rate": 0.0, "output_stride": 32}


class _PretrainedFile(NamedTuple):
    path: str
    kwargs: dict  # build_model arguments stored in the checkpoint
    state_dict: Dict[str, Tensor]  # in our names


def _timm_kwargs(name: str, fixed_norm: Optional[str], kwargs: dict) -> dict:
    """create_model's keyword arguments, checked and mapped onto build_model's."""
    for key, default in _TIMM_UNSUPPORTED.items():
        value = kwargs.pop(key, default)
        if value != default:
            raise ValueError(f"{name}: {key}={value!r} is not supported")
    if "drop_rate" in kwargs:  # timm's name for the classifier dropout
        kwargs.setdefault("dropout", kwargs.pop("drop_rate"))
    if fixed_norm is not None:
        norm = kwargs.setdefault("norm", fixed_norm)
        if get_norm_layer(norm) is not get_norm_layer(fixed_norm):  # aliases such as "BN" pass
            raise ValueError(f"{name} fixes norm={fixed_norm!r}; got norm={norm!r} "
                             f"(use {name[:-len(fixed_norm) - 1]} to choose the norm)")
    return kwargs


def _timm_pretrained(name: str, kwargs: dict) -> _PretrainedFile:
    """The checkpoint named by the resolved pretrained_cfg's ``file`` (ours or the authors'),
    read once by our converter; its classes, input channels and evaluation transform go
    into ``kwargs['pretrained_cfg_overlay']`` under the caller's own entries."""
    from timm.models import resolve_pretrained_cfg

    from .checkpoint import pretrained_source
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    cfg = resolve_pretrained_cfg(name, kwargs.get("pretrained_cfg"), overlay)
    if not cfg.file:
        raise ValueError(f"{name}: no pretrained weights are hosted for timm; pass a checkpoint "
                         f"file (ours or the authors' model zoo): timm.create_model({name!r}, "
                         "pretrained=True, pretrained_cfg_overlay=dict(file=PATH))")
    build_kwargs, sd, cfg_entries = pretrained_source(str(cfg.file))
    kwargs["pretrained_cfg_overlay"] = {**cfg_entries, **overlay}
    return _PretrainedFile(str(cfg.file), build_kwargs, sd)


def _pretrained_kwargs(arch: str, fixed_norm: Optional[str], source: _PretrainedFile,
                       kwargs: dict) -> dict:
    """build_model arguments: the checkpoint's, overridden by the caller's (as
    ``load_model``'s overrides; ``norm_kwargs`` are merged)."""
    from engine.checkpoint import CheckpointError
    stored = dict(source.kwargs)
    name = stored.pop("name", arch)
    if name != arch:
        raise CheckpointError(f"{source.path}: the checkpoint holds a {name}, not a {arch}; "
                              f"use timm.create_model({name!r}, ...)")
    norm = stored.get("norm")
    if fixed_norm is not None and norm and get_norm_layer(norm) is not get_norm_layer(fixed_norm):
        raise CheckpointError(f"{source.path}: the checkpoint holds norm={norm!r}, but "
                              f"{arch}_{fixed_norm} fixes norm={fixed_norm!r}; use {arch}")
    norm_kwargs = {**(stored.pop("norm_kwargs", None) or {}),
                   **(kwargs.pop("norm_kwargs", None) or {})}
    return {**stored, **kwargs, "norm_kwargs": norm_kwargs}


def _timm_build(arch: str, fixed_norm: Optional[str], source: Optional[_PretrainedFile],
                **kwargs) -> nn.Module:
    """The model class handed to timm's build_model_with_cfg: build_model, then the
    checkpoint's weights when there is one (``checkpoint.load_pretrained_weights``)."""
    if source is None:
        return build_model(arch, **kwargs)
    from .checkpoint import load_pretrained_weights
    model = build_model(arch, **_pretrained_kwargs(arch, fixed_norm, source, kwargs))
    load_pretrained_weights(model, source.state_dict, source.path)
    return model


def _create_timm_model(name: str, arch: str, fixed_norm: Optional[str], pretrained: bool,
                       kwargs: dict) -> nn.Module:
    """timm.create_model for our names through timm's own ``build_model_with_cfg``
    (pretrained_cfg, ``features_only`` / ``out_indices`` / ``feature_cls``, model traits).
    ``pretrained=True`` reads the local checkpoint given as pretrained_cfg ``file``: its
    architecture is the default of every argument; a different ``num_classes`` gets a new
    classifier, a different ``in_chans`` an adapted first conv, as timm does."""
    from timm.models import build_model_with_cfg
    kwargs = _timm_kwargs(name, fixed_norm, dict(kwargs))
    source = _timm_pretrained(name, kwargs) if pretrained else None
    build = functools.partial(_timm_build, arch, fixed_norm, source)
    # the weights are loaded by ``build`` (our converter), not by timm's loader
    return build_model_with_cfg(build, name, False, **kwargs)


def _timm_entrypoint(arch: str, fixed_norm: Optional[str]) -> Callable[..., nn.Module]:
    name = arch if fixed_norm is None else f"{arch}_{fixed_norm}"

    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        return _create_timm_model(name, arch, fixed_norm, pretrained, kwargs)

    # timm keys its registry on fn.__name__ and looks up sys.modules[fn.__module__].
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    norm_doc = f"norm={fixed_norm!r}" if fixed_norm else "norm='sn' unless given"
    entrypoint.__doc__ = f"timm entry point: models.build_model({arch!r}, {norm_doc}, **kwargs)."
    return entrypoint


def _timm_cfg() -> dict:
    """Every entry point's pretrained_cfg: the paper's ImageNet evaluation (224 px centre
    crop of a 256 px resize, bilinear, ImageNet mean/std), the stem conv and classifier
    names; no hosted weights (url='')."""
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7),
                crop_pct=0.875, crop_mode="center", interpolation="bilinear",
                mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                first_conv="conv1", classifier="fc",
                paper_name="Differentiable Learning-to-Normalize via Switchable Normalization",
                paper_ids="arXiv:1806.10779",
                origin_url="https://github.com/switchablenorms/Switchable-Normalization")


def _fx_leaf_modules() -> Tuple[type, ...]:
    """Our normalization layer classes, to be leaves of torch.fx traces. Only the classes
    of ``normalization`` itself: registering PyTorch's or timm's base classes would change
    the fx graphs of every other timm model."""
    import normalization
    names = ("BatchNorm2d", "SyncBatchNorm2d", "GroupNorm", "InstanceNorm2d", "LayerNorm2d",
             "SwitchNorm1d", "SwitchNorm2d", "SwitchNorm3d", "SyncSwitchNorm2d",
             "SparseSwitchNorm2d", "NoNorm")
    found = (list(normalization.NORM_LAYERS) + list(normalization.SWITCH_LAYERS)
             + [get_norm_layer(n) for n in list_norms()]
             + [getattr(normalization, n, None) for n in names])
    leaves: List[type] = []
    for cls in found:
        if isinstance(cls, type) and cls.__module__.partition(".")[0] == normalization.__name__ \
                and cls not in leaves:
            leaves.append(cls)
    return tuple(leaves)


#: Normalization classes registered as fx leaf modules in timm (``register_notrace_module``),
#: for ``tracer_kwargs={"leaf_modules": list(FX_LEAF_MODULES)}`` of torchvision's extractor.
FX_LEAF_MODULES: Tuple[type, ...] = _fx_leaf_modules()


def _register_timm() -> List[str]:
    """Register every entry point and our norm layers' fx leaves in timm; skip (with a
    warning) a name timm already has from elsewhere. Returns the registered names."""
    try:
        from timm.layers import register_notrace_module
        from timm.models import generate_default_cfgs, is_model, model_entrypoint, register_model
    except ImportError:  # timm is optional for the rest of the package
        return []
    for cls in FX_LEAF_MODULES:
        register_notrace_module(cls)
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
