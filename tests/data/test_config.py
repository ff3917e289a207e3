import dataclasses

import pytest

from data import IMAGENET_MEAN, IMAGENET_STD, DataConfig


def test_every_field_has_a_default_and_help():
    for f in dataclasses.fields(DataConfig):
        assert f.metadata.get("help"), f.name
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def test_defaults():
    cfg = DataConfig(root="/x")
    assert cfg.validate() is cfg
    assert (cfg.image_size, cfg.val_resize, cfg.val_crop) == (224, 256, 224)
    assert cfg.mean == list(IMAGENET_MEAN) and cfg.std == list(IMAGENET_STD)
    assert cfg.lighting == 0.1 and cfg.min_scale == 0.08 and cfg.on_bad_image == "skip"
    DataConfig(dataset="demo").validate()  # no root needed


@pytest.mark.parametrize("changes, key", [
    ({"dataset": "cifar"}, "data.dataset"),
    ({"layout": "tar"}, "data.layout"),
    ({"backend": "ffcv"}, "data.backend"),
    ({"on_bad_image": "ignore"}, "data.on_bad_image"),
    ({"root": None}, "data.root"),
    ({"workers": -1}, "data.workers"),
    ({"image_size": 0}, "data.image_size"),
    ({"val_crop": 300}, "data.val_crop"),
    ({"min_scale": 0.0}, "data.min_scale"),
    ({"min_scale": 1.5}, "data.min_scale"),
    ({"lighting": -0.1}, "data.lighting"),
    ({"mean": [0.5, 0.5]}, "data.mean"),
    ({"std": [0.2, 0.0, 0.2]}, "data.std"),
    ({"num_classes": 0}, "data.num_classes"),
    ({"dali_verify": "full"}, "data.dali_verify"),
])
def test_validate_names_the_key(changes, key):
    cfg = dataclasses.replace(DataConfig(root="/x"), **changes)
    with pytest.raises(ValueError, match=key):
        cfg.validate()
