"""Checkpoint files: written atomically, read without executing anything.

A checkpoint of ours is a dict of tensors and plain values::

    {"format": "switchable-norm/1", "config": {...resolved config...},
     "model": state_dict, "optimizer": ..., "scheduler": ..., "scaler": ...,
     "epoch": e, "iter": i, "global_step": s, "best_top1": b, "meters": {...},
     "rng": [per-rank torch RNG states], "metrics": {...}}

``epoch``/``iter`` say where training continues: epoch ``e`` after its first
``i`` iterations.
"""
from __future__ import annotations

import os
from typing import Any, Dict

import torch

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "CheckpointError"]

FORMAT = "switchable-norm/1"


class CheckpointError(ValueError):
    """A file that is not a checkpoint, or whose tensors do not fit the model."""


def save_checkpoint(path: str, state: Dict[str, Any]):
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """``torch.load(weights_only=True)`` with one-line errors naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a damaged or foreign file fails in many ways inside the unpickler
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint (a {type(obj).__name__}, not a dict)")
    return obj
