"""Helpers shared by the engine tests."""
import yaml


def write_tiny_run_config(base, *, size: int, num_classes: int, train_per_class: int,
                          val_per_class: int, **sections) -> str:
    """Generate a ``num_classes``-class dataset of ``size``-px images under ``base/data`` and
    write ``base/tiny.yaml`` for it: a width-4 ResNet-18 v1 with SN and the small stem on
    ``size - 8``-px crops, 2 virtual GPUs, one epoch on the CPU, no loader workers;
    ``sections`` update the config's sections (``batch={"per_gpu": 2}``)."""
    from data import ensure_demo_dataset
    root = ensure_demo_dataset(str(base / "data"), size=size, num_classes=num_classes,
                               train_per_class=train_per_class, val_per_class=val_per_class)
    cfg = {"data": {"dataset": "imagenet", "root": str(root), "image_size": size - 8,
                    "val_resize": size - 4, "val_crop": size - 8, "workers": 0,
                    "backend": "torchvision"},
           "model": {"name": "resnet18_v1", "norm": "sn", "num_classes": num_classes,
                     "width": 4, "stem": "small"},
           "batch": {"gpus": 2}, "train": {"epochs": 1, "device": "cpu"}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)
