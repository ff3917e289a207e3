"""convert_norm on torchvision and timm models, convert_sync, checkpoint layouts."""
import pytest
import timm
import torch
import torch.nn as nn
import torchvision

import normalization as N


def _no_batchnorm_left(model):
    return not any(type(m) in (nn.BatchNorm2d, nn.SyncBatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", ["sn", "gn", "ssn", "bn", "none"])
def test_convert_torchvision_resnet18(name):
    model = torchvision.models.resnet18(num_classes=10)
    bn = model.layer1[0].bn1
    with torch.no_grad():
        bn.weight.normal_()
    weight = bn.weight.clone()
    model = N.convert_norm(model, name)
    assert _no_batchnorm_left(model)
    new = model.layer1[0].bn1
    if name != "none":
        assert isinstance(new, type(N.build_norm(name, 64)))
        torch.testing.assert_close(new.weight, weight)  # affine copied
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_convert_timm_resnet_keeps_activation_layers():
    model = timm.create_model("resnet18", pretrained=False, num_classes=5)
    model = N.convert_norm(model, "sn", ghost_batch_size=1)
    assert _no_batchnorm_left(model)
    assert sum(isinstance(m, N.SwitchNorm2d) for m in model.modules()) == 20
    out = model(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    assert out.shape == (2, 5)


def test_convert_timm_norm_act_layer():
    from timm.layers import BatchNormAct2d
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.ReLU))
    x = torch.randn(2, 3, 8, 8)
    model = N.convert_norm(model, "gn", num_groups=4)
    assert isinstance(model[1][0], N.GroupNorm) and isinstance(model[1][-1], nn.ReLU)
    assert (model(x) >= 0).all()  # the activation is still applied


def test_convert_sync_keeps_state():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), N.SwitchNorm2d(4, ghost_batch_size=2),
                          N.BatchNorm2d(4), nn.BatchNorm2d(4), N.SparseSwitchNorm2d(4))
    model(torch.randn(4, 3, 5, 5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model = N.convert_sync(model)
    assert type(model[1]) is N.SyncSwitchNorm2d and model[1].ghost_batch_size == 2
    assert type(model[2]) is N.SyncBatchNorm2d and type(model[3]) is N.SyncBatchNorm2d
    assert type(model[4]) is N.SparseSwitchNorm2d
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_authors_checkpoint_layout_loads():
    """Their gamma/beta are (1, C, 1, 1) and running stats (1, C, 1)."""
    layer = N.SwitchNorm2d(6)
    theirs = {"weight": torch.randn(1, 6, 1, 1), "bias": torch.randn(1, 6, 1, 1),
              "mean_weight": torch.randn(3), "var_weight": torch.randn(3),
              "running_mean": torch.randn(1, 6, 1), "running_var": torch.rand(1, 6, 1)}
    layer.load_state_dict(theirs)
    torch.testing.assert_close(layer.weight, theirs["weight"].view(6))
    torch.testing.assert_close(layer.running_var, theirs["running_var"].view(6))


def test_wrong_ratio_length_names_layer_and_reason():
    model = nn.Sequential(nn.Identity(), N.SwitchNorm2d(6))
    state = model.state_dict()
    state["1.mean_weight"] = torch.ones(2)
    with pytest.raises(ValueError, match=r"1\.mean_weight has 2 ratio entries.*using_bn=False"):
        model.load_state_dict(state)
    no_bn = nn.Sequential(nn.Identity(), N.SwitchNorm2d(6, using_bn=False))
    with pytest.raises(ValueError, match="using_bn=True"):
        no_bn.load_state_dict({"1." + k: v for k, v in N.SwitchNorm2d(6).state_dict().items()})
