"""Triton kernels of SN's three large-tensor passes (``normalization/triton_kernels.py``).

On any machine:

* every kernel runs in Triton's interpreter on small CPU tensors and is
  compared with a float64 PyTorch reference: fp32/fp16/bf16 (and fp64) inputs,
  NCHW, channels_last and 3-D (N, C, M) views, M = 1, N*C = 1, odd sizes,
  several channel blocks, split reductions, a large mean. The interpreter is
  chosen when the kernels are decorated, i.e. when the module is imported,
  so these checks run in a subprocess with ``TRITON_INTERPRET=1`` (other test
  modules of the same pytest process import the module without it);
* the kernels are compiled for sm_90 (H100) at ResNet-50 shapes in a second
  subprocess with a stand-in driver: this catches what only the GPU compiler
  sees (specialisation of arguments equal to 1, layouts, types);
* launch plans (tiles, splits, alignment hints) are checked in process.

With CUDA (``@pytest.mark.gpu``): ResNet-50 shapes against the PyTorch path of
``normalization/ops.py``, without host-device synchronisation.

Tolerances (float64 references computed from the same, already rounded inputs):

* statistics: mean ``1e-5 + 1e-6 |mean|``; variance ``1e-5`` relative +
  ``1e-6`` absolute, whatever the input dtype (accumulation is float32), also
  for inputs of mean 1e3 and std 1;
* sums of the backward: ``1e-5 * sum |term|`` per (n, c);
* elementwise outputs: relative ``1e-5`` (fp32), ``2^-10`` (fp16), ``2^-7``
  (bf16) -- one rounding to the output dtype -- plus absolute ``1e-5``;
  ``1e-4`` for a whole instance-norm forward and backward built from the passes;
* GPU against PyTorch: ``1e-5`` (fp32).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
RTOL = {F32: 1e-5, F16: 2.0 ** -10, BF16: 2.0 ** -7, F64: 1e-12}
LAYOUTS = ("nchw", "cl", "3d", "cl3d")


# -- inputs and references (float64, from the rounded inputs) --------------------------------
def _make(shape, dtype, layout, seed, loc=0.0, std=1.0):
    """A (N, C, H, W) sample in ``layout``: nchw, cl (channels_last), 3d ((N, C, H*W)
    contiguous) or cl3d (the (N, C, H*W) view of a channels_last tensor)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=F64) * std + loc).to(dtype)
    if layout in ("cl", "cl3d"):
        x = x.contiguous(memory_format=torch.channels_last)
    if layout in ("3d", "cl3d"):
        x = x.flatten(2)
    return x


def _coefs(n, c, seed, k, dtype=F32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, generator=gen, dtype=F64).to(dtype) for _ in range(k)]


def _bcast(t, x):
    """An (N, C) or (1, C) coefficient in float64, broadcastable against ``x``."""
    return t.double().reshape(t.shape + (1,) * (x.dim() - 2))


def _assert_close(got, ref, rtol, atol, what):
    got, ref = got.double(), ref.double()
    err = (got - ref).abs()
    bound = atol + rtol * ref.abs()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    assert (err <= bound).all(), (f"{what}: max error {err.max().item():.3g}, "
                                  f"worst ratio {(err / bound).max().item():.3g}")


def _assert_layout(out, x):
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.stride() == x.stride(), f"strides {out.stride()} != x's {x.stride()}"


# -- the checks run by the interpreter ---------------------------------------------------------
def _assert_splits(tk, x, split):
    """A forced split must take effect (the plan may cap it at the number of blocks)."""
    if split is not None:
        x3 = x.flatten(2) if x.dim() == 4 else x
        plan = tk._plan(*x3.shape, tk._c_major(x3), x3.element_size(), True, 4, split)
        assert plan.split > 1, plan


def check_stats(shape, dtype, layout, split=None, loc=0.0, std=1.0):
    from normalization import triton_kernels as tk
    x = _make(shape, dtype, layout, 1, loc, std)
    _assert_splits(tk, x, split)
    mean, var = tk.instance_stats(x, split=split)
    n, c = shape[:2]
    want = F64 if dtype == F64 else F32
    assert mean.shape == var.shape == (n, c) and mean.dtype == var.dtype == want
    ref_var, ref_mean = torch.var_mean(x.double().reshape(n, c, -1), -1, correction=0)
    _assert_close(mean, ref_mean, 1e-6, 1e-5 * std, "mean")
    _assert_close(var, ref_var, 1e-5, 1e-6 * std * std, "var")


def check_apply(shape, dtype, layout, coef="full", out=None):
    from normalization import triton_kernels as tk
    x = _make(shape, dtype, layout, 2)
    n, c = shape[:2]
    acc = F64 if dtype == F64 else F32
    mu, scale, shift = _coefs(n, c, 3, 3, acc)
    if coef == "channel":   # (1, C), as the BN branch leaves them
        mu, scale, shift = mu[:1], scale[:1], shift[:1]
    if coef == "expanded":  # stride-0 views of (1, C)
        mu, scale, shift = (t[:1].expand(n, c) for t in (mu, scale, shift))
    target = None
    if out == "given":
        target = torch.empty_like(x)
    elif out == "strided":  # H and W do not merge: written through a temporary
        target = torch.empty(shape[:3] + (shape[3] + 1,), dtype=dtype)[..., :shape[3]]
    y = tk.apply_scale_shift(x, mu, scale, shift, out=target)
    if target is not None:
        assert y is target
    else:
        _assert_layout(y, x)
    xr = x.double().reshape(y.shape) if out == "strided" else x.double()
    ref = (xr - _bcast(mu, xr)) * _bcast(scale, xr) + _bcast(shift, xr)
    _assert_close(y, ref, RTOL[dtype], 1e-5, "y")


def check_grad_sums(shape, dtype, layout, split=None, g_layout=None):
    from normalization import triton_kernels as tk
    x = _make(shape, dtype, layout, 4)
    g = _make(shape, dtype, g_layout or layout, 5)
    _assert_splits(tk, x, split)
    n, c = shape[:2]
    acc = F64 if dtype == F64 else F32
    (mu,) = _coefs(n, c, 6, 1, acc)
    sum_g, sum_gx = tk.grad_sums(g, x, mu, split=split)
    assert sum_g.shape == sum_gx.shape == (n, c) and sum_g.dtype == sum_gx.dtype == acc
    g64 = g.double().reshape(n, c, -1)
    gx = g64 * (x.double().reshape(n, c, -1) - mu.double()[..., None])
    _assert_close(sum_g, g64.sum(-1), 0.0, 1e-5 * g64.abs().sum(-1) + 1e-12, "sum g")
    _assert_close(sum_gx, gx.sum(-1), 0.0, 1e-5 * gx.abs().sum(-1) + 1e-12, "sum g(x-mu)")
    # the same pass also writing g * scale (the direct share of x's gradient)
    (scale,) = _coefs(n, c, 12, 1, acc)
    dx = torch.empty_like(x)
    sum_g2, sum_gx2 = tk.grad_sums(g, x, mu, scale=scale, out=dx, split=split)
    torch.testing.assert_close(sum_g2, sum_g, rtol=0, atol=0)
    torch.testing.assert_close(sum_gx2, sum_gx, rtol=0, atol=0)
    _assert_layout(dx, x)
    _assert_close(dx, g.double() * _bcast(scale, x.double()), RTOL[dtype], 1e-5, "g * scale")


def check_grad_input(shape, dtype, layout, g_layout=None, coef="full", out=None):
    from normalization import triton_kernels as tk
    x = _make(shape, dtype, layout, 7)
    g = _make(shape, dtype, g_layout or layout, 8)
    n, c = shape[:2]
    acc = F64 if dtype == F64 else F32
    mu, scale, a, b = _coefs(n, c, 9, 4, acc)
    if coef == "channel":
        scale = scale[:1]
    target = torch.empty_like(x) if out == "given" else None
    dx = tk.grad_input(g, x, mu, scale, a, b, out=target)
    if target is not None:
        assert dx is target
    _assert_layout(dx, x)
    x64, g64 = x.double(), g.double()
    ref = g64 * _bcast(scale, x64) + (x64 - _bcast(mu, x64)) * _bcast(a, x64) + _bcast(b, x64)
    _assert_close(dx, ref, RTOL[dtype], 1e-5, "dx")


def check_instance_norm(shape, dtype, layout):
    """IN forward and backward composed from the four passes, against float64 autograd:
    y = (x - mu) r; dx = g r + (x - mu) a + b with r = (var + eps)^-1/2,
    a = -r^3 sum g(x - mu) / M, b = -r sum g / M."""
    from normalization import triton_kernels as tk
    eps = 1e-5
    x = _make(shape, dtype, layout, 10, loc=3.0, std=2.0)
    g = _make(shape, dtype, layout, 11)
    mu, var = tk.instance_stats(x)
    r = torch.rsqrt(var + eps)
    y = tk.apply_scale_shift(x, mu, r, torch.zeros_like(r))
    sum_g, sum_gx = tk.grad_sums(g, x, mu)
    m = x[0, 0].numel()
    dx = tk.grad_input(g, x, mu, r, -r.pow(3) * sum_gx / m, -r * sum_g / m)
    x64 = x.double().requires_grad_()
    dims = tuple(range(2, x.dim()))
    v64, m64 = torch.var_mean(x64, dims, correction=0, keepdim=True)
    y64 = (x64 - m64) / torch.sqrt(v64 + eps)
    y64.backward(g.double())
    tol = max(RTOL[dtype], 1e-4)
    _assert_close(y, y64.detach(), tol, 1e-4, "y")
    _assert_close(dx, x64.grad, tol, 1e-4, "dx")


def check_edge_cases():
    from normalization import triton_kernels as tk
    assert tk.triton_available() and tk.INTERPRET
    mean, var = tk.instance_stats(torch.zeros(0, 3, 4, 4))
    assert mean.shape == var.shape == (0, 3)
    mean, var = tk.instance_stats(torch.zeros(2, 3, 0))
    assert mean.shape == (2, 3) and torch.isnan(mean).all()
    assert tk.apply_scale_shift(torch.zeros(0, 3, 2, 2), *_coefs(0, 3, 0, 3)).shape == (0, 3, 2, 2)
    sum_g, _ = tk.grad_sums(torch.ones(2, 3, 0), torch.ones(2, 3, 0), torch.zeros(2, 3))
    assert (sum_g == 0).all()
    x = torch.full((2, 3, 5, 5), 7.0)
    mean, var = tk.instance_stats(x)
    assert (mean == 7.0).all() and (var == 0.0).all()
    for bad, err in [(torch.zeros(2, 3, 4, dtype=torch.int32), TypeError),
                     (torch.zeros(2, 3), ValueError)]:
        with pytest.raises(err):
            tk.instance_stats(bad)
    with pytest.raises(ValueError):
        tk.grad_sums(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), torch.zeros(2, 3))


def check_layer_through_ops(dtype, layout):
    """SN layers routed through the operators onto the interpreted kernels: the auto
    self-check approves them, and forward and backward equal the native path."""
    import copy

    import normalization as N
    from normalization import ops
    ops._triton_device = lambda x: True         # (the interpreter runs on CPU tensors)
    ops.reset_triton_checks()
    ops.set_triton_mode("auto")
    torch.manual_seed(0)
    layer = N.build_norm("sn", 6, ghost_batch_size=2)
    x = _make((4, 6, 5, 3), dtype, layout, 13, loc=3.0, std=2.0)
    g = _make((4, 6, 5, 3), dtype, layout, 14)
    results = []
    for mode in ("auto", "0"):
        ops.set_triton_mode(mode)
        xi = x.clone().requires_grad_()
        lay = copy.deepcopy(layer)
        y = lay(xi)
        y.backward(g)
        results.append((y.detach(), xi.grad, lay.weight.grad, lay.mean_weight.grad))
    assert set(ops.triton_status().values()) == {"ok"}, ops.triton_status()
    for name, a, b in zip(("y", "dx", "dweight", "dratio"), *results):
        # bf16: one rounding of an intermediate (g * scale, up to |dx|'s size) may differ
        # by an ulp between the paths (the interpreter rounds bf16 by truncation)
        _assert_close(a, b, max(RTOL[dtype], 1e-5), 1e-4 + RTOL[dtype] * b.abs().max(), name)


def check_self_check_catches(variant, dtype, layout):
    """The self-check on the real (interpreted) kernels approves them, and catches a merge
    kernel (statistics split into segments) or a ``grad_sums`` kernel without ``dx`` (the
    variant the eager backward launches) that writes wrong numbers."""
    from normalization import ops
    from normalization import triton_kernels as tk
    like = _make((2, 3, 4, 5), dtype, layout, 0)
    if variant == "none":
        assert ops._self_check(tk, like) is None
        return
    name = "_merge_stats_kernel" if variant == "merge" else "_grad_sums_kernel"
    kernel = getattr(tk, name)

    class Wrong:        # launches the real kernel, then bends one of its outputs
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                kernel[grid](*args, **kwargs)
                if variant == "merge" or not kwargs["DX"]:
                    args[3].add_(1e-3)  # the merged mean; the partial sums of g
            return launch
    setattr(tk, name, Wrong())
    try:
        reason = ops._self_check(tk, like)
    finally:
        setattr(tk, name, kernel)
    expected = ("mismatch in mean [segments + merge]" if variant == "merge"
                else "mismatch in sum g [one segment, no dx]")
    assert reason is not None and expected in reason, reason


def _cases():
    """id -> (check, kwargs); small shapes: the interpreter runs one program at a time."""
    cases = {}

    def add(check, **kw):
        name = check.__name__[6:] + "-" + "-".join(
            f"{k}={'x'.join(map(str, v)) if isinstance(v, tuple) else str(v).replace('torch.', '')}"
            for k, v in kw.items())
        cases[name] = (check, kw)

    main = [(2, 3, 4, 5), (3, 5, 7, 3), (2, 70, 3, 3)]      # odd sizes; two channel blocks (CL)
    edges = [(1, 1, 9, 11), (2, 6, 1, 1), (1, 1, 1, 1), (2, 4, 14, 14), (5, 1, 2, 3)]
    for check in (check_stats, check_apply, check_grad_sums, check_grad_input):
        for shape in main:
            for dtype in (F32, F16, BF16):
                for layout in ("nchw", "cl"):
                    add(check, shape=shape, dtype=dtype, layout=layout)
        for shape in edges:
            for layout in ("nchw", "cl"):
                add(check, shape=shape, dtype=F32, layout=layout)
            add(check, shape=shape, dtype=BF16, layout="cl")
        for layout in ("3d", "cl3d"):
            add(check, shape=(3, 5, 7, 3), dtype=F16, layout=layout)
        add(check, shape=(2, 70, 3, 3), dtype=F64, layout="cl")
    for layout in LAYOUTS:      # statistics of inputs with mean 1e3 and std 1
        add(check_stats, shape=(2, 3, 20, 20), dtype=F32, layout=layout, loc=1e3)
    add(check_stats, shape=(1, 2, 48, 40), dtype=BF16, layout="nchw", loc=1e3, std=30.0)
    for split in (2, 3, 7):     # M split over programs, merged by the parallel formula
        add(check_stats, shape=(2, 3, 16, 40), dtype=F32, layout="nchw", split=split, loc=1e3)
        add(check_stats, shape=(1, 64, 12, 12), dtype=F16, layout="cl", split=split)
        add(check_grad_sums, shape=(2, 3, 16, 40), dtype=BF16, layout="nchw", split=split)
        add(check_grad_sums, shape=(1, 64, 12, 12), dtype=F32, layout="cl", split=split)
    add(check_stats, shape=(1, 2, 40, 40), dtype=F32, layout="nchw")      # split by the plan
    add(check_grad_sums, shape=(3, 5, 7, 3), dtype=F32, layout="cl", g_layout="nchw")
    add(check_grad_input, shape=(3, 5, 7, 3), dtype=BF16, layout="nchw", g_layout="cl")
    add(check_grad_input, shape=(3, 5, 7, 3), dtype=F32, layout="cl", coef="channel", out="given")
    for coef in ("channel", "expanded"):
        add(check_apply, shape=(3, 5, 7, 3), dtype=F32, layout="cl", coef=coef)
    for out in ("given", "strided"):
        add(check_apply, shape=(3, 5, 7, 3), dtype=F16, layout="nchw", out=out)
    for dtype in (F32, F16, BF16):
        for layout in ("nchw", "cl"):
            add(check_instance_norm, shape=(2, 6, 5, 7), dtype=dtype, layout=layout)
    cases["edge_cases"] = (check_edge_cases, {})
    for dtype, layout in ((F32, "nchw"), (BF16, "cl")):
        add(check_layer_through_ops, dtype=dtype, layout=layout)
    for variant in ("none", "merge", "no_dx"):
        add(check_self_check_catches, variant=variant, dtype=F32, layout="nchw")
    add(check_self_check_catches, variant="none", dtype=BF16, layout="cl")
    add(check_self_check_catches, variant="merge", dtype=F16, layout="cl")
    return cases


CASES = _cases()


def _run_cases(names):
    """Run the named checks here; one JSON line: name -> "ok" or the failure."""
    import traceback
    results = {}
    for name in names:
        check, kwargs = CASES[name]
        try:
            check(**kwargs)
            results[name] = "ok"
        except Exception:   # report every failure, not only the first
            results[name] = traceback.format_exc(limit=-3)
    print(json.dumps(results))


def _subprocess(args, env_extra, timeout):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get(
        "PYTHONPATH")])), **env_extra)
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _collect(proc, timeout):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"subprocess timed out after {timeout} s\n{err[-2000:]}")
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(f"subprocess failed ({proc.returncode}):\n{err[-4000:]}")
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def interpreted():
    """Results of every interpreter check, run in two subprocesses (one per core)."""
    names = sorted(CASES)
    procs = [_subprocess(["--interpret", *names[i::2]], {"TRITON_INTERPRET": "1"}, 300)
             for i in range(2)]
    results = {}
    for proc in procs:
        results.update(_collect(proc, 300))
    return results


@needs_triton
@pytest.mark.parametrize("name", sorted(CASES))
def test_interpreter(interpreted, name):
    assert interpreted.get(name) == "ok", interpreted.get(name, "not run")


# -- compiled for the GPU, without one ----------------------------------------------------------
COMPILE_SHAPES = [(32, 256, 56, 56), (8, 1024, 14, 14), (2, 256, 56, 56), (2, 3, 1, 1),
                  (1, 1, 7, 9)]


def _compile_all():
    """Compile every kernel for sm_90 as the launches at COMPILE_SHAPES would (fp32 and
    bf16, NCHW and channels_last), with a stand-in driver; print one JSON line."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    class Driver:   # what JITFunction.run asks of the driver before it launches
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    driver.set_active(Driver())
    compiled = []

    def compile_only(self, grid):
        def run(*args, **kwargs):
            compiled.append(self.run(*args, grid=grid, warmup=True, **kwargs).name)
        return run

    JITFunction.__getitem__ = compile_only
    from normalization import triton_kernels as tk
    tk.INTERPRET = True             # let CPU tensors through the device check
    tk._num_sms = lambda device: 132
    for shape in COMPILE_SHAPES:
        for dtype in (F32, BF16):
            for layout in ("nchw", "cl"):
                x = torch.empty(shape, dtype=dtype)
                if layout == "cl":
                    x = x.contiguous(memory_format=torch.channels_last)
                mu = torch.zeros(shape[:2])
                tk.instance_stats(x)
                tk.apply_scale_shift(x, mu, mu, mu)
                tk.grad_sums(x, x, mu)
                tk.grad_sums(x, x, mu, scale=mu, out=torch.empty_like(x))
                tk.grad_input(x, x, mu, mu, mu[:1], mu)
    print(json.dumps(sorted(set(compiled))))


@needs_triton
def test_compiles_for_h100(tmp_path):
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("triton has no CUDA backend")
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not (os.path.exists(bundled) or os.environ.get("TRITON_PTXAS_PATH")
            or shutil.which("ptxas")):
        pytest.skip("no ptxas to assemble the kernels")
    proc = _subprocess(["--compile"], {"TRITON_CACHE_DIR": str(tmp_path), "TRITON_INTERPRET": "0"},
                       300)
    names = _collect(proc, 300)
    assert set(names) == {"_stats_kernel", "_merge_stats_kernel", "_scale_shift_kernel",
                          "_grad_sums_kernel", "_grad_input_kernel"}


# -- launch plans --------------------------------------------------------------------------------
RESNET_SHAPES = [(32, 64, 56, 56), (32, 256, 56, 56), (32, 512, 28, 28), (8, 1024, 14, 14),
                 (2, 256, 56, 56)]


@needs_triton
@pytest.mark.parametrize("shape", RESNET_SHAPES + [(1, 1, 1000, 1000), (64, 3, 1, 1)])
@pytest.mark.parametrize("c_major", [False, True])
@pytest.mark.parametrize("itemsize", [2, 4])
def test_plans(shape, c_major, itemsize):
    from normalization import triton_kernels as tk
    n, c, h, w = shape
    m = h * w
    for reduce in (True, False):
        p = tk._plan(n, c, m, c_major, itemsize, reduce, 132)
        assert p.block_c & (p.block_c - 1) == 0 and p.block_m & (p.block_m - 1) == 0
        assert p.block_c * p.block_m <= (tk._REDUCE_TILE if reduce else tk._MAP_TILE)
        assert p.seg % p.block_m == 0 and (p.split - 1) * p.seg < m <= p.split * p.seg
        if reduce and p.split > 1:      # a split only where (N, C) alone is too few programs
            assert n * math.ceil(c / p.block_c) < 2 * 132
        if reduce and n * c * m >= 2 ** 20:     # and enough programs to fill an H100
            programs = n * math.ceil(c / p.block_c) * p.split
            assert programs >= min(2 * 132, n * c * math.ceil(m / p.block_m))


@needs_triton
@pytest.mark.parametrize("dtype", [F32, F16, BF16, F64])
@pytest.mark.parametrize("layout", ["nchw", "cl", "3d"])
def test_self_check_sample_reaches_the_merge(dtype, layout):
    """The self-check's forced split takes effect in every dtype and layout, so the
    segmented statistics, the merge kernel and segmented grad_sums run in it."""
    from normalization import ops
    from normalization import triton_kernels as tk
    shape = ops._CHECK_SHAPE[3 if layout == "3d" else 4]
    x = torch.empty(shape, dtype=dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    x3 = tk._view3(x)
    plan = tk._plan(*x3.shape, tk._c_major(x3), x3.element_size(), True, 132, ops._CHECK_SPLIT)
    assert plan.split == ops._CHECK_SPLIT, plan


@needs_triton
def test_alignment_hints():
    from normalization import triton_kernels as tk
    nchw = torch.empty(8, 1024, 14, 14).flatten(2)
    assert tk._align(nchw) == (4, 1) and tk._vec_m(196, nchw) == 4
    cl = torch.empty(2, 24, 7, 7).contiguous(memory_format=torch.channels_last).flatten(2)
    assert tk._align(cl) == (1, 4)
    assert tk._align(cl.to(torch.bfloat16)) == (1, 8)
    assert tk._align(torch.empty(3, 5, 7)) == (1, 1) and tk._vec_m(7, torch.empty(3, 5, 7)) == 1
    assert tk._row_block(3136, 32, 512) == 256 and tk._row_block(196, 32, 512) == 32


@needs_triton
def test_availability_follows_import_mode():
    from normalization import triton_kernels as tk
    assert tk.triton_available() == (tk.INTERPRET or torch.cuda.is_available())
    if not tk.INTERPRET:
        with pytest.raises(ValueError, match="CUDA"):
            tk.instance_stats(torch.zeros(2, 3, 4))


# -- on the GPU: ResNet-50 shapes against the PyTorch path ---------------------------------------
@pytest.mark.parametrize("shape", RESNET_SHAPES)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_against_pytorch(shape, layout, dtype):
    from normalization import ops
    from normalization import triton_kernels as tk
    if tk.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1: the kernels were built for the interpreter")
    torch.manual_seed(0)
    n, c = shape[:2]
    x = (torch.randn(shape, device="cuda") * 2 + 0.5).to(dtype)
    g = torch.randn(shape, device="cuda").to(dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
        g = g.contiguous(memory_format=torch.channels_last)
    x3, g3 = x.flatten(2), g.flatten(2)
    scale, shift, a, b = (torch.randn(n, c, device="cuda") for _ in range(4))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")     # no host-device synchronisation inside
    try:
        mean, var = tk.instance_stats(x)
        y = tk.apply_scale_shift(x, mean, scale, shift)
        sum_g, sum_gx = tk.grad_sums(g, x, mean)
        dx = tk.grad_input(g, x, mean, scale, a, b)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y.stride() == x.stride() and dx.stride() == x.stride()
    x64, g64, mu = x3.double(), g3.double(), mean.double()[..., None]
    refs = {"mean": x64.mean(-1), "var": x64.var(-1, correction=0), "sum g": g64.sum(-1),
            "sum g(x-mu)": (g64 * (x64 - mu)).sum(-1),
            "y": (x64 - mu) * scale[..., None] + shift[..., None],
            "dx": g64 * scale[..., None] + (x64 - mu) * a[..., None] + b[..., None]}
    if dtype == F32:    # the native path of the operators (normalization/ops.py)
        x3c, g3c = x3.contiguous(), g3.contiguous()
        refs["mean"], refs["var"] = ops._native_stats(x3c)
        refs["sum g"], refs["sum g(x-mu)"], _ = ops._native_grad_sums(g3c, x3c, mean, None)
        refs["y"] = ops._native_apply(x3c, mean, scale, shift, x3c.dtype)
    _assert_close(mean, refs["mean"], 1e-5, 1e-5, "mean")
    _assert_close(var, refs["var"], 1e-5, 1e-5, "var")
    for name, got, terms in [("sum g", sum_g, g64), ("sum g(x-mu)", sum_gx, g64 * (x64 - mu))]:
        _assert_close(got, refs[name], 0.0, 1e-5 * terms.abs().sum(-1) + 1e-6, name)
    _assert_close(y.flatten(2), refs["y"], RTOL[dtype], 1e-5, "y")
    _assert_close(dx.flatten(2), refs["dx"], RTOL[dtype], 1e-5, "dx")


if __name__ == "__main__":     # the subprocesses started by the tests above
    if sys.argv[1:2] == ["--interpret"]:
        _run_cases(sys.argv[2:])
    elif sys.argv[1:2] == ["--compile"]:
        _compile_all()
    else:
        sys.exit(f"usage: {sys.argv[0]} --interpret CASE... | --compile")
