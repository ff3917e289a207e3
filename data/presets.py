"""ImageNet training and evaluation transforms (Sec. 5.1 of the paper).

Training follows the authors' ``train_imagenet.py``: RandomResizedCrop,
horizontal flip, AlexNet's PCA lighting noise ("ColorAugmentation",
Krizhevsky et al. 2012, std 0.1) and mean/std normalisation; optional
colour jitter.  Evaluation: resize the shorter side, center crop, normalise.

Every random draw comes from a ``random.Random`` passed by the caller, so the
loader can seed it per sample from ``(seed, epoch, index)``: the augmentation
of a sample does not depend on the worker that happens to process it.

The lighting noise uses the standard pairing of AlexNet's eigenvalues with
their eigenvectors (the columns of ``LIGHTING_EIGVEC``, as in
fb.resnet.torch). The authors' ``ColorAugmentation`` multiplies the
eigenvalues with the rows of a column-reversed copy of that matrix, which
is not the eigen-decomposition; the noise has the same scale either way.

The loader calls :meth:`prepare` (uint8 image + per-sample RGB shift) in its
workers and :class:`Normalizer` on the device, which moves 4x fewer bytes
than float32 batches; ``__call__`` does both for one image.
"""
from __future__ import annotations

import math
import random
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from .config import IMAGENET_MEAN, IMAGENET_STD, LIGHTING_EIGVAL, LIGHTING_EIGVEC

__all__ = ["ClassificationPresetTrain", "ClassificationPresetEval", "random_resized_crop_params",
           "lighting_shift", "Normalizer", "normalize_uint8", "pil_to_uint8"]


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 CHW tensor (a view of one HWC copy)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)


class Normalizer:
    """``(images / 255 + shift - mean) / std`` in float32 for (3,H,W) or (N,3,H,W) uint8
    images, with the constants kept on each device it has seen (no copy per batch).

    ``shift`` holds the per-sample RGB offset (the lighting noise) in [0, 1]
    units, shaped (3,) or (N, 3); None means zero.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)
        self._constants = {}

    def _on(self, device: torch.device):
        if device not in self._constants:
            std = self.std.to(device)
            self._constants[device] = ((1.0 / (255.0 * std)).view(3, 1, 1),
                                       -self.mean.to(device) / std, std)
        return self._constants[device]

    def __call__(self, images: torch.Tensor, shift: Optional[torch.Tensor] = None
                 ) -> torch.Tensor:
        scale, offset, std = self._on(images.device)
        if shift is not None:
            offset = offset + shift.to(device=images.device, dtype=torch.float32) / std
        return torch.addcmul(offset.unsqueeze(-1).unsqueeze(-1), images.float(), scale)


def normalize_uint8(images: torch.Tensor, shift: Optional[torch.Tensor],
                    mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """One-off :class:`Normalizer` call."""
    return Normalizer(mean, std)(images, shift)


def random_resized_crop_params(width: int, height: int, rng: random.Random,
                               scale: Tuple[float, float] = (0.08, 1.0),
                               ratio: Tuple[float, float] = (3 / 4, 4 / 3)
                               ) -> Tuple[int, int, int, int]:
    """(left, top, w, h) of a random crop covering ``scale`` of the area at a log-uniform
    aspect ratio (Szegedy et al. 2015); ten tries, then the largest central crop in
    ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def lighting_shift(std: float, rng: random.Random) -> torch.Tensor:
    """AlexNet PCA lighting: ``sum_j eigvec[:, j] * eigval[j] * alpha_j``, alpha ~ N(0, std)."""
    if std <= 0:
        return torch.zeros(3)
    weights = [rng.gauss(0.0, std) * val for val in LIGHTING_EIGVAL]
    return torch.tensor([sum(row[j] * weights[j] for j in range(3)) for row in LIGHTING_EIGVEC],
                        dtype=torch.float32)


def _color_jitter(img: Image.Image, strength: float, rng: random.Random) -> Image.Image:
    """Brightness, contrast and saturation factors in [1-s, 1+s], applied in random order."""
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    rng.shuffle(ops)
    for op in ops:
        img = op(img, rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength))
    return img


class ClassificationPresetTrain:
    """RandomResizedCrop + flip + optional colour jitter + PCA lighting + normalisation.

    ``resize_size``: instead of RandomResizedCrop, resize the shorter side to
    ``resize_size`` and take a random ``crop_size`` square (``Resize`` + ``RandomCrop``:
    the authors' SSN training in its last epochs, ``data.resize_crop_last_epochs``).
    """

    def __init__(self, crop_size: int = 224, *, min_scale: float = 0.08,
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True,
                 color_jitter: float = 0.0, lighting: float = 0.1,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 resize_size: Optional[int] = None):
        if resize_size is not None and resize_size < crop_size:
            raise ValueError(f"resize_size {resize_size} is smaller than crop_size {crop_size}")
        self.crop_size = crop_size
        self.resize_size = resize_size
        self.scale = (min_scale, 1.0)
        self.ratio = ratio
        self.hflip = hflip
        self.color_jitter = color_jitter
        self.lighting = lighting
        self.mean, self.std = tuple(mean), tuple(std)

    def prepare(self, img: Image.Image, rng: random.Random) -> Tuple[torch.Tensor, torch.Tensor]:
        """The augmented uint8 (3, crop, crop) image and its RGB lighting shift (3,)."""
        if self.resize_size is not None:
            img = TF.resize(img, self.resize_size, interpolation=TF.InterpolationMode.BILINEAR)
            left = rng.randint(0, img.size[0] - self.crop_size)
            top = rng.randint(0, img.size[1] - self.crop_size)
            img = img.crop((left, top, left + self.crop_size, top + self.crop_size))
        else:
            left, top, w, h = random_resized_crop_params(*img.size, rng, self.scale, self.ratio)
            img = img.resize((self.crop_size, self.crop_size), Image.BILINEAR,
                             box=(left, top, left + w, top + h))
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.color_jitter > 0:
            img = _color_jitter(img, self.color_jitter, rng)
        return pil_to_uint8(img), lighting_shift(self.lighting, rng)

    def __call__(self, img: Image.Image, rng: Optional[random.Random] = None) -> torch.Tensor:
        """A normalised float32 (3, crop, crop) tensor."""
        image, shift = self.prepare(img, rng if rng is not None else random.Random())
        return normalize_uint8(image, shift, self.mean, self.std)

    def __repr__(self) -> str:
        crop = f"resize_size={self.resize_size}" if self.resize_size is not None \
            else f"scale={self.scale}"
        return (f"{type(self).__name__}(crop_size={self.crop_size}, {crop}, "
                f"hflip={self.hflip}, color_jitter={self.color_jitter}, "
                f"lighting={self.lighting})")


class ClassificationPresetEval:
    """Resize the shorter side to ``resize_size``, center crop ``crop_size``, normalise."""

    def __init__(self, crop_size: int = 224, resize_size: int = 256, *,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.crop_size = crop_size
        self.resize_size = resize_size
        self.mean, self.std = tuple(mean), tuple(std)

    def prepare(self, img: Image.Image, rng: Optional[random.Random] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The uint8 (3, crop, crop) image and a zero shift (no randomness)."""
        img = TF.resize(img, self.resize_size, interpolation=TF.InterpolationMode.BILINEAR)
        img = TF.center_crop(img, self.crop_size)
        return pil_to_uint8(img), torch.zeros(3)

    def __call__(self, img: Image.Image, rng: Optional[random.Random] = None) -> torch.Tensor:
        image, shift = self.prepare(img)
        return normalize_uint8(image, shift, self.mean, self.std)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(crop_size={self.crop_size}, "
                f"resize_size={self.resize_size})")
