"""timm's model API on our ResNets (issue 11): features_only, forward_intermediates,
prune_intermediate_layers, num_classes=0 / global_pool / reset_classifier, group_matcher,
gradient checkpointing, stochastic depth, fx feature extraction, autocast, torch.compile,
and the model zoo through ``timm.create_model(..., pretrained=True,
pretrained_cfg_overlay=dict(file=PATH))``.

Tiny models (width 8, the ImageNet stem at 64 px so that strides 2-32 are visible).
"""
import itertools
import re

import pytest
import timm
import timm.optim
import torch
import torch.fx
import torch.nn as nn
from timm.layers import SelectAdaptivePool2d, is_notrace_module
from timm.models import FeatureListNet, group_parameters
from timm.models._features import FeatureGetterNet, feature_take_indices
from torchvision.models.feature_extraction import create_feature_extractor

import normalization
from engine.checkpoint import CheckpointError
from models import FX_LEAF_MODULES, POOL_TYPES, DropPath, build_model, load_model
from models.layers import take_indices

# v1 and v2, depths 18 and 50, bn / gn / sn / ssn: every combination for the core checks,
# one per version x depth (each norm once) for the more expensive ones
NAMES = [f"resnet{d}_{v}_{n}" for v, d, n in itertools.product(("v1", "v2"), (18, 50),
                                                                 ("bn", "gn", "sn", "ssn"))]
FEW = ["resnet18_v1_bn", "resnet50_v1_sn", "resnet18_v2_gn", "resnet50_v2_ssn"]
WIDTH, SIZE = 8, 64
MODULES = ["relu", "layer1", "layer2", "layer3", "layer4"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def create(name, **kwargs):
    """``timm.create_model`` with a fixed seed: the same arguments give the same weights."""
    torch.manual_seed(0)
    return timm.create_model(name, **{"width": WIDTH, **kwargs})


def image(n=2, size=SIZE, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def stage_outputs(model, x):
    """The stem feature (the stem ReLU's output) and each stage's output of a plain forward."""
    seen = {}
    handles = [model.get_submodule(m).register_forward_hook(
        lambda mod, i, o, m=m: seen.setdefault(m, o.clone())) for m in MODULES]
    with torch.no_grad():
        out = model.forward_features(x)
    for h in handles:
        h.remove()
    return [seen[m] for m in MODULES], out


def expected_channels(name):
    expansion = 4 if "50" in name else 1
    return [WIDTH] + [WIDTH * 2 ** i * expansion for i in range(4)]


# -- feature_info, features_only -------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_features_only_shapes_and_feature_info(name):
    model = create(name).eval()
    assert [f["num_chs"] for f in model.feature_info] == expected_channels(name)
    assert [f["reduction"] for f in model.feature_info] == [2, 4, 8, 16, 32]
    assert [f["module"] for f in model.feature_info] == MODULES
    features = create(name, features_only=True).eval()
    assert isinstance(features, FeatureListNet)
    assert features.feature_info.channels() == expected_channels(name)
    assert features.feature_info.reduction() == [2, 4, 8, 16, 32]
    with torch.no_grad():
        out = features(image())
    assert [tuple(f.shape) for f in out] == [(2, c, SIZE // r, SIZE // r) for c, r in
                                            zip(expected_channels(name), [2, 4, 8, 16, 32])]
    reference, _ = stage_outputs(model, image())
    for got, want in zip(out, reference):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["resnet18_v1_sn", "resnet50_v2_bn"])
def test_features_only_out_indices_and_small_stem(name):
    features = create(name, features_only=True, out_indices=(1, -1), stem="small").eval()
    assert features.feature_info.reduction() == [1, 8]
    assert features.feature_info.channels() == expected_channels(name)[1::3]
    out = features(image(size=32))
    assert [f.shape[-1] for f in out] == [32, 4]
    assert [f["reduction"] for f in create(name, stem="small").feature_info] == [1, 1, 2, 4, 8]


@pytest.mark.parametrize("feature_cls", ["dict", "hook", "getter", "fx"])
@pytest.mark.parametrize("name", ["resnet50_v1_sn", "resnet18_v2_ssn"])
def test_every_timm_feature_class_gives_the_same_features(name, feature_cls):
    reference = create(name, features_only=True, out_indices=(0, 2, 4)).eval()
    other = create(name, features_only=True, out_indices=(0, 2, 4),
                   feature_cls=feature_cls).eval()
    x = image()
    with torch.no_grad():
        want, got = reference(x), other(x)
    got = list(got.values()) if isinstance(got, dict) else got
    assert len(got) == 3
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# -- forward_intermediates, prune_intermediate_layers ----------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates_equal_forward_features(name):
    model = create(name).eval()
    x = image()
    reference, features = stage_outputs(model, x)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
        picked = model.forward_intermediates(x, indices=[0, -2], intermediates_only=True)
        normed = model.forward_intermediates(x, indices=[4], norm=True, intermediates_only=True)
    assert torch.equal(final, features)
    assert len(intermediates) == 5
    for got, want in zip(intermediates, reference):
        assert torch.equal(got, want)
    assert [torch.equal(a, b) for a, b in zip(only, reference[3:])] == [True, True]
    assert torch.equal(picked[0], reference[0]) and torch.equal(picked[1], reference[3])
    # norm=True: v2's last feature goes through its final norm + ReLU, i.e. forward_features
    assert torch.equal(normed[0], features)
    if "_v2_" in name:
        assert not torch.equal(reference[4], features)


@pytest.mark.parametrize("name", ["resnet18_v1_sn", "resnet50_v2_bn"])
def test_forward_intermediates_stop_early(name):
    model = create(name).eval()
    calls = []
    model.layer3.register_forward_hook(lambda *a: calls.append("layer3"))
    reference, _ = stage_outputs(model, image())
    calls.clear()
    with torch.no_grad():
        x, feats = model.forward_intermediates(image(), indices=[1, 2], stop_early=True)
    assert calls == [] and torch.equal(x, reference[2])
    assert torch.equal(feats[0], reference[1]) and torch.equal(feats[1], reference[2])


def test_forward_intermediates_runs_the_final_norm_once():
    """With norm=True the v2 final norm is computed once for the last feature and the output
    (its running statistics move once per forward, as in forward())."""
    model = create("resnet18_v2_bn").train()
    model.forward_intermediates(image(), norm=True)
    assert model.bn_out.num_batches_tracked.item() == 1


@pytest.mark.parametrize("indices", [None, 1, 3, 5, [0], [4, 0], (-1,), [-5, 2], [1, 1]])
def test_take_indices_as_timm(indices):
    assert take_indices(5, indices) == feature_take_indices(5, indices)


def test_forward_intermediates_errors():
    model = create("resnet18_v1_bn")
    for bad in (0, 6, [5], [-6], []):
        with pytest.raises(ValueError, match="out of range|no feature"):
            model.forward_intermediates(image(), indices=bad)
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(image(), output_fmt="NHWC")


@pytest.mark.parametrize("name", FEW)
def test_prune_intermediate_layers(name):
    model = create(name).eval()
    x = image()
    with torch.no_grad():
        want = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    params = sum(p.numel() for p in model.parameters())
    assert model.prune_intermediate_layers([1, -3]) == [1, 2]
    assert len(model.layer3) == 0 and len(model.layer4) == 0
    assert isinstance(model.fc, nn.Identity) and model.global_pool.is_identity()
    assert model.num_features == model.head_hidden_size == model.feature_info[2]["num_chs"]
    assert sum(p.numel() for p in model.parameters()) < params / 2
    if "_v2_" in name:
        assert isinstance(model.bn_out, nn.Identity) and "bn_out" not in model.norm_names()
    with torch.no_grad():
        got = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        out = model(x)  # the pruned network returns its last feature map
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(out, want[1])


def test_prune_keeps_what_is_still_needed():
    model = create("resnet18_v2_sn").eval()
    model.prune_intermediate_layers(5, prune_head=False)  # every feature: nothing to cut
    assert len(model.layer4) == 2 and not isinstance(model.bn_out, nn.Identity)
    assert model.fc.out_features == 1000
    stem_only = create("resnet18_v1_sn")
    assert stem_only.prune_intermediate_layers([0]) == [0]
    assert isinstance(stem_only.maxpool, nn.Identity) and len(stem_only.layer1) == 0
    getter = create("resnet50_v2_ssn", features_only=True, feature_cls="getter",
                    out_indices=(1, 3)).eval()
    assert isinstance(getter, FeatureGetterNet) and len(getter.model.layer4) == 0
    want, _ = stage_outputs(create("resnet50_v2_ssn").eval(), image())
    got = getter(image())
    assert torch.equal(got[0], want[1]) and torch.equal(got[1], want[3])


# -- head: num_classes=0, global_pool, reset_classifier ---------------------------------------
def _pool(features, pool_type):
    avg, top = features.mean((2, 3)), features.amax((2, 3))
    return {"avg": avg, "max": top, "avgmax": (avg + top) / 2,
            "catavgmax": torch.cat([avg, top], 1), "": features}[pool_type]


@pytest.mark.parametrize("pool", POOL_TYPES)
@pytest.mark.parametrize("name", FEW)
def test_num_classes_zero_and_every_global_pool(name, pool):
    model = create(name, num_classes=0, global_pool=pool).eval()
    assert isinstance(model.fc, nn.Identity) and model.num_classes == 0
    mult = 2 if pool == "catavgmax" else 1
    assert model.head_hidden_size == model.num_features * mult
    x = image()
    with torch.no_grad():
        features = model.forward_features(x)
        out = model(x)
    torch.testing.assert_close(out, _pool(features, pool))
    oracle = SelectAdaptivePool2d(pool_type=pool, flatten=bool(pool))  # timm's own layer
    torch.testing.assert_close(out, oracle(features))
    if pool:
        assert out.shape == (2, model.head_hidden_size)
        assert torch.equal(model.forward_head(features, pre_logits=True), out)
        logits = create(name, num_classes=4, global_pool=pool).eval()
        assert logits.fc.in_features == model.head_hidden_size
        assert logits(x).shape == (2, 4)


def test_head_errors():
    with pytest.raises(ValueError, match="needs num_classes=0"):
        create("resnet18_v1_bn", global_pool="")
    with pytest.raises(ValueError, match="unknown global_pool 'median'"):
        create("resnet18_v1_bn", global_pool="median")
    model = create("resnet18_v1_bn", num_classes=3)
    with pytest.raises(ValueError, match="needs num_classes=0"):
        model.reset_classifier(5, "")
    assert model.fc.out_features == 3  # a refused reset changes nothing
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet18_v1", num_classes=-1, norm="bn")


@pytest.mark.parametrize("name", FEW)
def test_reset_classifier_round_trip(name):
    model = create(name, num_classes=7).eval()
    x = image()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits, pooled = model(x), model.forward_head(model.forward_features(x), pre_logits=True)
    assert model.get_classifier() is model.fc and model.get_classifier(name_only=True) == "fc"
    model.reset_classifier(0)
    assert torch.equal(model(x), pooled) and model.head_hidden_size == model.num_features
    model.reset_classifier(3, "catavgmax")
    assert (model.fc.in_features, model.fc.out_features) == (2 * model.num_features, 3)
    assert not model.fc.training  # the new head follows the model's mode
    model.reset_classifier(5)  # None keeps the pooling
    assert model.global_pool.pool_type == "catavgmax" and model(x).shape == (2, 5)
    model.reset_classifier(7, "avg")
    model.load_state_dict(state)
    assert torch.equal(model(x), logits)
    double = create(name, num_classes=2).double()
    double.reset_classifier(4)
    assert double.fc.weight.dtype == torch.float64


def test_pretrained_cfg_is_complete():
    model = create("resnet50_v1_sn")
    cfg = model.pretrained_cfg
    for key in ("input_size", "crop_pct", "interpolation", "mean", "std", "first_conv",
                "classifier", "num_classes", "architecture", "paper_ids"):
        assert key in cfg, key
    assert isinstance(model.get_submodule(cfg["first_conv"]), nn.Conv2d)
    assert cfg["classifier"] == model.get_classifier(name_only=True)
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 224, 224) and data["crop_pct"] == 0.875
    assert data["interpolation"] == "bilinear"
    features = create("resnet50_v1_sn", features_only=True)
    assert "classifier" not in features.pretrained_cfg and "mean" in features.pretrained_cfg


# -- group_matcher, gradient checkpointing, stochastic depth ----------------------------------
@pytest.mark.parametrize("name,blocks", [("resnet18_v1_bn", 8), ("resnet50_v2_sn", 16)])
def test_group_matcher(name, blocks):
    model = create(name)
    v2 = "_v2_" in name
    for coarse, expected in ((False, blocks), (True, 4)):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        names = [n for g in groups.values() for n in g]
        assert sorted(names) == sorted(n for n, _ in model.named_parameters())
        assert len(groups) == 1 + expected + 1  # stem, blocks (or stages), classifier
        assert all(re.match(r"(conv1|bn1)\.", n) for n in groups[0])
        assert all(n.startswith("fc.") for n in groups[len(groups) - 1])
        last = groups[len(groups) - 2]  # v2's final norm joins the last block, as in timm
        assert any(n.startswith("layer4.") for n in last)
        assert v2 == any(n.startswith("bn_out.") for n in last)
    optimizer = timm.optim.create_optimizer_v2(model, "sgd", lr=0.1, layer_decay=0.5)
    scales = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    assert scales[id(model.conv1.weight)] < scales[id(model.layer4[0].conv1.weight)] \
        < scales[id(model.fc.weight)] == 1.0


def _train_step(name, checkpointing, **kwargs):
    model = create(name, **kwargs).train()
    model.set_grad_checkpointing(checkpointing)
    runs = []
    model.layer2[0].conv1.register_forward_hook(lambda *a: runs.append(1))
    torch.manual_seed(1)  # the drop-path masks
    loss = sum(f.square().mean() for f in model.forward_intermediates(image(4))[1])
    (model(image(4)).logsumexp(1).mean() + loss).backward()
    return model, len(runs)


@pytest.mark.parametrize("name,drop_path_rate", zip(FEW, [0.0, 0.2, 0.2, 0.0]))
def test_gradient_checkpointing_same_gradients_and_statistics(name, drop_path_rate):
    plain, plain_runs = _train_step(name, False, drop_path_rate=drop_path_rate)
    ckpt, ckpt_runs = _train_step(name, True, drop_path_rate=drop_path_rate)
    assert (plain_runs, ckpt_runs) == (2, 4)  # two forwards; with checkpointing recomputed
    grads = dict(plain.named_parameters())
    for n, p in ckpt.named_parameters():
        torch.testing.assert_close(p.grad, grads[n].grad, msg=n)
    buffers = dict(plain.named_buffers())  # the recomputation does not move them again
    for n, b in ckpt.named_buffers():
        assert torch.equal(b, buffers[n]), n


def test_drop_path_off_by_default_and_linear_decay():
    model = create("resnet50_v1_sn")
    assert not any(isinstance(m, DropPath) for m in model.modules())
    rated = create("resnet50_v1_sn", drop_path_rate=0.3)
    rates = [b.drop_path.drop_prob if b.drop_path is not None else 0.0 for b in rated.blocks()]
    n = len(rates)
    assert rates == pytest.approx([0.3 * i / (n - 1) for i in range(n)])
    assert rated.blocks()[0].drop_path is None
    assert list(rated.state_dict()) == list(model.state_dict())
    rated.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rated.eval()(image()), model.eval()(image()))
    with pytest.raises(ValueError, match="drop_path_rate"):
        create("resnet18_v1_bn", drop_path_rate=1.0)


def test_drop_path_per_sample():
    layer = DropPath(0.25).train()
    x = torch.ones(4000, 2, 3, 3)
    torch.manual_seed(0)
    y = layer(x)
    per_sample = y.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()
    dropped = (per_sample == 0).all(1).float().mean().item()
    assert abs(dropped - 0.25) < 4 * (0.25 * 0.75 / 4000) ** 0.5
    assert torch.equal(layer.eval()(x), x)


class _DropAll(nn.Module):
    def forward(self, x):
        return x * 0


@pytest.mark.parametrize("name", ["resnet18_v1_bn", "resnet50_v1_bn", "resnet18_v2_bn",
                                  "resnet50_v2_bn"])
def test_drop_path_drops_the_residual_branch(name):
    """A dropped branch leaves the block's shortcut: relu(shortcut) in v1, shortcut in v2."""
    model = create(name, drop_path_rate=0.1, zero_init_last=False).eval()
    block = model.layer2[1]  # identity shortcut
    block.drop_path = _DropAll()
    x = torch.randn(2, block.conv1.in_channels, 8, 8).abs()
    with torch.no_grad():
        assert torch.equal(block(x.clone()), x)


# -- fx ---------------------------------------------------------------------------------------
class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, FX_LEAF_MODULES) or super().is_leaf_module(m, qualname)


def test_norm_layers_are_registered_fx_leaves():
    for norm in normalization.list_norms():
        cls = type(normalization.build_norm(norm, 8))
        assert cls in FX_LEAF_MODULES and is_notrace_module(cls), norm
    for cls in (normalization.SwitchNorm1d, normalization.SwitchNorm3d,
                normalization.SyncSwitchNorm2d, normalization.SyncBatchNorm2d):
        assert is_notrace_module(cls)
    # PyTorch's classes (and so timm's subclasses of them) are left alone
    assert not any(is_notrace_module(c) for c in (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm))


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def _assert_same_as_eager(trace, model):
    """Train-mode forward and backward, and eval-mode forward, of ``trace(model)`` equal
    ``model``'s (the trace shares ``model``'s parameters). Each mode is traced on its own:
    a full trace bakes ``self.training`` branches into its graph."""
    x = image()
    model.train().zero_grad()
    torch.manual_seed(2)  # the same drop-path masks in both
    model(x).logsumexp(1).mean().backward()
    want = _grads(model)
    traced = trace(model.train())
    torch.manual_seed(2)
    traced(x).logsumexp(1).mean().backward()
    got = _grads(model)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)
    with torch.no_grad():
        torch.testing.assert_close(trace(model.eval())(x), model(x))


def _leaf_trace(model):
    return torch.fx.GraphModule(model, _LeafTracer().trace(model))


@pytest.mark.parametrize("name", FEW)
def test_fx_trace_with_norm_leaves_equals_eager(name):
    model = create(name, num_classes=5)
    leaves = {n.target for n in _leaf_trace(model).graph.nodes if n.op == "call_module"}
    assert set(model.norm_names()) <= leaves
    _assert_same_as_eager(_leaf_trace, model)


@pytest.mark.parametrize("name,norm", [("resnet50_v1", "sn"), ("resnet18_v2", "ssn"),
                                       ("resnet50_v2", "none")])
def test_fx_symbolic_trace_without_leaves(name, norm):
    """A plain torch.fx.symbolic_trace through the model and its norm layers."""
    model = create(name, norm=norm, num_classes=5, drop_path_rate=0.1)
    _assert_same_as_eager(torch.fx.symbolic_trace, model)


@pytest.mark.parametrize("leaves", [True, False], ids=["norm-leaves", "traced-norms"])
@pytest.mark.parametrize("name", FEW)
def test_torchvision_feature_extractor(name, leaves):
    model = create(name).eval()
    nodes = {m: f"f{i}" for i, m in enumerate(MODULES)}
    kwargs = {"tracer_kwargs": {"leaf_modules": list(FX_LEAF_MODULES)}} if leaves else {}
    extractor = create_feature_extractor(model, nodes, **kwargs)
    reference, _ = stage_outputs(model, image())
    with torch.no_grad():
        out = extractor(image())
    assert list(out) == list(nodes.values())
    for got, want in zip(out.values(), reference):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["resnet50_v1_sn", "resnet18_v2_gn"])
def test_timm_fx_feature_extraction_trains_like_eager(name):
    eager = create(name, features_only=True).train()
    graph = create(name, features_only=True, feature_cls="fx").train()
    x = image(4)
    for model in (eager, graph):
        sum(f.square().mean() for f in model(x)).backward()
    want = dict(eager.named_parameters())
    got = {n.split("graph_module.", 1)[-1]: p for n, p in graph.named_parameters()}
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n].grad, want[n].grad, msg=n)


# -- autocast, torch.compile ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18_v1_sn", "resnet50_v2_ssn"])
def test_autocast_bf16(name):
    model = create(name).eval()
    features = create(name, features_only=True).eval()
    x = image()
    with torch.no_grad():
        want = model.forward_intermediates(x, intermediates_only=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model.forward_intermediates(x, intermediates_only=True)
            listed = features(x)
    for a, b, c in zip(got, listed, want):
        assert a.dtype == b.dtype == torch.bfloat16
        assert torch.equal(a, b)
        assert ((a.float() - c).norm() / c.norm()).item() < 0.05


def test_compiled_forward_intermediates_without_graph_breaks():
    """Our model code adds no graph break (fullgraph); BN keeps the compile cheap (the norm
    layers' own compile tests live in tests/normalization)."""
    torch._dynamo.reset()
    model = create("resnet18_v2_bn").eval()
    compiled = torch.compile(model.forward_intermediates, backend="aot_eager", fullgraph=True)
    x = image()
    with torch.no_grad():
        final, feats = compiled(x, norm=True)
        want_final, want = model.forward_intermediates(x, norm=True)
    torch.testing.assert_close(final, want_final)
    for a, b in zip(feats, want):
        torch.testing.assert_close(a, b)


# -- the model zoo through timm ---------------------------------------------------------------
@torch.no_grad()
def _randomize(model):
    """Random affine parameters, ratio logits and running statistics in every norm."""
    g = torch.Generator().manual_seed(3)
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.dim() == 1 and t.is_floating_point() and not name.startswith("fc."):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name.endswith("running_var")
                    else torch.randn(t.shape, generator=g) * 0.5)
    return model


def _save_ours(path, name, norm, **kwargs):
    model = _randomize(build_model(name, 5, norm, width=WIDTH, stem="small", input_size=32,
                                   **kwargs))
    config = {"model": {"name": name, "norm": norm, "num_classes": 5, "norm_kwargs": {},
                        "width": WIDTH, "stem": "small"},
              "data": {"image_size": 32, "val_resize": 36, "val_crop": 32,
                       "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}}
    torch.save({"format": "switchable-norm/1", "config": config, "model": model.state_dict()},
               path)


def _save_authors(path, arch, using_bn):
    """The authors' layout: 'model' entry, module. prefix, snK names, (1, C, 1, 1) affine."""
    name = "resnet50_v2" if "v2" in arch else "resnet18_v1"
    norm = "ssn" if "ssn" in arch else "sn"
    model = _randomize(build_model(name, 6, norm, {"using_bn": using_bn, "variance": "authors"},
                                   width=WIDTH))
    sd = {}
    for key, value in model.state_dict().items():
        key = re.sub(r"(^|\.)bn(\d+|_out)\.", lambda m: f"{m.group(1)}sn{m.group(2)}.", key)
        if ".sn" in "." + key and key.endswith((".weight", ".bias")) and value.dim() == 1:
            value = value.view(1, -1, 1, 1)
        sd["module." + key] = value.clone()
    torch.save({"epoch": 100, "model": arch, "state_dict": sd}, path)


ZOO = [("ours", "resnet18_v1", "sn"), ("ours", "resnet50_v2", "gn"),
       ("authors", "resnetv2sn50", False), ("authors", "resnetv1ssn18", True)]


@pytest.fixture(params=ZOO, ids=lambda p: f"{p[0]}-{p[1]}")
def zoo_file(request, tmp_path):
    """(path, our name, arguments the file does not record, image size)."""
    kind, arch, extra = request.param
    path = str(tmp_path / f"{kind}.pth")
    if kind == "ours":  # the architecture is all in the stored config
        _save_ours(path, arch, extra)
        return path, arch, {}, 32
    _save_authors(path, arch, using_bn=extra)  # no width in the authors' files
    return path, "resnet50_v2" if "v2" in arch else "resnet18_v1", {"width": WIDTH}, SIZE


def test_pretrained_file_equals_load_model(zoo_file):
    path, name, kwargs, size = zoo_file
    x = image(size=size)
    reference = load_model(path, **kwargs)

    def create_pretrained(**extra):
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path),
                                 **kwargs, **extra).eval()

    model = create_pretrained()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert model.pretrained_cfg["file"] == path
    assert model.pretrained_cfg["num_classes"] == reference.num_classes
    tuned = create_pretrained(num_classes=3)  # timm's rule: a new head, the same backbone
    features = create_pretrained(features_only=True)
    with torch.no_grad():
        assert tuned(x).shape == (2, 3)
        assert torch.equal(tuned.forward_features(x), reference.forward_features(x))
        want = reference.forward_intermediates(x, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(features(x), want))


def test_pretrained_cfg_from_our_checkpoint(tmp_path):
    path = str(tmp_path / "ours.pth")
    _save_ours(path, "resnet18_v1", "sn")
    model = timm.create_model("resnet18_v1", pretrained=True,
                              pretrained_cfg_overlay=dict(file=path))
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 32, 32) and data["crop_pct"] == round(32 / 36, 4)
    assert data["mean"] == (0.5, 0.4, 0.3) and data["std"] == (0.2, 0.25, 0.3)
    assert model.norm_overrides == load_model(path).norm_overrides  # practice 5 at 32 px
    gray = timm.create_model("resnet18_v1", pretrained=True, in_chans=1,
                             pretrained_cfg_overlay=dict(file=path))
    torch.testing.assert_close(gray.conv1.weight, model.conv1.weight.sum(1, keepdim=True))


def test_pretrained_errors(tmp_path):
    path = str(tmp_path / "ours.pth")
    _save_ours(path, "resnet18_v1", "sn")
    with pytest.raises(ValueError, match="no pretrained weights.*pretrained_cfg_overlay"):
        timm.create_model("resnet18_v1_sn", pretrained=True)
    with pytest.raises(CheckpointError, match="holds a resnet18_v1, not a resnet50_v1"):
        timm.create_model("resnet50_v1", pretrained=True, pretrained_cfg_overlay=dict(file=path))
    with pytest.raises(CheckpointError, match="holds norm='sn'.*fixes norm='bn'"):
        timm.create_model("resnet18_v1_bn", pretrained=True,
                          pretrained_cfg_overlay=dict(file=path))
    with pytest.raises(CheckpointError, match="does not fit the model.*missing keys"):
        timm.create_model("resnet18_v1", pretrained=True, norm="bn",
                          pretrained_cfg_overlay=dict(file=path))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        timm.create_model("resnet18_v1", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "missing.pth")))
