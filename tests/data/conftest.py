"""Small real image trees for the data tests (a few dozen files of 24-64 pixels)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ("n02", "n01", "n10")  # written unsorted: labels follow the sorted names


def dali_available() -> bool:
    from data.dali import dali_import_error
    return dali_import_error() is None


requires_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI not importable")


def make_image(seed: int, size=(40, 30)) -> Image.Image:
    """A blocky random RGB image (blocks survive JPEG compression)."""
    rng = np.random.default_rng(seed)
    w, h = size
    blocks = rng.integers(0, 256, ((h + 7) // 8, (w + 7) // 8, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(blocks, np.ones((8, 8, 1), np.uint8))[:h, :w])


def write_image(path: Path, seed: int, kind: str = "jpeg", size=(40, 30)) -> Path:
    """kind: jpeg, cmyk (CMYK JPEG), gray (grayscale JPEG), png (PNG named .JPEG),
    exif (a JPEG tagged "rotate 90 degrees"), truncated (the first half of a JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = make_image(seed, size)
    if kind == "cmyk":
        img.convert("CMYK").save(path, "JPEG", quality=90)
    elif kind == "gray":
        img.convert("L").save(path, "JPEG", quality=90)
    elif kind == "exif":
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise
        img.save(path, "JPEG", quality=90, exif=exif)
    elif kind == "png":
        img.save(path, "PNG")
    elif kind == "truncated":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    else:
        img.save(path, "JPEG", quality=90)
    return path


def make_folder_dataset(root: Path, per_class: int = 4, val_per_class: int = 3,
                        kinds=("jpeg",), sizes=((40, 30),)) -> Path:
    """root/{train,val}/<class>/*.JPEG cycling through ``kinds`` and ``sizes``."""
    seed = 0
    for split, count in (("train", per_class), ("val", val_per_class)):
        for name in CLASSES:
            for i in range(count):
                seed += 1
                write_image(root / split / name / f"{name}_{i:03d}.JPEG", seed,
                            kinds[seed % len(kinds)], sizes[seed % len(sizes)])
    return root


@pytest.fixture
def folder_root(tmp_path) -> Path:
    """3 classes x 8 train / 5 val JPEGs (including CMYK, grayscale, EXIF-rotated and
    PNG-as-.JPEG files)."""
    return make_folder_dataset(tmp_path / "imagenet", 8, 5,
                               kinds=("jpeg", "cmyk", "gray", "png", "exif"),
                               sizes=((40, 30), (33, 47), (50, 50), (61, 38)))


def write_list(path: Path, lines) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path
