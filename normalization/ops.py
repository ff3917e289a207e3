"""The passes over the full input of SN, BN and their relatives, as PyTorch custom operators.

Switchable Normalization (Eq. 3-5) needs only three things of the large
(N, C, *spatial) tensors; everything else is (N, C)-sized algebra
(``algebra.py``):

* ``instance_stats(x) -> (mean, var)``: the per-(sample, channel) IN
  statistics of Eq. (4) in one pass: the statistics contract of every path is
  the mean and the biased variance over the spatial positions, float32 (float64
  for float64 inputs), accurate at any mean (the variance within 2e-6 of float64);
* ``scale_shift(x, mu, scale, shift) -> y``: the fused apply
  ``y = (x - mu) * scale + shift`` with (N, C) coefficients;
* backward (Appendix A): ``grad_sums(g, x, mu)`` gives the per-(n, c) ``sum g``
  and ``sum g (x - mu)`` in one read of (g, x) and, with ``scale``, also writes
  ``g * scale``; ``grad_input(g, x, mu, scale, a, b)`` writes
  ``dx = g * scale + (x - mu) * a + b`` in one more read of (g, x).

They are operators of the namespace ``switchable_norm`` with fake (meta)
implementations, so ``torch.compile`` and FakeTensor tracing see through them;
``scale_shift`` and ``instance_stats`` have autograd formulas. A name of the
namespace that is already taken, or taken later, by another definition is
refused with an error naming both. ``all_reduce_sum`` is a differentiable
all-reduce for SyncBN/SyncSN.

Implementations (``docs/normalization.md`` has the figures):

* CPU: the statistics come from ATen's group-norm kernel with one group per
  channel (1.1-3x faster in a layer than ``batch_norm_update_stats``, 12-100x
  faster than ``var_mean``, whose CPU path accumulates in float64); rows whose
  mean exceeds ``MAX_MEAN_PER_STD`` standard deviations, where its float32
  variance would be off by more than 1e-6, are recomputed in float64. The
  apply and the backward passes are PyTorch's batch-norm kernels on the
  (1, N*C, M) view, in which every "channel" is one (sample, channel) pair.
* CUDA: the Triton kernels of ``triton_kernels.py`` when ``SN_TRITON`` allows
  (``auto`` by default). In ``auto`` the first use on each (device, dtype,
  layout) runs every kernel variant a layer launches (statistics in one segment
  and in several with the merge kernel, the apply, ``grad_sums`` with and
  without ``dx``, ``grad_input``) on a small tensor and compares it with the
  native path, statistics at float32 tolerance; a failure or a mismatch logs
  one warning and the native path serves the rest of the process, as does any
  later launch failure. ``SN_TRITON=1`` skips the check, ``0`` never uses
  Triton. Every launch runs under the input's device guard, on that device's
  current stream. The native CUDA statistics shift each row by its first value
  (no host synchronisation) and reduce with ``var_mean``.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["NAMESPACE", "instance_stats", "scale_shift", "grad_sums", "grad_input",
           "all_reduce_sum", "group_name", "triton_mode", "set_triton_mode",
           "triton_status", "reset_triton_checks", "acc_dtype"]

NAMESPACE = "switchable_norm"
TRITON_MODES = ("auto", "1", "0")


def acc_dtype(x: Tensor) -> torch.dtype:
    """Statistics and coefficients are float32, or float64 for float64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    """An (N, C) or (1, C) coefficient shaped to broadcast against (N, C, *spatial) ``x``."""
    return t.reshape(t.shape + (1,) * (x.dim() - 2))


def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


# -- native implementations ---------------------------------------------------------------
# The group-norm kernel's float32 variance is off by about 6e-8 * |mean| / std (relative,
# measured on rows of 2 to 3136 positions): rows beyond this ratio are recomputed in float64.
MAX_MEAN_PER_STD = 16.0


def _native_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-(n, c) mean and biased variance of a (N, C, *spatial) tensor (the contract above)."""
    n, c = x.shape[:2]
    m = math.prod(x.shape[2:])
    acc = acc_dtype(x)
    # (.to returns a float32 x as it is, whatever its strides)
    xf = x.to(acc, memory_format=torch.contiguous_format).contiguous()
    if xf.numel() == 0:     # NaN for rows of no positions, as var_mean
        mean = torch.full((n, c), math.nan if m == 0 else 0.0, dtype=acc, device=x.device)
        return mean, mean.clone()
    if x.is_cuda:           # shifted by each row's first value: accurate at any mean
        rows = xf.view(n, c, m)
        first = rows[..., :1]
        var, mean = torch.var_mean(rows - first, -1, correction=0)
        return mean + first[..., 0], var
    _, mean, rstd = torch.native_group_norm(xf, None, None, n, c, m, c, 0.0)
    var = rstd.square_().reciprocal_()
    if acc == torch.float32:
        bad = (mean.square() > var * MAX_MEAN_PER_STD ** 2) | (var == math.inf)
        if bool(bad.any()):
            rows = bad.view(-1)
            v64, m64 = torch.var_mean(xf.view(n * c, m)[rows].double(), -1, correction=0)
            mean.view(-1)[rows] = m64.float()
            var.view(-1)[rows] = v64.float()
    return mean, var


def _rows(x: Tensor) -> Tensor:
    """The (1, N*C, M) view of a contiguous (N, C, *spatial) tensor."""
    return x.view(1, x.shape[0] * x.shape[1], -1)


def _native_ok(x: Tensor) -> bool:
    return x.dtype in (torch.float32, torch.float64) and x.is_contiguous() and x.numel() > 0


def _flat(t: Tensor, n: int, c: int, dtype: torch.dtype) -> Tensor:
    t = _to(t, dtype)
    if t.shape == (n, c) and t.is_contiguous():
        return t.view(-1)
    return t.expand(n, c).reshape(-1)


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
    """Tensors the Triton kernels are meant for: CUDA (tests widen this to simulate).
    Asked before anything imports triton, so a CPU run never does."""
    if not x.is_cuda:
        return False
    tk = _load_kernels()
    return tk is not None and not tk.INTERPRET


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


# The self-check's sample: M = 576 positions span several blocks in every dtype and layout,
# so a forced split of 3 runs the segmented statistics and the merge kernel.
_CHECK_SHAPE = {4: (2, 8, 24, 24), 3: (2, 8, 576)}
_CHECK_SPLIT = 3
# float32 results (statistics, sums) are compared at float32 tolerance whatever x's dtype;
# elementwise outputs at the tolerance of one rounding to x's dtype
_STAT_TOL = {torch.float64: 1e-9}
_OUT_TOL = {torch.float32: 1e-5, torch.float64: 1e-9}


def _self_check(tk, like: Tensor) -> Optional[str]:
    """Run every kernel variant a layer launches on a small tensor shaped like ``like``
    (device, dtype, layout) and compare with the native path; None when they agree, else
    the reason."""
    gen = torch.Generator().manual_seed(0)
    shape = _CHECK_SHAPE[like.dim()]
    n, c = shape[:2]
    x = (torch.randn(shape, generator=gen) * 2 + 3).to(like.dtype)
    g = torch.randn(shape, generator=gen).to(like.dtype)
    if _layout(like) == "channels_last":
        x, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, g))
    x, g = x.to(like.device), g.to(like.device)
    scale, shift, a, b = (torch.randn(n, c, generator=gen).to(like.device, acc_dtype(like))
                          for _ in range(4))
    try:
        with _device_guard(x):
            got = _variants(tk, x, g, scale, shift, a, b)
        want = _variants(None, x, g, scale, shift, a, b)
    except Exception as err:  # compile, launch or driver failures of any kind
        return f"self-check failed ({type(err).__name__}: {str(err).strip()[:200]})"
    for name, u in got.items():
        v = want[name.split(" [")[0]].double()
        u = u.double()
        tol = (_STAT_TOL.get(like.dtype, 1e-5) if u.shape == (n, c)
               else _OUT_TOL.get(like.dtype, 2.0 ** -6))
        err = (u - v).abs().max().item() if u.shape == v.shape else math.inf
        if not torch.isfinite(u).all() or not err <= tol * (1.0 + v.abs().max().item()):
            return f"self-check mismatch in {name} (max error {err:.3g})"
    return None


def _variants(tk, x, g, scale, shift, a, b) -> Dict[str, Tensor]:
    """Every pass once natively (``tk`` None), or every Triton variant by name."""
    if tk is None:
        mean, var = _native_stats(x)
        sg, sgx, dx1 = _native_grad_sums(g, x, mean, scale)
        return {"mean": mean, "var": var, "y": _native_apply(x, mean, scale, shift, x.dtype),
                "sum g": sg, "sum g(x-mu)": sgx, "g*scale": dx1,
                "dx": _native_grad_input(g, x, mean, scale, a, b)}
    out = {}
    for split in (1, _CHECK_SPLIT):
        seg = "one segment" if split == 1 else "segments + merge"
        out[f"mean [{seg}]"], out[f"var [{seg}]"] = tk.instance_stats(x, split=split)
        mean = out["mean [one segment]"]
        out[f"sum g [{seg}, no dx]"], out[f"sum g(x-mu) [{seg}, no dx]"] = tk.grad_sums(
            g, x, mean, split=split)
        dx1 = torch.empty_like(x)
        out[f"sum g [{seg}, dx]"], out[f"sum g(x-mu) [{seg}, dx]"] = tk.grad_sums(
            g, x, mean, scale=scale, out=dx1, split=split)
        out[f"g*scale [{seg}]"] = dx1
    out["y"] = tk.apply_scale_shift(x, out["mean [one segment]"], scale, shift)
    out["dx"] = tk.grad_input(g, x, out["mean [one segment]"], scale, a, b)
    return out


def _device_guard(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _with_triton(x: Tensor, triton_fn, native_fn):
    """``triton_fn(tk)`` under x's device guard when Triton serves x, else ``native_fn()``;
    a launch failure falls back to the native path (and disables Triton for x's kind)."""
    tk = _kernels_for(x)
    if tk is not None:
        if triton_mode() == "1":    # forced: failures are the user's to see
            with _device_guard(x):
                return triton_fn(tk)
        try:
            with _device_guard(x):
                return triton_fn(tk)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            _launch_failed(x, err)
    return native_fn()


# -- implementations (the operators call these; the eager autograd node calls them directly) --
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
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")  # noqa: TOR901 (kept for the process)


def _existing_schema(name: str) -> Optional[str]:
    try:
        packet = getattr(getattr(torch.ops, NAMESPACE), name)
    except (AttributeError, RuntimeError):
        return None
    return str(packet.default._schema)


def _define(schema: str, impl, fake, backward=None, setup=None):
    """Define ``NAMESPACE::schema`` with its implementation (every device), fake kernel and
    (with ``backward``) autograd formula.

    A name already defined with another schema is refused here; one defined with the same
    schema (this module imported twice, e.g. from a clone and from site-packages) is
    reused. Defined through a library fragment rather than ``custom_op``, so that a later
    definition of the same name elsewhere is refused by the dispatcher (``custom_op``
    would silently replace it)."""
    name = schema.split("(", 1)[0]
    full = f"{NAMESPACE}::{schema}"
    existing = _existing_schema(name)
    if existing is not None:
        if existing.replace(" ", "") != full.replace(" ", ""):
            raise RuntimeError(
                f"operator {NAMESPACE}::{name} is already registered as '{existing}', not "
                f"'{full}': another library (or another version of this one) took the name; "
                "load only one of them")
        return getattr(getattr(torch.ops, NAMESPACE), name).default
    _LIB.define(schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)
    if backward is not None:
        torch.library.register_autograd(f"{NAMESPACE}::{name}", backward, setup_context=setup,
                                        lib=_LIB)
    return getattr(getattr(torch.ops, NAMESPACE), name).default


# autograd of the two forward operators (used under torch.compile with SN_COMPILE=ops)
def _sum_to(t: Tensor, shape) -> Tensor:
    return t.sum_to_size(shape) if t.shape != shape else t


def _scale_shift_setup(ctx, inputs, output):
    x, mu, scale, shift, _ = inputs
    ctx.save_for_backward(x, mu, scale)
    ctx.shapes = (mu.shape, scale.shape, shift.shape)


def _scale_shift_backward(ctx, g):
    """Gradients (x, mu, scale, shift) of ``y = (x - mu) * scale + shift``; under
    ``create_graph`` as plain differentiable ops, so double backward works."""
    x, mu, scale = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    if torch.is_grad_enabled():
        acc = acc_dtype(x)
        gf, xc = g.to(acc), x.to(acc) - _bcast(mu, x)
        dims = tuple(range(2, x.dim()))
        sg, sgx = gf.sum(dims), (gf * xc).sum(dims)
        dx = (gf * _bcast(scale, x)).to(x.dtype) if need_x else None
    else:
        sg, sgx, dx = grad_sums(g, x, mu, scale if need_x else None)
        dx = dx if need_x else None
    shapes = ctx.shapes
    return (dx, _sum_to(-scale * sg, shapes[0]), _sum_to(sgx, shapes[1]),
            _sum_to(sg, shapes[2]), None)


def _stats_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[0])


def _stats_backward(ctx, d_mean, d_var):
    """x's gradient through its IN statistics: ``dx = (x - mu) * a + b``."""
    x, mu = ctx.saved_tensors
    m = math.prod(x.shape[2:])
    a = torch.zeros_like(mu) if d_var is None else d_var * (2.0 / m)
    b = torch.zeros_like(mu) if d_mean is None else d_mean * (1.0 / m)
    if torch.is_grad_enabled():
        acc = acc_dtype(x)
        return ((x.to(acc) - _bcast(mu, x)) * _bcast(a, x) + _bcast(b, x)).to(x.dtype)
    return scale_shift(x, mu, a, b)


def _stats_fake(x):
    shape = x.shape[:2]
    return x.new_empty(shape, dtype=acc_dtype(x)), x.new_empty(shape, dtype=acc_dtype(x))


def _grad_sums(g, x, mu, scale=None):
    sg, sgx, dx = grad_sums_impl(g, x, mu, scale)
    return sg, sgx, dx if dx is not None else x.new_empty(0)


#: Per-(n, c) mean and biased variance of ``x`` (N, C, *spatial) over the spatial dims.
instance_stats = _define("instance_stats(Tensor x) -> (Tensor, Tensor)",
                         instance_stats_impl, _stats_fake, _stats_backward, _stats_setup)
#: ``(x - mu) * scale + shift`` with (N, C) or (1, C) coefficients, computed in float32
#: (float64) and rounded once to ``out_dtype`` (default x's dtype); x's memory format.
scale_shift = _define(
    "scale_shift(Tensor x, Tensor mu, Tensor scale, Tensor shift, ScalarType? out_dtype=None)"
    " -> Tensor", scale_shift_impl,
    lambda x, mu, scale, shift, out_dtype=None: torch.empty_like(x, dtype=out_dtype or x.dtype),
    _scale_shift_backward, _scale_shift_setup)
#: (``sum g``, ``sum g (x - mu)``) per (n, c) in one read of (g, x), and ``g * scale`` in
#: x's dtype and memory format (an empty tensor without ``scale``).
grad_sums = _define("grad_sums(Tensor g, Tensor x, Tensor mu, Tensor? scale=None) "
                    "-> (Tensor, Tensor, Tensor)", _grad_sums,
                    lambda g, x, mu, scale=None: (*_stats_fake(x), torch.empty_like(x)
                                                  if scale is not None else x.new_empty(0)))
#: ``dx = g * scale + (x - mu) * a + b`` with (N, C) coefficients, in x's dtype and format.
grad_input = _define("grad_input(Tensor g, Tensor x, Tensor mu, Tensor scale, Tensor a, "
                     "Tensor b) -> Tensor", grad_input_impl,
                     lambda g, x, *rest: torch.empty_like(x))


# -- a differentiable all-reduce for SyncBN / SyncSN --------------------------------------
def group_name(group=None) -> str:
    """The name by which ``all_reduce_sum`` finds a process group (None: the default one)."""
    return (group if group is not None else dist.group.WORLD).group_name


def _all_reduce(t: Tensor, group: str) -> Tensor:
    out = t.contiguous().clone()
    dist.all_reduce(out, group=dist.distributed_c10d._resolve_process_group(group))
    return out


def _all_reduce_setup(ctx, inputs, output):
    ctx.group = inputs[1]


#: The sum of ``t`` over the ranks of process group ``group`` (see ``group_name``); its
#: gradient is the same sum of the gradients (one all-reduce each way).
all_reduce_sum = _define(
    "all_reduce_sum(Tensor t, str group) -> Tensor", _all_reduce,
    lambda t, group: torch.empty_like(t, memory_format=torch.contiguous_format),
    lambda ctx, g: (all_reduce_sum(g, ctx.group), None), _all_reduce_setup)
