"""Sparse SN: sparsestmax properties, SSN freezing, hard ratios, no host synchronisation."""
import math

import pytest
import torch
import torch.nn as nn

import normalization as N
from normalization.reference import reference_sparsestmax

from ..conftest import requires_cuda

D = torch.float64
VERTEX = math.sqrt(2.0 / 3.0)  # distance from the centre of the 3-simplex to a vertex


def test_sparsestmax_equals_recursive_reference():
    gen = torch.Generator().manual_seed(3)
    for _ in range(500):
        z = torch.randn(3, dtype=D, generator=gen) * torch.rand(1, dtype=D, generator=gen) * 3
        r = float(torch.rand(1, generator=gen))
        torch.testing.assert_close(N.sparsestmax(z, r), reference_sparsestmax(z, r),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("radius", [0.0, 0.1, 0.4, 0.7, VERTEX, 1.0])
def test_sparsestmax_on_simplex_and_outside_radius(radius):
    z = torch.randn(200, 3, dtype=D)
    p = N.sparsestmax(z, radius)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(200, dtype=D))
    dist = (p - 1.0 / 3).norm(dim=-1)
    assert (dist >= min(radius, VERTEX) - 1e-9).all()
    if radius >= VERTEX:  # one-hot (to rounding)
        assert (p.max(-1).values > 1 - 1e-12).all() and ((p > 1e-12).sum(-1) == 1).all()


def test_sparsemax_is_the_simplex_projection():
    z = torch.tensor([[0.5, 0.2, -3.0], [1.0, 1.0, 1.0], [3.0, 0.0, 0.0]], dtype=D)
    expected = torch.tensor([[0.65, 0.35, 0.0], [1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]], dtype=D)
    torch.testing.assert_close(N.sparsemax(z), expected)


def test_ssn_ratios_become_one_hot_and_freeze():
    layer = N.SparseSwitchNorm2d(4)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.9, 1.1, 1.0]))
        layer.var_weight.copy_(torch.tensor([1.2, 1.0, 0.7]))
    x = torch.randn(4, 4, 5, 5)
    layer.set_radius(0.2)
    layer(x)
    assert int(layer.mean_fixed) == 0 and int(layer.var_fixed) == 0
    assert N.set_ssn_radius(nn.Sequential(layer), 1.0) == 1
    layer(x).sum().backward()
    assert int(layer.mean_fixed) == 1 and int(layer.var_fixed) == 1
    torch.testing.assert_close(layer.mean_weight.data, torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(layer.var_weight.data, torch.tensor([1.0, 0.0, 0.0]))
    # frozen: no gradient to the logits, and the ratios stay one-hot at any radius
    layer.zero_grad()
    layer.set_radius(0.0)
    with torch.no_grad():
        layer.mean_weight.add_(torch.tensor([0.2, 0.0, 0.3]))  # e.g. weight decay drift
    layer(x).sum().backward()
    assert layer.mean_weight.grad is None or layer.mean_weight.grad.abs().sum() == 0
    r = N.ratios(nn.Sequential(layer))["0"]
    torch.testing.assert_close(r["mean"], torch.tensor([0.0, 1.0, 0.0]))


def test_ssn_ratios_on_the_simplex_during_training():
    layer = N.SparseSwitchNorm2d(4)
    layer.set_radius(0.5)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.3, 0.1, 0.2]))
    mean, var = layer.switch_ratios()
    assert abs(float(mean.sum()) - 1) < 1e-6 and (mean >= 0).all()
    assert float((mean - 1 / 3).norm()) >= 0.5 - 1e-6


def test_ssn_forward_never_synchronises_host(monkeypatch):
    """Any .item()/bool()/int()/float()/tolist() on a tensor during forward would sync a GPU.
    (The CPU statistics pass reads the host by design, to pick the rows it recomputes in
    float64; here it is replaced by var_mean, so that what is tested is SSN's own code.)"""
    from normalization import ops

    def stats(x):
        var, mean = torch.var_mean(x.flatten(2), -1, correction=0)
        return mean, var
    monkeypatch.setattr(ops, "_native_stats", stats)
    layer = N.SparseSwitchNorm2d(4, ghost_batch_size=2)
    layer.set_radius(0.5)
    x = torch.randn(4, 4, 3, 3, requires_grad=True)
    patched = {}

    def forbid(name):
        def raise_(*a, **k):
            raise AssertionError(f"host synchronisation: Tensor.{name}")
        return raise_
    for name in ("item", "__bool__", "__int__", "__float__", "tolist", "__index__"):
        patched[name] = getattr(torch.Tensor, name)
        setattr(torch.Tensor, name, forbid(name))
    try:
        y = layer(x)
        y.sum().backward()
        layer.eval()(x)
    finally:
        for name, fn in patched.items():
            setattr(torch.Tensor, name, fn)


@pytest.mark.gpu
@requires_cuda
def test_ssn_no_sync_on_cuda():
    layer = N.SparseSwitchNorm2d(8).cuda()
    layer.set_radius(0.5)
    x = torch.randn(4, 8, 5, 5, device="cuda", requires_grad=True)
    layer(x)  # warm-up: lazy initialisation may synchronise
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_hard_ratios_switch_and_gradient():
    model = nn.Sequential(N.SwitchNorm2d(4), nn.ReLU(), N.SparseSwitchNorm2d(4))
    with torch.no_grad():
        model[0].mean_weight.copy_(torch.tensor([0.1, 0.5, 0.2]))
        model[0].var_weight.copy_(torch.tensor([0.7, 0.5, 0.2]))
    assert N.set_hard_ratios(model) == 2
    r = N.ratios(model)
    torch.testing.assert_close(r["0"]["mean"], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(r["0"]["var"], torch.tensor([1.0, 0.0, 0.0]))
    model(torch.randn(3, 4, 4, 4)).sum().backward()
    assert model[0].mean_weight.grad is None and model[0].weight.grad is not None
    N.set_hard_ratios(model, False)
    assert abs(float(N.ratios(model)["0"]["mean"][1]) - 0.4) < 0.05


def test_hard_bn_layer_is_an_affine_in_eval():
    layer = N.SwitchNorm2d(4, hard_ratios=True)
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.0, 0.0, 2.0]))
        layer.var_weight.copy_(torch.tensor([0.0, 0.0, 2.0]))
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    layer.eval()
    assert layer._hard_bn_only()
    x = torch.randn(3, 4, 5, 5)
    fast = layer(x)
    general = N.SwitchNorm2d(4, hard_ratios=True).eval()
    general.load_state_dict(layer.state_dict())
    general._hard_bn_only = lambda: False  # the full statistics path with the same ratios
    torch.testing.assert_close(fast, general(x))
    with torch.no_grad():  # changing the logits invalidates the cached choice
        layer.var_weight.copy_(torch.tensor([3.0, 0.0, 0.0]))
    assert not layer._hard_bn_only()


def test_ratios_helper_names_and_order():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), N.SwitchNorm2d(4), N.SwitchNorm2d(4, using_bn=False),
                          N.BatchNorm2d(4))
    r = N.ratios(model)
    assert list(r) == ["1", "2"]
    assert r["1"]["mean"].shape == (3,) and r["2"]["var"].shape == (2,)
    torch.testing.assert_close(r["1"]["mean"], torch.full((3,), 1 / 3))


def test_frozen_ratios_are_untouched_by_momentum_and_weight_decay():
    """As the authors' SSN (which detaches frozen ratios): once one-hot, the logits do not
    move, whatever velocity they had or weight decay; the unfrozen vector keeps training."""
    torch.manual_seed(0)
    layer = N.SparseSwitchNorm2d(4)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    assert N.hold_frozen_ratios(nn.Sequential(layer), opt) is not None
    x = torch.randn(4, 4, 5, 5)
    layer.set_radius(0.3)
    for _ in range(3):                      # build up velocity in every logit
        opt.zero_grad()
        (layer(x) * torch.randn(4, 4, 5, 5)).sum().backward()
        opt.step()
    with torch.no_grad():                   # the mean ratios become one-hot at this radius
        layer.mean_weight.copy_(torch.tensor([2.0, 0.0, -1.0]))
    layer.set_radius(1.0)
    layer(x)
    assert int(layer.mean_fixed) == 1
    layer.set_radius(0.3)
    for _ in range(4):
        opt.zero_grad()
        var_before = layer.var_weight.detach().clone()
        (layer(x) * torch.randn(4, 4, 5, 5)).sum().backward()
        assert layer.mean_weight.grad.abs().sum() == 0
        opt.step()
        torch.testing.assert_close(layer.mean_weight.detach(), torch.tensor([1.0, 0.0, 0.0]),
                                   rtol=0, atol=0)
        assert opt.state[layer.mean_weight]["momentum_buffer"].abs().sum() == 0
        if not int(layer.var_fixed):
            assert not torch.equal(layer.var_weight.detach(), var_before)
