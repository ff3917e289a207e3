"""The typed schema of the config's ``data:`` section.

Only :func:`data.build_loader` (and the trainer, to call it) reads these
fields; datasets and transforms take plain arguments.  ``validate()`` checks
choices and ranges and raises ``ValueError`` naming the offending key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from .demo import DEMO_VARIANTS

__all__ = ["DataConfig", "IMAGENET_MEAN", "IMAGENET_STD", "LIGHTING_EIGVAL", "LIGHTING_EIGVEC"]

#: Per-channel (RGB) mean and standard deviation of ImageNet pixels in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: PCA of ImageNet RGB pixels in [0, 1] (Krizhevsky et al. 2012, "AlexNet"):
#: eigenvalues and eigenvectors (one per column, rows are R, G, B).
LIGHTING_EIGVAL = (0.2175, 0.0188, 0.0045)
LIGHTING_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))

DATASETS = ("imagenet", "demo")
LAYOUTS = ("folder", "list")
BACKENDS = ("auto", "dali", "torchvision")
BAD_IMAGE_POLICIES = ("skip", "error")
DALI_VERIFY = ("none", "header", "decode")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class DataConfig:
    """Where the images are, how they are decoded and augmented."""

    dataset: str = field(default="imagenet", metadata=_help(
        "'imagenet' (a copy on disk at data.root) or 'demo' (the generated shapes dataset)"))
    root: Optional[str] = field(default=None, metadata=_help(
        "dataset root; for 'demo', None means the cache folder ($SN_DEMO_DIR or "
        "~/.cache/switchable_norm/demo_v1_<demo_size>)"))
    layout: str = field(default="folder", metadata=_help(
        "'folder': root/<train_dir>/<wnid>/*.JPEG and root/<val_dir>/<wnid>/*.JPEG; "
        "'list': the authors' list files, one '<relative/path> <label>' per line"))
    train_dir: str = field(default="train", metadata=_help(
        "training images folder, relative to root"))
    val_dir: str = field(default="val", metadata=_help(
        "validation images folder, relative to root"))
    train_list: Optional[str] = field(default=None, metadata=_help(
        "layout 'list': training list file (relative to root or absolute); "
        "its paths are relative to root/<train_dir>"))
    val_list: Optional[str] = field(default=None, metadata=_help(
        "layout 'list': validation list file (relative to root or absolute); "
        "its paths are relative to root/<val_dir>"))
    backend: str = field(default="auto", metadata=_help(
        "'dali' (NVIDIA DALI, GPU JPEG decoding), 'torchvision' (Pillow in DataLoader "
        "workers) or 'auto' (DALI when importable and the device is CUDA)"))
    workers: int = field(default=4, metadata=_help(
        "DataLoader worker processes per rank (torchvision) or DALI CPU threads"))
    prefetch_factor: int = field(default=2, metadata=_help(
        "batches prefetched per DataLoader worker (torchvision, workers > 0)"))
    image_size: int = field(default=224, metadata=_help(
        "training crop size (RandomResizedCrop output, pixels)"))
    val_resize: int = field(default=256, metadata=_help(
        "validation: the shorter side is resized to this many pixels"))
    val_crop: int = field(default=224, metadata=_help(
        "validation: center crop size after the resize"))
    min_scale: float = field(default=0.08, metadata=_help(
        "RandomResizedCrop: smallest crop area as a fraction of the image"))
    resize_crop_last_epochs: int = field(default=0, metadata=_help(
        "the last N training epochs crop with Resize(val_resize) + RandomCrop(image_size) "
        "instead of RandomResizedCrop (the authors' SSN training: 5); 0 never"))
    hflip: bool = field(default=True, metadata=_help("random horizontal flips in training"))
    color_jitter: float = field(default=0.0, metadata=_help(
        "brightness/contrast/saturation jitter strength in training (0 disables)"))
    lighting: float = field(default=0.1, metadata=_help(
        "std of AlexNet's PCA lighting noise in training (the authors' ColorAugmentation); "
        "0 disables"))
    on_bad_image: str = field(default="skip", metadata=_help(
        "an unreadable/truncated image: 'skip' (count it and warn; in training another "
        "sample of the rank's shard takes its place, so batches stay whole and ranks in step; "
        "in validation it is left out) or 'error' (stop with an error naming the file)"))
    dali_verify: str = field(default="header", metadata=_help(
        "DALI cannot skip bad files mid-run, so files are checked when the loader is built: "
        "'header' (magic bytes and JPEG end marker, fast), 'decode' (full decode, slow) "
        "or 'none'"))
    pin_memory: bool = field(default=True, metadata=_help(
        "page-locked host batches for faster copies to the GPU (only used with CUDA)"))
    mean: List[float] = field(default_factory=lambda: list(IMAGENET_MEAN), metadata=_help(
        "per-channel RGB mean subtracted from pixels in [0, 1]"))
    std: List[float] = field(default_factory=lambda: list(IMAGENET_STD), metadata=_help(
        "per-channel RGB standard deviation pixels in [0, 1] are divided by"))
    demo_size: int = field(default=72, metadata=_help(
        "pixel size of the generated demo images (dataset 'demo')"))
    demo_variant: str = field(default="shapes", metadata=_help(
        "generated demo images: 'shapes' (cluttered: the demo) or 'clean' (one clear shape, "
        "learnt in a few hundred large-batch steps: the Table 2 grid at small scale); "
        "a variant other than 'shapes' lives in <cache>/demo_v1_<demo_size>_<demo_variant>"))
    num_classes: Optional[int] = field(default=None, metadata=_help(
        "expected number of classes; an error if the data has a different number"))

    def validate(self) -> "DataConfig":
        """Raise ``ValueError`` naming the first invalid ``data.*`` key; return self."""
        for name, choices in (("dataset", DATASETS), ("layout", LAYOUTS), ("backend", BACKENDS),
                              ("on_bad_image", BAD_IMAGE_POLICIES),
                              ("dali_verify", DALI_VERIFY), ("demo_variant", tuple(DEMO_VARIANTS))):
            if getattr(self, name) not in choices:
                raise ValueError(f"data.{name}: {getattr(self, name)!r} is not one of "
                                 f"{', '.join(choices)}")
        if self.dataset == "imagenet" and not self.root:
            raise ValueError("data.root: the path of the ImageNet copy is required "
                             "for dataset 'imagenet'")
        self._check_ranges()
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3:
                raise ValueError(f"data.{name}: expected 3 values (R, G, B), got {values!r}")
        if min(self.std) <= 0:
            raise ValueError(f"data.std: values must be > 0, got {self.std!r}")
        return self

    def _check_ranges(self) -> None:
        positive = ("image_size", "val_resize", "val_crop", "prefetch_factor")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}: must be >= 1, got {getattr(self, name)!r}")
        if self.workers < 0:
            raise ValueError(f"data.workers: must be >= 0, got {self.workers!r}")
        if self.resize_crop_last_epochs < 0:
            raise ValueError(f"data.resize_crop_last_epochs: must be >= 0, got "
                             f"{self.resize_crop_last_epochs!r}")
        if self.resize_crop_last_epochs and self.image_size > self.val_resize:
            raise ValueError(f"data.resize_crop_last_epochs: the crop (data.image_size "
                             f"{self.image_size}) is larger than data.val_resize "
                             f"({self.val_resize}), the size it is cropped from")
        if self.val_crop > self.val_resize:
            raise ValueError(f"data.val_crop: {self.val_crop} is larger than "
                             f"data.val_resize ({self.val_resize})")
        if not 0 < self.min_scale <= 1:
            raise ValueError(f"data.min_scale: must be in (0, 1], got {self.min_scale!r}")
        for name in ("color_jitter", "lighting"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name}: must be >= 0, got {getattr(self, name)!r}")
        if self.demo_size < 16:
            raise ValueError(f"data.demo_size: must be >= 16, got {self.demo_size!r}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"data.num_classes: must be >= 1 or null, got {self.num_classes!r}")
