"""Importance ratios of a model's SN layers (paper Fig. 1, 4, 5, 7, 8) and the hard-ratio switch."""
from __future__ import annotations

from typing import Dict

import torch.nn as nn
from torch import Tensor

from .switchable import _SwitchNormBase

__all__ = ["ratios", "set_hard_ratios", "switch_layers"]


def switch_layers(model: nn.Module):
    """(name, layer) of every SN-family layer of ``model``, in network order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _SwitchNormBase)]


def ratios(model: nn.Module) -> Dict[str, Dict[str, Tensor]]:
    """``{layer_name: {"mean": w[k], "var": w'[k]}}``: the softmax (sparsestmax, or
    hard one-hot) importance weights each SN layer uses, ordered IN, LN, BN
    (the layer's ``normalizers`` attribute names them: two entries without BN,
    and LN, BN for SwitchNorm1d)."""
    out = {}
    for name, layer in switch_layers(model):
        mean, var = layer.switch_ratios()
        out[name] = {"mean": mean, "var": var}
    return out


def set_hard_ratios(model: nn.Module, enabled: bool = True) -> int:
    """Switch every SN layer to hard (argmax one-hot) ratios, or back; returns the count."""
    layers = switch_layers(model)
    for _, layer in layers:
        layer.hard_ratios = bool(enabled)
    return len(layers)
