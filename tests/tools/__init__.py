"""Helpers shared by the tools' tests: tiny models, a tiny dataset and its config, our and
the authors' checkpoint layouts, and running a tool's ``main(argv)`` in-process."""
from __future__ import annotations

import contextlib
import io
import os
import re
from typing import Optional

import torch
import yaml

import normalization
from engine.checkpoint import FORMAT, save_checkpoint
from engine.config import from_dict, resolve, to_dict
from models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_model(norm: str = "sn", name: str = "resnet18_v1", **norm_kwargs) -> torch.nn.Module:
    """ResNet with 8 channels in the first stage and the 3x3 stem, for 32 px inputs."""
    return build_model(name, 4, norm, norm_kwargs, width=8, stem="small", input_size=32)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random ratio logits, affine parameters and running statistics in every norm."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        for name in ("mean_weight", "var_weight", "weight", "bias", "running_mean"):
            t = getattr(m, name, None)
            if isinstance(t, torch.Tensor) and t.dim() == 1 and not isinstance(m, torch.nn.Linear):
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 if "_weight" in name else 0.5))
        rv = getattr(m, "running_var", None)
        if isinstance(rv, torch.Tensor):
            rv.copy_(torch.rand(rv.shape, generator=g) + 0.5)
    return model


def tiny_dataset(base) -> str:
    """4 classes x 24 train / 6 val generated images of 40 px."""
    from data import ensure_demo_dataset
    return str(ensure_demo_dataset(str(base / "data"), size=40, num_classes=4,
                                   train_per_class=24, val_per_class=6))


def tiny_config_dict(root: str, **sections) -> dict:
    cfg = {
        "data": {"dataset": "imagenet", "root": root, "image_size": 32, "val_resize": 36,
                 "val_crop": 32, "min_scale": 0.5, "workers": 0, "backend": "torchvision"},
        "model": {"name": "resnet18_v1", "norm": "sn", "num_classes": 4, "width": 8,
                  "stem": "small"},
        "batch": {"gpus": 2, "per_gpu": 8},
        "optim": {"base_lr": 0.4},
        "schedule": {"name": "step", "milestones": [1, 2]},
        "train": {"epochs": 2, "print_freq": 1, "device": "cpu", "deterministic": True},
        "log": {"tensorboard": True},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


def write_config(path, data: dict) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return str(path)


def save_ours(path, model: torch.nn.Module, cfg_dict: dict, epoch: Optional[int] = None) -> str:
    """``model`` in our checkpoint layout, with the resolved ``cfg_dict``."""
    cfg = resolve(from_dict(cfg_dict), 1)
    state = {"format": FORMAT, "config": to_dict(cfg), "model": model.state_dict()}
    if epoch is not None:
        state.update(epoch=epoch, iter=0)
    save_checkpoint(str(path), state)
    return str(path)


_NORM = re.compile(r"(^|\.)bn(\d+|_out)\.")


def authors_layout(model: torch.nn.Module, arch: str) -> dict:
    """Our model's weights as the authors' released files hold them: ``module.`` prefix,
    norms named snK, gamma/beta (1, C, 1, 1), running statistics (1, C, 1), 'model' entry."""
    sd = {}
    switch = {n for n, _ in normalization.switch_layers(model)}
    for key, value in model.state_dict().items():
        layer, _, leaf = key.rpartition(".")
        if layer in switch and leaf in ("weight", "bias"):
            value = value.view(1, -1, 1, 1)
        elif layer in switch and leaf in ("running_mean", "running_var"):
            value = value.view(1, -1, 1)
        sd["module." + _NORM.sub(lambda m: f"{m.group(1)}sn{m.group(2)}.", key)] = value.clone()
    return {"epoch": 100, "model": arch, "state_dict": sd, "best_prec1": 0.0}


def run_main(main, argv) -> tuple:
    """(exit status, stdout, stderr) of a tool's ``main(argv)`` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()
