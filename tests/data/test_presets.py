import random

import pytest
import torch
import torchvision.transforms as T

from data import IMAGENET_MEAN, IMAGENET_STD
from data.config import LIGHTING_EIGVAL, LIGHTING_EIGVEC
from data.presets import (ClassificationPresetEval, ClassificationPresetTrain, lighting_shift,
                          normalize_uint8, pil_to_uint8, random_resized_crop_params)

from .conftest import make_image


def _value_bounds():
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return ((0 - mean) / std).min().item(), ((1 - mean) / std).max().item()


@pytest.mark.parametrize("size", [(40, 30), (30, 90), (17, 17)])
def test_train_preset_shape_dtype_range(size):
    preset = ClassificationPresetTrain(24, color_jitter=0.4, lighting=0.1)
    out = preset(make_image(1, size), random.Random(3))
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    low, high = _value_bounds()
    assert low - 0.5 < out.min() and out.max() < high + 0.5  # lighting moves values slightly


def test_eval_preset_matches_torchvision_reference():
    img = make_image(2, (61, 38))
    ours = ClassificationPresetEval(28, 32)(img)
    reference = T.Compose([T.Resize(32), T.CenterCrop(28), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(img)
    assert ours.shape == (3, 28, 28) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_train_preset_is_a_function_of_the_rng_seed():
    preset = ClassificationPresetTrain(16, color_jitter=0.3)
    img = make_image(3, (50, 40))
    a, b = preset(img, random.Random(7)), preset(img, random.Random(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, preset(img, random.Random(8)))


def test_without_augmentation_noise_train_is_crop_and_resize():
    preset = ClassificationPresetTrain(16, min_scale=1.0, hflip=False, lighting=0.0)
    img = make_image(4, (16, 16))
    image, shift = preset.prepare(img, random.Random(0))
    assert torch.equal(image, pil_to_uint8(img)) and torch.equal(shift, torch.zeros(3))


def test_random_resized_crop_params_in_bounds():
    rng = random.Random(0)
    for width, height in [(100, 80), (10, 200), (300, 5), (1, 1)]:
        for _ in range(50):
            left, top, w, h = random_resized_crop_params(width, height, rng, (0.08, 1.0))
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
            assert w > 0 and h > 0


def test_lighting_is_alexnet_pca_noise():
    """Covariance of the shift: V diag(lambda^2 sigma^2) V^T (Krizhevsky et al. 2012)."""
    rng = random.Random(0)
    shifts = torch.stack([lighting_shift(0.1, rng) for _ in range(20000)]).double()
    vec, val = torch.tensor(LIGHTING_EIGVEC).double(), torch.tensor(LIGHTING_EIGVAL).double()
    expected = vec @ torch.diag((val * 0.1) ** 2) @ vec.T
    torch.testing.assert_close(shifts.T.cov(), expected, atol=2e-5, rtol=0.05)
    assert torch.equal(lighting_shift(0.0, rng), torch.zeros(3))


def test_normalize_uint8_batch_and_single():
    images = torch.randint(0, 256, (4, 3, 5, 6), dtype=torch.uint8)
    shift = torch.randn(4, 3) * 0.01
    out = normalize_uint8(images, shift, IMAGENET_MEAN, IMAGENET_STD)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (images.float() / 255 + shift.view(4, 3, 1, 1) - mean) / std
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(normalize_uint8(images[1], shift[1], IMAGENET_MEAN, IMAGENET_STD),
                               expected[1], atol=1e-5, rtol=1e-5)
