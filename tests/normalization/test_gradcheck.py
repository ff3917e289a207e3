"""torch.autograd.gradcheck in float64 of the fused implementation (input, affine, ratio logits)."""
import pytest
import torch
from torch.func import functional_call

import normalization as N

D = torch.float64


def _check(layer, shape, training=True):
    layer = layer.to(D).train(training)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p for _, p in layer.named_parameters())
    buffers = {n: b.clone() for n, b in layer.named_buffers()}

    def f(x, *ps):
        # restore buffers so every evaluation sees the same running statistics
        state = dict(zip(names, ps))
        state.update({n: b.clone() for n, b in buffers.items()})
        return functional_call(layer, state, (x,))

    x = torch.randn(shape, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x,) + params, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(ghost_batch_size=2), dict(variance="authors"),
                                dict(using_bn=False), dict(ghost_batch_size=3)])
def test_switchnorm2d(kw):
    _check(N.SwitchNorm2d(3, **kw), (5, 3, 3, 2))


def test_switchnorm2d_eval_mode():
    _check(N.SwitchNorm2d(3), (4, 3, 3, 3), training=False)


def test_switchnorm_1d_3d():
    _check(N.SwitchNorm1d(4), (5, 4))
    _check(N.SwitchNorm1d(4), (5, 4, 3))
    _check(N.SwitchNorm3d(2), (3, 2, 2, 2, 3))


@pytest.mark.parametrize("radius", [0.0, 0.3, 0.6])
def test_sparse_switchnorm(radius):
    layer = N.SparseSwitchNorm2d(3)
    layer.set_radius(radius)
    _check(layer, (4, 3, 3, 3))


def test_ghost_batchnorm():
    _check(N.BatchNorm2d(3, ghost_batch_size=2), (6, 3, 2, 3))


def test_sparsestmax_and_sparsemax():
    for radius in (0.0, 0.2, 0.5, 0.75):
        z = torch.tensor([[0.3, -0.2, 0.1], [1.0, 0.55, 0.45], [0.2, 0.19, -1.0]], dtype=D,
                         requires_grad=True)
        assert torch.autograd.gradcheck(lambda z: N.sparsestmax(z, radius), (z,))
    z = torch.randn(6, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(N.sparsemax, (z,))
