"""The passes over the full input of SN, BN and their relatives, as PyTorch custom operators.

Switchable Normalization (Eq. 3-5) needs only three things of the large
(N, C, *spatial) tensors; everything else is (N, C)-sized algebra that
``functional.py`` writes as plain differentiable PyTorch code:

* ``sn::instance_stats(x) -> (mean, var)``: the per-(sample, channel) IN
  statistics of Eq. (4), one numerically stable pass (float32, or float64
  for float64 inputs), from which LN and BN statistics are pooled;
* ``sn::scale_shift(x, mu, scale, shift) -> y``: the fused apply
  ``y = (x - mu) * scale + shift`` with (N, C) coefficients;
* backward (Appendix A): ``sn::grad_sums(g, x, mu)`` gives the per-(n, c)
  ``sum g`` and ``sum g (x - mu)`` in one read of (g, x) and, with ``scale``,
  also writes ``g * scale``; ``sn::grad_input(g, x, mu, scale, a, b)`` writes
  ``dx = g * scale + (x - mu) * a + b`` in one more read of (g, x).

Each operator has a fake (meta) implementation, so ``torch.compile``,
``torch.export`` and FakeTensor tracing see through it, and
``scale_shift``/``instance_stats`` have autograd formulas
(``register_autograd``). ``sn::all_reduce_sum`` is a differentiable
all-reduce for SyncBN/SyncSN (its gradient is the all-reduce of the gradient).

Implementations. Everywhere: PyTorch's native batch-norm kernels applied to
the (1, N*C, M) view of a contiguous input, in which each "channel" is one
(sample, channel) pair (on the CPU the statistics come from the group-norm
kernel instead, see ``_native_stats``), and plain reductions otherwise. On CUDA the fused
Triton kernels of ``triton_kernels.py`` run instead when ``SN_TRITON`` allows
(``auto`` by default): in ``auto`` the first use of each (device, dtype,
layout) runs the kernels once on a small tensor and compares forward and
backward with the native path; a failure or a mismatch logs one warning and
the native path serves the rest of the process, as does any later launch
failure. ``SN_TRITON=1`` skips the check, ``0`` never uses Triton. Every
launch runs under the input's device guard, on that device's current stream.
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["instance_stats", "scale_shift", "grad_sums", "grad_input",
           "all_reduce_sum", "group_name", "triton_mode", "set_triton_mode",
           "triton_status", "reset_triton_checks"]

TRITON_MODES = ("auto", "1", "0")


def acc_dtype(x: Tensor) -> torch.dtype:
    """Statistics and coefficients are float32, or float64 for float64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# -- Triton: selection, self-check, fallback ----------------------------------------------
_mode_override: Optional[str] = None
_checked: Dict[tuple, Optional[str]] = {}   # key -> None (approved) or the reason it is not


def triton_mode() -> str:
    """``SN_TRITON`` (auto, 1 or 0), or the value given to ``set_triton_mode``."""
    mode = _mode_override or os.environ.get("SN_TRITON", "auto").strip().lower() or "auto"
    if mode not in TRITON_MODES:
        raise ValueError(f"SN_TRITON must be one of {', '.join(TRITON_MODES)}, got {mode!r}")
    return mode


def set_triton_mode(mode: Optional[str]) -> Optional[str]:
    """Override ``SN_TRITON`` in this process (None: back to the environment); returns the
    previous override (benchmarks compare the Triton and native paths side by side)."""
    global _mode_override
    if mode is not None and str(mode) not in TRITON_MODES:
        raise ValueError(f"triton mode must be one of {', '.join(TRITON_MODES)}, got {mode!r}")
    previous, _mode_override = _mode_override, None if mode is None else str(mode)
    return previous


def reset_triton_checks():
    """Forget every self-check result (tests)."""
    _checked.clear()


def triton_status() -> Dict[str, str]:
    """``{"device dtype layout": "ok" | reason}`` for every checked combination."""
    return {" ".join(str(k) for k in key): reason or "ok" for key, reason in _checked.items()}


@functools.lru_cache(maxsize=None)
def _load_kernels():
    """The Triton kernels module, or None when triton does not import."""
    try:
        from . import triton_kernels as tk
    except Exception:  # pragma: no cover - a broken triton install falls back to PyTorch
        return None
    return tk if tk.triton is not None else None


def _triton_device(x: Tensor) -> bool:
    """Tensors the Triton kernels are meant for (CUDA; tests widen this to simulate)."""
    tk = _load_kernels()
    return x.is_cuda and tk is not None and not tk.INTERPRET


def _layout(x: Tensor) -> str:
    return "channels_last" if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last) else "strided"


def _key(x: Tensor) -> tuple:
    return (str(x.device), str(x.dtype).replace("torch.", ""), _layout(x))


def _kernels_for(x: Tensor):
    """The Triton kernels to use for ``x``, or None for the native path."""
    if x.dim() not in (3, 4) or not _triton_device(x) or math.prod(x.shape[1:]) >= 2 ** 31:
        return None
    mode = triton_mode()
    if mode == "0":
        return None
    tk = _load_kernels()
    if mode == "1":
        return tk
    key = _key(x)
    if key not in _checked:
        _checked[key] = _self_check(tk, x)
        if _checked[key] is not None:
            _warn_fallback(key, _checked[key])
    return tk if _checked[key] is None else None


def _warn_fallback(key: tuple, reason: str):
    warnings.warn(f"SN Triton kernels disabled for {' '.join(key)}: {reason}; using PyTorch's "
                  "native kernels for the rest of the process (SN_TRITON=0 silences this)",
                  RuntimeWarning, stacklevel=3)


def _launch_failed(x: Tensor, err: BaseException):
    """A launch that raised after the self-check: native path from now on for this key."""
    key = _key(x)
    reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}"
    if _checked.get(key) is None:
        _checked[key] = reason
        _warn_fallback(key, reason)


def _self_check(tk, like: Tensor) -> Optional[str]:
    """Run every kernel once on a small tensor shaped like ``like`` (device, dtype, layout)
    and compare with the native path; None when they agree, else the reason."""
    gen = torch.Generator().manual_seed(0)
    shape = (3, 20, 9, 11) if like.dim() == 4 else (3, 20, 99)
    x = (torch.randn(shape, generator=gen) * 2 + 3).to(like.dtype)
    g = torch.randn(shape, generator=gen).to(like.dtype)
    coefs = [torch.randn(3, 20, generator=gen) for _ in range(4)]
    if _layout(like) == "channels_last":
        x, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, g))
    x, g = x.to(like.device), g.to(like.device)
    scale, shift, a, b = (c.to(like.device, acc_dtype(like)) for c in coefs)
    try:
        with torch.cuda.device(x.device) if x.is_cuda else _nullcontext():
            got = _passes(tk, x, g, scale, shift, a, b)
        want = _passes(None, x, g, scale, shift, a, b)
    except Exception as err:  # compile, launch or driver failures of any kind
        return f"self-check failed ({type(err).__name__}: {str(err).strip()[:200]})"
    tol = {torch.float32: 1e-4, torch.float64: 1e-9}.get(like.dtype, 2.0 ** -6)
    for name, u, v in zip(("mean", "var", "y", "sum g", "sum g(x-mu)", "g*scale", "dx"),
                          got, want):
        u, v = u.double(), v.double()
        bound = tol * (1.0 + v.abs().max().item())
        if u.shape != v.shape or not torch.isfinite(u).all() or (u - v).abs().max() > bound:
            return f"self-check mismatch in {name} (max error {(u - v).abs().max().item():.3g})"
    return None


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _passes(tk, x, g, scale, shift, a, b):
    """Every pass once, with the Triton kernels ``tk`` or natively (None)."""
    if tk is None:
        mean, var = _native_stats(x)
        y = _native_apply(x, mean, scale, shift, x.dtype)
        sg, sgx, dx1 = _native_grad_sums(g, x, mean, scale)
        dx = _native_grad_input(g, x, mean, scale, a, b)
    else:
        mean, var = tk.instance_stats(x)
        y = tk.apply_scale_shift(x, mean, scale, shift)
        dx1 = torch.empty_like(x)
        sg, sgx = tk.grad_sums(g, x, mean, scale=scale, out=dx1)
        dx = tk.grad_input(g, x, mean, scale, a, b)
    return mean, var, y, sg, sgx, dx1, dx


def _with_triton(x: Tensor, triton_fn, native_fn):
    """``triton_fn(tk)`` under x's device guard when Triton serves x, else ``native_fn()``;
    a launch failure falls back to the native path (and disables Triton for x's kind)."""
    tk = _kernels_for(x)
    if tk is not None:
        guard = torch.cuda.device(x.device) if x.is_cuda else _nullcontext()
        if triton_mode() == "1":    # forced: failures are the user's to see
            with guard:
                return triton_fn(tk)
        try:
            with guard:
                return triton_fn(tk)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            _launch_failed(x, err)
    return native_fn()


# -- native implementations ---------------------------------------------------------------
def _rows(x: Tensor) -> Tensor:
    """The (1, N*C, M) view of a contiguous (N, C, *spatial) tensor."""
    return x.view(1, x.shape[0] * x.shape[1], -1)


def _native_ok(x: Tensor) -> bool:
    return x.dtype in (torch.float32, torch.float64) and x.is_contiguous() and x.numel() > 0


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    """An (N, C) or (1, C) coefficient shaped to broadcast against (N, C, *spatial) ``x``."""
    return t.reshape(t.shape + (1,) * (x.dim() - 2))


def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _flat(t: Tensor, n: int, c: int, dtype: torch.dtype) -> Tensor:
    t = _to(t, dtype)
    if t.shape == (n, c) and t.is_contiguous():
        return t.view(-1)
    return t.expand(n, c).reshape(-1)


# Rows (positions per (sample, channel)) at least this long take the group-norm kernel on
# the CPU; shorter ones one batch_norm_update_stats call (measured: the group-norm kernel
# is 4x slower on 2x2 maps, and 1.1-3x faster from 4x4 up).
GROUP_NORM_MIN_ROW = 16
# Welford's float32 variance is off by about 5e-8 * |mean| / std (relative, measured):
# rows whose |mean| exceeds 50 std are recomputed by the two-pass method (3e-7 at any
# mean).
WELFORD_MAX_MEAN_PER_STD = 50.0


def _native_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-(n, c) mean and biased variance of a (N, C, *spatial) tensor.

    On the CPU, for rows of at least ``GROUP_NORM_MIN_ROW`` positions, ATen's group-norm
    kernel with one group per channel: one vectorised moments pass per row (its output
    discarded, ``var = 1 / rstd^2`` with eps 0), 1.1-3x faster in a layer than
    ``batch_norm_update_stats`` on the (1, N*C, M) view, whose contiguous CPU path
    accumulates in scalar float64 loops (``tools/benchmark_norm.py``). Should a row's
    mean exceed ``WELFORD_MAX_MEAN_PER_STD`` standard deviations, the whole tensor is
    recomputed by two passes (``_two_pass_stats``), so the variance stays within 3e-6
    (relative) of float64 at any mean (tested). Shorter rows, and CUDA, use
    ``batch_norm_update_stats`` (float64 accumulation on the CPU, Welford on CUDA); half
    and bfloat16 inputs on the CPU one float32 copy; other layouts ``var_mean``.
    """
    n, c = x.shape[:2]
    acc = acc_dtype(x)
    m = x.numel() // (n * c) if n * c else 0
    if m and x.is_contiguous():
        if not x.is_cuda and m >= GROUP_NORM_MIN_ROW:
            xf = x.to(acc)
            _, mean, rstd = torch.native_group_norm(xf, None, None, n, c, m, c, 0.0)
            var = rstd.square_().reciprocal_()
            if bool((mean.square() > var * WELFORD_MAX_MEAN_PER_STD ** 2).any()):
                return _two_pass_stats(xf.view(n * c, m), n, c)
            return mean, var
        if x.dtype == acc:
            mean, var = torch.batch_norm_update_stats(_rows(x), None, None, 0.0)
            return mean.view(n, c), var.view(n, c)
    var, mean = torch.var_mean(x.reshape(n, c, -1).to(acc), dim=-1, correction=0)
    return mean, var


def _two_pass_stats(rows: Tensor, n: int, c: int) -> Tuple[Tensor, Tensor]:
    """Mean and variance of each row of ``rows`` by ATen's vectorised reductions:
    ``mean = sum(x) / M``, ``d = x - mean``, ``mean += sum(d) / M`` (the correction that
    makes the float32 mean as exact as a float64 accumulation), ``var = |d|^2 / M``."""
    m = rows.shape[1]
    mean = rows.sum(1, keepdim=True).div_(m)
    d = rows - mean
    mean.add_(d.sum(1, keepdim=True).div_(m))
    var = torch.linalg.vector_norm(d, 2, 1).square_().div_(m)
    return mean.view(n, c), var.view(n, c)


@functools.lru_cache(maxsize=64)
def _ones(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A constant ones vector (the unit variance handed to the native apply; read only)."""
    return torch.ones(numel, dtype=dtype, device=device)


def _native_apply(x: Tensor, mu: Tensor, scale: Tensor, shift: Tensor,
                  out_dtype: torch.dtype, out: Optional[Tensor] = None) -> Tensor:
    """``(x - mu) * scale + shift`` in float32 (float64), rounded once to ``out_dtype``
    (into ``out`` when given: x's shape and memory format)."""
    n, c = x.shape[:2]
    acc = acc_dtype(x)
    if out is None:
        out = torch.empty_like(x, dtype=out_dtype)
    if _native_ok(x) and out_dtype == x.dtype:
        ones = _ones(n * c, acc, x.device)
        empty = _ones(0, acc, x.device)
        torch.native_batch_norm(
            _rows(x), _flat(scale, n, c, acc), _flat(shift, n, c, acc), _flat(mu, n, c, acc),
            ones, False, 0.0, 0.0, out=(_rows(out), empty, empty))
        return out
    xf = x.to(acc) - _bcast(_to(mu, acc), x)
    return out.copy_(xf.mul_(_bcast(_to(scale, acc), x)).add_(_bcast(_to(shift, acc), x)))


def _native_grad_sums(g: Tensor, x: Tensor, mu: Tensor, scale: Optional[Tensor]):
    """(sum g, sum g (x - mu)) per (n, c) and, with ``scale``, ``g * scale`` in x's dtype."""
    n, c = x.shape[:2]
    acc = acc_dtype(x)
    dx = None
    if scale is not None:
        dx = torch.mul(g, _bcast(_to(scale, acc), x), out=torch.empty_like(x))
    if x.numel() == 0:
        zeros = torch.zeros(n, c, dtype=acc, device=x.device)
        return zeros, zeros.clone(), dx
    if _native_ok(x) and g.dtype == x.dtype:
        g = g.contiguous()
        ones = _ones(n * c, acc, x.device)
        _, sum_gx, sum_g = torch.ops.aten.native_batch_norm_backward(
            _rows(g), _rows(x), None, None, None, _flat(mu, n, c, acc), ones, True, 0.0,
            [False, True, True])
        return sum_g.view(n, c), sum_gx.view(n, c), dx
    gf, xf = g.reshape(n, c, -1).to(acc), x.reshape(n, c, -1).to(acc)
    return gf.sum(-1), (gf * (xf - mu.to(acc)[..., None])).sum(-1), dx


def _native_grad_input(g: Tensor, x: Tensor, mu: Tensor, scale: Tensor, a: Tensor,
                       b: Tensor, out: Optional[Tensor] = None) -> Tensor:
    acc = acc_dtype(x)
    if x.dtype == acc and (out is None or out.dtype == acc):
        t = _native_apply(x, mu, a, b, acc, out)
        return t.addcmul_(_to(g, acc), _bcast(_to(scale, acc), x))
    t = _native_apply(x, mu, a, b, acc)
    t.addcmul_(_to(g, acc), _bcast(_to(scale, acc), x))
    return t.to(x.dtype) if out is None else out.copy_(t)


# -- implementations (the operators below call these; eager autograd calls them directly) --
def instance_stats_impl(x: Tensor) -> Tuple[Tensor, Tensor]:
    mean, var = _with_triton(x, lambda tk: tk.instance_stats(x), lambda: _native_stats(x))
    if mean.untyped_storage().data_ptr() == var.untyped_storage().data_ptr():
        var = var.clone()   # outputs of an operator may not alias each other
    return mean, var


def scale_shift_impl(x: Tensor, mu: Tensor, scale: Tensor, shift: Tensor,
                     out_dtype: Optional[torch.dtype] = None,
                     out: Optional[Tensor] = None) -> Tensor:
    dtype = out_dtype or x.dtype
    if dtype == x.dtype:
        return _with_triton(x, lambda tk: tk.apply_scale_shift(x, mu, scale, shift, out=out),
                            lambda: _native_apply(x, mu, scale, shift, dtype, out))
    return _native_apply(x, mu, scale, shift, dtype, out)


def grad_sums_impl(g: Tensor, x: Tensor, mu: Tensor, scale: Optional[Tensor] = None
                   ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    def triton(tk):
        dx = torch.empty_like(x) if scale is not None else None
        sg, sgx = tk.grad_sums(g, x, mu, scale=scale, out=dx)
        return sg, sgx, dx
    return _with_triton(x, triton, lambda: _native_grad_sums(g, x, mu, scale))


def grad_input_impl(g: Tensor, x: Tensor, mu: Tensor, scale: Tensor, a: Tensor,
                    b: Tensor, out: Optional[Tensor] = None) -> Tensor:
    return _with_triton(x, lambda tk: tk.grad_input(g, x, mu, scale, a, b, out=out),
                        lambda: _native_grad_input(g, x, mu, scale, a, b, out))


# -- the operators ------------------------------------------------------------------------
@torch.library.custom_op("sn::instance_stats", mutates_args=())
def instance_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-(n, c) mean and biased variance of ``x`` (N, C, *spatial) over the spatial dims."""
    return instance_stats_impl(x)


@instance_stats.register_fake
def _(x):
    shape = x.shape[:2]
    return x.new_empty(shape, dtype=acc_dtype(x)), x.new_empty(shape, dtype=acc_dtype(x))


@torch.library.custom_op("sn::scale_shift", mutates_args=())
def scale_shift(x: Tensor, mu: Tensor, scale: Tensor, shift: Tensor,
                out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``(x - mu) * scale + shift`` with (N, C) or (1, C) coefficients, computed in float32
    (float64) and rounded once to ``out_dtype`` (default x's dtype); x's memory format."""
    return scale_shift_impl(x, mu, scale, shift, out_dtype)


@scale_shift.register_fake
def _(x, mu, scale, shift, out_dtype=None):
    return torch.empty_like(x, dtype=out_dtype or x.dtype)


@torch.library.custom_op("sn::grad_sums", mutates_args=())
def grad_sums(g: Tensor, x: Tensor, mu: Tensor, scale: Optional[Tensor] = None
              ) -> Tuple[Tensor, Tensor, Tensor]:
    """(``sum g``, ``sum g (x - mu)``) per (n, c) in one read of (g, x), and ``g * scale``
    in x's dtype and memory format (an empty tensor without ``scale``)."""
    sg, sgx, dx = grad_sums_impl(g, x, mu, scale)
    return sg, sgx, dx if dx is not None else x.new_empty(0)


@grad_sums.register_fake
def _(g, x, mu, scale=None):
    shape = x.shape[:2]
    dx = torch.empty_like(x) if scale is not None else x.new_empty(0)
    return x.new_empty(shape, dtype=acc_dtype(x)), x.new_empty(shape, dtype=acc_dtype(x)), dx


@torch.library.custom_op("sn::grad_input", mutates_args=())
def grad_input(g: Tensor, x: Tensor, mu: Tensor, scale: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``dx = g * scale + (x - mu) * a + b`` with (N, C) coefficients, in x's dtype and format."""
    return grad_input_impl(g, x, mu, scale, a, b)


@grad_input.register_fake
def _(g, x, mu, scale, a, b):
    return torch.empty_like(x)


# -- autograd of the two forward operators ------------------------------------------------
def _spatial_size(x: Tensor) -> int:
    return math.prod(x.shape[2:])


def _sum_to(t: Tensor, shape) -> Tensor:
    return t.sum_to_size(shape) if t.shape != shape else t


def scale_shift_backward(g: Tensor, x: Tensor, mu: Tensor, scale: Tensor, shapes, need_x: bool,
                         direct: bool = False):
    """Gradients (x, mu, scale, shift) of ``y = (x - mu) * scale + shift`` for ``g``;
    ``shapes`` are those of (mu, scale, shift). ``direct`` calls the implementations
    instead of the operators (eager autograd). Under ``create_graph`` the same formulas
    run as plain differentiable ops, so double backward works."""
    if torch.is_grad_enabled():
        acc = acc_dtype(x)
        gf, xc = g.to(acc), x.to(acc) - _bcast(mu, x)
        dims = tuple(range(2, x.dim()))
        sg, sgx = gf.sum(dims), (gf * xc).sum(dims)
        dx = (gf * _bcast(scale, x)).to(x.dtype) if need_x else None
    else:
        sums = grad_sums_impl if direct else grad_sums
        sg, sgx, dx = sums(g, x, mu, scale if need_x else None)
        dx = dx if need_x else None
    return (dx, _sum_to(-scale * sg, shapes[0]), _sum_to(sgx, shapes[1]), _sum_to(sg, shapes[2]))


def _scale_shift_setup(ctx, inputs, output):
    x, mu, scale, shift, _ = inputs
    ctx.save_for_backward(x, mu, scale)
    ctx.shapes = (mu.shape, scale.shape, shift.shape)


def _scale_shift_backward(ctx, g):
    x, mu, scale = ctx.saved_tensors
    return scale_shift_backward(g, x, mu, scale, ctx.shapes, ctx.needs_input_grad[0]) + (None,)


scale_shift.register_autograd(_scale_shift_backward, setup_context=_scale_shift_setup)


def stats_grad_coefficients(x: Tensor, mu: Tensor, d_mean: Optional[Tensor],
                            d_var: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(a, b) with ``dx = (x - mu) * a + b`` the gradient of x through its IN statistics."""
    m = _spatial_size(x)
    a = torch.zeros_like(mu) if d_var is None else d_var * (2.0 / m)
    b = torch.zeros_like(mu) if d_mean is None else d_mean * (1.0 / m)
    return a, b


def _stats_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[0])


def _stats_backward(ctx, d_mean, d_var):
    x, mu = ctx.saved_tensors
    a, b = stats_grad_coefficients(x, mu, d_mean, d_var)
    if torch.is_grad_enabled():
        acc = acc_dtype(x)
        return ((x.to(acc) - _bcast(mu, x)) * _bcast(a, x) + _bcast(b, x)).to(x.dtype)
    return scale_shift(x, mu, a, b)


instance_stats.register_autograd(_stats_backward, setup_context=_stats_setup)


# -- a differentiable all-reduce for SyncBN / SyncSN --------------------------------------
def group_name(group=None) -> str:
    """The name by which ``all_reduce_sum`` finds a process group (None: the default one)."""
    return (group if group is not None else dist.group.WORLD).group_name


@torch.library.custom_op("sn::all_reduce_sum", mutates_args=())
def all_reduce_sum(t: Tensor, group: str) -> Tensor:
    """The sum of ``t`` over the ranks of process group ``group`` (see ``group_name``);
    its gradient is the same sum of the gradients (one all-reduce each way)."""
    out = t.contiguous().clone()
    dist.all_reduce(out, group=dist.distributed_c10d._resolve_process_group(group))
    return out


@all_reduce_sum.register_fake
def _(t, group):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _all_reduce_setup(ctx, inputs, output):
    ctx.group = inputs[1]


def _all_reduce_backward(ctx, g):
    return all_reduce_sum(g, ctx.group), None


all_reduce_sum.register_autograd(_all_reduce_backward, setup_context=_all_reduce_setup)
