"""The eager-mode fast path of SN/BN: one autograd node per layer, Appendix A written out.

Recorded op by op, a layer's (N, C) algebra is ~25 small forward ops and ~100
tiny backward ops, and x's gradient is assembled from two shares. Measured on
this project's 2-core CPU (one thread, ResNet-18 width 16 at 64 px): a training
step took 15% longer at batch 8 and 11% at batch 64 than with one node per
layer, and a layer at (32, 64, 56, 56) 1.9x BatchNorm2d against 1.06x. So eager
mode runs this ``torch.autograd.Function``:

* forward: ``ops.instance_stats_impl``, then ``algebra.coefficients`` (the very
  function the compiled path records, here run without recording), then the
  fused apply ``ops.scale_shift_impl``;
* backward: one pass over (g, x) for ``sum g`` and ``sum g (x - mu)``, the
  (N, C) backward of Appendix A (Eq. 6-14) written out, and one fused pass
  writing ``dx = g * scale + (x - mu) * a + b``;
* double backward (``create_graph=True``): the layer is recomputed with
  ``algebra.switch_norm_definition`` and differentiated by autograd.

The ratios of Eq. (5) are computed outside, with autograd: the node takes the
(2, K) ratio tensor and returns its gradient. Tested equal to the definition to
1e-10 in float64 (outputs, every gradient, the batch statistics).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import ops
from .algebra import BatchSpec, bessel, chunk_sum, coefficients, per_sample, \
    switch_norm_definition

__all__ = ["FastSwitchNorm", "LayerSpec"]


class LayerSpec(NamedTuple):
    """The constants of one layer call (everything but tensors)."""
    normalizers: Tuple[str, ...]
    eps: float
    unbiased: Optional[str]          # None, "in" or "pooled" (algebra.coefficients)
    batch: bool                      # BN from the batch (else from running statistics)
    ghost: Optional[int]
    group: Optional[str]             # process-group name when synchronised
    out_dtype: torch.dtype


# indices into ctx.saved_tensors
_X, _MU, _S, _INV, _CENTRED, _SCALE, _W, _GAMMA, _WEIGHT, _BIAS, _SHIFT, _RM, _RV, _LN_DEV, \
    _BN_DEV, _COUNT, _FACTOR = range(17)


class FastSwitchNorm(torch.autograd.Function):
    """The layer as one autograd node (see the module docstring).

    ``apply(x, weight, bias, w, shift, running_mean, running_var, spec)`` returns
    ``(y, chunk_mean, chunk_var, chunk_count)`` (the last three non-differentiable,
    empty without batch statistics).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, w, shift, running_mean, running_var, spec: LayerSpec):
        # The output first, before the small tensors: on the CPU this keeps the large
        # buffers from being returned to the OS and faulted back in at every step.
        y = torch.empty_like(x, dtype=spec.out_dtype)
        mu, var = ops.instance_stats_impl(x)
        m = math.prod(x.shape[2:])
        batch = BatchSpec(spec.ghost, shift, spec.group) if spec.batch else None
        running = (running_mean, running_var) if not spec.batch else None
        co = coefficients(mu, var, m, spec.normalizers, spec.eps, weight, bias, w, batch,
                          running, spec.unbiased)
        y = ops.scale_shift_impl(x, mu, co.scale, co.shift, spec.out_dtype, out=y)
        ctx.set_materialize_grads(False)   # no zero gradients for the statistics outputs
        ctx.spec, ctx.m, ctx.f_ln = spec, m, co.ln_factor
        bn = co.bn
        ctx.sizes = bn.sizes if bn is not None else None
        ctx.save_for_backward(
            x, mu, co.stacked, co.inv, co.centred, co.scale, w, co.gamma, weight, bias, shift,
            running_mean, running_var, co.ln_dev,
            *((bn.dev, bn.stats.count, bn.factor) if bn is not None else (None,) * 3))
        out = tuple(bn.stats) if bn is not None else (mu.new_empty(0),) * 3
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
        if w is None:
            parts = (d_stats,)
        else:
            k = stacked.shape[1]
            if need[3]:
                d_w = (stacked * d_stats.unsqueeze(1)).sum((2, 3)).to(w.dtype)
            parts = (d_stats.unsqueeze(1) * w.to(mu.dtype).view(2, k, 1, 1)).unbind(1)
        d_in = _stats_backward(ctx, saved, parts, mu)     # (2, N, C): d mu_in, d var_in
        if need[0]:
            f = 2.0 * (bessel(m) if spec.unbiased == "in" else 1.0) / m
            dx = ops.grad_input_impl(g, x, mu, scale, d_in[1] * f, d_in[0] * (1.0 / m), dx)
        return dx, d_gamma, d_bias, d_w, None, None, None, None


def _stats_backward(ctx, saved, parts, mu) -> Tensor:
    """(d mu_in, d var_in) stacked (2, N, C) from each normalizer's share ``parts[k]``
    (2, *) of the gradients of the mixed mean and variance: the backward of ``pool``
    (d mu += d mean / n + 2 dev d var / n, d var += d var / n) for LN and BN. The parts
    are fresh tensors and are updated in place."""
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
    factor = saved[_FACTOR]             # None without pooled Bessel
    if len(sizes) == 1 and spec.group is None:
        pooled = part.sum(1, keepdim=True).mul_(1.0 / max(sizes[0], 1))
        if factor is not None:
            pooled[1].mul_(factor)
        return pooled
    c = part.shape[2]
    sums = chunk_sum(torch.cat([part[0], part[1]], 1), sizes)       # (k, 2C)
    if factor is not None:
        sums[:, c:].mul_(factor)
    if spec.group is not None:
        sums = ops.all_reduce_sum(sums, spec.group)
    sums = per_sample(sums / saved[_COUNT][:, None], sizes)
    return torch.stack([sums[:, :c], sums[:, c:]])


def _double_backward(ctx, saved, g):
    """create_graph=True: recompute the layer with the differentiable definition and
    differentiate it, so higher derivatives exist."""
    x, w, weight, bias, shift, running_mean, running_var = (
        saved[_X], saved[_W], saved[_WEIGHT], saved[_BIAS], saved[_SHIFT], saved[_RM], saved[_RV])
    spec = ctx.spec
    inputs = [t for t in (x, weight, bias, w) if t is not None and t.requires_grad]
    with torch.enable_grad():
        batch = BatchSpec(spec.ghost, shift, spec.group) if spec.batch else None
        running = (running_mean, running_var) if not spec.batch else None
        y, _ = switch_norm_definition(x, spec.normalizers, spec.eps, weight, bias, w,
                                      batch=batch, running=running, unbiased=spec.unbiased)
        grads = iter(torch.autograd.grad(y, inputs, g, create_graph=True, allow_unused=True))
    out = [next(grads) if t is not None and t.requires_grad else None
           for t in (x, weight, bias, w)]
    return tuple(out) + (None, None, None, None)
