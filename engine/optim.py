"""build_optimizer / build_scheduler: SGD with parameter groups by type, per-iteration schedules.

Parameter groups are decided by the type of the module that owns a
parameter, never by a substring of its name:

* ``ratio``: the ratio logits (``mean_weight``, ``var_weight``) of SN layers,
* ``norm``: the affine parameters of every normalization layer,
* ``bias``: other one-dimensional parameters (the classifier's bias),
* ``weight``: everything else (convolution and linear weights).
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn as nn

from normalization import NORM_LAYERS, SWITCH_LAYERS

__all__ = ["parameter_groups", "build_optimizer", "build_scheduler", "lr_factor",
           "clip_gradients"]

RATIO_NAMES = ("mean_weight", "var_weight")


def parameter_groups(model: nn.Module) -> Dict[str, List[nn.Parameter]]:
    """Trainable parameters of ``model`` by kind (see module docstring)."""
    groups: Dict[str, List[nn.Parameter]] = {"weight": [], "bias": [], "norm": [], "ratio": []}
    seen = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, SWITCH_LAYERS) and name in RATIO_NAMES:
                groups["ratio"].append(p)
            elif isinstance(module, NORM_LAYERS):
                groups["norm"].append(p)
            elif p.ndim <= 1:
                groups["bias"].append(p)
            else:
                groups["weight"].append(p)
    return groups


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """SGD over the parameter groups, with the derived learning rate ``cfg.optim.lr``."""
    o = cfg.optim
    if o.lr is None:
        raise ValueError("optim.lr is derived: call engine.config.resolve(cfg, world_size) first")
    decay = {"weight": o.weight_decay,
             "bias": o.weight_decay if o.bias_weight_decay is None else o.bias_weight_decay,
             "norm": o.weight_decay if o.norm_weight_decay is None else o.norm_weight_decay,
             "ratio": o.weight_decay if o.ratio_weight_decay is None else o.ratio_weight_decay}
    groups = []
    for kind, params in parameter_groups(model).items():
        if params:
            scale = o.ratio_lr_scale if kind == "ratio" else 1.0
            groups.append({"params": params, "name": kind, "weight_decay": decay[kind],
                           "lr": o.lr * scale})
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)


def lr_factor(cfg, iteration: int, iters_per_epoch: int) -> float:
    """Learning rate at ``iteration`` as a fraction of ``optim.lr``: warm-up, then step or cosine."""
    s = cfg.schedule
    total = cfg.train.epochs * iters_per_epoch
    warmup = int(round(s.warmup_epochs * iters_per_epoch))
    if iteration < warmup:
        return s.warmup_factor + (1.0 - s.warmup_factor) * iteration / warmup
    if s.name == "step":
        epoch = iteration / iters_per_epoch
        return s.gamma ** sum(1 for m in s.milestones if epoch >= m)
    progress = min(1.0, (iteration - warmup) / max(1, total - warmup))
    floor = s.min_lr / cfg.optim.lr if cfg.optim.lr else 0.0
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(cfg, optimizer: torch.optim.Optimizer, iters_per_epoch: int):
    """A LambdaLR stepped once per iteration (its state resumes with the checkpoint)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(cfg, it, iters_per_epoch))


def clip_gradients(cfg, optimizer: torch.optim.Optimizer):
    """Clip the ratio logits' gradient norm, then the global one (when configured)."""
    o = cfg.optim
    if o.ratio_grad_clip is not None:
        ratio = [p for g in optimizer.param_groups if g.get("name") == "ratio"
                 for p in g["params"] if p.grad is not None]
        if ratio:
            nn.utils.clip_grad_norm_(ratio, o.ratio_grad_clip)
    if o.grad_clip is not None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        nn.utils.clip_grad_norm_(params, o.grad_clip)
