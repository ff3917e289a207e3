"""Each normalizer against PyTorch's own layers and the plain reference of Eq. (2)-(5)."""
import pytest
import torch
import torch.nn.functional as F

import normalization as N
from normalization.reference import reference_switch_norm

D = torch.float64


def _randomize(layer):
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    return layer


def _one_hot_sn(index, hard, **kw):
    """SN whose ratios select normalizer ``index`` for mean and variance."""
    layer = _randomize(N.SwitchNorm2d(6, **kw).to(D))
    with torch.no_grad():
        logits = torch.full((3,), -30.0, dtype=D)
        logits[index] = 30.0
        layer.mean_weight.copy_(logits)
        layer.var_weight.copy_(logits)
    layer.hard_ratios = hard
    return layer


def _affine(y, layer):
    return y * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("hard", [False, True])
def test_one_hot_in_equals_instance_norm(hard):
    layer = _one_hot_sn(0, hard)
    x = torch.randn(4, 6, 5, 7, dtype=D)
    expected = _affine(F.instance_norm(x, eps=layer.eps), layer)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.eval()(x), expected)


@pytest.mark.parametrize("hard", [False, True])
def test_one_hot_ln_equals_layer_norm_over_chw(hard):
    layer = _one_hot_sn(1, hard)
    x = torch.randn(4, 6, 5, 7, dtype=D)
    expected = _affine(F.layer_norm(x, x.shape[1:], eps=layer.eps), layer)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.eval()(x), expected)


@pytest.mark.parametrize("hard", [False, True])
def test_one_hot_bn_equals_batch_norm_train_and_eval(hard):
    layer = _one_hot_sn(2, hard, momentum=0.7)
    x = torch.randn(5, 6, 4, 3, dtype=D) * 2 + 1
    rm, rv = torch.zeros(6, dtype=D), torch.ones(6, dtype=D)
    expected = F.batch_norm(x, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
    torch.testing.assert_close(layer(x), expected)
    # running statistics: the authors' convention with the biased batch variance
    torch.testing.assert_close(layer.running_mean, 0.7 * rm + 0.3 * x.mean((0, 2, 3)))
    torch.testing.assert_close(layer.running_var, 0.7 * rv + 0.3 * x.var((0, 2, 3), unbiased=False))
    layer.eval()
    expected = F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias,
                            False, 0.0, layer.eps)
    torch.testing.assert_close(layer(x), expected)


CONFIGS = [
    dict(),
    dict(ghost_batch_size=2),
    dict(ghost_batch_size=3),  # the last chunk is smaller
    dict(variance="authors"),
    dict(variance="authors", ghost_batch_size=2),
    dict(using_bn=False),
]


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("training", [True, False])
def test_soft_ratios_match_reference_forward_and_gradients(kw, training):
    layer = _randomize(N.SwitchNorm2d(6, **kw).to(D))
    with torch.no_grad():
        layer.running_mean.normal_() if layer.running_mean is not None else None
        layer.running_var.uniform_(0.5, 2) if layer.running_var is not None else None
    layer.train(training)
    x = (torch.randn(5, 6, 4, 3, dtype=D) * 3 + 2).requires_grad_()
    running = None
    if not training and layer.using_bn:
        running = (layer.running_mean, layer.running_var)
    params = [layer.weight, layer.bias, layer.mean_weight, layer.var_weight]
    y = layer(x)
    y_ref = reference_switch_norm(x, layer.weight, layer.bias, torch.softmax(layer.mean_weight, 0),
                                  torch.softmax(layer.var_weight, 0), normalizers=layer.normalizers,
                                  eps=layer.eps, ghost_batch_size=kw.get("ghost_batch_size"),
                                  running=running, authors=kw.get("variance") == "authors")
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x] + params, g)
    grads_ref = torch.autograd.grad(y_ref, [x] + params, g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_authors_variance_reproduces_released_algorithm():
    """Unbiased IN variance, LN/BN variances derived from it (E[var + mu^2] - E[mu]^2)."""
    layer = _randomize(N.SwitchNorm2d(6, variance="authors").to(D))
    x = torch.randn(4, 6, 3, 3, dtype=D)
    xf = x.view(4, 6, -1)
    mean_in, var_in = xf.mean(-1, keepdim=True), xf.var(-1, keepdim=True)
    temp = var_in + mean_in ** 2
    mean_ln = mean_in.mean(1, keepdim=True)
    var_ln = temp.mean(1, keepdim=True) - mean_ln ** 2
    mean_bn = mean_in.mean(0, keepdim=True)
    var_bn = temp.mean(0, keepdim=True) - mean_bn ** 2
    mw, vw = torch.softmax(layer.mean_weight, 0), torch.softmax(layer.var_weight, 0)
    mean = mw[0] * mean_in + mw[1] * mean_ln + mw[2] * mean_bn
    var = vw[0] * var_in + vw[1] * var_ln + vw[2] * var_bn
    expected = ((xf - mean) / (var + layer.eps).sqrt()).view_as(x)
    torch.testing.assert_close(layer(x), _affine(expected, layer))
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * var_bn.view(-1))


def test_switchnorm_1d_matches_reference_ln_bn():
    layer = _randomize(N.SwitchNorm1d(5).to(D))
    for shape in [(7, 5), (7, 5, 4)]:
        x = torch.randn(shape, dtype=D, requires_grad=True)
        y = layer(x)
        ref = reference_switch_norm(x.view(shape[0], 5, -1), layer.weight, layer.bias,
                                    torch.softmax(layer.mean_weight, 0),
                                    torch.softmax(layer.var_weight, 0), normalizers=("ln", "bn"),
                                    eps=layer.eps).view(shape)
        torch.testing.assert_close(y, ref)
        g = torch.randn_like(y)
        torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])
    assert layer.normalizers == ("ln", "bn")


def test_switchnorm_3d_statistics_over_thw():
    layer = _randomize(N.SwitchNorm3d(4).to(D))
    x = torch.randn(3, 4, 2, 3, 5, dtype=D)
    ref = reference_switch_norm(x, layer.weight, layer.bias, torch.softmax(layer.mean_weight, 0),
                                torch.softmax(layer.var_weight, 0), eps=layer.eps)
    torch.testing.assert_close(layer(x), ref)


def test_group_instance_layer_norm_equal_pytorch():
    x = torch.randn(3, 64, 5, 5, dtype=D)
    gn = _randomize(N.GroupNorm(64, num_groups=32).to(D))
    ref = torch.nn.GroupNorm(32, 64).to(D)
    ref.load_state_dict(gn.state_dict())
    torch.testing.assert_close(gn(x), ref(x))
    inorm = _randomize(N.InstanceNorm2d(64).to(D))
    torch.testing.assert_close(inorm(x), F.instance_norm(x, weight=inorm.weight, bias=inorm.bias))
    ln = _randomize(N.LayerNorm2d(64).to(D))
    torch.testing.assert_close(ln(x), _affine(F.layer_norm(x, x.shape[1:]), ln))


def test_group_norm_non_divisible_channels_uses_common_divisor():
    assert N.GroupNorm(48, num_groups=32).num_groups == 16
    assert N.GroupNorm(16).num_groups == 16


def test_our_batchnorm_is_pytorch_batchnorm_without_ghosts():
    x = torch.randn(6, 5, 4, 4, dtype=D)
    ours = _randomize(N.BatchNorm2d(5).to(D))
    ref = torch.nn.BatchNorm2d(5).to(D)
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert list(ours.state_dict()) == list(ref.state_dict())


def test_switchnorm1d_authors_variance_matches_their_layer():
    """The authors' SwitchNorm1d, written out: LN over C and BN over N with unbiased
    variances (x.var default), momentum 0.997 for the running statistics."""
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64) * 2 + 1
    layer = N.SwitchNorm1d(5, variance="authors").double()
    with torch.no_grad():
        layer.mean_weight.copy_(torch.tensor([0.3, -0.2]))
        layer.var_weight.copy_(torch.tensor([-0.5, 0.4]))
        layer.weight.normal_()
        layer.bias.normal_()
    y = layer(x)
    mw, vw = torch.softmax(layer.mean_weight, 0), torch.softmax(layer.var_weight, 0)
    mean = mw[0] * x.mean(1, keepdim=True) + mw[1] * x.mean(0, keepdim=True)
    var = vw[0] * x.var(1, keepdim=True) + vw[1] * x.var(0, keepdim=True)
    ref = (x - mean) / (var + layer.eps).sqrt() * layer.weight + layer.bias
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert layer.momentum == 0.997 and N.SwitchNorm3d(4).momentum == 0.997
    torch.testing.assert_close(layer.running_var, 0.997 + 0.003 * x.var(0))
    torch.testing.assert_close(layer.running_mean, 0.003 * x.mean(0))
