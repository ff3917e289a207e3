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


def _pooled(mu: Tensor, var: Tensor, dim: int) -> Tuple[Tensor, Tensor]:
    """Eq. (4) with deviations: ``mean(mu)``, ``mean(var + (mu - mean)^2)``."""
    inv_n = 1.0 / mu.shape[dim]
    mean = mu.sum(dim, keepdim=True) * inv_n
    return mean, (var + (mu - mean).square()).sum(dim, keepdim=True) * inv_n


def _bessel(n):
    """Factor n / (n - 1) (a number or a tensor; 1 for a single value)."""
    if isinstance(n, Tensor):
        return n / (n - 1).clamp_min(1)
    return n / (n - 1) if n > 1 else 1.0


class _Batch(NamedTuple):
    """BN statistics of one forward: per-chunk mean, var, count (k, C), (k, 1), their
    per-sample expansions, and the factor applied to the variance (pooled Bessel)."""
    mean: Tensor
    var: Tensor
    count: Tensor
    sizes: List[int]
    factor: Tensor


def _batch_forward(mu: Tensor, v_in: Tensor, spec: LayerSpec, shift: Optional[Tensor],
                   m: int) -> _Batch:
    n, c = mu.shape
    sizes = _sizes(n, spec.ghost)
    if spec.group is not None:
        d = mu - shift
        packed = _chunk_sum(torch.cat([d, v_in + d.square(), torch.ones_like(mu[:, :1])], 1),
                            sizes)
        dist.all_reduce(packed, group=dist.distributed_c10d._resolve_process_group(spec.group))
        count = packed[:, -1:]
        mean_d = packed[:, :c] / count
        mean, var = mean_d + shift, (packed[:, c:2 * c] / count - mean_d.square()).clamp_min(0)
    elif len(sizes) == 1:
        count = mu.new_full((1, 1), n)
        mean, var = _pooled(mu, v_in, 0)
    else:
        count = mu.new_tensor(sizes)[:, None]
        mean = _chunk_sum(mu, sizes) / count
        var = _chunk_sum(v_in + (mu - _per_sample(mean, sizes)).square(), sizes) / count
    factor = _bessel(count * m) if spec.unbiased == "pooled" else torch.ones_like(count)
    return _Batch(mean, var * factor, count, sizes, factor)


def _statistics(mu, v_in, spec: LayerSpec, shift, running, m):
    """The (mean, var) of every normalizer (broadcastable to (N, C)), the BN batch, and
    the LN variance factor."""
    stats, batch, f_ln = [], None, 1.0
    for name in spec.normalizers:
        if name == "in":
            stats.append((mu, v_in))
        elif name == "ln":
            mean, var = _pooled(mu, v_in, 1)
            if spec.unbiased == "pooled":
                f_ln = _bessel(mu.shape[1] * m)
            stats.append((mean, var * f_ln))
        elif spec.batch:
            batch = _batch_forward(mu, v_in, spec, shift, m)
            stats.append((_per_sample(batch.mean, batch.sizes),
                          _per_sample(batch.var, batch.sizes)))
        else:
            stats.append((running[0].to(mu.dtype)[None], running[1].to(mu.dtype)[None]))
    return stats, batch, f_ln


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
        m = ops._spatial_size(x)
        v_in = var * _bessel(m) if spec.unbiased == "in" else var
        stats, batch, f_ln = _statistics(mu, v_in, spec, shift, (running_mean, running_var), m)
        means = torch.stack(torch.broadcast_tensors(*[s[0] for s in stats]))   # (K, N, C)
        vars_ = torch.stack(torch.broadcast_tensors(*[s[1] for s in stats]))
        wf = _as(w, mu.dtype)
        if wf is None:
            mean, mixed = means[0], vars_[0]
        else:   # Eq. (3), elementwise (autocast would run a matmul in low precision)
            mean = (means * wf[0, :, None, None]).sum(0)
            mixed = (vars_ * wf[1, :, None, None]).sum(0)
        inv = (mixed + spec.eps).rsqrt_()
        gamma = _as(weight, mu.dtype)
        scale = inv * gamma if gamma is not None else inv
        centred = mu - mean
        shift_y = centred * scale if bias is None else torch.addcmul(_as(bias, mu.dtype),
                                                                     centred, scale)
        y = ops.scale_shift_impl(x, mu, scale, shift_y, spec.out_dtype, out=y)
        ctx.spec, ctx.m, ctx.f_ln = spec, m, f_ln
        ctx.sizes = batch.sizes if batch is not None else None
        extra = (batch.mean, batch.count, batch.factor) if batch is not None else ()
        ctx.save_for_backward(x, mu, means, vars_, inv, centred, scale, w, gamma, weight, bias,
                              shift, running_mean, running_var, *extra)
        out = (batch.mean, batch.var, batch.count[:, 0]) if batch is not None else \
            (mu.new_empty(0),) * 3
        ctx.mark_non_differentiable(*out)
        return (y,) + out

    @staticmethod
    def backward(ctx, g, *unused):
        saved = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _double_backward(ctx, saved, g)
        x, mu, means, vars_, inv, centred, scale, w, gamma = saved[:9]
        m, need = ctx.m, ctx.needs_input_grad
        dx = torch.empty_like(x) if need[0] else None     # first: see forward
        if not x.is_cuda and x.is_contiguous() and not g.is_contiguous():
            g = g.contiguous()
        sum_g, sum_gx, _ = ops.grad_sums_impl(g, x, mu)
        # y = (x - mean) * scale + bias, scale = inv * gamma (Appendix A, Eq. 6-14)
        d_scale = torch.addcmul(sum_gx, centred, sum_g)
        d_mean = (scale * sum_g).neg_()
        d_gamma = (d_scale * inv).sum(0) if need[1] else None
        d_bias = sum_g.sum(0) if need[2] else None
        d_mixed = inv.pow(3).mul_(-0.5) * (d_scale if gamma is None else d_scale * gamma)
        d_w = None
        if w is not None and need[3]:
            d_w = torch.stack([(means * d_mean).sum((1, 2)), (vars_ * d_mixed).sum((1, 2))])
            d_w = _as(d_w, w.dtype)
        d_mu, d_var = _stats_backward(ctx, saved, _as(w, mu.dtype), d_mean, d_mixed)
        if ctx.spec.unbiased == "in":
            d_var = d_var * _bessel(m)
        if need[0]:
            dx = ops.grad_input_impl(g, x, mu, scale, d_var * (2.0 / m), d_mu * (1.0 / m), dx)
        return dx, d_gamma, d_bias, d_w, None, None, None, None


def _as(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _stats_backward(ctx, saved, wf, d_mean, d_mixed) -> Tuple[Tensor, Tensor]:
    """(d mu_in, d var_in) from the gradients of the mixed mean and variance."""
    mu, means = saved[1], saved[2]
    spec = ctx.spec
    if wf is not None:      # the gradient of each normalizer's statistics (K, N, C)
        d_means, d_vars = wf[0, :, None, None] * d_mean, wf[1, :, None, None] * d_mixed
    d_mu = d_var = None
    for k, name in enumerate(spec.normalizers):
        gm, gv = (d_mean, d_mixed) if wf is None else (d_means[k], d_vars[k])
        if name == "ln":
            inv_c = 1.0 / mu.shape[1]
            gm = gm.sum(1, keepdim=True) * inv_c
            gv = gv.sum(1, keepdim=True) * (ctx.f_ln * inv_c)
            gm = torch.addcmul(gm, gv * 2.0, mu - means[k, :, :1])
        elif name == "bn":
            if not spec.batch:
                continue
            gm, gv = _batch_backward(ctx, saved, gm, gv)
        d_mu = gm if d_mu is None else d_mu + gm
        d_var = gv if d_var is None else d_var + gv
    if d_mu is None:
        return torch.zeros_like(mu), torch.zeros_like(mu)
    return d_mu, d_var


def _batch_backward(ctx, saved, gm: Tensor, gv: Tensor) -> Tuple[Tensor, Tensor]:
    """(d mu_in, d var_in) of the BN branch from the gradients of its per-sample mean and
    variance: summed per chunk (and over the ranks when synchronised), then spread back."""
    mu = saved[1]
    chunk_mean, count, factor = saved[-3:]
    sizes = ctx.sizes
    spec = ctx.spec
    gm, gv = _chunk_sum(gm, sizes), _chunk_sum(gv, sizes) * factor
    if spec.group is not None:
        c = mu.shape[1]
        both = torch.cat([gm, gv], 1)
        dist.all_reduce(both, group=dist.distributed_c10d._resolve_process_group(spec.group))
        gm, gv = both[:, :c], both[:, c:]
    gm, gv = _per_sample(gm / count, sizes), _per_sample(gv / count, sizes)
    return torch.addcmul(gm, gv * 2.0, mu - _per_sample(chunk_mean, sizes)), gv


def _double_backward(ctx, saved, g):
    """create_graph=True: recompute the layer with the differentiable definition
    (``functional.switch_norm``) and differentiate it, so higher derivatives exist."""
    from .functional import BatchSpec, switch_norm
    x, w, weight, bias, shift, running_mean, running_var = (
        saved[0], saved[7], saved[9], saved[10], saved[11], saved[12], saved[13])
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
