"""Batch Normalization with ghost batches, SyncBN, and batch-average statistics.

``BatchNorm2d`` is ``torch.nn.BatchNorm2d`` (same parameters, buffers, PyTorch
momentum convention, so torchvision weights load unchanged) that also takes
``ghost_batch_size``. Without ghost batches, sync or batch-average collection
it runs PyTorch's own kernel. Otherwise it runs ``functional.switch_norm``
with BN as the only normalizer: BN is SN with one-hot BN ratios.

Running statistics with ghost batches follow PyTorch per chunk (the unbiased
chunk variance) and are averaged over the chunks into one update per forward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from . import functional as fn
from .batch_stats import BatchStatsMixin
from .switchable import check_input

__all__ = ["BatchNorm2d", "SyncBatchNorm2d"]


class BatchNorm2d(BatchStatsMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with ``ghost_batch_size`` (and the sync/batch-average machinery)."""

    normalizers = ("bn",)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 ghost_batch_size: Optional[int] = None, sync: bool = False,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self._init_batch_stats(ghost_batch_size, sync, process_group)

    def config(self) -> dict:
        return dict(num_features=self.num_features, eps=self.eps, momentum=self.momentum,
                    affine=self.affine, track_running_stats=self.track_running_stats,
                    ghost_batch_size=self.ghost_batch_size)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.ghost_batch_size:
            s += f", ghost_batch_size={self.ghost_batch_size}"
        return s

    def _check_input_dim(self, input: Tensor):
        """Done by ``check_input`` in forward (which torch.fx tracing skips)."""

    def _fused(self, x: Tensor) -> bool:
        if self.collecting:
            return True
        if not self.training:
            return False
        ghost = self.ghost_batch_size is not None and (
            fn.fx_tracing() or self.ghost_batch_size < x.shape[0])
        return ghost or self._sync_active()

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, (4,), "(N, C, H, W)")
        self._check_mode()
        if not self._fused(x):
            return fn.autocast_output(super().forward(x))
        out = fn.switch_norm(x, ("bn",), self.eps, self.weight, self.bias,
                             batch=self._batch_spec(x))
        self._after_batch(x, out[1], fn.spatial_size(x))
        return out[0]

    @torch.no_grad()
    def _update_running(self, stats, spatial):
        """PyTorch's update, per chunk (unbiased variance), averaged over the chunks."""
        if not self.track_running_stats:
            return
        mean, var, count = stats.mean, stats.var, stats.count
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        n = (count * spatial)[:, None]
        unbiased = var * n / (n - 1).clamp_min(1)
        self.running_mean.lerp_(mean.mean(0).to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.mean(0).to(self.running_var.dtype), factor)


class SyncBatchNorm2d(BatchNorm2d):
    """BatchNorm2d whose statistics are reduced over a process group in training.

    One all-reduce of concatenated float32 sums forward and one of their
    gradients backward; local in eval and without a process group. Works on
    gloo (CPU) and NCCL (GPU).
    """

    def __init__(self, num_features: int, *args, process_group=None, **kwargs):
        kwargs.pop("sync", None)
        super().__init__(num_features, *args, sync=True, process_group=process_group, **kwargs)
