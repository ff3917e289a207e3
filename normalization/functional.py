"""Fused statistics and the autograd function behind every batch-statistics normalizer.

Implements the paper's Eq. (1)-(5) and Appendix A in the shape that is fast on
real hardware:

* all statistics come from the per-(sample, channel) IN statistics (Eq. 4),
  computed in ONE pass over the input by a numerically stable kernel (no
  E[x^2] - E[x]^2 cancellation);
* LN and BN statistics are pooled from the IN statistics with the parallel
  variance formula ``var = mean(var_in + (mu_in - mu)^2)``: Eq. (4) written
  with deviations, exact and stable for inputs with a large mean;
* the output is one fused multiply-add per element,
  ``y = (x - mu_in[n, c]) * scale[n, c] + shift[n, c]``;
* backward needs two per-(n, c) reductions (sum g, sum g (x - mu_in)) in one
  pass and writes dx once. Between the IN statistics and (scale, shift) lies
  an (N, C)-sized computation (``Coefficients``) whose backward is written out
  as in Appendix A, so a layer's fixed cost stays far below its memory traffic.

Large-tensor work runs, on CUDA, through the fused Triton kernels of
``triton_kernels.py`` (NCHW and channels_last, one read per pass; set
``SN_TRITON=0`` to disable), and otherwise through PyTorch's native
batch-norm kernels applied to the (1, N*C, M) view of the input, in which
each "channel" is one (sample, channel) pair.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["instance_stats", "apply_scale_shift", "switch_norm_function", "Coefficients",
           "BatchBranch", "SoftmaxRatios", "HardRatios", "chunk_ids", "set_triton_enabled"]

_FAST_DTYPES = (torch.float32, torch.float64)


def stats_dtype(x: Tensor) -> torch.dtype:
    """Statistics are float32, or float64 for float64 inputs (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _native_ok(*tensors: Tensor) -> bool:
    return all(t.is_contiguous() and t.device.type in ("cpu", "cuda") for t in tensors)


@functools.lru_cache(maxsize=None)
def _triton_kernels():
    """The Triton kernels module when usable on a GPU (not in interpreter mode), else None."""
    if os.environ.get("SN_TRITON", "1") == "0" or not torch.cuda.is_available():
        return None
    try:
        from . import triton_kernels as tk
    except Exception:  # pragma: no cover - a broken triton install falls back to PyTorch
        return None
    return tk if tk.triton_available() and not tk.INTERPRET else None


_TRITON_ENABLED = True


def set_triton_enabled(enabled: bool) -> bool:
    """Use the Triton kernels on CUDA (default) or PyTorch's native kernels; returns the
    previous setting (benchmarks compare both paths in one process)."""
    global _TRITON_ENABLED
    previous, _TRITON_ENABLED = _TRITON_ENABLED, bool(enabled)
    return previous


def _triton_for(x: Tensor):
    """Triton kernels for CUDA tensors whose samples fit 32-bit indexing, else None."""
    if not (_TRITON_ENABLED and x.is_cuda) or math.prod(x.shape[1:]) >= 2 ** 31:
        return None
    return _triton_kernels()


# -- the three large-tensor passes ---------------------------------------------------------
def instance_stats(x3: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-(n, c) mean and biased variance over the last dim of ``x3`` (N, C, M).

    One pass over the data (a stable two-pass/Welford kernel) for contiguous
    float32/float64 inputs; reduced-precision inputs are accumulated in float32.
    """
    n, c, m = x3.shape
    tk = _triton_for(x3)
    if tk is not None:
        return tk.instance_stats(x3)
    if x3.dtype in _FAST_DTYPES and _native_ok(x3) and n * c > 0 and m > 0:
        mean, var = torch.batch_norm_update_stats(x3.reshape(1, n * c, m), None, None, 0.0)
        return mean.view(n, c), var.view(n, c)
    var, mean = torch.var_mean(x3.to(stats_dtype(x3)), dim=-1, correction=0)
    return mean, var


def apply_scale_shift(x3: Tensor, mu: Tensor, scale: Tensor, shift: Tensor,
                      out: Optional[Tensor] = None) -> Tensor:
    """``(x - mu) * scale + shift`` with (N, C) coefficients, into ``out`` (x's dtype).

    One fused pass ``x * scale + (shift - mu * scale)``: PyTorch's eval-mode
    batch-norm kernel on the (1, N*C, M) view for contiguous inputs, addcmul
    otherwise; reduced-precision inputs are computed in float32.
    """
    n, c, m = x3.shape
    tk = _triton_for(x3)
    if tk is not None:
        return tk.apply_scale_shift(x3, mu, scale, shift, out=out)
    if out is None:
        out = torch.empty_like(x3)
    if _native_ok(x3, out):
        ones = torch.ones(n * c, dtype=mu.dtype, device=mu.device)
        empty = mu.new_empty(0)
        torch.ops.aten.native_batch_norm.out(
            x3.view(1, n * c, m), scale.reshape(-1), shift.reshape(-1), mu.reshape(-1), ones,
            False, 0.0, 0.0, out=out.view(1, n * c, m), save_mean=empty, save_invstd=empty)
        return out
    offset = shift - mu * scale
    return torch.addcmul(offset[..., None], x3, scale[..., None], out=out)


def _grad_sums(g3: Tensor, x3: Tensor, mu: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-(n, c) ``sum g`` and ``sum g * (x - mu)`` in one pass over (g, x)."""
    n, c, m = x3.shape
    tk = _triton_for(x3)
    if tk is not None:
        return tk.grad_sums(g3, x3, mu)
    if _native_ok(g3, x3):
        ones = torch.ones(n * c, dtype=mu.dtype, device=mu.device)
        _, sum_gx, sum_g = torch.ops.aten.native_batch_norm_backward(
            g3.reshape(1, n * c, m), x3.reshape(1, n * c, m), None, None, None,
            mu.reshape(-1), ones, True, 0.0, [False, True, True])
        return sum_g.view(n, c).to(mu.dtype), sum_gx.view(n, c).to(mu.dtype)
    g = g3.to(mu.dtype)
    return g.sum(-1), (g * (x3.to(mu.dtype) - mu[..., None])).sum(-1)


# -- the (N, C) part: Eq. (3)-(5) and their backward (Appendix A) --------------------------
def chunk_ids(n: int, chunk: Optional[int], device) -> Tuple[Optional[Tensor], int]:
    """Chunk index of each of ``n`` samples for chunks of ``chunk`` samples (None: one chunk)."""
    if chunk is None or chunk >= n:
        return None, 1
    return torch.arange(n, device=device) // chunk, (n + chunk - 1) // chunk


def _chunk_sum(t: Tensor, ids: Optional[Tensor], k: int) -> Tensor:
    if ids is None:
        return t.sum(0, keepdim=True)
    return t.new_zeros(k, t.shape[1]).index_add_(0, ids, t)


def _per_sample(t: Tensor, ids: Optional[Tensor]) -> Tensor:
    return t if ids is None else t[ids]


def _softmax(logits: Tensor) -> Tensor:
    return torch.softmax(logits if logits.dtype in _FAST_DTYPES else logits.float(), -1)


class SoftmaxRatios:
    """Eq. (5): ``w = softmax(lambda)``, with its backward (Eq. 12-14 of Appendix A).

    A ratio function maps (mean_logits, var_logits) to the importance weights
    and back-propagates their gradients; the logits of both are computed as
    one (2, K) batch.
    """

    def forward(self, mean_logits: Tensor, var_logits: Tensor) -> Tuple[Tensor, Tensor]:
        self.w = _softmax(torch.stack([mean_logits, var_logits]))
        return self.w[0], self.w[1]

    def backward(self, grad_wm: Tensor, grad_wv: Tensor):
        g = torch.stack([grad_wm, grad_wv]).to(self.w.dtype)
        d = self.w * (g - (self.w * g).sum(-1, keepdim=True))
        return d[0], d[1]


class HardRatios:
    """Sparse SN with hard ratios: the one-hot of the argmax, no gradient to the logits."""

    def forward(self, mean_logits: Tensor, var_logits: Tensor) -> Tuple[Tensor, Tensor]:
        logits = torch.stack([mean_logits, var_logits]).detach()
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        hot = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(dtype)
        return hot[0], hot[1]

    def backward(self, grad_wm: Tensor, grad_wv: Tensor):
        return None, None


class BatchBranch:
    """BN statistics of the samples' chunks (ghost batches), maybe summed over ranks.

    ``sync_shift`` (per channel) turns on the synchronised form: every rank
    sends, per chunk, the sums of ``mu - shift``, of ``var + (mu - shift)^2``
    and the sample count, concatenated, in ONE all-reduce over ``group``;
    backward all-reduces the gradients of the chunk statistics, again once. The
    shift (the running mean, identical on all ranks) keeps the sums small so
    the final ``E[d^2] - E[d]^2`` does not cancel.
    """

    def __init__(self, ghost_batch_size: Optional[int] = None, sync_shift: Optional[Tensor] = None,
                 group=None):
        self.ghost = ghost_batch_size
        self.shift = sync_shift
        self.group = group

    def forward(self, mu: Tensor, var: Tensor) -> Tuple[Tensor, Tensor]:
        """Per-sample (or broadcastable (1, C)) BN mean and variance."""
        n, c = mu.shape
        self.ids, self.k = ids, k = chunk_ids(n, self.ghost, mu.device)
        if self.shift is not None:
            d = mu - self.shift
            ones = torch.ones(n, 1, dtype=mu.dtype, device=mu.device)
            sums = _chunk_sum(torch.cat([d, var + d.square(), ones], 1), ids, k)
            torch.distributed.all_reduce(sums, group=self.group)
            self.count = sums[:, -1:]
            mean_d = sums[:, :c] / self.count
            self.mean = mean_d + self.shift
            self.var = (sums[:, c:2 * c] / self.count - mean_d.square()).clamp_min(0.0)
        elif ids is None:
            self.count = n
            self.mean, self.var = _pooled(mu, var, 0)
        else:
            self.count = _chunk_sum(torch.ones(n, 1, dtype=mu.dtype, device=mu.device), ids, k)
            self.mean = _chunk_sum(mu, ids, k) / self.count
            self.var = _chunk_sum(var + (mu - self.mean[ids]).square(), ids, k) / self.count
        return _per_sample(self.mean, ids), _per_sample(self.var, ids)

    def counts(self) -> Tensor:
        """Samples per chunk (k,)."""
        if isinstance(self.count, int):
            return torch.full((1,), float(self.count), dtype=self.mean.dtype,
                              device=self.mean.device)
        return self.count[:, 0]

    def backward(self, mu: Tensor, grad_mean: Tensor, grad_var: Tensor,
                 ) -> Tuple[Tensor, Tensor]:
        """(d mu, d var) of the IN statistics from the summed-per-chunk gradients of the
        BN mean and variance (grad_mean, grad_var: (1, C) or (N, C))."""
        if self.ids is not None:
            grad_mean = _chunk_sum(grad_mean, self.ids, self.k)
            grad_var = _chunk_sum(grad_var, self.ids, self.k)
        elif grad_mean.shape[0] != 1:
            grad_mean, grad_var = grad_mean.sum(0, keepdim=True), grad_var.sum(0, keepdim=True)
        if self.shift is not None:
            c = mu.shape[1]
            g = torch.cat([grad_mean, grad_var], 1)
            torch.distributed.all_reduce(g, group=self.group)
            grad_mean, grad_var = g[:, :c], g[:, c:]
        return _pooled_backward(mu, _per_sample(self.mean, self.ids),
                                _per_sample(grad_mean / self.count, self.ids),
                                _per_sample(grad_var / self.count, self.ids))


def _pooled(mu: Tensor, var: Tensor, dim: int) -> Tuple[Tensor, Tensor]:
    """Mean and variance of the union of equally sized groups along ``dim``:
    ``mean(var + (mu - mean)^2)``, i.e. Eq. (4) with deviations (no cancellation)."""
    inv_n = 1.0 / mu.shape[dim]  # sums: much faster than var_mean at these sizes
    mean = mu.sum(dim, keepdim=True) * inv_n
    return mean, (var + (mu - mean).square()).sum(dim, keepdim=True) * inv_n


def _pooled_backward(mu: Tensor, mean: Tensor, g_mean: Tensor, g_var: Tensor):
    """Gradient of IN stats for ``mean = avg(mu)``, ``var = avg(var + (mu - mean)^2)``,
    given the gradients of the pooled mean/var already divided by the group size."""
    return g_mean + 2.0 * g_var * (mu - mean), g_var


class Coefficients:
    """``(mu_in, var_in) -> (scale, shift)`` of one SN forward, and its backward.

    ``normalizers`` names the statistics mixed (``in``, ``ln``, ``bn``);
    ``bn`` comes from ``batch`` (a BatchBranch) or from ``running`` (mean,
    var). ``ratios`` is a ratio function (``SoftmaxRatios`` by default,
    ``HardRatios``, SSN's sparsestmax) with forward and backward.
    ``var_factor`` scales the IN variance before anything else (the authors'
    unbiased convention). With no logits (``bn`` alone) the ratios are one.
    """

    def __init__(self, normalizers: Sequence[str], eps: float, var_factor: float = 1.0,
                 ratios=None, batch: Optional[BatchBranch] = None,
                 running: Optional[Tuple[Tensor, Tensor]] = None):
        self.normalizers = tuple(normalizers)
        self.eps = eps
        self.var_factor = var_factor
        self.ratio_fn = ratios if ratios is not None else SoftmaxRatios()
        self.batch = batch
        self.running = running
        self.ratios: Tuple[Optional[Tensor], Optional[Tensor]] = (None, None)

    def _stats(self, mu: Tensor, v_in: Tensor):
        stats = []
        for name in self.normalizers:
            if name == "in":
                stats.append((mu, v_in))
            elif name == "ln":
                stats.append(_pooled(mu, v_in, 1))
            elif self.batch is not None:
                stats.append(self.batch.forward(mu, v_in))
            else:
                rm, rv = self.running
                stats.append((rm.to(mu.dtype)[None], rv.to(mu.dtype)[None]))
        return stats

    def forward(self, mu: Tensor, var: Tensor, weight: Optional[Tensor] = None,
                bias: Optional[Tensor] = None, mean_logits: Optional[Tensor] = None,
                var_logits: Optional[Tensor] = None, track: bool = False):
        dt = mu.dtype
        v_in = var * self.var_factor if self.var_factor != 1.0 else var
        stats = self._stats(mu, v_in)
        if mean_logits is None:  # a single normalizer (bn): ratios are one
            w_mean = w_var = stacked = None
            mean, mix_var = stats[0]
        else:
            w_mean, w_var = self.ratios = self.ratio_fn.forward(mean_logits, var_logits)
            if w_mean.dtype != dt:
                w_mean, w_var = w_mean.to(dt), w_var.to(dt)
            # (N, C, K) stacks of the K normalizers' statistics: Eq. (3) is one matmul
            stacked = (torch.stack([m.expand_as(mu) for m, _ in stats], -1),
                       torch.stack([v.expand_as(mu) for _, v in stats], -1))
            mean = stacked[0] @ w_mean
            mix_var = stacked[1] @ w_var
        inv = torch.rsqrt(mix_var + self.eps)
        if weight is not None and weight.dtype != dt:
            weight = weight.to(dt)
        scale = inv if weight is None else inv * weight
        shift = (mu - mean) * scale
        if bias is not None:
            shift = shift + (bias if bias.dtype == dt else bias.to(dt))
        if track:
            self._saved = (mu, v_in, stats, stacked, w_mean, w_var, inv, weight, mean, scale)
        return scale.expand_as(mu), shift

    def backward(self, d_scale: Tensor, d_shift: Tensor, need: Sequence[bool]):
        """Gradients (mu_in, var_in, weight, bias, mean_logits, var_logits) of
        ``sum(d_scale * scale + d_shift * shift)`` (Appendix A, Eq. 6-14);
        ``need`` flags the last four."""
        mu, v_in, stats, stacked, w_mean, w_var, inv, w, mean, scale = self._saved
        d_scale = torch.addcmul(d_scale, mu - mean, d_shift)
        d_mu = scale * d_shift              # shift = (mu - mean) * scale + bias
        d_mean = -d_mu
        d_weight = (d_scale * inv).sum(0) if need[0] else None
        d_bias = d_shift.sum(0) if need[1] else None
        d_inv = d_scale if w is None else d_scale * w
        d_mix = d_inv * inv.pow(3) * -0.5   # d loss / d (mixed variance)
        if w_mean is None:
            wm = wv = (1.0,)
        else:
            wm, wv = w_mean.unbind(), w_var.unbind()
        d_var = None
        for i, name in enumerate(self.normalizers):
            if name == "in":
                d_mu = torch.addcmul(d_mu, wm[i], d_mean)
                g_var = wv[i] * d_mix
            elif name == "ln":
                inv_c = 1.0 / mu.shape[1]
                g_mean = d_mean.sum(1, keepdim=True) * (wm[i] * inv_c)
                g_v = d_mix.sum(1, keepdim=True) * (wv[i] * inv_c)
                dm, g_var = _pooled_backward(mu, stats[i][0], g_mean, g_v)
                d_mu = d_mu + dm
            elif self.batch is not None:
                dm, g_var = self.batch.backward(mu, d_mean * wm[i], d_mix * wv[i])
                d_mu = d_mu + dm
            else:
                continue
            d_var = g_var if d_var is None else d_var + g_var
        if d_var is None:
            d_var = torch.zeros_like(v_in)
        elif self.var_factor != 1.0:
            d_var = d_var * self.var_factor
        d_ml = d_vl = None
        if w_mean is not None and (need[2] or need[3]):
            k = len(stats)
            grad_wm = d_mean.reshape(-1) @ stacked[0].view(-1, k)
            grad_wv = d_mix.reshape(-1) @ stacked[1].view(-1, k)
            d_ml, d_vl = self.ratio_fn.backward(grad_wm, grad_wv)
        return d_mu, d_var.expand_as(mu), d_weight, d_bias, d_ml, d_vl


def as_3d(x: Tensor) -> Tensor:
    """The (N, C, M) view of an (N, C, *spatial) tensor (M = 1 for (N, C))."""
    return x.flatten(2) if x.dim() > 2 else x.unsqueeze(-1)


class _SwitchNormFunction(torch.autograd.Function):
    """y = (x - mu_in) * scale + shift with (scale, shift) = coef.forward(mu_in, var_in, *params).

    Takes and returns tensors of the layer's own shape (not (N, C, M) views),
    so that an in-place op on the output (ReLU) needs no copy in backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, coef: Coefficients, *params: Optional[Tensor]):
        # Allocate the output before the small (N, C) tensors: it keeps the
        # large buffers from being trimmed and faulted back in on every step.
        y = torch.empty_like(x)
        x3 = as_3d(x)
        mu, var = instance_stats(x3)
        scale, shift = coef.forward(mu, var, *params, track=True)
        apply_scale_shift(x3, mu, scale, shift, out=as_3d(y))
        ctx.save_for_backward(x, mu)
        ctx.coef = coef
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, mu = ctx.saved_tensors
        coef: Coefficients = ctx.coef
        x3 = as_3d(x)
        tk = _triton_for(x3)
        if tk is None and x.is_contiguous() and not g.is_contiguous():
            g = g.contiguous()
        g3 = as_3d(g)
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        sum_g, sum_gx = _grad_sums(g3, x3, mu)
        need = ctx.needs_input_grad[2:] + (False,) * (6 - len(ctx.needs_input_grad))
        d_mu, d_var, *d_params = coef.backward(sum_gx, sum_g, need[:4])
        scale = coef._saved[-1].expand_as(mu)
        if dx is not None:
            # dx = g * scale + d_mu_total / M + (x - mu) * 2 d_var / M, with the
            # direct dependence of y on mu_in added to d_mu
            m = x3.shape[-1]
            d_mu = d_mu - scale * sum_g
            dx3 = as_3d(dx)
            if tk is not None:  # one fused pass
                tk.grad_input(g3, x3, mu, scale, d_var * (2.0 / m), d_mu / m, out=dx3)
            else:
                apply_scale_shift(x3, mu, d_var * (2.0 / m), d_mu / m, out=dx3)
                dx3.addcmul_(g3, scale[..., None])
        return (dx, None) + tuple(d_params[:len(ctx.needs_input_grad) - 2])


def switch_norm_function(x: Tensor, coef: Coefficients, *params: Optional[Tensor]) -> Tensor:
    """Normalize ``x`` (N, C, *spatial) with the coefficients computed by ``coef``.

    ``params`` are (weight, bias[, mean_logits, var_logits]). The fused autograd
    function runs when a gradient is needed, a plain computation otherwise.
    """
    if torch.is_grad_enabled() and (x.requires_grad or any(
            p is not None and p.requires_grad for p in params)):
        return _SwitchNormFunction.apply(x, coef, *params)
    y = torch.empty_like(x)
    x3 = as_3d(x)
    mu, var = instance_stats(x3)
    scale, shift = coef.forward(mu, var, *params)
    apply_scale_shift(x3, mu, scale, shift, out=as_3d(y))
    return y
