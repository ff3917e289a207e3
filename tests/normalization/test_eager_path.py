"""The eager fast path (``eager.FastSwitchNorm``: one autograd node, Appendix A written out)
equals the definition (``functional.switch_norm``: plain differentiable ops) to 1e-10 in
float64: outputs, the gradients of the input, affine parameters and ratio logits, and
the batch statistics that feed the running averages."""
import pytest
import torch

import normalization as N
from normalization import functional as fn

D = torch.float64
CASES = [("sn", {}), ("sn", {"ghost_batch_size": 2}), ("sn", {"ghost_batch_size": 3}),
         ("sn", {"variance": "authors"}), ("sn", {"using_bn": False}),
         ("sn", {"hard_ratios": True}), ("ssn", {}), ("bn", {"ghost_batch_size": 2}),
         ("bn", {"ghost_batch_size": 4})]


def _run(layer, x, g, path):
    previous, definition = fn.current_path, fn.switch_norm
    calls = []

    def spy(*args, **kwargs):
        calls.append(path)
        return definition(*args, **kwargs)
    fn.current_path = lambda: path          # both paths through the same layer code
    fn.switch_norm = spy
    try:
        xi = x.clone().requires_grad_()
        layer.zero_grad()
        y = layer(xi)
        y.backward(g)
    finally:
        fn.current_path, fn.switch_norm = previous, definition
    assert calls, "the layer did not run switch_norm: the two paths were not compared"
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), xi.grad, grads, {n: b.clone() for n, b in layer.named_buffers()}


def _layer(name, kw, cls=None):
    torch.manual_seed(0)
    layer = (cls(5, **kw) if cls else N.build_norm(name, 5, **kw)).to(D)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    if isinstance(layer, N.SparseSwitchNorm2d):
        layer.set_radius(0.4)
    return layer


# (BatchNorm2d in eval is PyTorch's own layer: there is no fast path to compare)
@pytest.mark.parametrize("name,kw,train", [(n, k, t) for n, k in CASES for t in (True, False)
                                           if t or n != "bn"], ids=str)
def test_fast_path_equals_definition(name, kw, train):
    x = torch.randn(7, 5, 4, 3, dtype=D) * 3 + 2
    g = torch.randn(x.shape, dtype=D)
    results = []
    for path in ("eager", "plain"):
        layer = _layer(name, kw).train(train)
        results.append(_run(layer, x, g, path))
    (y1, dx1, p1, b1), (y2, dx2, p2, b2) = results
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y1, y2, **tol)
    torch.testing.assert_close(dx1, dx2, **tol)
    assert p1.keys() == p2.keys()
    for n in p1:
        torch.testing.assert_close(p1[n], p2[n], **tol, msg=n)
    for n in b1:
        torch.testing.assert_close(b1[n], b2[n], **tol, msg=n)


@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 7)])
def test_switchnorm1d_authors_fast_path_equals_definition(shape):
    x = torch.randn(shape, dtype=D) * 2 + 1
    g = torch.randn(shape, dtype=D)
    results = [_run(_layer(None, {"variance": "authors", "ghost_batch_size": 4},
                           N.SwitchNorm1d), x, g, path) for path in ("eager", "plain")]
    for a, b in zip(results[0][:2], results[1][:2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for n in results[0][2]:
        torch.testing.assert_close(results[0][2][n], results[1][2][n], rtol=1e-10, atol=1e-10)
