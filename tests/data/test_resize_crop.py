"""Resize + RandomCrop training crops (data.resize_crop_last_epochs, the authors' SSN recipe
in its last epochs): the preset, both loaders switching between epochs, the config check."""
import random

import pytest
import torch
import torchvision.transforms.functional as TF

from data import DataConfig, build_loader
from data.datasets import load_rgb
from data.presets import ClassificationPresetTrain, pil_to_uint8

from .conftest import requires_dali


def _is_crop_of(crop: torch.Tensor, full: torch.Tensor) -> bool:
    size = crop.shape[-1]
    return any(torch.equal(crop, full[:, top:top + size, left:left + size])
               for top in range(full.shape[1] - size + 1)
               for left in range(full.shape[2] - size + 1))


def test_preset_resizes_then_crops_at_random(folder_root):
    img = load_rgb(next((folder_root / "train").rglob("*.JPEG")))  # 40 x 30
    preset = ClassificationPresetTrain(24, resize_size=28, hflip=False, lighting=0.0)
    full = pil_to_uint8(TF.resize(img, 28, interpolation=TF.InterpolationMode.BILINEAR))
    assert full.shape == (3, 28, 37)
    crops = [preset.prepare(img, random.Random(seed))[0] for seed in range(8)]
    assert all(c.shape == (3, 24, 24) and _is_crop_of(c, full) for c in crops)
    assert len({c.sum().item() for c in crops}) > 1  # the position is random
    assert torch.equal(crops[3], preset.prepare(img, random.Random(3))[0])  # and seeded
    assert "resize_size=28" in repr(preset)
    with pytest.raises(ValueError, match="smaller than crop_size"):
        ClassificationPresetTrain(24, resize_size=20)


@pytest.mark.parametrize("workers", [0, 1])
def test_torchvision_loader_switches_crops_between_epochs(folder_root, workers):
    cfg = DataConfig(root=str(folder_root), backend="torchvision", workers=workers,
                     image_size=24, val_resize=24, val_crop=24, hflip=False, lighting=0.0)
    loader = build_loader(cfg, "train", 4, seed=5)
    val = build_loader(cfg, "val", 4)
    assert not loader.resize_crop

    def epoch():
        loader.set_epoch(1)
        order = [i for batch in loader.sampler.batches() for i in batch]
        return order, torch.cat([x for x, _ in loader])

    order, random_resized = epoch()
    loader.set_resize_crop(True)
    assert loader.resize_crop and epoch()[0] == order
    # the shorter side resized to 24 (val_resize), then a random 24 x 24 crop of it
    _, resized = epoch()
    for index, image in zip(order, resized):
        pil = load_rgb(loader.images.path(index))
        full = pil_to_uint8(TF.resize(pil, 24, interpolation=TF.InterpolationMode.BILINEAR))
        expected = (full.float() / 255 - torch.tensor(cfg.mean).view(3, 1, 1)) / \
            torch.tensor(cfg.std).view(3, 1, 1)
        assert any(torch.allclose(image, expected[:, top:top + 24, left:left + 24], atol=1e-5)
                   for top in range(full.shape[1] - 23) for left in range(full.shape[2] - 23))
    assert not torch.allclose(resized, random_resized)
    loader.set_resize_crop(False)
    assert torch.equal(epoch()[1], random_resized)
    with pytest.raises(ValueError, match="validation"):
        val.set_resize_crop(True)


@requires_dali
def test_dali_loader_switches_crops(folder_root):
    cfg = DataConfig(root=str(folder_root), backend="dali", workers=1, image_size=24,
                     val_resize=28, val_crop=24)
    loader = build_loader(cfg, "train", 4, seed=5)
    loader.set_epoch(0)
    first = torch.cat([x for x, _ in loader])
    loader.set_resize_crop(True)
    loader.set_epoch(0)
    switched = torch.cat([x for x, _ in loader])
    assert switched.shape == first.shape == (24, 3, 24, 24)
    assert not torch.allclose(first, switched)
    loader.set_resize_crop(False)
    loader.set_epoch(0)
    assert torch.equal(torch.cat([x for x, _ in loader]), first)


def test_config_checks_the_crop_fits():
    DataConfig(dataset="demo", resize_crop_last_epochs=5).validate()
    with pytest.raises(ValueError, match="data.resize_crop_last_epochs: must be >= 0"):
        DataConfig(dataset="demo", resize_crop_last_epochs=-1).validate()
    with pytest.raises(ValueError, match="larger than data.val_resize"):
        DataConfig(dataset="demo", resize_crop_last_epochs=5, image_size=64, val_resize=60,
                   val_crop=56).validate()


def test_a_crop_larger_than_val_resize_builds_without_the_switch(folder_root):
    """The Resize + RandomCrop transform is only built where it fits: a config that never
    switches (resize_crop_last_epochs 0) may crop larger than its validation resize."""
    cfg = DataConfig(root=str(folder_root), backend="torchvision", workers=0, image_size=32,
                     val_resize=28, val_crop=24)
    loader = build_loader(cfg, "train", 4)
    assert next(iter(loader))[0].shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="larger than data.val_resize"):
        loader.set_resize_crop(True)
