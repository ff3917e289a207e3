"""Every normalizer: shapes, dtypes, finiteness, backward, train/eval, bad input."""
import pytest
import torch

import normalization as N

NAMES = N.list_norms()


def _single_value_statistic(name, shape):
    """PyTorch's own BN/GN/IN refuse statistics over a single value (a clear error)."""
    n, c, h, w = shape
    per_stat = {"bn": n * h * w, "syncbn": n * h * w, "in": h * w, "gn": h * w}
    return per_stat.get(name, 2) == 1


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(4, 8, 5, 6), (1, 8, 1, 1), (3, 8, 1, 1), (1, 8, 4, 4)])
def test_forward_backward_finite(name, shape):
    """No NaN or inf for any shape, including H = W = 1 and N = 1 (SN family: always)."""
    layer = N.build_norm(name, 8)
    if _single_value_statistic(name, shape):
        try:
            assert torch.isfinite(layer(torch.randn(shape))).all()
        except ValueError as e:
            assert "value" in str(e) or "element" in str(e)
        return
    if name == "ssn":
        layer.set_radius(0.4)
    x = (torch.randn(shape) * 3 + 1).requires_grad_()
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        y = layer(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.isfinite(y).all(), (name, mode)
        y.square().sum().backward()
        assert torch.isfinite(x.grad).all(), (name, mode)
        for p in layer.parameters():
            if p.grad is not None:
                assert torch.isfinite(p.grad).all()
        x.grad = None


@pytest.mark.parametrize("name", ["bn", "sn", "ssn", "syncbn", "syncsn"])
def test_train_updates_running_stats_eval_uses_them(name):
    layer = N.build_norm(name, 4)
    x = torch.randn(8, 4, 3, 3) * 2 + 5
    before = layer.running_mean.clone()
    layer.train()(x)
    assert not torch.equal(layer.running_mean, before)
    layer.eval()
    frozen = layer.running_mean.clone()
    y1 = layer(x[:2])
    assert torch.equal(layer.running_mean, frozen)
    # eval output of a sample does not depend on the rest of the batch
    y2 = layer(x[:1])
    torch.testing.assert_close(y1[:1], y2)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_rank_and_channels(name):
    layer = N.build_norm(name, 8)
    if name == "none":
        return
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 8"):
        layer(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="expects input of shape"):
        layer(torch.randn(8))


def test_switchnorm_1d_and_3d_bad_shapes():
    with pytest.raises(ValueError, match=r"\(N, 6\) or \(N, 6, L\)"):
        N.SwitchNorm1d(6)(torch.randn(2, 6, 3, 3))
    with pytest.raises(ValueError, match=r"\(N, 6, T, H, W\)"):
        N.SwitchNorm3d(6)(torch.randn(2, 6, 3, 3))


def test_parameter_and_buffer_names_and_shapes():
    sn = N.SwitchNorm2d(16)
    assert [n for n, _ in sn.named_parameters()] == ["weight", "bias", "mean_weight", "var_weight"]
    assert [n for n, _ in sn.named_buffers()] == ["running_mean", "running_var"]
    assert sn.mean_weight.shape == (3,) and sn.weight.shape == (16,)
    torch.testing.assert_close(sn.mean_weight.data, torch.ones(3))
    no_bn = N.SwitchNorm2d(16, using_bn=False)
    assert no_bn.mean_weight.shape == (2,) and no_bn.running_mean is None
    assert "running_mean" not in no_bn.state_dict()


def test_last_gamma_zero_init():
    assert N.SwitchNorm2d(8, last_gamma=True).weight.abs().sum() == 0
    layer = N.SwitchNorm2d(8)
    assert torch.equal(layer.weight, torch.ones(8))


def test_momentum_convention_keeps_momentum_of_old_value():
    """The authors' convention: momentum 0.9 keeps 0.9 of the old running value."""
    layer = N.SwitchNorm2d(3, momentum=0.9)
    x = torch.randn(6, 3, 4, 4) + 2.0
    layer(x)
    batch_mean = x.mean((0, 2, 3))
    torch.testing.assert_close(layer.running_mean, 0.1 * batch_mean)
    batch_var = x.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(layer.running_var, 0.9 * torch.ones(3) + 0.1 * batch_var)


def test_no_moving_average_leaves_running_stats():
    layer = N.SwitchNorm2d(3, using_moving_average=False)
    layer(torch.randn(6, 3, 4, 4))
    assert torch.equal(layer.running_mean, torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["sn", "ssn", "bn"])
def test_reduced_precision_inputs_give_float32_statistics(name, dtype):
    layer = N.build_norm(name, 8, ghost_batch_size=2)
    x = torch.randn(4, 8, 6, 6) * 2 + 3
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    ref = N.build_norm(name, 8, ghost_batch_size=2)(x.to(dtype).float())
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)
    # running statistics are float32, accumulated from float32 statistics
    assert layer.running_mean.dtype == torch.float32


def test_autocast_cpu_bfloat16():
    conv = torch.nn.Conv2d(3, 8, 3)
    layer = N.SwitchNorm2d(8)
    x = torch.randn(2, 3, 10, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = layer(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.mean_weight.grad is not None and layer.mean_weight.grad.dtype == torch.float32
    assert torch.isfinite(conv.weight.grad).all()


def test_channels_last_input():
    layer = N.SwitchNorm2d(8)
    x = torch.randn(4, 8, 5, 5)
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    xr = x.clone().requires_grad_()
    y, yr = layer(xc), layer(xr)
    torch.testing.assert_close(y, yr)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(xc.grad, xr.grad)


def test_repr_mentions_configuration():
    s = repr(N.SwitchNorm2d(8, ghost_batch_size=2, using_bn=False))
    assert "in/ln" in s and "ghost_batch_size=2" in s


@pytest.mark.gpu
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("name", ["sn", "ssn", "bn"])
def test_cuda_matches_cpu(name, layout):
    """The CUDA path (fused Triton kernels when available) against the CPU implementation."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cpu = N.build_norm(name, 16, ghost_batch_size=4)
    if name == "ssn":
        cpu.set_radius(0.3)
    gpu = N.build_norm(name, 16, ghost_batch_size=4).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(8, 16, 14, 14) * 2 + 3
    g = torch.randn_like(x)
    xc = x.clone().requires_grad_()
    xg = x.cuda().contiguous(memory_format=layout).requires_grad_()
    yc, yg = cpu(xc), gpu(xg)
    yc.backward(g)
    yg.backward(g.cuda())
    torch.testing.assert_close(yg.cpu(), yc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xg.grad.cpu(), xc.grad, rtol=1e-5, atol=1e-5)
    for (n, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,kw", [("sn", {}), ("sn", {"ghost_batch_size": 2}), ("ssn", {}),
                                     ("syncsn", {}), ("bn", {"ghost_batch_size": 2}),
                                     ("sn", {"using_bn": False}), ("gn", {"num_groups": 2})],
                         ids=str)
def test_empty_batch_behaves_like_batchnorm(name, kw, train):
    """N = 0: an empty output of the input's shape, running statistics untouched, a
    backward that gives zero gradients, as nn.BatchNorm2d does."""
    layer = N.build_norm(name, 4, **kw).train(train)
    oracle = torch.nn.BatchNorm2d(4).train(train)
    buffers = {k: v.clone() for k, v in layer.named_buffers()}
    x = torch.randn(0, 4, 5, 3, requires_grad=True)
    y, y_oracle = layer(x), oracle(x)
    assert y.shape == y_oracle.shape == (0, 4, 5, 3) and y.dtype == y_oracle.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(layer.weight.grad, torch.zeros(4))
    for k, v in layer.named_buffers():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, buffers[k]), k
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
