"""Ghost batches: chunk by chunk equal to running the layer on each chunk alone."""
import copy

import pytest
import torch

import normalization as N

D = torch.float64


def _make(name, **kw):
    layer = N.build_norm(name, 4, **kw).to(D)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    if name == "ssn":
        layer.set_radius(0.3)
    return layer


@pytest.mark.parametrize("name", ["sn", "ssn", "bn", "syncsn", "syncbn"])
@pytest.mark.parametrize("n,ghost", [(8, 2), (6, 3), (7, 2)])
def test_equal_to_each_chunk_alone(name, n, ghost):
    ghosted = _make(name, ghost_batch_size=ghost)
    alone = [copy.deepcopy(ghosted) for _ in range(0, n, ghost)]
    for a in alone:
        a.ghost_batch_size = None
    x = torch.randn(n, 4, 3, 3, dtype=D) * 2 + 1
    g = torch.randn_like(x)

    xg = x.clone().requires_grad_()
    y = ghosted(xg)
    y.backward(g)
    chunks = []
    for layer, xc, gc in zip(alone, x.split(ghost), g.split(ghost)):
        xc = xc.clone().requires_grad_()
        yc = layer(xc)
        yc.backward(gc)
        chunks.append((yc, xc.grad))
    torch.testing.assert_close(y, torch.cat([c[0] for c in chunks]))
    torch.testing.assert_close(xg.grad, torch.cat([c[1] for c in chunks]))
    for name_p, p in ghosted.named_parameters():
        expected = sum(dict(a.named_parameters())[name_p].grad for a in alone)
        torch.testing.assert_close(p.grad, expected, msg=name_p)
    # one running-statistics update from the average of the chunks' statistics
    for buf in ("running_mean", "running_var"):
        expected = torch.stack([getattr(a, buf) for a in alone]).mean(0)
        torch.testing.assert_close(getattr(ghosted, buf), expected, msg=buf)


def test_ghost_none_or_larger_than_batch_is_whole_batch():
    x = torch.randn(4, 4, 3, 3, dtype=D)
    a, b = _make("sn"), _make("sn")
    b.load_state_dict(a.state_dict())
    b.ghost_batch_size = 16
    torch.testing.assert_close(a(x), b(x))


def test_ghost_batch_statistics_differ_from_whole_batch():
    x = torch.randn(8, 4, 3, 3, dtype=D)
    x[4:] += 5.0
    a, b = _make("bn"), _make("bn", ghost_batch_size=4)
    b.load_state_dict(a.state_dict())
    assert not torch.allclose(a(x), b(x))


def test_eval_ignores_ghost_batches():
    layer = _make("sn", ghost_batch_size=2).eval()
    x = torch.randn(6, 4, 3, 3, dtype=D)
    torch.testing.assert_close(layer(x)[:2], layer(x[:2]))
