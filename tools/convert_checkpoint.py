#!/usr/bin/env python
"""Convert a checkpoint (the authors' model zoo, ours, or safetensors) to our layout.

    python tools/convert_checkpoint.py "ResNet50v1+SN(8,32)-77.49.pth" resnet50_v1_sn_8x32.pth \\
        --config configs/imagenet/zoo/resnet50_v1_sn_8x32_cosine.yaml
    python tools/convert_checkpoint.py runs/resnet_sn/checkpoint_best.pth sn.safetensors \\
        --safetensors
    python tools/convert_checkpoint.py sn.safetensors sn.pth        # and back

The output is our checkpoint (``{"format", "config", "model"}``, what
``evaluate.py``, ``models.load_model`` and ``checkpoint.init`` read), or with
--safetensors a safetensors file of the state dict whose metadata holds
``format`` and the config as JSON. The architecture comes from the input
(our stored config, or the authors' ``model`` entry and ratio lengths); the
rest of the config from --config, else the input's own, else the defaults.
Inputs are read with ``torch.load(weights_only=True)`` or safetensors: nothing
in them is executed. The weights are loaded into the rebuilt model first, so a
file whose tensors do not fit fails with the missing/unexpected keys listed.

This module also holds the checkpoint helpers the other tools share.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import struct
import sys
from typing import Dict, Optional, Sequence

import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from engine.checkpoint import FORMAT, CheckpointError, load_checkpoint  # noqa: E402
from engine.cli import run_cli  # noqa: E402
from engine.config import (Config, apply_overrides, from_dict,  # noqa: E402
                           load_config, strip_derived, to_dict)
from models import build_model  # noqa: E402
from models.checkpoint import model_from_state  # noqa: E402

__all__ = ["read_checkpoint", "checkpoint_config", "our_checkpoint",
           "write_safetensors", "is_safetensors", "convert", "main"]

_MODEL_KEYS = ("name", "norm", "num_classes", "norm_kwargs", "zero_init_last", "dropout",
               "stem", "width", "stem_pool")


# -- reading ------------------------------------------------------------------------------------
def is_safetensors(path: str) -> bool:
    """A safetensors file starts with a little-endian u64 header length, then '{'."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = os.path.getsize(path)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < size


def _read_safetensors(path: str) -> dict:
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if "config" not in meta:
        return {"state_dict": tensors}
    try:
        config = json.loads(meta["config"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the metadata's config is not JSON ({e})") from None
    return {"format": meta.get("format", FORMAT), "config": config, "model": tensors}


def read_checkpoint(path: str) -> dict:
    """A checkpoint dict from a .pth (weights_only) or a safetensors file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    return _read_safetensors(path) if is_safetensors(path) else load_checkpoint(path)


# -- configs ----------------------------------------------------------------------------------
def checkpoint_config(path: str, state: dict, kwargs: dict, config_path: Optional[str] = None,
                      overrides: Sequence[str] = ()) -> Config:
    """The config for a checkpoint: --config, else the stored one, else the defaults; the
    model section always from the checkpoint itself (``kwargs`` of ``model_from_state``)."""
    if config_path:
        cfg = load_config(config_path, list(overrides))
    elif isinstance(state.get("config"), dict):
        cfg = from_dict(apply_overrides(strip_derived(state["config"]), list(overrides)))
    else:
        cfg = from_dict(apply_overrides({}, list(overrides)))
    defaults = {k: p.default for k, p in inspect.signature(build_model).parameters.items()}
    for key in _MODEL_KEYS:  # an authors' file names fewer: build_model's defaults built it
        value = kwargs.get(key, defaults.get(key))
        setattr(cfg.model, key, dict(value or {}) if key == "norm_kwargs" else value)
    if kwargs.get("input_size"):
        cfg.data.image_size = int(kwargs["input_size"])
    return cfg


def our_checkpoint(cfg: Config, model: nn.Module, **extra) -> dict:
    """Our checkpoint layout: format, config, state dict (plus ``extra`` entries)."""
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"format": FORMAT, "config": to_dict(cfg), "model": sd, **extra}


def write_safetensors(path: str, state: dict):
    from safetensors.torch import save_file
    tensors = {k: v.contiguous() for k, v in state["model"].items()}
    meta = {"format": state.get("format", FORMAT), "config": json.dumps(state["config"])}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -- the tool ---------------------------------------------------------------------------------
def convert(src: str, dst: str, safetensors: bool = False, config_path: Optional[str] = None,
            overrides: Sequence[str] = ()) -> Dict[str, object]:
    """Convert ``src`` to ``dst``; returns a summary."""
    from engine.checkpoint import save_checkpoint
    state = read_checkpoint(src)
    model, kwargs = model_from_state(src, state)
    cfg = checkpoint_config(src, state, kwargs, config_path, overrides)
    out = our_checkpoint(cfg, model, converted_from=os.path.basename(src))
    model_from_state(dst, out)  # the output rebuilds from its own config
    if safetensors:
        write_safetensors(dst, out)
    else:
        save_checkpoint(dst, out)
    return {"model": kwargs["name"], "norm": kwargs.get("norm"),
            "norm_kwargs": kwargs.get("norm_kwargs"), "tensors": len(out["model"])}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("input", help="checkpoint to convert (.pth of ours or the authors', "
                    "or .safetensors)")
    ap.add_argument("output", help="file to write")
    ap.add_argument("--safetensors", action="store_true",
                    help="write a safetensors file (state dict + JSON metadata)")
    ap.add_argument("--config", help="YAML config for the non-model sections (data, batch, ...)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def run():
        info = convert(args.input, args.output, args.safetensors, args.config, args.overrides)
        print(f"{args.input} -> {args.output}: {info['model']} with {info['norm']} "
              f"{info['norm_kwargs'] or ''} ({info['tensors']} tensors)")
    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
