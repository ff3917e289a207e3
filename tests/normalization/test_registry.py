"""The factory: names, aliases, errors, kwargs."""
import functools

import pytest
import torch
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


@pytest.mark.parametrize("name", EXPECTED)
def test_every_norm_accepts_ghost_batch_size(name):
    """Every normalizer takes ``ghost_batch_size``; those with batch statistics compute them
    per chunk (the first chunk's output does not depend on the second chunk's samples),
    the others ignore it (each sample's output depends on that sample alone)."""
    layer = N.build_norm(name, 8, ghost_batch_size=4).train()
    x = torch.randn(8, 8, 5, 5)
    other = x.clone()
    other[4:] = torch.randn(4, 8, 5, 5) * 3 + 2       # a different second chunk
    y, y_other = layer(x), layer(other)
    torch.testing.assert_close(y[:4], y_other[:4], rtol=1e-5, atol=1e-5)
    batch_stats = name in N.BATCH_STAT_NAMES
    assert (getattr(layer, "ghost_batch_size", None) == 4) == batch_stats
    if batch_stats:     # and within a chunk, the samples do share statistics
        third = x.clone()
        third[1:4] = torch.randn(3, 8, 5, 5) * 3 + 2
        assert not torch.allclose(layer(third)[0], y[0], atol=1e-3)


def test_bad_ghost_batch_size():
    with pytest.raises(ValueError, match="ghost_batch_size"):
        N.build_norm("sn", 8, ghost_batch_size=0)


def test_norm_layer_types_for_parameter_groups():
    for name in EXPECTED:
        layer = N.build_norm(name, 8)
        if name != "none":
            assert isinstance(layer, N.NORM_LAYERS), name
    assert isinstance(N.build_norm("ssn", 8), N.SWITCH_LAYERS)
