"""Normalizers without batch statistics: GN, IN, LN and none, channels first.

Thin subclasses of PyTorch's layers with the common signature
``(num_features, **kwargs)``; they accept ``ghost_batch_size`` so that the
trainer can pass it to any normalizer, and ignore it (no batch statistics).
"""
from __future__ import annotations

import math
from typing import Optional

import torch.nn as nn
from torch import Tensor

from . import functional as fn
from .switchable import check_input

__all__ = ["GroupNorm", "InstanceNorm2d", "LayerNorm2d", "NoNorm"]


class GroupNorm(nn.GroupNorm):
    """GN (Wu & He) with ``num_groups`` groups (default 32, the paper's baseline).

    When ``num_features`` is not divisible, the largest common divisor is used
    (e.g. 16 groups for 16 channels), so any model can be converted.
    """

    def __init__(self, num_features: int, num_groups: int = 32, eps: float = 1e-5,
                 affine: bool = True, ghost_batch_size: Optional[int] = None):
        super().__init__(math.gcd(num_features, num_groups), num_features, eps, affine)
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, (3, 4, 5), "(N, C, H, W)")
        return fn.autocast_output(super().forward(x))


class InstanceNorm2d(nn.InstanceNorm2d):
    """IN (Ulyanov et al.): statistics over (H, W) per sample and channel, affine by default."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True,
                 ghost_batch_size: Optional[int] = None):
        super().__init__(num_features, eps=eps, affine=affine, track_running_stats=False)

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, (4,), "(N, C, H, W)")
        return fn.autocast_output(self._apply_instance_norm(x))  # (shape checked above)


class LayerNorm2d(nn.GroupNorm):
    """LN (Ba et al.) as the paper uses it in CNNs: statistics over (C, H, W) per
    sample, per-channel affine (GroupNorm with one group)."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True,
                 ghost_batch_size: Optional[int] = None):
        super().__init__(1, num_features, eps, affine)
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, (3, 4, 5), "(N, C, H, W)")
        return fn.autocast_output(super().forward(x))


class NoNorm(nn.Identity):
    """``none``: no normalization (keeps the signature of the others)."""

    def __init__(self, num_features: int, ghost_batch_size: Optional[int] = None):
        super().__init__()
        self.num_features = num_features
