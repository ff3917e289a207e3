"""Triton kernels for the three large-tensor passes of Switchable Normalization.

The paper's Eq. (4) needs only the per-(sample, channel) IN statistics of the
input; everything else (LN and BN statistics, ratios, Eq. (3) and (5)) is an
(N, C)-sized computation (``algebra.coefficients``). What remains on the
large tensors are three passes, written here as fused Triton kernels:

1. ``instance_stats``: per-(n, c) mean and biased variance in one read of x;
2. ``apply_scale_shift``: ``y = (x - mu[n, c]) * scale[n, c] + shift[n, c]``,
   one read of x and one write of y (Eq. 3 folded into (scale, shift));
3. backward (Appendix A): ``grad_sums`` reads g and x once for
   ``sum g`` and ``sum g (x - mu)``; ``grad_input`` writes
   ``dx = g * scale + (x - mu) * a + b`` in one more read of g and x.

Layouts. Every kernel sees the input as an (N, C, M) strided view (M = H*W)
and works on (BLOCK_C, BLOCK_M) tiles of one sample: for NCHW tensors M is
contiguous and a tile holds a few rows of many positions; for channels_last
tensors C is contiguous and a tile holds a few positions of many channels.
Strides are kernel arguments (Triton specialises a stride of 1), so any mix
of layouts among x, g and out is correct; tiles are sized for x's layout.

Stability. ``instance_stats`` keeps a Welford accumulator (mean, M2) per tile
lane, all lanes of a tile advancing in lockstep so the update weight 1/k is
one scalar per step. Lanes, and then segments of M that ran in separate
programs, are merged by the parallel (Chan et al.) formula
``M2 = sum M2_i + sum n_i (mean_i - mean)^2``: no ``E[x^2] - E[x]^2``
cancellation, so inputs with mean 1e3 and std 1 keep ~1e-6 relative variance.
Accumulation is float32 (float64 for float64 inputs).

Launch plans are heuristics (no autotuning, no host-device synchronisation):
tile shapes follow the layout and M; reductions split M into segments when
(N, C) alone would give too few programs to fill the GPU, and a small kernel
(or one ``sum``) merges the segments.

Set ``TRITON_INTERPRET=1`` before this module is imported to run the kernels
on CPU tensors with Triton's interpreter (slow; for tests).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None
    tl = None

__all__ = ["triton_available", "instance_stats", "apply_scale_shift", "grad_sums", "grad_input"]

_INTERPRETER_SMS = 4        # "SM count" in interpreter mode: small, so tests reach the split path
_REDUCE_TILE = 2048         # elements per tile of a reduction (three accumulators per element)
_MAP_TILE = 4096            # elements per tile of an elementwise pass
_INT32_MAX = 2 ** 31 - 1


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


def triton_available() -> bool:
    """True when the kernels can run: triton imports and CUDA is present (or the
    interpreter was selected with ``TRITON_INTERPRET=1`` before import)."""
    return triton is not None and (INTERPRET or torch.cuda.is_available())


# -- kernels ------------------------------------------------------------------------------
@_jit
def _rows(n, offs_c, sn, sc, ALIGN: tl.constexpr):
    """Offsets (int64) of the (n, c) rows; ALIGN divides them all (lets loads vectorise
    when M is not a multiple of 16, e.g. 14x14 and 7x7 maps)."""
    off = n.to(tl.int64) * sn + offs_c * sc
    if ALIGN > 1:
        off = tl.multiple_of(off, ALIGN)
    return off


@_jit
def _cols(offs_m, sm, ALIGN: tl.constexpr):
    """Offsets of the positions ``offs_m``; ALIGN divides them all."""
    off = offs_m * sm
    if ALIGN > 1:
        off = tl.multiple_of(off, ALIGN)
    return off


@_jit
def _stats_kernel(x_ptr, mean_ptr, var_ptr, C, M_V, SEG, NC, NUM_CB, sxn, sxc, sxm,
                  BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, VM: tl.constexpr,
                  ALIGN_R: tl.constexpr, ALIGN_M: tl.constexpr, SHIFTED: tl.constexpr):
    """Mean and biased variance of segment ``program_id(1)`` (SEG positions) of each
    row; with SHIFTED the mean is stored minus the row's first value."""
    M = M_V * VM
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    n = pid // NUM_CB
    offs_c = (pid % NUM_CB) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    rows = x_ptr + _rows(n, offs_c, sxn, sxc, ALIGN_R)[:, None]
    acc_ty = mean_ptr.dtype.element_ty
    m_lo = seg * SEG
    m_hi = tl.minimum(m_lo + SEG, M)
    # shift each row by its first value: the accumulators then hold O(std) numbers
    shift = tl.load(rows, mask=c_ok[:, None], other=0.0).to(acc_ty)
    mean = tl.zeros([BLOCK_C, BLOCK_M], dtype=acc_ty)
    m2 = tl.zeros([BLOCK_C, BLOCK_M], dtype=acc_ty)
    for start in range(m_lo, m_hi, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mask = c_ok[:, None] & (offs_m < m_hi)[None, :]
        x = tl.load(rows + _cols(offs_m, sxm, ALIGN_M)[None, :], mask=mask, other=0.0)
        x = x.to(acc_ty) - shift
        # every live lane has seen the same number of values: one scalar weight
        w = 1.0 / ((start - m_lo) // BLOCK_M + 1).to(acc_ty)
        delta = x - mean
        new_mean = tl.where(mask, mean + delta * w, mean)
        m2 = tl.where(mask, m2 + delta * (x - new_mean), m2)
        mean = new_mean
    # merge the lanes of each row (Chan): lane j saw ceil((len - j) / BLOCK_M) values
    length = m_hi - m_lo
    cnt = ((length - tl.arange(0, BLOCK_M) + BLOCK_M - 1) // BLOCK_M).to(acc_ty)
    row_mean = tl.sum(mean * cnt[None, :], 1) / length.to(acc_ty)
    dev = mean - row_mean[:, None]
    row_m2 = tl.sum(m2, 1) + tl.sum(dev * dev * cnt[None, :], 1)
    if not SHIFTED:
        row_mean += tl.sum(shift, 1)
    out = seg * NC + n * C + offs_c
    tl.store(mean_ptr + out, row_mean, mask=c_ok)
    tl.store(var_ptr + out, row_m2 / length.to(acc_ty), mask=c_ok)


@_jit
def _merge_stats_kernel(x_ptr, pmean_ptr, pvar_ptr, mean_ptr, var_ptr, C, NC, M, SEG, SPLIT,
                        sxn, sxc, BLOCK: tl.constexpr):
    """Merge the (shifted mean, var) of SPLIT segments of SEG positions (Chan), and
    add back the shift, each row's first value."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NC
    acc_ty = mean_ptr.dtype.element_ty
    shift = tl.load(x_ptr + (offs // C).to(tl.int64) * sxn + (offs % C) * sxc, mask=ok, other=0.0)
    total = tl.zeros([BLOCK], dtype=acc_ty)
    for s in range(0, SPLIT):
        cnt = tl.minimum(SEG, M - s * SEG).to(acc_ty)
        total += cnt * tl.load(pmean_ptr + s * NC + offs, mask=ok, other=0.0)
    mean = total / M.to(acc_ty)
    m2 = tl.zeros([BLOCK], dtype=acc_ty)
    for s in range(0, SPLIT):
        cnt = tl.minimum(SEG, M - s * SEG).to(acc_ty)
        dev = tl.load(pmean_ptr + s * NC + offs, mask=ok, other=0.0) - mean
        m2 += cnt * (tl.load(pvar_ptr + s * NC + offs, mask=ok, other=0.0) + dev * dev)
    tl.store(mean_ptr + offs, mean + shift.to(acc_ty), mask=ok)
    tl.store(var_ptr + offs, m2 / M.to(acc_ty), mask=ok)


@_jit
def _grad_sums_kernel(g_ptr, x_ptr, mu_ptr, sg_ptr, sgx_ptr, scale_ptr, dx_ptr, C, M_V, SEG,
                      NC, NUM_CB, sgn, sgc, sgm, sxn, sxc, sxm, smn, smc, ssn, ssc, sdn, sdc, sdm,
                      BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, VM: tl.constexpr,
                      ALIGN_R: tl.constexpr, ALIGN_M: tl.constexpr, DX: tl.constexpr):
    """``sum g`` and ``sum g (x - mu)`` of segment ``program_id(1)`` of each row; with DX
    also ``dx = g * scale`` of every element read (the direct share of x's gradient)."""
    M = M_V * VM
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    n = pid // NUM_CB
    offs_c = (pid % NUM_CB) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    g_rows = g_ptr + _rows(n, offs_c, sgn, sgc, ALIGN_R)[:, None]
    x_rows = x_ptr + _rows(n, offs_c, sxn, sxc, ALIGN_R)[:, None]
    acc_ty = sg_ptr.dtype.element_ty
    mu = tl.load(mu_ptr + n * smn + offs_c * smc, mask=c_ok, other=0.0).to(acc_ty)
    if DX:
        scale = _load_coef(scale_ptr, n, offs_c, ssn, ssc, c_ok, acc_ty)
        d_rows = dx_ptr + _rows(n, offs_c, sdn, sdc, ALIGN_R)[:, None]
    m_lo = seg * SEG
    m_hi = tl.minimum(m_lo + SEG, M)
    acc_g = tl.zeros([BLOCK_C, BLOCK_M], dtype=acc_ty)
    acc_gx = tl.zeros([BLOCK_C, BLOCK_M], dtype=acc_ty)
    for start in range(m_lo, m_hi, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mask = c_ok[:, None] & (offs_m < m_hi)[None, :]
        g = tl.load(g_rows + _cols(offs_m, sgm, ALIGN_M)[None, :], mask=mask, other=0.0)
        x = tl.load(x_rows + _cols(offs_m, sxm, ALIGN_M)[None, :], mask=mask, other=0.0)
        g = g.to(acc_ty)
        acc_g += g
        acc_gx += g * (x.to(acc_ty) - mu[:, None])    # g is 0 off the mask
        if DX:
            tl.store(d_rows + _cols(offs_m, sdm, ALIGN_M)[None, :],
                     (g * scale).to(dx_ptr.dtype.element_ty), mask=mask)
    out = seg * NC + n * C + offs_c
    tl.store(sg_ptr + out, tl.sum(acc_g, 1), mask=c_ok)
    tl.store(sgx_ptr + out, tl.sum(acc_gx, 1), mask=c_ok)


@_jit
def _tile(C, M_V, NUM_CB, NUM_MB, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
          VM: tl.constexpr):
    """Sample, channels, positions and mask of this program's tile (1-D grid)."""
    M = M_V * VM
    pid = tl.program_id(0)
    rest = pid // NUM_MB
    n = rest // NUM_CB
    offs_c = (rest % NUM_CB) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_m = (pid % NUM_MB) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (offs_c < C)[:, None] & (offs_m < M)[None, :]
    return n, offs_c, offs_m, mask


@_jit
def _load_coef(ptr, n, offs_c, sn, sc, c_ok, acc_ty: tl.constexpr):
    """An (N, C) coefficient of sample n as a (BLOCK_C, 1) column."""
    return tl.load(ptr + n * sn + offs_c * sc, mask=c_ok, other=0.0).to(acc_ty)[:, None]


@_jit
def _scale_shift_kernel(x_ptr, y_ptr, mu_ptr, scale_ptr, shift_ptr, C, M_V, NUM_CB, NUM_MB,
                        sxn, sxc, sxm, syn, syc, sym, smn, smc, ssn, ssc, stn, stc,
                        BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, VM: tl.constexpr,
                        ALIGN_R: tl.constexpr, ALIGN_M: tl.constexpr):
    """``y = (x - mu) * scale + shift`` on one (BLOCK_C, BLOCK_M) tile of one sample."""
    n, offs_c, offs_m, mask = _tile(C, M_V, NUM_CB, NUM_MB, BLOCK_C, BLOCK_M, VM)
    c_ok = offs_c < C
    acc_ty: tl.constexpr = mu_ptr.dtype.element_ty
    mu = _load_coef(mu_ptr, n, offs_c, smn, smc, c_ok, acc_ty)
    scale = _load_coef(scale_ptr, n, offs_c, ssn, ssc, c_ok, acc_ty)
    shift = _load_coef(shift_ptr, n, offs_c, stn, stc, c_ok, acc_ty)
    x = tl.load(x_ptr + _rows(n, offs_c, sxn, sxc, ALIGN_R)[:, None]
                + _cols(offs_m, sxm, ALIGN_M)[None, :], mask=mask, other=0.0)
    y = (x.to(acc_ty) - mu) * scale + shift
    tl.store(y_ptr + _rows(n, offs_c, syn, syc, ALIGN_R)[:, None]
             + _cols(offs_m, sym, ALIGN_M)[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@_jit
def _grad_input_kernel(g_ptr, x_ptr, dx_ptr, mu_ptr, scale_ptr, a_ptr, b_ptr, C, M_V, NUM_CB,
                       NUM_MB, sgn, sgc, sgm, sxn, sxc, sxm, sdn, sdc, sdm,
                       smn, smc, ssn, ssc, san, sac, sbn, sbc,
                       BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, VM: tl.constexpr,
                       ALIGN_R: tl.constexpr, ALIGN_M: tl.constexpr):
    """``dx = g * scale + (x - mu) * a + b`` on one (BLOCK_C, BLOCK_M) tile of one sample."""
    n, offs_c, offs_m, mask = _tile(C, M_V, NUM_CB, NUM_MB, BLOCK_C, BLOCK_M, VM)
    c_ok = offs_c < C
    acc_ty: tl.constexpr = mu_ptr.dtype.element_ty
    mu = _load_coef(mu_ptr, n, offs_c, smn, smc, c_ok, acc_ty)
    scale = _load_coef(scale_ptr, n, offs_c, ssn, ssc, c_ok, acc_ty)
    a = _load_coef(a_ptr, n, offs_c, san, sac, c_ok, acc_ty)
    b = _load_coef(b_ptr, n, offs_c, sbn, sbc, c_ok, acc_ty)
    g = tl.load(g_ptr + _rows(n, offs_c, sgn, sgc, ALIGN_R)[:, None]
                + _cols(offs_m, sgm, ALIGN_M)[None, :], mask=mask, other=0.0)
    x = tl.load(x_ptr + _rows(n, offs_c, sxn, sxc, ALIGN_R)[:, None]
                + _cols(offs_m, sxm, ALIGN_M)[None, :], mask=mask, other=0.0)
    dx = g.to(acc_ty) * scale + (x.to(acc_ty) - mu) * a + b
    tl.store(dx_ptr + _rows(n, offs_c, sdn, sdc, ALIGN_R)[:, None]
             + _cols(offs_m, sdm, ALIGN_M)[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


# Triton picks the interpreter when it decorates a kernel (TRITON_INTERPRET=1 at
# import time), so the mode is read off a kernel, not the current environment.
INTERPRET = triton is not None and type(_stats_kernel).__name__ == "InterpretedFunction"


# -- launch plans ---------------------------------------------------------------------------
class _Plan(NamedTuple):
    block_c: int
    block_m: int
    num_warps: int
    split: int      # segments of M reduced by separate programs (reductions only)
    seg: int        # positions per segment, a multiple of block_m


def _pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _row_block(m: int, lo: int, hi: int) -> int:
    """BLOCK_M for rows of ``m`` contiguous values: the largest power of two in
    [lo, hi] whose padding of m is within m/16 of the least padding possible."""
    if m <= lo:
        return _pow2(m)
    sizes = [1 << k for k in range(lo.bit_length() - 1, hi.bit_length())]
    padded = {bm: _cdiv(m, bm) * bm for bm in sizes}
    best = min(padded.values())
    return max(bm for bm in sizes if padded[bm] <= best + m // 16)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=4096)
def _plan(n: int, c: int, m: int, c_major: bool, itemsize: int, reduce: bool, sms: int,
          split: Optional[int] = None) -> _Plan:
    """Tile shape and M-split for an (n, c, m) tensor; ``c_major``: C is the contiguous dim."""
    tile = _REDUCE_TILE if reduce else _MAP_TILE
    if c_major:
        bc = min(_pow2(c), max(16, 256 // itemsize) if m > 1 else tile)
        bm = min(_pow2(m), max(1, tile // bc))
    else:
        bm = _row_block(m, max(16, 128 // itemsize), tile // 4)
        bc = min(_pow2(c), max(1, tile // bm))
    if reduce and split is None:
        split = 1
        programs = n * _cdiv(c, bc)
        if not c_major:     # rather fewer rows per program than a split of M
            while programs < 2 * sms and bc > 1 and bc * bm > 1024:
                bc //= 2
                programs = n * _cdiv(c, bc)
        if programs < 2 * sms and m > bm:
            split = min(_cdiv(4 * sms, programs), _cdiv(m, bm))
    split = max(1, min(split or 1, _cdiv(m, bm)))
    seg = _cdiv(_cdiv(m, split), bm) * bm
    warps = max(1, min(8, bc * bm // 512))
    return _Plan(bc, bm, warps, _cdiv(m, seg), seg)


# -- host helpers ---------------------------------------------------------------------------
def _check(*tensors: Tensor):
    """Tensors the kernels can read: on one CUDA device (any device when interpreting)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    device = tensors[0].device
    for t in tensors:
        if t.device.type != "cuda" and not INTERPRET:
            raise ValueError(f"triton kernels need CUDA tensors (got {t.device}); set "
                             "TRITON_INTERPRET=1 before import to run them on the CPU")
        if t.device != device:
            raise ValueError(f"tensors on {device} and {t.device}")


def _view3(t: Tensor) -> Tensor:
    """(N, C, M) view of a 3-D or 4-D tensor (a copy only if H and W do not merge)."""
    if t.dim() == 4:
        return t.flatten(2)
    if t.dim() != 3:
        raise ValueError(f"expected an (N, C, M) or (N, C, H, W) tensor, got {tuple(t.shape)}")
    return t


def _c_major(x3: Tensor) -> bool:
    """Tiles follow C when C is the contiguous dim (channels_last) or M is 1."""
    return x3.shape[2] == 1 or (x3.stride(1) == 1 and x3.stride(2) != 1)


def _fits_int32(*t3: Tensor):
    for t in t3:
        extent = sum((s - 1) * abs(st) for s, st in zip(t.shape[1:], t.stride()[1:]))
        if extent > _INT32_MAX:
            raise ValueError(f"one sample spans {extent} elements; the kernels index it in int32")


def _align(*t3: Tensor) -> Tuple[int, int]:
    """Powers of two (up to 16 bytes) dividing every row offset and every position
    offset of the (N, C, M) views ``t3``: the kernels' ALIGN_R and ALIGN_M hints."""
    align_r = align_m = min(max(1, 16 // t.element_size()) for t in t3)
    for t in t3:
        sn, sc, sm = t.stride()
        while align_r > 1 and (sn % align_r or sc % align_r):
            align_r //= 2
        while align_m > 1 and sm % align_m:
            align_m //= 2
    return align_r, align_m


def _vec_m(m: int, *t3: Tensor) -> int:
    """The power of two VM (up to 16 bytes) that divides M: the kernels get M as
    (M // VM) * VM so that masks along M stay uniform over a vector."""
    vm = min(max(1, 16 // t.element_size()) for t in t3)
    while m % vm:
        vm //= 2
    return vm


def _acc_dtype(x: Tensor) -> torch.dtype:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"unsupported dtype {x.dtype}: expected float16, bfloat16, float32 "
                        "or float64")
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _coef_view(t: Tensor, n: int, c: int, dtype: torch.dtype) -> Tuple[Tensor, int, int]:
    """An (N, C) coefficient, broadcast without copying, and its two strides."""
    t = t.to(dtype).expand(n, c)
    return t, t.stride(0), t.stride(1)


def _out3(x: Tensor, out: Optional[Tensor]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(out, its (N, C, M) view, the caller's out when a temporary stands in for it)."""
    if out is None:
        out = torch.empty_like(x)   # keeps x's memory format
        return out, _view3(out), None
    x3 = _view3(x)
    if out.numel() != x3.numel():
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(x.shape)}")
    try:
        return out, out.view(x3.shape), None
    except RuntimeError:            # strides that do not merge H and W: write, then copy
        tmp = torch.empty_like(x3)
        return tmp, tmp, out


def _finish(result: Tensor, caller_out: Optional[Tensor]) -> Tensor:
    if caller_out is None:
        return result
    return caller_out.copy_(result.view(caller_out.shape))


# -- the passes -----------------------------------------------------------------------------
def instance_stats(x: Tensor, *, split: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Per-(n, c) mean and biased variance over the spatial dims, one read of ``x``.

    ``x``: (N, C, H, W) in either memory format, or (N, C, M). Returns two
    (N, C) float32 tensors (float64 for float64 ``x``). ``split`` forces the
    number of M-segments (None: chosen from the GPU's size).
    """
    _check(x)
    x3 = _view3(x)
    n, c, m = x3.shape
    acc = _acc_dtype(x3)
    if n * c == 0 or m == 0:
        full = torch.full((n, c), float("nan") if m == 0 else 0.0, dtype=acc, device=x.device)
        return full, full.clone()
    _fits_int32(x3)
    p = _plan(n, c, m, _c_major(x3), x3.element_size(), True, _num_sms(x.device), split)
    part = torch.empty((2, p.split, n, c), dtype=acc, device=x.device)
    num_cb = _cdiv(c, p.block_c)
    align_r, align_m = _align(x3)
    vm = _vec_m(m, x3)
    _stats_kernel[(n * num_cb, p.split)](
        x3, part[0], part[1], c, m // vm, p.seg, n * c, num_cb, *x3.stride(),
        BLOCK_C=p.block_c, BLOCK_M=p.block_m, VM=vm, ALIGN_R=align_r, ALIGN_M=align_m,
        SHIFTED=p.split > 1, num_warps=p.num_warps)
    if p.split == 1:
        return part[0, 0], part[1, 0]
    stats = torch.empty((2, n, c), dtype=acc, device=x.device)
    block = 256
    _merge_stats_kernel[(_cdiv(n * c, block),)](
        x3, part[0], part[1], stats[0], stats[1], c, n * c, m, p.seg, p.split,
        x3.stride(0), x3.stride(1), BLOCK=block, num_warps=2)
    return stats[0], stats[1]


def apply_scale_shift(x: Tensor, mu: Tensor, scale: Tensor, shift: Tensor,
                      out: Optional[Tensor] = None) -> Tensor:
    """``out = (x - mu) * scale + shift`` with (N, C) coefficients (broadcastable),
    computed in float32 (float64 for float64 ``x``); one read of x, one write.

    ``out`` (default: new, in x's dtype and memory format) is returned.
    """
    _check(x, mu, scale, shift)
    x3 = _view3(x)
    n, c, m = x3.shape
    acc = _acc_dtype(x3)
    out, y3, caller_out = _out3(x, out)
    if x3.numel() == 0:
        return _finish(out if caller_out is None else y3, caller_out)
    _fits_int32(x3, y3)
    mu, smn, smc = _coef_view(mu, n, c, acc)
    scale, ssn, ssc = _coef_view(scale, n, c, acc)
    shift, stn, stc = _coef_view(shift, n, c, acc)
    p = _plan(n, c, m, _c_major(x3), x3.element_size(), False, 0)
    num_cb, num_mb = _cdiv(c, p.block_c), _cdiv(m, p.block_m)
    align_r, align_m = _align(x3, y3)
    vm = _vec_m(m, x3, y3)
    _scale_shift_kernel[(n * num_cb * num_mb,)](
        x3, y3, mu, scale, shift, c, m // vm, num_cb, num_mb, *x3.stride(), *y3.stride(),
        smn, smc, ssn, ssc, stn, stc, BLOCK_C=p.block_c, BLOCK_M=p.block_m, VM=vm,
        ALIGN_R=align_r, ALIGN_M=align_m, num_warps=p.num_warps)
    return _finish(out if caller_out is None else y3, caller_out)


def grad_sums(g: Tensor, x: Tensor, mu: Tensor, *, scale: Optional[Tensor] = None,
              out: Optional[Tensor] = None, split: Optional[int] = None
              ) -> Tuple[Tensor, Tensor]:
    """Per-(n, c) ``sum g`` and ``sum g * (x - mu)`` in one read of ``g`` and ``x``.

    Returns two (N, C) float32 tensors (float64 for float64 ``x``); ``split``
    as in ``instance_stats``. With ``scale`` and ``out`` (x's shape), the same
    pass also writes ``out = g * scale``.
    """
    _check(g, x, mu)
    x3, g3 = _view3(x), _view3(g)
    if g3.shape != x3.shape:
        raise ValueError(f"g has shape {tuple(g.shape)}, x {tuple(x.shape)}")
    n, c, m = x3.shape
    acc = _acc_dtype(x3)
    write_dx = scale is not None and out is not None
    if n * c == 0 or m == 0:
        if write_dx and out.numel():
            out.copy_(g * scale.to(acc).reshape(scale.shape + (1,) * (g.dim() - 2)))
        zeros = torch.zeros((n, c), dtype=acc, device=x.device)
        return zeros, zeros.clone()
    mu, smn, smc = _coef_view(mu, n, c, acc)
    d3, caller_out = None, None
    if write_dx:
        _check(scale, out)
        out, d3, caller_out = _out3(x, out)
        scale, ssn, ssc = _coef_view(scale, n, c, acc)
        _fits_int32(x3, g3, d3)
    else:
        scale, ssn, ssc = mu, 0, 0
        _fits_int32(x3, g3)
    p = _plan(n, c, m, _c_major(x3), x3.element_size(), True, _num_sms(x.device), split)
    part = torch.empty((2, p.split, n, c), dtype=acc, device=x.device)
    num_cb = _cdiv(c, p.block_c)
    align_r, align_m = _align(g3, x3, *([d3] if write_dx else []))
    vm = _vec_m(m, g3, x3, *([d3] if write_dx else []))
    d_arg = d3 if write_dx else x3
    _grad_sums_kernel[(n * num_cb, p.split)](
        g3, x3, mu, part[0], part[1], scale, d_arg, c, m // vm, p.seg, n * c, num_cb,
        *g3.stride(), *x3.stride(), smn, smc, ssn, ssc, *d_arg.stride(),
        BLOCK_C=p.block_c, BLOCK_M=p.block_m, VM=vm, ALIGN_R=align_r, ALIGN_M=align_m,
        DX=write_dx, num_warps=p.num_warps)
    if write_dx:
        _finish(out if caller_out is None else d3, caller_out)
    if p.split == 1:
        return part[0, 0], part[1, 0]
    sums = part.sum(1)
    return sums[0], sums[1]


def grad_input(g: Tensor, x: Tensor, mu: Tensor, scale: Tensor, a: Tensor, b: Tensor,
               out: Optional[Tensor] = None) -> Tensor:
    """``dx = g * scale + (x - mu) * a + b`` with (N, C) coefficients (broadcastable),
    computed in float32 (float64 for float64 ``x``); one read of g and x, one write.

    ``out`` (default: new, in x's dtype and memory format) is returned.
    """
    _check(g, x, mu, scale, a, b)
    x3, g3 = _view3(x), _view3(g)
    if g3.shape != x3.shape:
        raise ValueError(f"g has shape {tuple(g.shape)}, x {tuple(x.shape)}")
    n, c, m = x3.shape
    acc = _acc_dtype(x3)
    out, d3, caller_out = _out3(x, out)
    if x3.numel() == 0:
        return _finish(out if caller_out is None else d3, caller_out)
    _fits_int32(x3, g3, d3)
    mu, smn, smc = _coef_view(mu, n, c, acc)
    scale, ssn, ssc = _coef_view(scale, n, c, acc)
    a, san, sac = _coef_view(a, n, c, acc)
    b, sbn, sbc = _coef_view(b, n, c, acc)
    p = _plan(n, c, m, _c_major(x3), x3.element_size(), False, 0)
    num_cb, num_mb = _cdiv(c, p.block_c), _cdiv(m, p.block_m)
    align_r, align_m = _align(g3, x3, d3)
    vm = _vec_m(m, g3, x3, d3)
    _grad_input_kernel[(n * num_cb * num_mb,)](
        g3, x3, d3, mu, scale, a, b, c, m // vm, num_cb, num_mb,
        *g3.stride(), *x3.stride(), *d3.stride(), smn, smc, ssn, ssc, san, sac, sbn, sbc,
        BLOCK_C=p.block_c, BLOCK_M=p.block_m, VM=vm, ALIGN_R=align_r, ALIGN_M=align_m,
        num_warps=p.num_warps)
    return _finish(out if caller_out is None else d3, caller_out)
