"""The eager-mode fast path of SN/BN: one autograd node per layer, Appendix A written out.

``functional.switch_norm`` is the definition: plain differentiable PyTorch
around the custom operators, which ``torch.compile``, ``torch.fx`` and double
backward use. In eager mode, autograd would record every one of its ~25 small
(N, C)-sized ops and run ~100 tiny ops in backward, and x's gradient would be
assembled from two shares. Measured on this project's 2-core CPU (one
thread, the same process, ResNet-18 width 16 at 64 px): a training step took
15% longer at batch 8 and 11% at batch 64 than with one node per layer, and a
layer at (32, 64, 56, 56) 1.9x BatchNorm2d against 1.06x. So eager mode runs
this ``torch.autograd.Function`` instead, which is the same computation
(tested against ``switch_norm`` to 1e-10 in float64, outputs and every
gradient):

* forward: the IN statistics, then the (N, C) algebra of Eq. (3)-(5) without
  autograd recording, then the fused apply;
* backward: one pass over (g, x) for ``sum g`` and ``sum g (x - mu)``, the
  (N, C) backward of Appendix A (Eq. 6-14) written out, and one fused pass
  writing ``dx = g * scale + (x - mu) * a + b``.

The ratios of Eq. (5) (softmax, hard one-hot, SSN's sparsestmax) are computed
outside, with autograd: the node takes the (2, K) ratio tensor and returns its
gradient. State passes only through ``ctx.save_for_backward`` and constants on
``ctx``. Double backward (``create_graph=True``) recomputes the layer with
``functional.switch_norm`` and differentiates that, so it works too.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import ops
from .functional import _chunk_sum, _chunks as _sizes, _per_sample  # ghost-batch chunks

__all__ = ["FastSwitchNorm", "LayerSpec"]


class LayerSpec(NamedTuple):
    """The constants of one layer call (everything but tensors)."""
    normalizers: Tuple[str, ...]
    eps: float
    unbiased: Optional[str]          # None, "in" or "pooled" (functional.switch_norm)
    batch: bool                      # BN from the batch (else from running statistics)
    ghost: Optional[int]
    group: Optional[str]             # process-group name when synchronised
    out_dtype: Optional[torch.dtype]


def _pool(mu: Tensor, var: Tensor, dim: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Eq. (4) with deviations over ``dim``: ``mean(mu)``, ``mean(var + dev^2)`` and
    ``dev = mu - mean`` (kept for the backward)."""
    inv_n = 1.0 / mu.shape[dim]
    mean = mu.sum(dim, keepdim=True).mul_(inv_n)
    dev = mu - mean
    return mean, torch.addcmul(var, dev, dev).sum(dim, keepdim=True).mul_(inv_n), dev


def _bessel(n):
    """Factor n / (n - 1) (a number or a tensor; 1 for a single value)."""
    if isinstance(n, Tensor):
        return n / (n - 1).clamp_min(1)
    return n / (n - 1) if n > 1 else 1.0


class _Batch(NamedTuple):
    """BN statistics of one forward: per-chunk mean, var, count (k, C), (k, C), (k, 1);
    the per-sample mean and var (broadcastable to (N, C)), ``dev = mu - mean`` per sample,
    and the factor applied to the variance (pooled Bessel, (k, 1); None without)."""
    mean: Tensor
    var: Tensor
    count: Tensor
    sizes: List[int]
    mean_ps: Tensor
    var_ps: Tensor
    dev: Tensor
    factor: Optional[Tensor]


def _batch_forward(mu: Tensor, v_in: Tensor, spec: LayerSpec, shift: Optional[Tensor],
                   m: int) -> _Batch:
    n, c = mu.shape
    sizes = _sizes(n, spec.ghost)
    if spec.group is not None:
        d = mu - shift
        packed = _chunk_sum(torch.cat([d, torch.addcmul(v_in, d, d), torch.ones_like(mu[:, :1])],
                                      1), sizes)
        dist.all_reduce(packed, group=dist.distributed_c10d._resolve_process_group(spec.group))
        count = packed[:, -1:]
        mean_d = packed[:, :c] / count
        mean, var = mean_d + shift, (packed[:, c:2 * c] / count - mean_d.square()).clamp_min(0)
        dev = mu - _per_sample(mean, sizes)
    elif len(sizes) == 1:
        count = mu.new_full((1, 1), n)
        mean, var, dev = _pool(mu, v_in, 0)
    else:
        count = mu.new_tensor(sizes)[:, None]
        mean = _chunk_sum(mu, sizes) / count
        dev = mu - _per_sample(mean, sizes)
        var = _chunk_sum(torch.addcmul(v_in, dev, dev), sizes) / count
    factor = None
    if spec.unbiased == "pooled":
        factor = _bessel(count * m)
        var = var * factor
    return _Batch(mean, var, count, sizes, _per_sample(mean, sizes), _per_sample(var, sizes),
                  dev, factor)


# indices into ctx.saved_tensors
_X, _MU, _S, _INV, _CENTRED, _SCALE, _W, _GAMMA, _WEIGHT, _BIAS, _SHIFT, _RM, _RV, _LN_DEV, \
    _BN_DEV, _COUNT, _FACTOR = range(17)


class FastSwitchNorm(torch.autograd.Function):
    """``functional.switch_norm`` as one autograd node (see the module docstring).

    ``apply(x, weight, bias, w, shift, running_mean, running_var, spec)`` returns
    ``(y, chunk_mean, chunk_var, chunk_count)`` (the last three non-differentiable,
    empty without batch statistics).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, w, shift, running_mean, running_var, spec: LayerSpec):
        # The output first, before the small tensors: on the CPU this keeps the large
        # buffers from being returned to the OS and faulted back in at every step.
        y = torch.empty_like(x, dtype=spec.out_dtype or x.dtype)
        mu, var = ops.instance_stats_impl(x)
        n, c = mu.shape
        m = ops._spatial_size(x)
        v_in = var * _bessel(m) if spec.unbiased == "in" else var
        means, vars_ = [], []
        batch = ln_dev = None
        f_ln = 1.0
        for name in spec.normalizers:
            if name == "in":
                means.append(mu)
                vars_.append(v_in)
            elif name == "ln":
                mean_k, var_k, ln_dev = _pool(mu, v_in, 1)
                if spec.unbiased == "pooled":
                    f_ln = _bessel(c * m)
                    var_k = var_k * f_ln
                means.append(mean_k)
                vars_.append(var_k)
            elif spec.batch:
                batch = _batch_forward(mu, v_in, spec, shift, m)
                means.append(batch.mean_ps)
                vars_.append(batch.var_ps)
            else:
                means.append(_as(running_mean, mu.dtype)[None])
                vars_.append(_as(running_var, mu.dtype)[None])
        wf = _as(w, mu.dtype)
        stacked = None
        if wf is None:
            mean, mixed = means[0], vars_[0]
        else:   # Eq. (3), elementwise (autocast would run a matmul in low precision)
            k = len(means)
            stacked = torch.stack([t if t.shape == mu.shape else t.expand(n, c)
                                   for t in means + vars_]).view(2, k, n, c)
            mean, mixed = (stacked * wf.view(2, k, 1, 1)).sum(1)
        inv = (mixed + spec.eps).rsqrt_()
        gamma = _as(weight, mu.dtype)
        scale = inv * gamma if gamma is not None else inv
        centred = mu - mean
        shift_y = centred * scale if bias is None else torch.addcmul(_as(bias, mu.dtype),
                                                                     centred, scale)
        y = ops.scale_shift_impl(x, mu, scale, shift_y, spec.out_dtype, out=y)
        ctx.set_materialize_grads(False)   # no zero gradients for the statistics outputs
        ctx.spec, ctx.m, ctx.f_ln = spec, m, f_ln
        ctx.sizes = batch.sizes if batch is not None else None
        ctx.save_for_backward(
            x, mu, stacked, inv, centred, scale, w, gamma, weight, bias, shift, running_mean,
            running_var, ln_dev, *((batch.dev, batch.count, batch.factor) if batch is not None
                                   else (None,) * 3))
        out = (batch.mean, batch.var, batch.count[:, 0]) if batch is not None else \
            (mu.new_empty(0),) * 3
        ctx.mark_non_differentiable(*out)
        return (y,) + out

    @staticmethod
    def backward(ctx, g, *unused):
        if g is None:
            return (None,) * 8
        saved = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _double_backward(ctx, saved, g)
        x, mu, stacked, inv, centred, scale, w, gamma = saved[:8]
        m, need, spec = ctx.m, ctx.needs_input_grad, ctx.spec
        dx = torch.empty_like(x) if need[0] else None     # first: see forward
        if not x.is_cuda and x.is_contiguous() and not g.is_contiguous():
            g = g.contiguous()
        sum_g, sum_gx, _ = ops.grad_sums_impl(g, x, mu)
        # y = (x - mean) * scale + bias, scale = inv * gamma (Appendix A, Eq. 6-14)
        d_scale = torch.addcmul(sum_gx, centred, sum_g)
        d_gamma = (d_scale * inv).sum(0) if need[1] else None
        d_bias = sum_g.sum(0) if need[2] else None
        # d mean = -scale sum g, d var = -1/2 gamma inv^3 d_scale, stacked (2, N, C)
        d_stats = torch.stack([scale * sum_g,
                               (d_scale * scale).mul_(inv.square()).mul_(0.5)]).neg_()
        d_w = None
        wf = _as(w, mu.dtype)
        if wf is None:
            parts = (d_stats,)
        else:
            k = stacked.shape[1]
            if need[3]:
                d_w = _as((stacked * d_stats.unsqueeze(1)).sum((2, 3)), w.dtype)
            parts = (d_stats.unsqueeze(1) * wf.view(2, k, 1, 1)).unbind(1)
        d_in = _stats_backward(ctx, saved, parts, mu)     # (2, N, C): d mu_in, d var_in
        if need[0]:
            f = 2.0 * (_bessel(m) if spec.unbiased == "in" else 1.0) / m
            dx = ops.grad_input_impl(g, x, mu, scale, d_in[1] * f, d_in[0] * (1.0 / m), dx)
        return dx, d_gamma, d_bias, d_w, None, None, None, None


def _as(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _stats_backward(ctx, saved, parts, mu) -> Tensor:
    """(d mu_in, d var_in) stacked (2, N, C) from each normalizer's share ``parts[k]``
    (2, *) of the gradients of the mixed mean and variance. The parts are fresh tensors
    and are updated in place."""
    spec = ctx.spec
    total = None
    for k, name in enumerate(spec.normalizers):
        part = parts[k]
        if name == "in":
            total = part if total is None else total.add_(part)
            continue
        if name == "ln":
            pooled = part.sum(2, keepdim=True).mul_(1.0 / mu.shape[1])    # (2, N, 1)
            if ctx.f_ln != 1.0:
                pooled[1].mul_(ctx.f_ln)
            dev = saved[_LN_DEV]
        elif not spec.batch:
            continue            # running statistics: no gradient to the input's statistics
        else:
            pooled = _batch_backward(ctx, saved, part)                     # (2, N or 1, C)
            dev = saved[_BN_DEV]
        if total is None:
            total = torch.zeros(2, *mu.shape, dtype=mu.dtype, device=mu.device)
        total.add_(pooled)
        total[0].addcmul_(pooled[1], dev, value=2.0)
    if total is None:
        return torch.zeros(2, *mu.shape, dtype=mu.dtype, device=mu.device)
    return total


def _batch_backward(ctx, saved, part: Tensor) -> Tensor:
    """The BN branch's share (2, N, C) of the gradients of its per-sample mean and variance,
    averaged per chunk (over the ranks too when synchronised) and spread back: (2, N or 1, C)."""
    spec, sizes = ctx.spec, ctx.sizes
    count, factor = saved[_COUNT], saved[_FACTOR]       # factor: None without pooled Bessel
    if len(sizes) == 1 and spec.group is None:
        pooled = part.sum(1, keepdim=True).mul_(1.0 / sizes[0])
        if factor is not None:
            pooled[1].mul_(factor)
        return pooled
    c = part.shape[2]
    sums = _chunk_sum(torch.cat([part[0], part[1]], 1), sizes)       # (k, 2C)
    if factor is not None:
        sums[:, c:].mul_(factor)
    if spec.group is not None:
        dist.all_reduce(sums, group=dist.distributed_c10d._resolve_process_group(spec.group))
    sums = _per_sample(sums / count, sizes)
    return torch.stack([sums[:, :c], sums[:, c:]])


def _double_backward(ctx, saved, g):
    """create_graph=True: recompute the layer with the differentiable definition
    (``functional.switch_norm``) and differentiate it, so higher derivatives exist."""
    from .functional import BatchSpec, switch_norm
    x, w, weight, bias, shift, running_mean, running_var = (
        saved[_X], saved[_W], saved[_WEIGHT], saved[_BIAS], saved[_SHIFT], saved[_RM], saved[_RV])
    spec = ctx.spec
    inputs = [t for t in (x, weight, bias, w) if t is not None and t.requires_grad]
    with torch.enable_grad():
        batch = BatchSpec(spec.ghost, shift, spec.group) if spec.batch else None
        running = (running_mean, running_var) if not spec.batch and running_mean is not None \
            else None
        y, _ = switch_norm(x, spec.normalizers, spec.eps, weight, bias, w, batch=batch,
                           running=running, unbiased=spec.unbiased, path="plain")
        grads = iter(torch.autograd.grad(y, inputs, g, create_graph=True, allow_unused=True))
    out = [next(grads) if t is not None and t.requires_grad else None
           for t in (x, weight, bias, w)]
    return tuple(out) + (None, None, None, None)
