"""The factory: names, aliases, errors, kwargs."""
import functools

import pytest
import torch.nn as nn

import normalization as N

EXPECTED = ["bn", "syncbn", "gn", "in", "ln", "sn", "syncsn", "ssn", "none"]


def test_list_norms_names():
    assert N.list_norms() == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_build_norm_every_name(name):
    layer = N.build_norm(name, 16)
    assert isinstance(layer, nn.Module)
    assert layer.num_features == 16


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        N.build_norm("batchnrom", 8)
    for name in EXPECTED:
        assert name in str(e.value)


@pytest.mark.parametrize("alias,cls", [("BatchNorm", N.BatchNorm2d), ("switch_norm", N.SwitchNorm2d),
                                       ("SN", N.SwitchNorm2d), ("group-norm", N.GroupNorm),
                                       ("identity", N.NoNorm)])
def test_aliases(alias, cls):
    assert type(N.build_norm(alias, 8)) is cls


def test_get_norm_layer_class_or_partial():
    assert N.get_norm_layer("sn") is N.SwitchNorm2d
    p = N.get_norm_layer("sn", using_bn=False, ghost_batch_size=2)
    assert isinstance(p, functools.partial)
    layer = p(32)
    assert layer.normalizers == ("in", "ln") and layer.ghost_batch_size == 2


def test_unknown_kwarg_is_an_error_naming_accepted_ones():
    with pytest.raises(ValueError, match="ghost_batch_size"):
        N.build_norm("gn", 8, groups=4)
    with pytest.raises(ValueError, match="unknown argument"):
        N.build_norm("syncsn", 8, sync_group=3)


def test_every_norm_accepts_ghost_batch_size():
    for name in EXPECTED:
        N.build_norm(name, 8, ghost_batch_size=4)


def test_bad_ghost_batch_size():
    with pytest.raises(ValueError, match="ghost_batch_size"):
        N.build_norm("sn", 8, ghost_batch_size=0)


def test_norm_layer_types_for_parameter_groups():
    for name in EXPECTED:
        layer = N.build_norm(name, 8)
        if name != "none":
            assert isinstance(layer, N.NORM_LAYERS), name
    assert isinstance(N.build_norm("ssn", 8), N.SWITCH_LAYERS)
