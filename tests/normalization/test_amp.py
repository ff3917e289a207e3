"""Autocast: statistics, Eq. (3) mixing and coefficients in float32, output in the autocast dtype.

An input with mean 50 and std 1 is where low-precision statistics or mixing fail
(bf16 keeps 8 bits: 50 +- 1 leaves about 2 bits for the deviation); every output
element must be within one bf16 rounding of the float32 result:
``|y_amp - y_fp32| <= 2^-8 |y_fp32| + 1e-3``.
"""
import copy

import pytest
import torch
import torch.fx

import normalization as N
from normalization import ops

BF16 = torch.bfloat16
NORMS = [("sn", {"ghost_batch_size": 2}), ("ssn", {"ghost_batch_size": 2}),
         ("bn", {"ghost_batch_size": 2}), ("gn", {"num_groups": 3}), ("sn", {}), ("bn", {}),
         ("in", {}), ("ln", {}), ("sn", {"variance": "authors"})]


def _layer(name, kw, train=True):
    torch.manual_seed(0)
    layer = N.build_norm(name, 6, **kw).train(train)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    if name == "ssn":
        layer.set_radius(0.3)
    return layer


def _within_bf16(y, ref):
    bound = 2.0 ** -8 * ref.abs() + 1e-3
    excess = ((y.float() - ref).abs() - bound).max().item()
    assert excess <= 0, f"off by {excess:.3g} beyond one bf16 rounding"


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,kw", NORMS, ids=lambda v: str(v))
def test_autocast_bf16_large_mean(name, kw, train):
    x = torch.randn(8, 6, 5, 5, generator=torch.Generator().manual_seed(1)) + 50
    layer = _layer(name, kw, train)
    ref = copy.deepcopy(layer)(x)
    with torch.autocast("cpu", dtype=BF16):
        y = layer(x)
    assert y.dtype == BF16
    _within_bf16(y, ref)


@pytest.mark.parametrize("name,kw", NORMS[:3], ids=lambda v: str(v))
def test_bf16_input_against_float32_of_the_same_values(name, kw):
    """A bf16 activation (what a conv under autocast produces): statistics of the
    rounded values in float32, one rounding of the output; the gradients too."""
    xb = (torch.randn(8, 6, 5, 5, generator=torch.Generator().manual_seed(2)) + 50).to(BF16)
    layer = _layer(name, kw)
    ref_layer = copy.deepcopy(layer)
    xr = xb.float().requires_grad_()
    ref = ref_layer(xr)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    ref.backward(g)
    xb.requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        y = layer(xb)
    y.backward(g.to(BF16))
    assert y.dtype == BF16 and xb.grad.dtype == BF16
    _within_bf16(y, ref.detach())
    # the gradient goes through the bf16-rounded g, so compare with a looser bound
    assert ((xb.grad.float() - xr.grad).abs() <= 2.0 ** -6 * xr.grad.abs().max() + 1e-3).all()
    torch.testing.assert_close(layer.weight.grad, ref_layer.weight.grad, rtol=2e-2, atol=2e-2)


def test_mixing_stays_float32_under_autocast():
    """The coefficients of Eq. (3) are float32 under autocast (a matmul would not be)."""
    x = torch.randn(4, 6, 3, 3) + 50
    seen = {}
    original = ops.scale_shift_impl

    def spy(x_in, mu, scale, shift, out_dtype=None, out=None):
        seen.update(mu=mu.dtype, scale=scale.dtype, shift=shift.dtype, out=out_dtype)
        return original(x_in, mu, scale, shift, out_dtype, out)
    ops.scale_shift_impl = spy
    try:
        with torch.autocast("cpu", dtype=BF16):
            _layer("sn", {"ghost_batch_size": 2})(x)
    finally:
        ops.scale_shift_impl = original
    assert seen == {"mu": torch.float32, "scale": torch.float32, "shift": torch.float32,
                    "out": BF16}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,kw", NORMS[:4], ids=lambda v: str(v))
def test_autocast_cuda(name, kw, dtype):
    x = torch.randn(8, 6, 5, 5, device="cuda") + 50
    layer = _layer(name, kw).cuda()
    ref = copy.deepcopy(layer)(x)
    with torch.autocast("cuda", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    rounding = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    assert ((y.float() - ref).abs() <= rounding * ref.abs() + 1e-3).all()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,kw", NORMS, ids=lambda v: str(v))
def test_fx_traced_layer_under_autocast_has_the_eager_dtype(name, kw, train):
    """A torch.fx-traced normalizer run under autocast gives the eager layer's output: the
    same dtype and the same values (the layer's call is one leaf of the graph)."""
    x = torch.randn(8, 6, 5, 5, generator=torch.Generator().manual_seed(4)) + 50
    layer = _layer(name, kw, train)
    traced = torch.fx.symbolic_trace(copy.deepcopy(layer))
    with torch.autocast("cpu", dtype=BF16):
        y, y_traced = layer(x), traced(x)
    assert y.dtype == y_traced.dtype == BF16
    torch.testing.assert_close(y_traced, y, rtol=0, atol=0)
