"""torch.compile, torch.fx and double backward for every normalizer.

Compiled (inductor on the CPU, ``fullgraph=True``: no graph break inside a norm
layer) equals eager to 1e-5 in outputs, input gradients, parameter gradients
and running statistics, in training and in eval mode, on the default ``plain``
path and on the custom-operator path (``SN_COMPILE=ops``). Every layer of a
module is compiled at once (one compilation: compiling is the slow part).
"""
import copy

import pytest
import torch
import torch.fx
import torch.nn as nn

import models
import normalization as N
from normalization import functional as fn

CASES = {  # name -> (normalizer, kwargs)
    "bn": ("bn", {}), "bn-ghost": ("bn", {"ghost_batch_size": 3}), "syncbn": ("syncbn", {}),
    "gn": ("gn", {"num_groups": 2}), "in": ("in", {}), "ln": ("ln", {}), "sn": ("sn", {}),
    "sn-ghost": ("sn", {"ghost_batch_size": 3}), "syncsn": ("syncsn", {}),
    "sn-hard": ("sn", {"hard_ratios": True}), "sn-authors": ("sn", {"variance": "authors"}),
    "sn-nobn": ("sn", {"using_bn": False}), "ssn": ("ssn", {}),
}


class AllNorms(nn.Module):
    """Every case applied to the same input; returns one output per case."""

    def __init__(self, cases, channels=6):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleDict({k.replace("-", "_"): N.build_norm(n, channels, **kw)
                                     for k, (n, kw) in cases.items()})
        with torch.no_grad():
            for p in self.parameters():
                p.normal_()
        for layer in self.layers.values():
            if isinstance(layer, N.SparseSwitchNorm2d):
                layer.set_radius(0.3)

    def forward(self, x):
        return tuple(layer(x) for layer in self.layers.values())


def _close(a, b, what):
    scale = max(1.0, b.abs().max().item())
    assert (a - b).abs().max().item() <= 1e-5 * scale, f"{what}: {(a - b).abs().max().item()}"


def _run(module, x, g):
    x = x.clone().requires_grad_()
    outs = module(x)
    torch.autograd.backward(outs, [g] * len(outs))
    return outs, x.grad


def _compare(eager, compiled, x, g):
    for step in range(2):    # the second step sees the updated running statistics
        outs_e, dx_e = _run(eager, x * (step + 1), g)
        outs_c, dx_c = _run(compiled, x * (step + 1), g)
        for name, a, b in zip(eager.layers, outs_c, outs_e):
            _close(a.detach(), b.detach(), f"{name} output")
        _close(dx_c, dx_e, "input gradient")
    model_c = getattr(compiled, "_orig_mod", compiled)
    params, buffers = dict(model_c.named_parameters()), dict(model_c.named_buffers())
    for name, p in eager.named_parameters():
        if p.grad is not None:
            _close(params[name].grad, p.grad, f"{name} gradient")
    for name, b in eager.named_buffers():
        if b.is_floating_point():
            _close(buffers[name], b, name)
        elif not name.endswith("num_batches_tracked"):
            # (BatchNorm's counter moves at fx trace time, as for nn.BatchNorm2d itself)
            assert torch.equal(buffers[name], b), name


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, 5, 4, generator=gen) * 3 + 2
    return x, torch.randn(x.shape, generator=gen)


# eval mode differs from training only where running statistics are used
EVAL_CASES = ("bn-ghost", "sn", "sn-hard", "ssn")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compiled_equals_eager(data, train):
    eager = AllNorms(CASES if train else {k: CASES[k] for k in EVAL_CASES}).train(train)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)   # fullgraph: no break
    _compare(eager, compiled, *data)


def test_custom_operator_path_compiles(data):
    """SN_COMPILE=ops: the operators' fake implementations and autograd formulas."""
    eager = AllNorms({k: CASES[k] for k in ("sn-ghost", "bn-ghost")}).train()
    previous = fn.set_compile_path("ops")
    try:
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
        _compare(eager, compiled, *data)
    finally:
        fn.set_compile_path(previous)
        torch._dynamo.reset()


@pytest.mark.parametrize("norm", ["sn"])
def test_resnet18_has_no_graph_break(norm):
    model = models.build_model("resnet18_v1", 10, norm, {"ghost_batch_size": 2}, width=8,
                               stem="small", input_size=32)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(torch.randn(4, 3, 32, 32))
    torch._dynamo.reset()
    assert explained.graph_count == 1 and explained.graph_break_count == 0, \
        [str(b.reason) for b in explained.break_reasons]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fx_trace_equals_eager(data, train):
    """torch.fx.symbolic_trace of every normalizer: same outputs, gradients and buffer
    updates as eager (shape-dependent pieces are recorded as single calls)."""
    eager = AllNorms(CASES).train(train)
    traced = copy.deepcopy(eager)
    for name, layer in traced.layers.items():
        traced.layers[name] = torch.fx.symbolic_trace(layer)
    _compare(eager, traced, *data)


def test_shape_errors_still_raised_in_eager():
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 4, H, W\)"):
        N.build_norm("sn", 4)(torch.randn(2, 3, 5, 5))


@pytest.mark.parametrize("name,kw", [("sn", {}), ("sn", {"ghost_batch_size": 2}),
                                     ("bn", {"ghost_batch_size": 2}), ("ssn", {})])
def test_double_backward(name, kw):
    torch.manual_seed(0)
    layer = N.build_norm(name, 3, **kw).double()
    if name == "ssn":
        layer.set_radius(0.2)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    state = {k: v.clone() for k, v in layer.named_buffers()}

    def f(x, w):
        layer.load_state_dict(state, strict=False)   # same running statistics each call
        return torch.func.functional_call(layer, {"weight": w}, (x,))

    x = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradgradcheck(f, (x, w), eps=1e-6, atol=1e-5)
