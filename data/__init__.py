"""The data pipeline: ImageNet (folder or list-file layout) and the demo dataset, decoded
by DALI or torchvision, sharded, deterministic and resumable.

    from data import DataConfig, build_loader
    loader = build_loader(cfg, "train", batch_size=64, rank=rank, world_size=world, seed=0,
                          device=device)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch, start_iter)
        for images, targets in loader: ...
"""
from .base import Loader
from .config import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from .datasets import BadImageError
from .demo import DEMO_CLASSES, ensure_demo_dataset
from .loader import build_loader
from .presets import ClassificationPresetEval, ClassificationPresetTrain

__all__ = ["build_loader", "DataConfig", "IMAGENET_MEAN", "IMAGENET_STD", "ensure_demo_dataset",
           "DEMO_CLASSES", "Loader", "BadImageError", "ClassificationPresetTrain",
           "ClassificationPresetEval"]
