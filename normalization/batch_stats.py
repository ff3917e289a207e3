"""What every normalizer with a BN branch shares: ghost batches, SyncBN, running
statistics, and the paper's batch-average inference (Sec. 4.1.3, "Inference").

* Ghost batches: with ``ghost_batch_size = G`` the batch statistics are those of
  consecutive chunks of G samples of the local batch, exactly as if each chunk
  ran on its own GPU. The running statistics take one update per forward from
  the average of the chunks' statistics (the average of the updates each chunk
  would make alone), so the time constant of the moving average does not
  depend on how many virtual GPUs a process holds.
* Sync: in training, under an initialised process group of more than one rank,
  chunk ``j`` of every rank is pooled (with ``ghost_batch_size=None``: the
  whole global batch). One differentiable all-reduce (``ops.all_reduce_sum``)
  of concatenated float32 sums forward, whose gradient is one all-reduce
  backward. Every rank must hold the same number of chunks. In eval, or
  without a process group, statistics are local.
* Batch average: ``begin_batch_average()`` resets accumulators; every training
  mode forward then adds each chunk's mean and second moment (float64,
  weighted by its sample count) instead of touching the running statistics;
  ``finalize_batch_average()`` writes ``mean`` and ``E[x^2] - mean^2`` into
  ``running_mean`` / ``running_var``. An eval-mode forward in between is an
  error, as is finalising without any batch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops
from .algebra import BatchSpec, BatchStats
from .functional import fx_tracing

__all__ = ["BatchStatsMixin"]


def _check_ghost(ghost_batch_size):
    if ghost_batch_size is None:
        return None
    if isinstance(ghost_batch_size, bool) or not isinstance(ghost_batch_size, int) \
            or ghost_batch_size < 1:
        raise ValueError(f"ghost_batch_size must be a positive int or None, got {ghost_batch_size!r}")
    return ghost_batch_size


def distributed_world(group=None) -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


class BatchStatsMixin:
    """Ghost-batch, sync and batch-average machinery for a layer with a BN branch.

    The host class provides ``running_mean``/``running_var`` buffers (or None),
    ``num_features`` and ``_update_running(stats, spatial)``, which receives
    the ``BatchStats`` of the forward (per-chunk ``mean``, ``var`` (k, C) and
    ``count`` (k,)) and the number of positions per (sample, channel).
    """

    sync: bool = False
    process_group = None
    _ba: Optional[dict] = None

    def _init_batch_stats(self, ghost_batch_size, sync=False, process_group=None):
        self.ghost_batch_size = _check_ghost(ghost_batch_size)
        self.sync = sync
        self.process_group = process_group
        self._ba = None

    # -- batch statistics ---------------------------------------------------------
    def _sync_active(self) -> bool:
        return self.sync and self.training and distributed_world(self.process_group) > 1

    @property
    def collecting(self) -> bool:
        """True between begin_batch_average() and finalize_batch_average()."""
        return self._ba is not None

    def _check_mode(self):
        if self._ba is not None and not self.training:
            raise RuntimeError(
                f"{type(self).__name__}: batch-average collection was started but not finalised; "
                "call finalize_batch_average() (normalization.finalize_batch_average(model)) "
                "before evaluating")

    def _batch_spec(self, x: Tensor) -> BatchSpec:
        """How this forward computes BN statistics: per ghost chunk, synced if active."""
        if not self._sync_active():
            return BatchSpec(self.ghost_batch_size)
        rm = getattr(self, "running_mean", None)
        shift = rm if rm is not None else x.new_zeros(self.num_features)
        return BatchSpec(self.ghost_batch_size, shift, ops.group_name(self.process_group))

    @torch.no_grad()
    def _after_batch(self, x: Tensor, stats: BatchStats, spatial):
        """Accumulate for the batch average, or update the running statistics; an empty
        local batch leaves both alone, as in ``nn.BatchNorm2d`` (unless synchronised: the
        statistics are then those of the other ranks' samples)."""
        if not fx_tracing() and x.shape[0] == 0 and not self._sync_active():
            return
        stats = BatchStats(stats.mean.detach(), stats.var.detach(), stats.count.detach())
        if self._ba is not None:
            w = stats.count.double()[:, None]
            mean = stats.mean.double()
            self._ba["sum"] += (w * mean).sum(0)
            self._ba["sq"] += (w * (stats.var.double() + mean.square())).sum(0)
            self._ba["count"] += stats.count.double().sum()
        elif self.training:
            self._update_running(stats, spatial)

    # -- batch average (paper Sec. 4.1.3) ----------------------------------------
    def begin_batch_average(self):
        """Reset the accumulators; following training-mode forwards collect statistics."""
        rm = self.running_mean
        z = dict(dtype=torch.float64, device=rm.device)
        self._ba = {"sum": torch.zeros(self.num_features, **z),
                    "sq": torch.zeros(self.num_features, **z),
                    "count": torch.zeros((), **z)}

    def abort_batch_average(self):
        """Leave collection without touching the running statistics."""
        self._ba = None

    @torch.no_grad()
    def finalize_batch_average(self, process_group=None, reduce: bool = True) -> float:
        """Write the collected mean and variance into the running statistics.

        Under an initialised process group the sums are all-reduced first (all
        ranks must call this). Returns the number of samples averaged.
        """
        if self._ba is None:
            raise RuntimeError(f"{type(self).__name__}: finalize_batch_average() without "
                               "begin_batch_average()")
        ba = self._ba
        if reduce and distributed_world(process_group) > 1:
            flat = torch.cat([ba["sum"], ba["sq"], ba["count"].view(1)])
            dist.all_reduce(flat, group=process_group)
            c = self.num_features
            ba = {"sum": flat[:c], "sq": flat[c:2 * c], "count": flat[-1]}
        count = float(ba["count"])
        if count == 0:
            raise RuntimeError(f"{type(self).__name__}: batch average has no batch: run at least "
                               "one training-mode forward between begin and finalize")
        mean = ba["sum"] / count
        var = (ba["sq"] / count - mean.square()).clamp_min(0.0)
        self.running_mean.copy_(mean)
        self.running_var.copy_(var)
        self._ba = None
        return count
