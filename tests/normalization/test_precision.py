"""Accuracy for inputs with a large mean (no E[x^2] - E[x]^2 cancellation)."""
import os

import pytest
import torch

import normalization as N
from normalization.ops import instance_stats
from normalization.reference import reference_switch_norm


def test_instance_statistics_large_mean_against_float64():
    x = torch.randn(4, 8, 32, 32, dtype=torch.float64) + 1e3
    mean, var = instance_stats(x.float().flatten(2))
    ref = x.float().double().flatten(2)  # the float32 data, exactly
    torch.testing.assert_close(mean.double(), ref.mean(-1), rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), ref.var(-1, unbiased=False), rtol=1e-5, atol=0)


def _reference(x):
    """float64 statistics of the (already rounded) input."""
    n, c = x.shape[:2]
    ref_var, ref_mean = torch.var_mean(x.double().reshape(n, c, -1), -1, correction=0)
    return ref_mean, ref_var


@pytest.mark.parametrize("m", [2, 3, 16, 49, 784])
@pytest.mark.parametrize("ratio", [0.0, 1.0, 30.0, 1e3, 1e5, 1e7])
def test_variance_within_2e_6_of_float64_at_any_mean(ratio, m):
    """The statistics every eager layer uses (``instance_stats``, the CPU path: the group-norm
    kernel, rows beyond MAX_MEAN_PER_STD recomputed in float64): the variance within 2e-6
    (relative) of float64 for rows of 2 to 784 positions whose |mean| is up to 1e7 standard
    deviations, the mean within 2 float32 ulps of max(|mean|, std)."""
    from normalization import ops
    gen = torch.Generator().manual_seed(int(m + ratio))
    std = torch.rand(8, 16, 1, generator=gen, dtype=torch.float64) + 0.5
    x = ((torch.randn(8, 16, m, generator=gen, dtype=torch.float64) + ratio) * std).float()
    mean, var = ops.instance_stats_impl(x)
    assert mean.dtype == var.dtype == torch.float32
    ref_mean, ref_var = _reference(x)
    assert ((var.double() - ref_var).abs() <= 2e-6 * ref_var).all(), \
        ((var.double() - ref_var).abs() / ref_var).nan_to_num(posinf=1).max()
    ulp = torch.finfo(torch.float32).eps * torch.maximum(ref_mean.abs(), ref_var.sqrt())
    assert ((mean.double() - ref_mean).abs() <= 2 * ulp).all()


def test_statistics_of_low_precision_and_strided_inputs():
    """bfloat16 inputs (statistics in float32) and non-contiguous ones take the same path."""
    from normalization import ops
    x = (torch.randn(4, 8, 14, 14, dtype=torch.float64) * 3 + 50).float()
    for t in (x.bfloat16(), x.transpose(2, 3), x.contiguous(memory_format=torch.channels_last)):
        mean, var = ops.instance_stats_impl(t)
        ref_mean, ref_var = _reference(t)
        assert mean.dtype == var.dtype == torch.float32
        torch.testing.assert_close(var.double(), ref_var, rtol=2e-6, atol=0)
        torch.testing.assert_close(mean.double(), ref_mean, rtol=2e-7, atol=0)


@pytest.mark.parametrize("value", [0.1, 3.3, -7e4, 0.0])
def test_zero_variance_stays_exactly_zero(value):
    """Constant rows of values that float32 sums do not represent exactly."""
    from normalization import ops
    for shape in ((2, 3, 1, 2), (2, 3, 5, 5), (2, 3, 40, 40)):
        mean, var = ops.instance_stats_impl(torch.full(shape, value))
        assert (var == 0).all(), var
        assert (mean == torch.tensor(value)).all()


def test_non_finite_only_where_var_mean_is():
    """Huge but finite inputs keep finite statistics (a float32 accumulation of squared
    deviations near 1e38 would overflow); inf and NaN give what var_mean gives."""
    from normalization import ops
    x = torch.randn(4, 6, 7, 7)
    x[0] *= 1e19                       # variance ~1e38: finite in float32
    x[1, 0, 0, 0] = float("inf")
    x[1, 1, 2, 3] = float("nan")
    x[2, :2] = 3e37                    # constant huge rows: mean finite, variance zero
    mean, var = ops.instance_stats_impl(x)
    ref_var, ref_mean = torch.var_mean(x.flatten(2), -1, correction=0)
    assert torch.equal(torch.isfinite(mean), torch.isfinite(ref_mean))
    assert torch.equal(torch.isfinite(var), torch.isfinite(ref_var))
    ok = torch.isfinite(ref_var)
    torch.testing.assert_close(var[ok].double(), ref_var[ok].double(), rtol=2e-6, atol=0)


def test_cpu_forward_never_imports_triton():
    """A CPU layer, eager and compiled, runs without importing triton (0.3 s at first use)."""
    import subprocess
    import sys
    code = ("import sys, torch, normalization as N\n"
            "layer = N.build_norm('sn', 4, ghost_batch_size=2)\n"
            "x = torch.randn(4, 4, 6, 6, requires_grad=True)\n"
            "layer(x).sum().backward(); layer.eval()(x)\n"
            "print('triton' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__)))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("kw", [dict(), dict(ghost_batch_size=2)])
def test_switchnorm_large_mean_against_float64(kw):
    layer = N.SwitchNorm2d(8, **kw)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.3, -0.2, 0.5]))
        layer.var_weight.copy_(torch.tensor([-0.1, 0.4, 0.2]))
    x32 = torch.randn(4, 8, 16, 16) + 1e3
    x64 = x32.double()
    y = layer(x32)
    ref = reference_switch_norm(x64, layer.weight.double(), layer.bias.double(),
                                torch.softmax(layer.mean_weight.double(), 0),
                                torch.softmax(layer.var_weight.double(), 0),
                                ghost_batch_size=kw.get("ghost_batch_size"))
    # y = x * a + b with |x| = 1e3: float32 rounding of x * a alone is ~1e3 * 6e-8 * |a|
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-3)
    # the running variance (BN branch) is exact to float32 precision, not off by ~1e6 * eps
    var64 = x64.var((0, 2, 3), unbiased=False) if not kw else torch.stack(
        [c.var((0, 2, 3), unbiased=False) for c in x64.split(2)]).mean(0)
    torch.testing.assert_close(layer.running_var.double(), 0.9 + 0.1 * var64, rtol=1e-5, atol=0)


def test_naive_formula_would_fail_here():
    """Sanity check that the case above is hard: E[x^2] - E[x]^2 in float32 is far off."""
    x = torch.randn(4, 8, 32, 32) + 1e3
    naive = (x.square().mean((2, 3)) - x.mean((2, 3)).square()).double()
    exact = x.double().var((2, 3), unbiased=False)
    assert (naive - exact).abs().max() > 1e-2


def test_gradients_large_mean_against_float64():
    layer = N.SwitchNorm2d(4)
    x32 = (torch.randn(4, 4, 8, 8) + 1e3).requires_grad_()
    x64 = x32.detach().double().requires_grad_()
    g = torch.randn(4, 4, 8, 8)
    layer(x32).backward(g)
    ref_layer = N.SwitchNorm2d(4).double()
    ref_layer(x64).backward(g.double())
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=0, atol=5e-3 * x64.grad.abs().max())
    torch.testing.assert_close(layer.mean_weight.grad.double(), ref_layer.mean_weight.grad,
                               rtol=1e-3, atol=1e-3)
