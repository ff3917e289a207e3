"""Batch-average inference statistics (paper Sec. 4.1.3): collect, finalise, errors."""
import pytest
import torch
import torch.nn as nn

import normalization as N

D = torch.float64


def _net(norm="sn", **kw):
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3), N.build_norm(norm, 4, **kw), nn.ReLU(),
                         nn.Dropout(0.5), nn.Conv2d(4, 5, 3), N.build_norm(norm, 5, **kw)).to(D)


def _explicit(batches, upto, ghost):
    """Mean and E[x^2] - mean^2 over every chunk of every batch, computed directly."""
    feats = []
    for x in batches:
        h = upto(x)
        feats.extend(h.split(ghost or len(h)))
    n = sum(f.shape[0] for f in feats)
    mean = sum(f.mean((0, 2, 3)) * f.shape[0] for f in feats) / n
    second = sum((f.var((0, 2, 3), unbiased=False) + f.mean((0, 2, 3)) ** 2) * f.shape[0]
                 for f in feats) / n
    return mean, second - mean ** 2


@pytest.mark.parametrize("norm,ghost", [("sn", None), ("sn", 2), ("bn", 3), ("ssn", None)])
def test_collected_statistics_equal_explicit_average(norm, ghost):
    net = _net(norm, ghost_batch_size=ghost)
    batches = [torch.randn(6, 3, 7, 7, dtype=D) * (i + 1) + i for i in range(4)]
    weights_before = [p.clone() for p in net.parameters()]
    n = N.update_batch_average(net, batches)
    assert n == 24
    # the first layer's input is the first conv's output, computed with frozen weights
    mean, var = _explicit(batches, net[0], ghost)
    torch.testing.assert_close(net[1].running_mean, mean)
    torch.testing.assert_close(net[1].running_var, var)
    for p, q in zip(net.parameters(), weights_before):
        assert torch.equal(p, q)
    assert net.training  # modes restored


def test_second_layer_sees_first_layer_in_batch_statistics_mode():
    net = _net("sn")
    batches = [torch.randn(5, 3, 7, 7, dtype=D) for _ in range(3)]
    N.update_batch_average(net, batches)
    # the explicit average for layer 2 uses layer 1 normalising with batch statistics
    # (training mode) and dropout off; running stats of layer 1 are already final.
    net.eval()
    net[1].train()

    def upto(x):
        with torch.no_grad():
            return net[4](net[3](net[2](net[1](net[0](x)))))
    saved = net[1].running_mean.clone(), net[1].running_var.clone()
    mean, var = _explicit(batches, upto, None)
    net[1].running_mean.copy_(saved[0])
    net[1].running_var.copy_(saved[1])
    torch.testing.assert_close(net[5].running_mean, mean)
    torch.testing.assert_close(net[5].running_var, var)


def test_step_by_step_api_and_num_batches_limit():
    net = _net("sn")
    assert N.begin_batch_average(net) == 2
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(4, 3, 6, 6, dtype=D))
    assert N.finalize_batch_average(net) == 8
    assert N.update_batch_average(net, (torch.randn(4, 3, 6, 6, dtype=D) for _ in range(10)),
                                  num_batches=3) == 12


def test_finalize_without_any_batch_is_an_error():
    net = _net("sn")
    N.begin_batch_average(net)
    with pytest.raises(RuntimeError, match="no batch"):
        N.finalize_batch_average(net)
    assert not net[1].collecting  # collection aborted, layers usable again


def test_evaluating_before_finalising_is_an_error():
    net = _net("sn")
    N.begin_batch_average(net)
    net.eval()
    with pytest.raises(RuntimeError, match="not finalised"):
        net(torch.randn(2, 3, 6, 6, dtype=D))
    N.abort_batch_average(net)
    net(torch.randn(2, 3, 6, 6, dtype=D))


def test_running_stats_untouched_until_finalised_and_no_momentum_updates():
    net = _net("sn")
    before = net[1].running_mean.clone()
    N.begin_batch_average(net)
    with torch.no_grad():
        net(torch.randn(4, 3, 6, 6, dtype=D) + 3)
    assert torch.equal(net[1].running_mean, before)


def test_layers_without_bn_branch_are_skipped():
    net = nn.Sequential(N.SwitchNorm2d(3, using_bn=False), N.GroupNorm(3)).to(D)
    assert N.begin_batch_average(net) == 0
    assert N.finalize_batch_average(net) == 0.0
