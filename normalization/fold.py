"""Fold inference-time per-channel affine normalizers away (sparse SN, paper Sec. 4.1.4 / Table 3).

In eval mode an SN layer whose ratios are one-hot on BN for both the mean and
the variance (hard ratios, or SSN ratios frozen one-hot) computes

    y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta = x * a + b

with ``a = gamma / sqrt(running_var + eps)`` and ``b = beta - running_mean * a``
per channel: no statistics of ``x`` are needed. ``fold_hard_bn`` replaces such
layers (and, by default, eval-mode BatchNorm layers, e.g. those put where the
map is 1x1) by a ``FrozenAffine2d``, or, with ``into_conv=True``, scales the
weights of the convolution that feeds the layer (and adds ``b`` to its bias)
and removes the layer, when the graph allows it: the norm's only input is the
conv's output and nothing else reads that output (conv -> norm directly, as
in ResNet v1 blocks and their downsample shortcuts). The graph comes from
``torch.fx``; a model that cannot be traced is folded into affine layers only.

``fold_plan(model, into_conv)`` says what would be folded (layer -> conv or
None) without changing anything; ``restructure(model, plan)`` gives an
unfolded model the folded structure (to load a folded state dict). The
coefficients are computed in float64 and cast to the parameters' dtype.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .switchable import _SwitchNormBase

__all__ = ["FrozenAffine2d", "affine_coefficients", "fold_plan", "fold_hard_bn", "restructure",
           "trace_modules"]

FoldPlan = Dict[str, Optional[str]]  # foldable norm -> the conv to fold it into, or None


class FrozenAffine2d(nn.Module):
    """``y = x * scale + shift`` per channel of (N, C, H, W), with buffers (no parameters)."""

    def __init__(self, num_features: int, scale: Optional[Tensor] = None,
                 shift: Optional[Tensor] = None):
        super().__init__()
        self.num_features = num_features
        self.register_buffer("scale", torch.ones(num_features) if scale is None
                             else scale.detach().clone().reshape(num_features))
        self.register_buffer("shift", torch.zeros(num_features) if shift is None
                             else shift.detach().clone().reshape(num_features))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(self.shift.view(shape), x, self.scale.view(shape))

    def extra_repr(self) -> str:
        return str(self.num_features)


def _one_hot_bn(layer: _SwitchNormBase) -> bool:
    """The layer's ratios (as used now) are exactly one-hot on BN for mean and variance."""
    if not layer.using_bn or layer.running_mean is None:
        return False
    bn = layer.normalizers.index("bn")
    for ratio in layer.switch_ratios():
        if float(ratio[bn]) != 1.0 or float(ratio.abs().sum()) != 1.0:
            return False
    return True


def affine_coefficients(layer: nn.Module, include_batchnorm: bool = True,
                        ) -> Optional[Tuple[Tensor, Tensor]]:
    """(a, b) in float64 when ``layer`` is a per-channel affine in eval, else None."""
    if isinstance(layer, _SwitchNormBase):
        if not _one_hot_bn(layer):
            return None
        weight, bias = layer.weight, layer.bias
    elif include_batchnorm and isinstance(layer, nn.modules.batchnorm._BatchNorm):
        if not layer.track_running_stats or layer.running_mean is None:
            return None
        weight, bias = layer.weight, layer.bias
    else:
        return None
    with torch.no_grad():
        var = layer.running_var.detach().double()
        a = torch.rsqrt(var + layer.eps)
        if weight is not None:
            a = a * weight.detach().double()
        b = -layer.running_mean.detach().double() * a
        if bias is not None:
            b = b + bias.detach().double()
    return a, b


def trace_modules(model: nn.Module):
    """torch.fx graph with every module that has no children as a leaf, or None when the
    model cannot be traced (data-dependent control flow)."""
    import torch.fx as fx

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return next(m.children(), None) is None

    try:
        return _Tracer().trace(model)
    except Exception:
        return None


def _conv_inputs(model: nn.Module) -> Dict[str, str]:
    """norm -> conv for every module fed only by a Conv2d whose output nothing else reads."""
    graph = trace_modules(model)
    if graph is None:
        return {}
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or len(node.all_input_nodes) != 1:
            continue
        src = node.all_input_nodes[0]
        if (src.op == "call_module" and isinstance(model.get_submodule(src.target), nn.Conv2d)
                and len(src.users) == 1 and calls[src.target] == 1 and calls[node.target] == 1):
            pairs[node.target] = src.target
    return pairs


def fold_plan(model: nn.Module, into_conv: bool = False,
              include_batchnorm: bool = True) -> FoldPlan:
    """The layers ``fold_hard_bn`` would fold, each with its conv (or None: affine)."""
    pairs = _conv_inputs(model) if into_conv else {}
    plan: FoldPlan = {}
    for name, module in model.named_modules():
        if affine_coefficients(module, include_batchnorm) is not None:
            plan[name] = pairs.get(name)
    return plan


@torch.no_grad()
def _fold_into_conv(conv: nn.Conv2d, a: Tensor, b: Tensor):
    dtype = conv.weight.dtype
    w = conv.weight.double() * a.view(-1, *([1] * (conv.weight.dim() - 1)))
    bias = b if conv.bias is None else b + a * conv.bias.double()
    conv.weight.copy_(w.to(dtype))
    conv.bias = nn.Parameter(bias.to(dtype=dtype, device=conv.weight.device),
                             requires_grad=conv.weight.requires_grad)


@torch.no_grad()
def fold_hard_bn(model: nn.Module, into_conv: bool = False,
                 include_batchnorm: bool = True) -> Tuple[nn.Module, int]:
    """Fold every per-channel-affine normalizer of ``model`` (in place; the model is put
    in eval mode). Returns ``(model, number of layers folded)``."""
    model.eval()
    plan = fold_plan(model, into_conv, include_batchnorm)
    for name, conv_name in plan.items():
        layer = model.get_submodule(name)
        a, b = affine_coefficients(layer, include_batchnorm)
        if conv_name is not None:
            _fold_into_conv(model.get_submodule(conv_name), a, b)
            model.set_submodule(name, nn.Identity())
        else:
            dtype, device = layer.running_mean.dtype, layer.running_mean.device
            affine = FrozenAffine2d(layer.num_features, a.to(dtype), b.to(dtype)).to(device)
            model.set_submodule(name, affine)
    return model, len(plan)


def restructure(model: nn.Module, plan: FoldPlan) -> nn.Module:
    """Give an unfolded model the structure ``fold_hard_bn`` left (identity values), so
    that a folded state dict loads into it."""
    for name, conv_name in plan.items():
        layer = model.get_submodule(name)
        if conv_name is None:
            model.set_submodule(name, FrozenAffine2d(layer.num_features))
            continue
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype))
        model.set_submodule(name, nn.Identity())
    return model.eval()
