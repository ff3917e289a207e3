"""Switchable Normalization's (N, C)-sized algebra: the paper's Eq. (3)-(5) from the IN statistics.

One definition of each piece, which every execution path calls (``functional.py``
picks the path): the eager autograd node (``eager.py``) runs these functions in
its forward without recording them; the compiled path records them, so autograd
derives Appendix A's gradients and inductor fuses them.

* ``bessel``: Bessel's correction factor ``n / (n - 1)``;
* ``pool``: Eq. (4) with deviations, ``mean(mu)`` and ``mean(var + (mu - mean)^2)``
  over a dimension (LN over the channels, BN over the samples): exact and stable
  for inputs with a large mean, no ``E[x^2] - E[x]^2`` cancellation;
* ``batch_statistics``: BN per ghost chunk (virtual GPU), or pooled over the
  ranks with one all-reduce of packed sums (SyncBN/SyncSN);
* ``softmax_ratios`` / ``hard_ratios``: Eq. (5);
* ``mix``: Eq. (3);
* ``coefficients``: all of them for one layer, ending in the (N, C) ``scale``
  and ``shift`` of the apply ``y = (x - mu_in) * scale + shift``;
* ``switch_norm_definition``: the layer as plain differentiable PyTorch, the
  reference that the compiled path runs and the eager node recomputes for double
  backward.

Everything here is float32 (float64 for float64 inputs) whatever the autocast state.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import ops
from .ops import acc_dtype

__all__ = ["bessel", "pool", "BatchSpec", "BatchStats", "BatchBranch", "batch_statistics",
           "softmax_ratios", "hard_ratios", "mix", "Coefficients", "coefficients",
           "switch_norm_definition", "out_dtype", "chunk_sizes", "chunk_sum", "per_sample"]


def bessel(count: Union[int, Tensor]) -> Union[float, Tensor]:
    """``n / (n - 1)``, Bessel's correction of a biased variance of ``n`` values (1 for a
    single value); ``count`` an int or a tensor."""
    if isinstance(count, Tensor):
        return count / (count - 1).clamp_min(1)
    return count / (count - 1) if count > 1 else 1.0


def pool(mu: Tensor, var: Tensor, dim: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Eq. (4) with deviations: the mean and biased variance of the union of equally sized
    groups along ``dim`` from each group's ``mu`` and ``var``, and ``dev = mu - mean``
    (which the backward needs)."""
    mean = mu.mean(dim, keepdim=True)
    dev = mu - mean
    return mean, torch.addcmul(var, dev, dev).mean(dim, keepdim=True), dev


def out_dtype(x: Tensor) -> torch.dtype:
    """The output dtype: the autocast dtype for a float32 input under autocast, else x's."""
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# -- ghost chunks ---------------------------------------------------------------------------
def chunk_sizes(n: int, ghost: Optional[int]) -> List[int]:
    """Sizes of the consecutive chunks of ``ghost`` samples of a batch of ``n``."""
    if ghost is None or ghost >= n:
        return [n]
    full, rest = divmod(n, ghost)
    return [ghost] * full + ([rest] if rest else [])


def chunk_sum(t: Tensor, sizes: Sequence[int]) -> Tensor:
    """(N, C) -> (k, C): the sum over each consecutive chunk of ``sizes`` samples."""
    if len(sizes) == 1:
        return t.sum(0, keepdim=True)
    g, full = sizes[0], sum(1 for s in sizes if s == sizes[0])
    sums = t[:g * full].unflatten(0, (full, g)).sum(1)
    if full == len(sizes):
        return sums
    return torch.cat([sums, t[g * full:].sum(0, keepdim=True)])


def per_sample(t: Tensor, sizes: Sequence[int]) -> Tensor:
    """(k, C) -> (N, C): each chunk's row for its samples ((1, C) for a single chunk)."""
    if len(sizes) == 1:
        return t
    g, full = sizes[0], sum(1 for s in sizes if s == sizes[0])
    c = t.shape[1]
    out = t[:full].unsqueeze(1).expand(full, g, c).reshape(full * g, c)
    if full == len(sizes):
        return out
    return torch.cat([out, t[full:].expand(sizes[-1], c)])


# -- BN statistics --------------------------------------------------------------------------
class BatchSpec(NamedTuple):
    """How a forward computes BN statistics: chunks of ``ghost`` samples (None: the whole
    local batch); with ``group`` (a process-group name, ``ops.group_name``) chunk j of
    every rank is pooled, with the sums taken relative to ``shift`` (per channel, the same
    on every rank: the running mean), which keeps them small."""
    ghost: Optional[int] = None
    shift: Optional[Tensor] = None
    group: Optional[str] = None


class BatchStats(NamedTuple):
    """The BN statistics of one forward, per chunk: ``mean``, biased ``var`` (k, C) and
    ``count`` (k,), the samples per chunk (over every rank when synchronised)."""
    mean: Tensor
    var: Tensor
    count: Tensor


class BatchBranch(NamedTuple):
    """The BN branch of one forward: its mean and variance for every sample ((N, C), or
    (1, C) for one chunk), ``dev = mu - mean`` per sample, the per-chunk ``stats``, the
    chunk ``sizes``, and the pooled Bessel factor (k, 1) applied to the variance (None
    without)."""
    mean: Tensor
    var: Tensor
    dev: Tensor
    stats: BatchStats
    sizes: List[int]
    factor: Optional[Tensor]


def batch_statistics(mu: Tensor, var: Tensor, batch: BatchSpec, unbiased_m: int = 0
                     ) -> BatchBranch:
    """BN statistics from the IN statistics, per chunk (over the ranks too with
    ``batch.group``: one all-reduce of the packed sums ``[d, var + d^2, 1]``, with
    ``d = mu - shift``). With ``unbiased_m`` (the positions per sample) each chunk's
    variance gets Bessel's correction over its ``count * unbiased_m`` values (the
    authors' SwitchNorm1d)."""
    n, c = mu.shape
    sizes = chunk_sizes(n, batch.ghost)
    if batch.group is not None:
        shift = batch.shift.detach().to(mu.dtype)
        d = mu - shift
        packed = torch.cat([d, torch.addcmul(var, d, d), torch.ones_like(mu[:, :1])], 1)
        packed = ops.all_reduce_sum(chunk_sum(packed, sizes), batch.group)
        count = packed[:, -1:]
        mean_d = packed[:, :c] / count
        mean = mean_d + shift
        bvar = (packed[:, c:2 * c] / count - mean_d * mean_d).clamp_min(0.0)
        dev = mu - per_sample(mean, sizes)
    elif len(sizes) == 1:
        count = mu.new_full((1, 1), n)
        mean, bvar, dev = pool(mu, var, 0)
    else:
        count = mu.new_tensor(sizes)[:, None]
        mean = chunk_sum(mu, sizes) / count
        dev = mu - per_sample(mean, sizes)
        bvar = chunk_sum(torch.addcmul(var, dev, dev), sizes) / count
    factor = None
    if unbiased_m:
        factor = bessel(count * unbiased_m)
        bvar = bvar * factor
    return BatchBranch(per_sample(mean, sizes), per_sample(bvar, sizes), dev,
                       BatchStats(mean, bvar, count[:, 0]), sizes, factor)


# -- ratios (Eq. 5) and mixing (Eq. 3) -------------------------------------------------------
def softmax_ratios(mean_logits: Tensor, var_logits: Tensor) -> Tensor:
    """Eq. (5): the softmax of both logit vectors, (2, K) (mean, var), in float32 (float64)."""
    logits = torch.stack([mean_logits, var_logits])
    return torch.softmax(logits.to(acc_dtype(logits)), -1)


def hard_ratios(mean_logits: Tensor, var_logits: Tensor) -> Tensor:
    """Sparse SN with hard ratios: the one-hot of each argmax, (2, K), no gradient."""
    logits = torch.stack([mean_logits, var_logits]).detach()
    hot = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1])
    return hot.to(acc_dtype(logits))


def mix(means: Sequence[Tensor], variances: Sequence[Tensor], w: Tensor
        ) -> Tuple[Tensor, Tensor, Tensor]:
    """Eq. (3): ``sum_k w[0, k] mean_k`` and ``sum_k w[1, k] var_k`` for the (2, K) ratios
    ``w``, as one broadcast multiply and sum (elementwise: autocast would run a matmul in
    low precision). Also returns the stacked statistics (2, K, N, C) (the ratios'
    gradient is their product with the mixed statistics' gradients)."""
    both = (*means, *variances)
    n, c = torch.broadcast_shapes(*(t.shape for t in both))
    k = len(means)
    stacked = torch.stack([t if t.shape == (n, c) else t.expand(n, c) for t in both])
    stacked = stacked.view(2, k, n, c)
    mean, var = (stacked * w.view(2, k, 1, 1)).sum(1).unbind(0)
    return mean, var, stacked


# -- one layer ------------------------------------------------------------------------------
class Coefficients(NamedTuple):
    """The (N, C) coefficients of one forward, ``y = (x - mu) * scale + shift``, and what
    the eager node's backward needs: the mixed mean, ``inv = (var + eps)^-1/2``,
    ``centred = mu - mean``, gamma, the stacked statistics (None for one normalizer),
    LN's deviations and Bessel factor, and the BN branch."""
    scale: Tensor
    shift: Tensor
    inv: Tensor
    centred: Tensor
    gamma: Optional[Tensor]
    stacked: Optional[Tensor]
    ln_dev: Optional[Tensor]
    ln_factor: float
    bn: Optional[BatchBranch]


def _as(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def coefficients(mu: Tensor, var: Tensor, m: int, normalizers: Sequence[str], eps: float,
                 weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                 ratios: Optional[Tensor] = None, batch: Optional[BatchSpec] = None,
                 running: Optional[Tuple[Tensor, Tensor]] = None,
                 unbiased: Optional[str] = None) -> Coefficients:
    """Eq. (3)-(5) for one layer from the IN statistics ``mu``, ``var`` (N, C) of ``m``
    positions each: the ``normalizers`` (in, ln, bn) mixed by ``ratios`` (2, K) (None: a
    single normalizer); BN from the batch (``batch``) or from ``running`` = (mean, var).
    ``unbiased`` reproduces the authors' variances: ``"in"`` applies Bessel's correction to
    the IN variance first (their 2d/3d layers: LN and BN derived from it), ``"pooled"`` to
    the LN and BN variances over their own pixel sets (their 1d layer)."""
    dtype = mu.dtype
    if unbiased == "in":
        var = var * bessel(m)
    pooled_m = m if unbiased == "pooled" else 0
    means, variances = [], []
    ln_dev = bn = None
    ln_factor = 1.0
    for name in normalizers:
        if name == "in":
            mean_k, var_k = mu, var
        elif name == "ln":
            mean_k, var_k, ln_dev = pool(mu, var, 1)
            if pooled_m:
                ln_factor = bessel(mu.shape[1] * pooled_m)
                var_k = var_k * ln_factor
        elif batch is not None:
            bn = batch_statistics(mu, var, batch, pooled_m)
            mean_k, var_k = bn.mean, bn.var
        else:
            mean_k, var_k = running[0].to(dtype)[None], running[1].to(dtype)[None]
        means.append(mean_k)
        variances.append(var_k)
    if ratios is None:
        mean, mixed, stacked = means[0], variances[0], None
    else:
        mean, mixed, stacked = mix(means, variances, ratios.to(dtype))
    inv = torch.rsqrt(mixed + eps)
    gamma = _as(weight, dtype)
    scale = inv * gamma if gamma is not None else inv
    centred = mu - mean
    shift = centred * scale if bias is None else torch.addcmul(_as(bias, dtype), centred, scale)
    return Coefficients(scale, shift, inv, centred, gamma, stacked, ln_dev, ln_factor, bn)


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape(t.shape + (1,) * (x.dim() - 2))


def switch_norm_definition(x: Tensor, normalizers: Sequence[str], eps: float,
                           weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                           ratios: Optional[Tensor] = None, batch: Optional[BatchSpec] = None,
                           running: Optional[Tuple[Tensor, Tensor]] = None,
                           unbiased: Optional[str] = None, use_ops: bool = False
                           ) -> Tuple[Tensor, Optional[BatchStats]]:
    """The layer as plain differentiable PyTorch: the IN statistics by ``var_mean`` (or the
    ``instance_stats`` operator with ``use_ops``), ``coefficients``, and the apply in
    float32 rounded once to the output dtype (or the ``scale_shift`` operator). Returns
    the output and, with ``batch``, the per-chunk BN statistics."""
    acc = acc_dtype(x)
    if use_ops:
        stats = ops.instance_stats(x)
        mu, var = stats[0], stats[1]
    elif x.dim() == 2:
        mu, var = x.to(acc), torch.zeros_like(x, dtype=acc)
    else:
        var, mu = torch.var_mean(x.to(acc), dim=tuple(range(2, x.dim())), correction=0)
    co = coefficients(mu, var, math.prod(x.shape[2:]), normalizers, eps, weight, bias, ratios,
                      batch, running, unbiased)
    if use_ops:
        y = ops.scale_shift(x, mu, co.scale, co.shift, out_dtype(x))
    else:
        y = (x.to(acc) - _bcast(mu, x)) * _bcast(co.scale, x) + _bcast(co.shift, x)
        y = y.to(out_dtype(x))
    return y, (co.bn.stats if co.bn is not None else None)
