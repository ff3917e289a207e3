"""Switchable Normalization as (N, C)-sized algebra around the passes over the input.

The paper's Eq. (1)-(5) in the shape that is fast on real hardware:

* every statistic comes from the per-(sample, channel) IN statistics (Eq. 4),
  computed in ONE numerically stable pass over the input;
* LN and BN statistics are pooled from them with the parallel variance
  formula ``var = mean(var_in + (mu_in - mu)^2)``: Eq. (4) written with
  deviations, exact and stable for inputs with a large mean; BN per ghost
  chunk (virtual GPU), or summed over the ranks with one differentiable
  all-reduce (SyncBN/SyncSN);
* Eq. (3) mixes them with the ratios of Eq. (5) into per-(n, c) coefficients,
  and the output is one fused pass ``y = (x - mu_in) * scale + shift``.

Everything between the statistics and the apply is plain differentiable
PyTorch on (N, C) tensors, in float32 (float64 for float64 inputs) whatever
the autocast state: autograd derives Appendix A's gradients, ``torch.compile``
and ``torch.fx`` see ordinary ops. ``switch_norm`` runs one of three ways
(``current_path``):

* ``plain`` (under ``torch.compile``, the default): the passes over the input
  as plain ops too (``var_mean``, a multiply-add), which inductor fuses with
  their neighbours;
* ``ops`` (under ``torch.fx`` symbolic tracing, or under ``torch.compile``
  with ``SN_COMPILE=ops``): the passes as the custom operators of ``ops.py``
  with their registered autograd formulas, opaque nodes in the graph;
* ``eager``: the same computation as ONE autograd node per layer
  (``eager.FastSwitchNorm``: the operators' implementations, the (N, C)
  backward written out, double backward by recomputation through this
  module), because recording the small ops one by one costs more than the
  layer itself at small batches (figures in ``eager.py``).
"""
from __future__ import annotations

import math
import os
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.fx
from torch import Tensor

from . import ops
from .ops import acc_dtype

__all__ = ["switch_norm", "batch_statistics", "BatchSpec", "BatchStats", "current_path",
           "compile_path", "set_compile_path", "fx_tracing", "softmax_ratios", "hard_ratios",
           "spatial_size", "as_3d", "autocast_output"]

COMPILE_PATHS = ("plain", "ops")
_compile_override: Optional[str] = None


def compile_path() -> str:
    """How SN runs under ``torch.compile``: ``plain`` ops (default) or the custom ``ops``
    (``SN_COMPILE`` or ``set_compile_path``)."""
    path = _compile_override or os.environ.get("SN_COMPILE", "plain").strip().lower()
    if path not in COMPILE_PATHS:
        raise ValueError(f"SN_COMPILE must be one of {', '.join(COMPILE_PATHS)}, got {path!r}")
    return path


def set_compile_path(path: Optional[str]) -> Optional[str]:
    """Override ``SN_COMPILE`` (None: back to the environment); returns the previous override."""
    global _compile_override
    if path is not None and path not in COMPILE_PATHS:
        raise ValueError(f"compile path must be one of {', '.join(COMPILE_PATHS)}, got {path!r}")
    previous, _compile_override = _compile_override, path
    return previous


def fx_tracing() -> bool:
    """True while ``torch.fx.symbolic_trace`` runs Python code on proxies."""
    check = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing",
                    torch.fx._symbolic_trace.is_fx_tracing)
    return check()


def current_path() -> str:
    """``plain`` or ``ops`` under torch.compile, ``ops`` under fx tracing, else ``eager``."""
    if torch.compiler.is_compiling():
        return compile_path()
    return "ops" if fx_tracing() else "eager"


# -- shape helpers (fx.wrap: recorded as one call while fx traces, run with real shapes) --
def spatial_size(x: Tensor) -> int:
    """Number of positions per (sample, channel): H*W (1 for (N, C))."""
    return math.prod(x.shape[2:])


def as_3d(x: Tensor) -> Tensor:
    """The (N, C, M) view of an (N, C, *spatial) tensor (M = 1 for (N, C))."""
    return x.flatten(2) if x.dim() > 2 else x.unsqueeze(-1)


def _bessel(var: Tensor, count) -> Tensor:
    """``var * n / (n - 1)``: Bessel's correction of a biased variance of ``count`` values
    (unchanged for a single value); ``count`` an int or a tensor."""
    if isinstance(count, Tensor):
        return var * (count / (count - 1).clamp_min(1))
    return var * (count / (count - 1)) if count > 1 else var


def _out_dtype(x: Tensor) -> torch.dtype:
    """The output dtype: the autocast dtype for a float32 input under autocast, else x's."""
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def autocast_output(y: Tensor) -> Tensor:
    """A float32 output of a normalizer under autocast, in the autocast dtype (the contract
    of every normalizer here: statistics in float32, output in the autocast dtype)."""
    if not fx_tracing() and y.dtype == torch.float32 and \
            torch.is_autocast_enabled(y.device.type):
        return y.to(torch.get_autocast_dtype(y.device.type))
    return y


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape(t.shape + (1,) * (x.dim() - 2))


# -- the passes over the input --------------------------------------------------------------
def _plain_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    xf = x.to(acc_dtype(x))
    if x.dim() == 2:
        return xf, torch.zeros_like(xf)
    var, mean = torch.var_mean(xf, dim=tuple(range(2, x.dim())), correction=0)
    return mean, var


def _instance_stats(x: Tensor, path: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(mu_in, var_in, the x the apply must read) on ``path``."""
    if path == "plain":
        return (*_plain_stats(x), x)
    stats = ops.instance_stats(x)   # (a proxy while fx traces: index, do not unpack)
    return stats[0], stats[1], x


def _apply(x: Tensor, mu: Tensor, scale: Tensor, shift: Tensor, path: str) -> Tensor:
    """``(x - mu) * scale + shift`` in float32, rounded once to the output dtype."""
    if path == "plain":
        acc = acc_dtype(x)
        y = (x.to(acc) - _bcast(mu, x)) * _bcast(scale, x) + _bcast(shift, x)
        return y.to(_out_dtype(x))
    if fx_tracing():
        return ops.scale_shift(x, mu, scale, shift)
    return ops.scale_shift(x, mu, scale, shift, _out_dtype(x))


# -- BN statistics: ghost chunks, sync -----------------------------------------------------
class BatchSpec(NamedTuple):
    """How a forward computes BN statistics: chunks of ``ghost`` samples (None: the whole
    local batch); with ``group`` (a process-group name, see ``ops.group_name``) chunk j of
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


def chunk_average(stat: Tensor, dtype: torch.dtype) -> Tensor:
    """The average over the chunks (rows) of a per-chunk statistic (k, C), in ``dtype``."""
    if fx_tracing():
        return stat.mean(0).to(dtype)
    avg = stat[0] if stat.shape[0] == 1 else stat.mean(0)
    return avg if avg.dtype == dtype else avg.to(dtype)


def _chunks(n: int, ghost: Optional[int]) -> List[int]:
    if ghost is None or ghost >= n:
        return [n]
    full, rest = divmod(n, ghost)
    return [ghost] * full + ([rest] if rest else [])


def _chunk_sum(t: Tensor, sizes: Sequence[int]) -> Tensor:
    """(N, C) -> (k, C): the sum over each consecutive chunk of ``sizes`` samples."""
    if len(sizes) == 1:
        return t.sum(0, keepdim=True)
    g, full = sizes[0], sum(1 for s in sizes if s == sizes[0])
    sums = t[:g * full].unflatten(0, (full, g)).sum(1)
    if full == len(sizes):
        return sums
    return torch.cat([sums, t[g * full:].sum(0, keepdim=True)])


def _per_sample(t: Tensor, sizes: Sequence[int]) -> Tensor:
    """(k, C) -> (N, C): each chunk's row for its samples ((1, C) for a single chunk)."""
    if len(sizes) == 1:
        return t
    g, full = sizes[0], sum(1 for s in sizes if s == sizes[0])
    c = t.shape[1]
    out = t[:full].unsqueeze(1).expand(full, g, c).reshape(full * g, c)
    if full == len(sizes):
        return out
    return torch.cat([out, t[full:].expand(sizes[-1], c)])


def batch_statistics(mu: Tensor, var: Tensor, ghost: Optional[int] = None,
                     shift: Optional[Tensor] = None, group: Optional[str] = None,
                     unbiased_m: int = 0) -> Tuple[Tensor, Tensor, BatchStats]:
    """BN mean and variance for every sample ((N, C), or (1, C) for one chunk) from the
    IN statistics, and the per-chunk ``BatchStats``. Differentiable. With ``unbiased_m``
    (the positions per sample) each chunk's variance gets Bessel's correction over its
    ``count * unbiased_m`` values (the authors' SwitchNorm1d)."""
    n, c = mu.shape
    sizes = _chunks(n, ghost)
    if group is not None:
        d = mu - shift.detach().to(mu.dtype)
        packed = torch.cat([d, var + d.square(), torch.ones_like(mu[:, :1])], 1)
        packed = ops.all_reduce_sum(_chunk_sum(packed, sizes), group)
        count = packed[:, -1:]
        mean_d = packed[:, :c] / count
        chunk_mean = mean_d + shift
        chunk_var = (packed[:, c:2 * c] / count - mean_d.square()).clamp_min(0.0)
    elif len(sizes) == 1:
        count = mu.new_full((1, 1), n)
        chunk_mean, chunk_var = _pooled(mu, var, 0)
    else:
        count = mu.new_tensor(sizes)[:, None]
        chunk_mean = _chunk_sum(mu, sizes) / count
        dev = mu - _per_sample(chunk_mean, sizes)
        chunk_var = _chunk_sum(var + dev.square(), sizes) / count
    if unbiased_m:
        chunk_var = _bessel(chunk_var, count * unbiased_m)
    stats = BatchStats(chunk_mean, chunk_var, count[:, 0])
    return _per_sample(chunk_mean, sizes), _per_sample(chunk_var, sizes), stats


for _name in ("spatial_size", "_bessel", "batch_statistics", "_out_dtype", "acc_dtype"):
    torch.fx.wrap(_name)


# -- ratios (Eq. 5) -------------------------------------------------------------------------
def softmax_ratios(mean_logits: Tensor, var_logits: Tensor) -> Tensor:
    """Eq. (5): the softmax of both logit vectors, (2, K) (mean, var), in float32 (float64)."""
    logits = torch.stack([mean_logits, var_logits])
    return torch.softmax(logits.to(acc_dtype(logits)), -1)


def hard_ratios(mean_logits: Tensor, var_logits: Tensor) -> Tensor:
    """Sparse SN with hard ratios: the one-hot of each argmax, (2, K), no gradient."""
    logits = torch.stack([mean_logits, var_logits]).detach()
    hot = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1])
    return hot.to(acc_dtype(logits))


def _pooled(mu: Tensor, var: Tensor, dim: int) -> Tuple[Tensor, Tensor]:
    """Mean and variance of the union of equally sized groups along ``dim``:
    ``mean(var) + var(mu)``, i.e. Eq. (4) without its ``E[x^2] - E[x]^2`` cancellation
    (the variance of the group means is taken by a stable two-pass reduction)."""
    spread, mean = torch.var_mean(mu, dim, correction=0, keepdim=True)
    return mean, var.mean(dim, keepdim=True) + spread


def _eager(x, normalizers, eps, weight, bias, ratios, batch, running, unbiased):
    from .eager import FastSwitchNorm, LayerSpec
    spec = LayerSpec(tuple(normalizers), eps, unbiased, batch is not None,
                     batch.ghost if batch is not None else None,
                     batch.group if batch is not None else None, _out_dtype(x))
    # (copies: the buffers move in place after this forward, the node keeps what it used)
    shift = batch.shift.detach().clone() if batch is not None and batch.group is not None \
        else None
    rm, rv = (t.detach().clone() for t in running) if running is not None else (None, None)
    y, mean, var, count = FastSwitchNorm.apply(x, weight, bias, ratios, shift, rm, rv, spec)
    return y, (BatchStats(mean, var, count) if batch is not None else None)


def _mix(stats: Sequence[Tuple[Tensor, Tensor]], w: Tensor) -> Tuple[Tensor, Tensor]:
    """Eq. (3): ``sum_k w[0, k] mean_k`` and ``sum_k w[1, k] var_k`` for the (mean, var)
    pairs ``stats`` and the (2, K) ratios ``w``, as one broadcast multiply and sum
    (elementwise: no matmul, which autocast would run in low precision)."""
    k = len(stats)
    parts = torch.broadcast_tensors(*[s[0] for s in stats], *[s[1] for s in stats])
    both = torch.stack(parts, -1).unflatten(-1, (2, k))     # (N, C, 2, K)
    mixed = (both * w).sum(-1)
    return mixed[..., 0], mixed[..., 1]


# -- one layer ------------------------------------------------------------------------------
def switch_norm(x: Tensor, normalizers: Sequence[str], eps: float,
                weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                ratios: Optional[Tensor] = None,
                batch: Optional[BatchSpec] = None,
                running: Optional[Tuple[Tensor, Tensor]] = None,
                unbiased: Optional[str] = None,
                path: Optional[str] = None) -> Tuple[Tensor, Optional[BatchStats]]:
    """Normalize ``x`` (N, C, *spatial) by Eq. (3): the ``normalizers`` (in, ln, bn)
    mixed by ``ratios`` (2, K): the mean weights, then the variance weights (None: a
    single normalizer).

    BN statistics come from the batch (``batch``) or from ``running`` = (mean, var).
    ``unbiased`` reproduces the authors' variances: ``"in"`` applies Bessel's correction
    to the IN variance before anything else (their 2d/3d layers: LN and BN derived from
    it), ``"pooled"`` to the LN and BN variances over their own pixel sets (their 1d layer:
    unbiased over C for LN, over N for BN).
    Returns the output and, with ``batch``, the per-chunk BN statistics (for the
    running averages or the batch average). ``path`` overrides ``current_path()``;
    in eager mode the same computation runs as one autograd node
    (``eager.FastSwitchNorm``).
    """
    path = path or current_path()
    if path == "eager":
        return _eager(x, normalizers, eps, weight, bias, ratios, batch, running, unbiased)
    mu, var, x_in = _instance_stats(x, path)
    if unbiased == "in":
        var = _bessel(var, spatial_size(x))
    m = spatial_size(x) if unbiased == "pooled" else 0
    bn = None
    stats = []
    for name in normalizers:
        if name == "in":
            stats.append((mu, var))
        elif name == "ln":
            mean_ln, var_ln = _pooled(mu, var, 1)
            if unbiased == "pooled":
                var_ln = _bessel(var_ln, mu.shape[1] * m)
            stats.append((mean_ln, var_ln))
        elif batch is not None:
            out = batch_statistics(mu, var, batch.ghost, batch.shift, batch.group, m)
            stats.append((out[0], out[1]))
            bn = out[2]
        else:
            rm, rv = running
            stats.append((rm.to(mu.dtype)[None], rv.to(mu.dtype)[None]))
    if ratios is None:
        mean, mixed = stats[0]
    else:
        mean, mixed = _mix(stats, ratios.to(mu.dtype))
    scale = torch.rsqrt(mixed + eps)
    if weight is not None:
        scale = scale * weight.to(mu.dtype)
    if bias is not None:
        shift = torch.addcmul(bias.to(mu.dtype), mu - mean, scale)
    else:
        shift = (mu - mean) * scale
    return _apply(x_in, mu, scale, shift, path), bn
