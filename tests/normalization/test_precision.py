"""Accuracy for inputs with a large mean (no E[x^2] - E[x]^2 cancellation)."""
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


@pytest.mark.parametrize("shape,group_norm", [((64, 32, 2, 2), False), ((4, 64, 28, 28), True),
                                              ((8, 512, 7, 7), True), ((2, 8, 4, 4), True)],
                         ids=["batch_norm_update_stats", "group-norm", "group-norm-7x7",
                              "group-norm-4x4"])
@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (50.0, 1.0), (3.0, 1e-3)])
def test_native_statistics_paths_against_float64(shape, group_norm, mean, std):
    """The CPU statistics paths (the group-norm kernel for rows of at least
    GROUP_NORM_MIN_ROW positions, the two-pass recomputation where a row's mean exceeds
    WELFORD_MAX_MEAN_PER_STD standard deviations (mean 3, std 1e-3 here), one
    batch_norm_update_stats call for shorter rows): the mean within 2 float32 ulps of
    |mean| (a float64 accumulation, rounded), the variance to 1e-5 relative; bfloat16
    and non-contiguous inputs agree with float32."""
    from normalization import ops
    x = (torch.randn(shape, dtype=torch.float64) * std + mean).float()
    assert (x[0, 0].numel() >= ops.GROUP_NORM_MIN_ROW) == group_norm
    ref = x.double().flatten(2)
    mu, var = ops._native_stats(x)
    assert mu.shape == var.shape == shape[:2] and mu.dtype == var.dtype == torch.float32
    ulp = torch.finfo(torch.float32).eps * max(abs(mean), std)
    assert (mu.double() - ref.mean(-1)).abs().max() <= 2 * ulp
    torch.testing.assert_close(var.double(), ref.var(-1, unbiased=False), rtol=1e-5, atol=0)
    mu_nc, var_nc = ops._native_stats(x.transpose(2, 3))
    torch.testing.assert_close(mu_nc, mu, rtol=1e-6, atol=2 * ulp)
    torch.testing.assert_close(var_nc, var, rtol=1e-5, atol=0)
    xb = x.bfloat16()
    mu_b, var_b = ops._native_stats(xb)
    assert mu_b.dtype == var_b.dtype == torch.float32
    refb = xb.double().flatten(2)
    torch.testing.assert_close(mu_b.double(), refb.mean(-1), rtol=0, atol=2 * ulp)
    torch.testing.assert_close(var_b.double(), refb.var(-1, unbiased=False), rtol=1e-5, atol=0)
    const = torch.full(shape, 7.25)                     # zero variance stays exactly zero
    assert (ops._native_stats(const)[1] == 0).all()


@pytest.mark.parametrize("ratio", [1.0, 30.0, 49.0, 51.0, 1e3, 1e4])
def test_statistics_variance_accuracy_at_any_mean(ratio):
    """Whichever path serves them (Welford up to 50 std, two passes beyond), the
    variances of rows with |mean| = ratio * std are within 5e-6 of float64."""
    from normalization import ops
    x = (torch.randn(4, 32, 14, 14, dtype=torch.float64) + ratio).float()
    x[0, :3] = torch.randn(3, 14, 14).float()                # a few well-conditioned rows
    _, var = ops._native_stats(x)
    ref = x.double().flatten(2).var(-1, unbiased=False)
    assert ((var.double() - ref) / ref).abs().max() < 5e-6


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
