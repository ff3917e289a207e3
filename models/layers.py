"""Small layers behind the timm model API of our ResNets (``timm/models/resnet.py`` semantics).

* ``GlobalPool2d``: the classifier's global pooling, ``global_pool`` in timm
  (``'avg'``, ``'max'``, ``'avgmax'``, ``'catavgmax'`` or ``''`` for none), as
  timm's ``SelectAdaptivePool2d`` with a flattening output.
* ``DropPath``: stochastic depth (Huang et al., "Deep Networks with Stochastic
  Depth", ECCV 2016): in training, each sample's residual branch is dropped with
  probability p and kept ones are scaled by 1 / (1 - p); ``drop_path_rates``
  is their linear decay rule over the blocks, as timm's ``drop_path_rate``.
* ``checkpoint_blocks``: activation checkpointing per residual block (Chen et
  al., "Training Deep Nets with Sublinear Memory Cost", 2016), as timm's
  ``checkpoint_seq``, except that the recomputation in the backward pass does
  not update the running statistics of the norm layers a second time.
* ``take_indices``: timm's rule for selecting intermediate features by index.

Nothing here imports timm: the models work without it.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["POOL_TYPES", "GlobalPool2d", "DropPath", "drop_path_rates", "checkpoint_blocks",
           "take_indices"]

#: Global pooling types of ``global_pool`` (timm's names); ``''`` keeps the feature map.
POOL_TYPES = ("avg", "max", "avgmax", "catavgmax", "")


class GlobalPool2d(nn.Module):
    """Global pooling of an (N, C, H, W) map to (N, C * feat_mult()), or nothing (``''``).

    ``avgmax`` is the mean of average and max pooling, ``catavgmax`` their
    concatenation (2C features), as in timm. ``avg`` is ``adaptive_avg_pool2d``,
    bit-identical to torchvision's ``avgpool`` + ``flatten``.
    """

    def __init__(self, pool_type: str = "avg"):
        super().__init__()
        if pool_type is None or pool_type not in POOL_TYPES:
            raise ValueError(f"unknown global_pool {pool_type!r}; valid: "
                             + ", ".join(repr(p) for p in POOL_TYPES) + " ('' = no pooling)")
        self.pool_type = pool_type

    def feat_mult(self) -> int:
        """Pooled features per input channel."""
        return 2 if self.pool_type == "catavgmax" else 1

    def is_identity(self) -> bool:
        return not self.pool_type

    def forward(self, x: Tensor) -> Tensor:
        if not self.pool_type:
            return x
        if self.pool_type == "avg":
            return F.adaptive_avg_pool2d(x, 1).flatten(1)
        if self.pool_type == "max":
            return F.adaptive_max_pool2d(x, 1).flatten(1)
        avg, top = F.adaptive_avg_pool2d(x, 1).flatten(1), F.adaptive_max_pool2d(x, 1).flatten(1)
        return 0.5 * (avg + top) if self.pool_type == "avgmax" else torch.cat((avg, top), 1)

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type!r}"


class DropPath(nn.Module):
    """Stochastic depth on a residual branch of shape (N, C, H, W): in training, every
    sample's branch is zeroed with probability ``drop_prob`` and the others are
    scaled by ``1 / (1 - drop_prob)``; the identity in eval mode."""

    def __init__(self, drop_prob: float):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        # one draw per sample; slicing (not x.shape arithmetic) keeps this fx-traceable
        mask = torch.empty_like(x[:, :1, :1, :1]).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def drop_path_rates(rate: float, num_blocks: int) -> List[float]:
    """Huang et al.'s linear decay rule, as timm: block i of n drops with ``rate * i / (n - 1)``
    (0 for the first block, ``rate`` for the last)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
    return [rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]


@contextlib.contextmanager
def _buffers_kept(module: nn.Module):
    """Restore every buffer of ``module`` on exit: the recomputation of a checkpointed
    block must not move the running statistics its first forward already moved."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def _contexts(module: nn.Module):
    return contextlib.nullcontext(), _buffers_kept(module)


def checkpoint_blocks(blocks: Iterable[nn.Module], x: Tensor) -> Tensor:
    """Run ``blocks`` in order, each under non-reentrant activation checkpointing: only a
    block's input is kept, its activations are recomputed in the backward pass (with
    the same random state, so dropout and drop-path masks repeat). Running statistics
    and other buffers change once per forward, as without checkpointing; under
    ``torch.compile`` the compiler's own recomputation already guarantees this."""
    compiling = torch.compiler.is_compiling()
    for block in blocks:
        if compiling:
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = checkpoint(block, x, use_reentrant=False,
                           context_fn=functools.partial(_contexts, block))
    return x


def take_indices(num_features: int,
                 indices: Optional[Union[int, Sequence[int]]] = None) -> Tuple[List[int], int]:
    """timm's ``feature_take_indices``: None takes all ``num_features`` features, an int n
    the last n, a sequence those indices (negative ones count from the end). Returns the
    absolute indices and the largest one; out-of-range indices raise ``ValueError``."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"last-n indices={indices} is out of range (1 to {num_features})")
        taken = list(range(num_features - indices, num_features))
    else:
        taken = []
        for i in indices:
            idx = num_features + int(i) if int(i) < 0 else int(i)
            if not 0 <= idx < num_features:
                raise ValueError(f"feature index {i} is out of range "
                                 f"({-num_features} to {num_features - 1})")
            taken.append(idx)
        if not taken:
            raise ValueError("indices selects no feature")
    return taken, max(taken)
