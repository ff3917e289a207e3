"""Swap the normalization layers of a built model (like ``nn.SyncBatchNorm.convert_sync_batchnorm``).

* ``convert_norm(model, name, **kw)`` replaces every BatchNorm2d (PyTorch's,
  ours, ``nn.SyncBatchNorm`` and timm's ``BatchNormAct2d``) of any model, a
  torchvision or timm ResNet for instance, by ``build_norm(name, C, **kw)``,
  copying the affine parameters and, where the new layer has them, the running
  statistics. timm's fused norm+activation layers keep their activation.
  BatchNorm1d/3d layers are left as they are.
* ``convert_sync(model)`` turns bn into syncbn and sn into syncsn in place of
  the old layers, keeping every parameter and buffer.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

import torch
import torch.nn as nn

from .batchnorm import BatchNorm2d, SyncBatchNorm2d
from .registry import build_norm
from .switchable import SwitchNorm2d, SyncSwitchNorm2d

__all__ = ["convert_norm", "convert_sync", "replace_modules"]


def replace_modules(model: nn.Module, fn: Callable[[nn.Module], Optional[nn.Module]]) -> nn.Module:
    """Replace, depth first, every module for which ``fn`` returns a new one."""
    new = fn(model)
    if new is not None:
        return new
    for name, child in model.named_children():
        replaced = replace_modules(child, fn)
        if replaced is not child:
            setattr(model, name, replaced)
    return model


def _place_like(new: nn.Module, old: nn.Module) -> nn.Module:
    ref = next(iter(old.parameters()), None)
    if ref is None:
        ref = next(iter(old.buffers()), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    return new.train(old.training)


@torch.no_grad()
def _copy_state(new: nn.Module, old: nn.modules.batchnorm._BatchNorm):
    for name in ("weight", "bias", "running_mean", "running_var"):
        src, dst = getattr(old, name, None), getattr(new, name, None)
        if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.shape == dst.shape:
            dst.copy_(src)
    src, dst = getattr(old, "num_batches_tracked", None), getattr(new, "num_batches_tracked", None)
    if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor):
        dst.copy_(src)


def convert_norm(model: nn.Module, name: str, **kwargs) -> nn.Module:
    """Replace the BatchNorm2d layers of ``model`` by normalizer ``name`` (in place; returns it)."""

    def swap(m: nn.Module) -> Optional[nn.Module]:
        if not isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            return None
        new = build_norm(name, m.num_features, **kwargs)
        _copy_state(new, m)
        new = _place_like(new, m)
        act, drop = getattr(m, "act", None), getattr(m, "drop", None)
        if isinstance(act, nn.Module):  # timm BatchNormAct2d: norm, then drop, then act
            parts = [("norm", new)]
            if isinstance(drop, nn.Module):
                parts.append(("drop", drop))
            parts.append(("act", act))
            return nn.Sequential(OrderedDict(parts))
        return new

    return replace_modules(model, swap)


def convert_sync(model: nn.Module, process_group=None) -> nn.Module:
    """bn -> syncbn and sn -> syncsn (in place; returns the model)."""

    def swap(m: nn.Module) -> Optional[nn.Module]:
        if type(m) in (BatchNorm2d, nn.BatchNorm2d):
            cfg = BatchNorm2d.config(m) if isinstance(m, BatchNorm2d) else dict(
                num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                track_running_stats=m.track_running_stats)
            new = SyncBatchNorm2d(**cfg, process_group=process_group)
        elif type(m) is SwitchNorm2d:
            new = SyncSwitchNorm2d(**m.config(), process_group=process_group)
        else:
            return None
        new.load_state_dict(m.state_dict())
        return _place_like(new, m)

    return replace_modules(model, swap)
