"""SN_TRITON=auto|1|0: Triton kernels that cannot break a run.

The kernels run only on CUDA, so these tests widen the routing to CPU tensors
and stand in for the kernels module with one that raises (a compile or launch
failure), returns wrong numbers, or works; the self-check on first use must
catch the first two with one warning and leave the native path in charge.
(The real kernels pass the same self-check under TRITON_INTERPRET=1:
``test_triton.py``, case ``layer_through_ops``.)
"""
import re
import warnings

import pytest
import torch

import normalization as N
from normalization import ops


class StandIn:
    """The kernels API of ``triton_kernels`` on the native implementations, broken on demand:
    ``raise`` (every call), ``wrong`` (every result), or one variant wrong: ``merge`` (the
    statistics of a reduction split into segments), ``no_dx`` (``grad_sums`` without
    ``dx``, the variant the eager backward launches), ``shifted`` (a variance off by 1e-4
    relative: what a tolerance for half-precision outputs would let through)."""
    INTERPRET = False
    triton = object()

    def __init__(self, fault=None):
        self.fault, self.calls = fault, 0

    def _enter(self):
        self.calls += 1
        if self.fault == "raise":
            raise RuntimeError("ptxas fatal: simulated compile failure")

    def _bend(self, t, variant=True):
        return t + 1.0 if self.fault == "wrong" or (variant and self.fault not in (
            None, "raise", "wrong", "shifted")) else t

    def instance_stats(self, x, split=None):
        self._enter()
        mean, var = ops._native_stats(x)
        if self.fault == "shifted":
            var = var * (1 + 1e-4)
        return self._bend(mean, self.fault == "merge" and (split or 1) > 1), var

    def apply_scale_shift(self, x, mu, scale, shift, out=None):
        self._enter()
        y = self._bend(ops._native_apply(x, mu, scale, shift, x.dtype), False)
        return y if out is None else out.copy_(y)

    def grad_sums(self, g, x, mu, scale=None, out=None, split=None):
        self._enter()
        sg, sgx, dx = ops._native_grad_sums(g, x, mu, scale)
        if out is not None:
            out.copy_(dx)
        return self._bend(sg, self.fault == "no_dx" and out is None), sgx

    def grad_input(self, g, x, mu, scale, a, b, out=None):
        self._enter()
        dx = self._bend(ops._native_grad_input(g, x, mu, scale, a, b), False)
        return dx if out is None else out.copy_(dx)


@pytest.fixture
def kernels(monkeypatch):
    """Route CPU tensors to a stand-in kernels module; returns a setter for it."""
    monkeypatch.delenv("SN_TRITON", raising=False)
    monkeypatch.setattr(ops, "_triton_device", lambda x: True)
    ops.reset_triton_checks()
    ops.set_triton_mode(None)

    def use(stand_in):
        monkeypatch.setattr(ops, "_load_kernels", lambda: stand_in)
        return stand_in
    yield use
    ops.reset_triton_checks()
    ops.set_triton_mode(None)


def _step(seed=0):
    """Forward and backward of an SN layer with ghost batches: (y, dx, dweight)."""
    torch.manual_seed(seed)
    layer = N.build_norm("sn", 6, ghost_batch_size=2)
    x = (torch.randn(4, 6, 5, 5) * 2 + 3).requires_grad_()
    y = layer(x)
    y.backward(torch.randn_like(y))
    return y.detach(), x.grad, layer.weight.grad


def _native():
    previous = ops.set_triton_mode("0")
    try:
        return _step()
    finally:
        ops.set_triton_mode(previous)


def _assert_same(got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fault,reason", [
    ("raise", "self-check failed"), ("wrong", "self-check mismatch"),
    ("merge", r"self-check mismatch in mean \[segments \+ merge\]"),
    ("no_dx", r"self-check mismatch in sum g \[one segment, no dx\]"),
    ("shifted", r"self-check mismatch in var \[one segment\]")])
def test_broken_kernels_fall_back_with_one_warning(kernels, fault, reason):
    stand_in = kernels(StandIn(fault))
    want = _native()
    with pytest.warns(RuntimeWarning, match=f"SN Triton kernels disabled.*{reason}"):
        got = _step()
    _assert_same(got, want)
    calls = stand_in.calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # no second warning, no second attempt
        _assert_same(_step(), want)
    assert stand_in.calls == calls
    assert all(re.search(reason, v) for v in ops.triton_status().values())


def test_working_kernels_are_used(kernels):
    stand_in = kernels(StandIn())
    want = _native()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _step()
    _assert_same(got, want)
    checked = stand_in.calls
    _step()
    assert stand_in.calls > checked       # the layer's passes ran on the kernels
    assert set(ops.triton_status().values()) == {"ok"}


def test_launch_failure_after_the_check_falls_back(kernels):
    stand_in = kernels(StandIn())
    want = _native()
    _step()                                # approved
    stand_in.fault = "raise"               # e.g. a new shape whose kernel fails to compile
    with pytest.warns(RuntimeWarning, match="RuntimeError: ptxas fatal"):
        got = _step()
    _assert_same(got, want)
    calls = stand_in.calls
    _step()
    assert stand_in.calls == calls


def test_modes(kernels, monkeypatch):
    stand_in = kernels(StandIn("raise"))
    monkeypatch.setenv("SN_TRITON", "0")
    _step()
    assert stand_in.calls == 0 and not ops.triton_status()
    monkeypatch.setenv("SN_TRITON", "1")   # forced: no self-check, failures surface
    with pytest.raises(RuntimeError, match="ptxas fatal"):
        _step()
    monkeypatch.setenv("SN_TRITON", "sometimes")
    with pytest.raises(ValueError, match="SN_TRITON must be one of auto, 1, 0"):
        _step()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_on_the_inputs_device():
    """A layer on cuda:1 called while cuda:0 is current gives the same result as on cuda:0."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5) * 2 + 3
    layer = N.build_norm("sn", 6, ghost_batch_size=2)
    ref = layer.cuda(0)(x.cuda(0)).cpu()
    with torch.cuda.device(0):
        y = layer.cuda(1)(x.cuda(1))
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_launches_on_the_current_stream():
    """On one GPU: a layer called under a side stream gives the default stream's result
    (the kernels launch on the current stream of the input's device, after the work that
    stream waits for)."""
    torch.manual_seed(0)
    x = (torch.randn(8, 64, 28, 28) * 2 + 3).cuda()
    layer = N.build_norm("sn", 64, ghost_batch_size=2).cuda()
    ref = layer(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = layer(x * 1.0)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
