"""The data pipeline: ImageNet (folder or list-file layout) and the demo dataset, decoded
by DALI or torchvision, sharded, deterministic and resumable.

    from data import DataConfig, build_loader
    loader = build_loader(cfg, "train", batch_size=64, rank=rank, world_size=world, seed=0,
                          device=device)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch, start_iter)
        for images, targets in loader: ...

The names below are imported on first use, so that reading a config (``data.config``,
``train.py --help-config`` and ``--print-config``) does not import torch.
"""
import importlib

_EXPORTS = {
    "build_loader": ".loader", "DataConfig": ".config", "IMAGENET_MEAN": ".config",
    "IMAGENET_STD": ".config", "ensure_demo_dataset": ".demo", "DEMO_CLASSES": ".demo",
    "Loader": ".base", "BadImageError": ".datasets", "ClassificationPresetTrain": ".presets",
    "ClassificationPresetEval": ".presets",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
