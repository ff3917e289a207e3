"""The one factory: every normalizer by name, channels first.

``build_norm(name, C, **kw)`` returns an instance, ``get_norm_layer(name,
**kw)`` the class or a partial for model code, ``list_norms()`` the names.
Names are matched case-insensitively, ignoring ``-`` and ``_``; long aliases
(``batchnorm``, ``switchnorm`` ...) are accepted.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Dict, List, Type

import torch.nn as nn

from .batchnorm import BatchNorm2d, SyncBatchNorm2d
from .simple import GroupNorm, InstanceNorm2d, LayerNorm2d, NoNorm
from .sparse import SparseSwitchNorm2d
from .switchable import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SyncSwitchNorm2d

__all__ = ["build_norm", "get_norm_layer", "list_norms", "NORM_LAYERS", "SWITCH_LAYERS",
           "BATCH_STAT_NAMES", "SYNC_NAMES"]

_REGISTRY: Dict[str, Type[nn.Module]] = {
    "bn": BatchNorm2d,
    "syncbn": SyncBatchNorm2d,
    "gn": GroupNorm,
    "in": InstanceNorm2d,
    "ln": LayerNorm2d,
    "sn": SwitchNorm2d,
    "syncsn": SyncSwitchNorm2d,
    "ssn": SparseSwitchNorm2d,
    "none": NoNorm,
}

_ALIASES = {
    "batchnorm": "bn", "batchnorm2d": "bn", "syncbatchnorm": "syncbn", "groupnorm": "gn",
    "instancenorm": "in", "instancenorm2d": "in", "layernorm": "ln", "layernorm2d": "ln",
    "switchnorm": "sn", "switchnorm2d": "sn", "switchablenorm": "sn", "syncswitchnorm": "syncsn",
    "sparseswitchnorm": "ssn", "identity": "none",
}

#: Names of the normalizers that use batch statistics (and take ghost batches).
BATCH_STAT_NAMES = ("bn", "syncbn", "sn", "syncsn", "ssn")
#: Names whose batch statistics are synchronised across processes.
SYNC_NAMES = ("syncbn", "syncsn")

#: Every normalization layer type, ours and PyTorch's, for parameter grouping by type.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, SwitchNorm1d,
               SwitchNorm2d, SwitchNorm3d)
#: Layers with ratio logits (``mean_weight``, ``var_weight``).
SWITCH_LAYERS = (SwitchNorm1d, SwitchNorm2d, SwitchNorm3d)


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"normalizer name must be a string, got {name!r}; "
                         f"valid names: {', '.join(list_norms())}")
    key = name.lower().replace("-", "").replace("_", "").strip()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"unknown normalizer {name!r}; valid names: {', '.join(list_norms())}")
    return key


def list_norms() -> List[str]:
    """The registered normalizer names."""
    return list(_REGISTRY)


def _check_kwargs(cls: Type[nn.Module], name: str, kwargs: dict):
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):  # a subclass forwarding kwargs
        params = {**params, **inspect.signature(cls.__mro__[1].__init__).parameters}
    valid = [k for k in params if k not in ("self", "num_features", "args", "kwargs")]
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise ValueError(f"normalizer {name!r} got unknown argument(s) {', '.join(unknown)}; "
                         f"it accepts: {', '.join(valid)}")


def get_norm_layer(name: str, **kwargs) -> Callable[..., nn.Module]:
    """The class registered as ``name``, or a partial binding ``kwargs``."""
    key = _canonical(name)
    cls = _REGISTRY[key]
    if not kwargs:
        return cls
    _check_kwargs(cls, key, kwargs)
    return functools.partial(cls, **kwargs)


def build_norm(name: str, num_features: int, **kwargs) -> nn.Module:
    """An instance of normalizer ``name`` over ``num_features`` channels."""
    return get_norm_layer(name, **kwargs)(num_features)
