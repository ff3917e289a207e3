"""ResNet v1/v2 with every normalizer: shapes, torchvision parity, init, practice 5, timm."""
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn
import torchvision

import normalization
from models import (TIMM_NAMES, PreActBasicBlock, PreActBottleneck, ResNetV1, ResNetV2,
                    build_model, list_models)

NORMS = ["bn", "gn", "sn", "ssn"]
TINY = dict(width=8, stem="small", input_size=32)  # a 32 px CPU-sized network


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine
    their spin-waits made this file 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(name, norm="sn", **kw):
    return build_model(name, num_classes=5, norm=norm, **{**TINY, **kw})


def test_list_models():
    assert list_models() == [f"resnet{d}_{v}" for v in ("v1", "v2")
                             for d in (18, 34, 50, 101, 152)]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name, norm):
    model = tiny(name, norm)
    x = torch.randn(2, 3, 32, 32)
    y = model(x)
    assert y.shape == (2, 5) and torch.isfinite(y).all()
    y.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.conv1.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 5) and torch.isfinite(y).all()


@pytest.mark.parametrize("norm", normalization.list_norms())
@pytest.mark.parametrize("name", ["resnet50_v1", "resnet18_v2"])
def test_every_norm_trains(name, norm):
    model = tiny(name, norm, input_size=None)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert torch.isfinite(model.conv1.weight.grad).all()


@pytest.mark.parametrize("name", ["resnet18_v1", "resnet50_v2"])
def test_imagenet_stem_any_input_size(name):
    model = build_model(name, num_classes=3, norm="gn", width=8, in_chans=1).eval()
    for size in (40, 64, 97):
        assert model(torch.randn(1, 1, size, size)).shape == (1, 3)


@pytest.mark.parametrize("name", ["resnet18_v1", "resnet34_v1", "resnet50_v1"])
def test_parameter_count_equals_torchvision(name):
    ours = build_model(name, norm="bn")
    theirs = getattr(torchvision.models, name[:-3])()
    assert sum(p.numel() for p in ours.parameters()) == \
        sum(p.numel() for p in theirs.parameters())


@pytest.mark.parametrize("name", ["resnet18_v1", "resnet50_v1"])
def test_torchvision_weights_load_unchanged(name):
    ours = build_model(name, norm="bn", dropout=0.5)
    theirs = getattr(torchvision.models, name[:-3])()
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(ref)
    assert all(mine[k].shape == ref[k].shape for k in ref)
    with torch.no_grad():  # non-trivial running statistics, so eval mode really uses them
        for m in theirs.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
    ours.load_state_dict(ref)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), theirs.eval()(x))


def test_v2_layout_follows_the_authors():
    model = build_model("resnet50_v2", norm="sn")
    keys = model.state_dict()
    assert "layer1.0.downsample.weight" in keys and "layer4.0.downsample.weight" in keys
    assert not any("downsample.1" in k for k in keys)
    assert keys["bn_out.weight"].shape == (2048,) and keys["bn1.weight"].shape == (64,)
    # pre-activation: a block's first norm sees its input channels
    assert keys["layer2.0.bn1.weight"].shape == (256,)
    assert keys["layer2.0.conv1.weight"].shape == (128, 256, 1, 1)
    assert model.fc.in_features == 2048
    assert build_model("resnet18_v2", norm="bn").bn_out.num_features == 512


def _v2_residual(b, x):
    out = b.conv2(torch.relu(b.bn2(b.conv1(torch.relu(b.bn1(x))))))
    return b.conv3(torch.relu(b.bn3(out))) if hasattr(b, "conv3") else out


@pytest.mark.parametrize("norm", ["bn", "none"])
@pytest.mark.parametrize("block", [PreActBasicBlock, PreActBottleneck])
def test_v2_block_formula(block, norm):
    """Projection shortcut from relu(bn1(x)); identity shortcut is x, intact even when
    bn1 is the identity (``none``)."""
    norm_layer = normalization.get_norm_layer(norm)
    down = nn.Conv2d(8, 4 * block.expansion, 1, stride=2, bias=False)
    projecting = block(8, 4, stride=2, downsample=down, norm_layer=norm_layer).eval()
    identity = block(8, 8 // block.expansion, norm_layer=norm_layer).eval()
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        expected = _v2_residual(projecting, x) + down(torch.relu(projecting.bn1(x)))
        torch.testing.assert_close(projecting(x), expected)
        torch.testing.assert_close(identity(x.clone()), _v2_residual(identity, x) + x)


def _blocks_start_as_shortcut(model, x, v1):
    records = []
    for block in model.blocks():
        block.register_forward_hook(lambda m, i, o: records.append((m, i[0], o)))
    with torch.no_grad():
        model(x)
        for block, inp, out in records:
            if block.downsample is None:
                shortcut = inp
            else:
                shortcut = block.downsample(inp if v1 else torch.relu(block.bn1(inp)))
            expected = torch.relu(shortcut) if v1 else shortcut
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert len(records) == len(model.blocks())


@pytest.mark.parametrize("norm", ["bn", "sn", "gn"])
@pytest.mark.parametrize("name", ["resnet18_v1", "resnet50_v1"])
def test_zero_init_last_v1(name, norm):
    model = tiny(name, norm).eval()
    for block in model.blocks():
        last = block.bn3 if hasattr(block, "bn3") else block.bn2
        assert torch.count_nonzero(last.weight) == 0
        assert torch.count_nonzero(block.bn1.weight) == block.bn1.num_features
    _blocks_start_as_shortcut(model, torch.randn(2, 3, 32, 32), v1=True)
    assert not tiny(name, norm, zero_init_last=False).layer1[-1].bn1.weight.eq(0).all()


@pytest.mark.parametrize("norm", ["bn", "sn"])
@pytest.mark.parametrize("name", ["resnet18_v2", "resnet50_v2"])
def test_zero_init_last_v2(name, norm):
    model = tiny(name, norm).eval()
    for block in model.blocks():
        last = block.conv3 if hasattr(block, "conv3") else block.conv2
        assert torch.count_nonzero(last.weight) == 0
    _blocks_start_as_shortcut(model, torch.randn(2, 3, 32, 32), v1=False)
    assert tiny(name, norm, zero_init_last=False).layer1[0].conv2.weight.abs().sum() > 0


@pytest.mark.parametrize("name", ["resnet18_v1", "resnet50_v1", "resnet18_v2", "resnet50_v2"])
def test_norm_none(name):
    model = tiny(name, "none")
    assert not any(isinstance(m, normalization.NORM_LAYERS) for m in model.modules())
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


@pytest.mark.parametrize("norm", ["bn", "gn", "ln", "in", "sn", "ssn"])
@pytest.mark.parametrize("name", ["resnet50_v1", "resnet18_v2"])
def test_norm_names_cover_every_norm_and_init_resets_them(name, norm):
    model = tiny(name, norm, input_size=None)
    cls = type(normalization.build_norm(norm, 8))
    assert set(model.norm_names()) == {n for n, m in model.named_modules() if type(m) is cls}
    with torch.no_grad():
        for n in model.norm_names():
            for p in model.get_submodule(n).parameters():
                p.fill_(5.0)
    model.init_weights(zero_init_last=False)
    for n in model.norm_names():
        m = model.get_submodule(n)
        assert m.weight.eq(1).all() and m.bias.eq(0).all(), n
        if hasattr(m, "mean_weight"):
            assert m.mean_weight.eq(1).all() and m.var_weight.eq(1).all()


def test_conv_init_is_kaiming_fan_out():
    conv = build_model("resnet18_v1", norm="bn").layer3[0].conv2
    expected = (2.0 / (conv.out_channels * 9)) ** 0.5
    assert abs(conv.weight.std().item() / expected - 1) < 0.02


@pytest.mark.parametrize("name,stem,size,pool", [
    ("resnet18_v1", "imagenet", 64, "torchvision"), ("resnet50_v1", "imagenet", 57, "torchvision"),
    ("resnet34_v2", "small", 33, "torchvision"), ("resnet50_v2", "imagenet", 64, "torchvision"),
    # the authors' SSN stem pool (no padding, ceil mode) changes the sizes after it
    ("resnet18_v1", "imagenet", 57, "ceil"), ("resnet50_v2", "imagenet", 57, "ceil"),
    ("resnet18_v1", "imagenet", 64, "ceil")])
def test_norm_sizes_match_real_feature_maps(name, stem, size, pool):
    model = build_model(name, norm="gn", width=8, stem=stem, stem_pool=pool)
    seen = {}
    for n in model.norm_names():
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, i, n=n: seen.__setitem__(n, tuple(i[0].shape[-2:])))
    model(torch.randn(1, 3, size, size))
    assert seen == {n: (s, s) for n, s in model.norm_sizes(size).items()}


def _layer4_norms(model):
    return [n for n in model.norm_names() if n.startswith("layer4.")]


@pytest.mark.parametrize("norm", ["sn", "syncsn", "ssn"])
def test_no_sn_after_a_1x1_feature_map(norm):
    kwargs = {"ghost_batch_size": 2, "using_moving_average": True}
    model = build_model("resnet18_v1", 5, norm, kwargs, width=8, input_size=32)
    assert model.norm_overrides == _layer4_norms(model)
    for n in model.norm_names():
        m = model.get_submodule(n)
        if n in model.norm_overrides:  # a synchronised SN stays synchronised, as SyncBN
            expected = normalization.SyncBatchNorm2d if norm == "syncsn" else \
                normalization.BatchNorm2d
            assert type(m) is expected and m.ghost_batch_size == 2
        else:
            assert isinstance(m, normalization.SWITCH_LAYERS)
    assert torch.isfinite(model(torch.randn(4, 3, 32, 32))).all()


def test_practice5_keeps_norms_whose_map_is_larger():
    v1 = build_model("resnet50_v1", norm="sn", width=8, input_size=32)
    assert "layer4.0.bn1" not in v1.norm_overrides  # before the strided 3x3: 2x2
    assert set(v1.norm_overrides) == set(_layer4_norms(v1)) - {"layer4.0.bn1"}
    v2 = build_model("resnet50_v2", norm="sn", width=8, input_size=32)
    assert "bn_out" in v2.norm_overrides and "layer4.0.bn2" not in v2.norm_overrides
    assert isinstance(v2.bn_out, normalization.BatchNorm2d)


@pytest.mark.parametrize("name", ["resnet18_v1", "resnet50_v2"])
def test_practice5_changes_nothing_at_imagenet_size(name):
    assert build_model(name, norm="sn", width=8, input_size=224).norm_overrides == []
    assert build_model(name, norm="sn", width=8, stem="small", input_size=32).norm_overrides == []
    assert build_model(name, norm="gn", width=8, input_size=32).norm_overrides == []


def test_options():
    model = build_model("resnet18_v1", 7, "bn", width=16, stem="small", in_chans=1, dropout=0.2)
    assert model.conv1.weight.shape == (16, 1, 3, 3) and isinstance(model.maxpool, nn.Identity)
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.2
    assert model.num_features == 128 and model.fc.out_features == 7
    assert isinstance(build_model("resnet18_v1", norm="bn").dropout, nn.Identity)
    assert isinstance(build_model("resnet50_v1", norm="bn"), ResNetV1)
    assert isinstance(build_model("resnet50_v2", norm="bn"), ResNetV2)
    assert model.forward_head(model.forward_features(torch.randn(1, 1, 16, 16)),
                              pre_logits=True).shape == (1, 128)


def test_errors():
    with pytest.raises(ValueError, match="resnet50_v1.*resnet152_v2"):
        build_model("resnet51_v1")
    with pytest.raises(ValueError, match="valid stems"):
        build_model("resnet18_v1", stem="cifar")
    with pytest.raises(ValueError, match="valid names"):
        build_model("resnet18_v1", norm="xn")
    with pytest.raises(ValueError, match="zero_init_last"):
        build_model("resnet18_v1", norm_kwargs={"last_gamma": True})


def test_timm_names():
    norms = [n for n in normalization.list_norms() if n != "none"]
    assert len(TIMM_NAMES) == len(list_models()) * (1 + len(norms))
    expected = {"resnet50_v1", "resnet50_v1_sn", "resnet101_v2_ssn", "resnet18_v1_bn"}
    assert expected <= set(TIMM_NAMES)
    assert not any(n.endswith("_none") for n in TIMM_NAMES)
    assert all(timm.is_model(n) for n in TIMM_NAMES)


def test_timm_create_model():
    model = timm.create_model("resnet50_v1_sn")
    assert isinstance(model, ResNetV1)
    assert isinstance(model.layer1[0].bn1, normalization.SwitchNorm2d)
    model = timm.create_model("resnet18_v2", norm="gn", width=8, num_classes=4, drop_rate=0.1)
    assert isinstance(model, ResNetV2) and isinstance(model.bn_out, normalization.GroupNorm)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4) and model.dropout.p == 0.1
    model = timm.create_model("resnet18_v1_bn", num_classes=10)
    assert model.fc.out_features == 10 and type(model.bn1) is normalization.BatchNorm2d
    assert timm.data.resolve_data_config(model=model)["input_size"] == (3, 224, 224)


def test_timm_errors():
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("resnet18_v1", pretrained=True)
    with pytest.raises(ValueError, match="fixes norm='bn'"):
        timm.create_model("resnet18_v1_bn", norm="gn")
    with pytest.raises(ValueError, match="drop_block_rate"):
        timm.create_model("resnet18_v1", drop_block_rate=0.1)
    with pytest.raises(ValueError, match="output_stride"):
        timm.create_model("resnet18_v1", output_stride=16)


def test_import_registers_without_warnings():
    code = ("import warnings, timm\n"
            "with warnings.catch_warnings():\n"
            "    warnings.simplefilter('error')\n"
            "    import models\n"
            "print(len(models.TIMM_NAMES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == len(TIMM_NAMES)
