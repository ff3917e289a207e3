"""The stem's max-pool option (issue 10, part 5): ``stem_pool="ceil"`` is the authors'
ResNetV1SSN pool (Sparse_SwitchNorm ``models/resnet_v1_ssn.py``: ``MaxPool2d(3, stride=2,
padding=0, ceil_mode=True)``), checked against an independent ``nn.MaxPool2d``; the
default is unchanged; models rebuilt from the authors' SSN files and the SSN zoo configs
use it."""
import glob
import os

import pytest
import torch
import torch.nn as nn
import yaml

from models import STEM_POOLS, build_model, load_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pooled(model, x):
    """The stem's output after its max-pool."""
    with torch.no_grad():
        return model.maxpool(model._stem(x))


@pytest.mark.parametrize("name", ["resnet18_v1", "resnet50_v1", "resnet50_v2"])
@pytest.mark.parametrize("size", [224, 57, 64, 33])
def test_ceil_pool_equals_an_independent_maxpool(name, size):
    model = build_model(name, 10, "bn", width=8, stem_pool="ceil").eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        stem = model._stem(x)
        want = nn.MaxPool2d(3, 2, 0, ceil_mode=True)(stem)
    got = _pooled(model, x)
    assert got.shape == want.shape
    assert torch.equal(got, want)


def test_default_pool_is_unchanged_and_differs_from_ceil():
    torch.manual_seed(0)
    default = build_model("resnet50_v1", 10, "bn", width=8).eval()
    ceil = build_model("resnet50_v1", 10, "bn", width=8, stem_pool="ceil").eval()
    ceil.load_state_dict(default.state_dict())  # the pool has no parameters
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        stem = default._stem(x)
        torch.testing.assert_close(_pooled(default, x), nn.MaxPool2d(3, 2, 1)(stem), rtol=0,
                                   atol=0)
    a, b = _pooled(default, x), _pooled(ceil, x)
    assert a.shape == b.shape == (2, 8, 56, 56)  # the same size at 224 px ...
    assert (a != b).float().mean() > 0.3  # ... but other windows: most values differ


def test_stem_pool_errors():
    with pytest.raises(ValueError, match="valid: torchvision, ceil"):
        build_model("resnet18_v1", stem_pool="caffe")
    with pytest.raises(ValueError, match="needs stem='imagenet'"):
        build_model("resnet18_v1", stem="small", stem_pool="ceil")
    assert STEM_POOLS == ("torchvision", "ceil")


def _authors_file(path, arch: str, norm: str):
    """Our model saved in the authors' layout (module. prefix, snK names, 'model' entry)."""
    model = build_model("resnet18_v1", 6, norm, {"variance": "authors"}, width=8)
    sd = {}
    for key, value in model.state_dict().items():
        key = key.replace("bn1.", "sn1.").replace("bn2.", "sn2.")
        sd["module." + key] = value
    torch.save({"epoch": 100, "model": arch, "state_dict": sd}, path)
    return str(path)


@pytest.mark.parametrize("arch,norm,pool", [("resnetv1ssn18", "ssn", "ceil"),
                                            ("resnetv1sn18", "sn", "torchvision")])
def test_authors_checkpoints_build_their_pool(tmp_path, arch, norm, pool):
    model = load_model(_authors_file(tmp_path / f"{arch}.pth", arch, norm), width=8)
    assert model.stem_pool == pool
    want = nn.MaxPool2d(3, 2, 0, ceil_mode=True) if pool == "ceil" else nn.MaxPool2d(3, 2, 1)
    x = torch.randn(1, 3, 57, 57)
    with torch.no_grad():
        assert torch.equal(_pooled(model, x), want(model._stem(x)))


def test_ssn_file_without_model_entry_builds_the_ceil_pool(tmp_path):
    path = _authors_file(tmp_path / "ssn.pth", "resnetv1ssn18", "ssn")
    state = torch.load(path, weights_only=True)
    del state["model"]  # found to be SSN by its mean_fixed buffers
    torch.save(state, path)
    model = load_model(path, name="resnet18_v1", width=8)
    assert model.norm_name == "ssn" and model.stem_pool == "ceil"


def _schema_has_stem_pool() -> bool:
    from engine.config import ModelConfig
    return "stem_pool" in ModelConfig.__dataclass_fields__


SSN_ZOO = sorted(glob.glob(os.path.join(ROOT, "configs", "imagenet", "zoo", "*ssn*.yaml")))


@pytest.mark.parametrize("path", SSN_ZOO, ids=os.path.basename)
def test_ssn_zoo_configs_follow_the_authors_network(path):
    from engine.config import load_config
    with open(path) as f:
        data = yaml.safe_load(f)
    assert data["model"]["dropout"] == 0.5  # their classifier: Dropout(p=0.5)
    assert data["data"]["color_jitter"] == 0.4  # their ColorJitter(0.4, 0.4, 0.4)
    assert _schema_has_stem_pool()
    cfg = load_config(path, ["data.root=/data/imagenet"])
    assert cfg.model.stem_pool == "ceil" and cfg.model.dropout == 0.5
    # their last 5 epochs: Resize(256) + RandomCrop(224)
    assert (cfg.data.resize_crop_last_epochs, cfg.data.val_resize, cfg.data.image_size) == \
        (5, 256, 224)
