"""ImageNet sources: the folder layout and the authors' list files.

Folder layout: ``<split_dir>/<class>/<image>``; the label of a class is the
position of its folder name in the sorted list of class folders (for
ImageNet, the sorted WordNet ids ``n01440764`` ... ``n15075141`` -> 0 ... 999,
the order torchvision's ``ImageFolder`` and the released checkpoints use).

List layout (the authors' ``devkit/dataset/imagenet_dataset.py``): a text file
with one ``<relative/path> <label>`` per line, paths relative to the split's
image folder, integer labels in ``[0, num_classes)``.

Every structural problem (missing folder, empty class, malformed line, label
out of range) raises one ``FileNotFoundError``/``ValueError`` naming the file
when the source is read, i.e. before training starts.  Images are decoded
with Pillow and always converted to RGB (ImageNet holds CMYK and grayscale
JPEGs and a PNG named ``.JPEG``); an undecodable file is skipped and counted
or raises :class:`BadImageError`, by policy.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["IMG_EXTENSIONS", "BadImageError", "BadSample", "ImageList", "ImageDataset",
           "class_folders", "scan_folder", "read_list_file", "load_rgb"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")


class BadImageError(RuntimeError):
    """An image file that cannot be decoded (``data.on_bad_image: error``)."""


@dataclass(frozen=True)
class BadSample:
    """Stands in for a sample whose image could not be decoded (policy ``skip``); ``index``
    and ``seed`` are the request's, so that the loader can put another sample in its place."""

    path: str
    error: str
    index: int = -1
    seed: int = 0


@dataclass
class ImageList:
    """The samples of one split: paths relative to ``image_dir`` and integer labels.

    Paths and labels are numpy arrays rather than lists of Python objects, so
    that forked DataLoader workers do not copy them page by page as reference
    counts change.
    """

    image_dir: Path
    paths: np.ndarray        # bytes, relative to image_dir
    labels: np.ndarray       # int64
    classes: List[str]
    source: str              # the folder or list file, for messages

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def path(self, index: int) -> str:
        return os.path.join(self.image_dir, os.fsdecode(self.paths[index]))

    def check_num_classes(self, expected: Optional[int]) -> None:
        if expected is not None and expected != self.num_classes:
            raise ValueError(f"{self.source}: found {self.num_classes} classes but "
                             f"data.num_classes is {expected}")


def _require_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} not found")
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: {what} is not a folder")


def _list_images(class_dir: Path) -> List[str]:
    with os.scandir(class_dir) as entries:
        names = [e.name for e in entries
                 if e.name.lower().endswith(IMG_EXTENSIONS) and e.is_file()]
    return sorted(names)


def class_folders(split_dir: Union[str, Path]) -> List[str]:
    """Sorted names of the class subfolders (hidden folders such as ``.cache`` ignored)."""
    with os.scandir(split_dir) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def scan_folder(split_dir: Union[str, Path], classes: Optional[Sequence[str]] = None
                ) -> ImageList:
    """Index ``split_dir/<class>/<image>``; ``classes`` fixes the class list (e.g. the
    training split's), otherwise the sorted subfolder names are the classes."""
    split_dir = Path(split_dir)
    _require_dir(split_dir, "split folder")
    found = class_folders(split_dir)
    if not found:
        raise ValueError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<image>; "
                         f"for a flat folder use data.layout=list with a list file)")
    if classes is not None and list(classes) != found:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise ValueError(f"{split_dir}: class folders differ from the training split's "
                         f"(missing {missing[:5]}, extra {extra[:5]})")
    paths, labels = [], []
    for label, name in enumerate(found):
        images = _list_images(split_dir / name)
        if not images:
            raise ValueError(f"{split_dir / name}: class folder has no images "
                             f"({', '.join(IMG_EXTENSIONS)})")
        paths.extend(os.fsencode(f"{name}/{image}") for image in images)
        labels.extend([label] * len(images))
    return ImageList(split_dir, np.array(paths), np.array(labels, dtype=np.int64), found,
                     str(split_dir))


def _parse_line(line: str, where: str) -> Tuple[str, int]:
    parts = line.rsplit(None, 1)
    if len(parts) != 2:
        raise ValueError(f"{where}: expected '<relative/path> <label>', got {line.strip()!r}")
    try:
        return parts[0].strip(), int(parts[1])
    except ValueError:
        raise ValueError(f"{where}: label {parts[1]!r} is not an integer") from None


def _class_names(paths: List[str], labels: List[int], num_classes: int) -> List[str]:
    """Each label's folder name when labels and first path components agree one to one
    (as in ImageNet's lists), otherwise the label as text."""
    names = {}
    for path, label in zip(paths, labels):
        folder = path.split("/", 1)[0] if "/" in path else None
        if folder is None or names.setdefault(label, folder) != folder:
            return [str(i) for i in range(num_classes)]
    if len(set(names.values())) != len(names) or len(names) != num_classes:
        return [str(i) for i in range(num_classes)]
    return [names[i] for i in range(num_classes)]


def read_list_file(list_file: Union[str, Path], image_dir: Union[str, Path],
                   num_classes: Optional[int] = None) -> ImageList:
    """Read ``<relative/path> <label>`` lines; labels must lie in ``[0, num_classes)``
    (``num_classes`` None: inferred as the largest label + 1)."""
    list_file, image_dir = Path(list_file), Path(image_dir)
    if not list_file.is_file():
        raise FileNotFoundError(f"{list_file}: list file not found")
    _require_dir(image_dir, "image folder of the list file")
    paths, labels = [], []
    with open(list_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            path, label = _parse_line(line, f"{list_file}:{lineno}")
            if label < 0 or (num_classes is not None and label >= num_classes):
                bound = num_classes if num_classes is not None else "num_classes"
                raise ValueError(f"{list_file}:{lineno}: label {label} is out of range "
                                 f"[0, {bound})")
            paths.append(path.replace(os.sep, "/"))
            labels.append(label)
    if not paths:
        raise ValueError(f"{list_file}: no samples")
    first = image_dir / paths[0]
    if not first.is_file():
        raise FileNotFoundError(f"{list_file}: image of the first line not found: {first} "
                                f"(list paths are relative to {image_dir})")
    n = num_classes if num_classes is not None else max(labels) + 1
    return ImageList(image_dir, np.array([os.fsencode(p) for p in paths]),
                     np.array(labels, dtype=np.int64), _class_names(paths, labels, n),
                     str(list_file))


def load_rgb(path: str) -> Image.Image:
    """Decode any Pillow-readable image (CMYK, grayscale, palette, PNG) as RGB."""
    with Image.open(path) as img:
        return img.convert("RGB")


Transform = Callable[[Image.Image, random.Random], Tuple[torch.Tensor, torch.Tensor]]


class ImageDataset(Dataset):
    """``dataset[(index, sample_seed)] -> (uint8 image, rgb shift, label)``.

    ``transform`` is a preset's ``prepare(img, rng)``; it draws from
    ``random.Random(sample_seed)``, so the augmentation of a sample is a function
    of the seed the sampler gives it.  A plain integer index uses seed 0.  A bad
    image yields a :class:`BadSample` (policy ``skip``) or raises
    :class:`BadImageError` (policy ``error``).
    """

    def __init__(self, images: ImageList, transform: Transform, on_bad_image: str = "skip"):
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"on_bad_image: {on_bad_image!r} is not one of skip, error")
        self.images = images
        self.transform = transform
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, 0)
        path = self.images.path(index)
        try:
            img = load_rgb(path)
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError ...
            message = f"{type(exc).__name__}: {exc}"
            if self.on_bad_image == "error":
                raise BadImageError(f"{path}: cannot decode image ({message})") from exc
            return BadSample(path, message, int(index), int(seed))
        image, shift = self.transform(img, random.Random(seed))
        return image, shift, int(self.images.labels[index])
