"""Rebuild a model from a checkpoint file: ours, or the authors' released ones.

* Ours (``train.py``): the architecture comes from the resolved config stored
  in the checkpoint.
* The authors' (Switchable-Normalization / Sparse_SwitchNorm model zoo): a
  dict with ``state_dict`` (keys prefixed ``module.``, norms named ``sn1``,
  ``sn2``, ``sn3``, ``sn_out``, gamma/beta shaped (1, C, 1, 1)) and ``model``
  (``resnetv1sn50``, ``resnetv2sn101``, ``resnetv1ssn50`` ...). ``using_bn``
  follows from the length of the ratio vectors, and the layers use the
  authors' variance convention (unbiased IN variance) so that the outputs are
  those of their own model code. Their SSN networks (``resnetv1ssn*``, or any
  file whose layers hold ``mean_fixed``) pool the stem with
  ``MaxPool2d(3, 2, padding=0, ceil_mode=True)`` (Sparse_SwitchNorm's
  ``ResNetV1SSN``): they are built with ``stem_pool="ceil"``.

``pretrained_source`` and ``load_pretrained_weights`` serve
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``
with the same conversion, so timm gives the logits of ``load_model(PATH)``.

Every file is read with ``torch.load(weights_only=True)``: nothing in it runs.
"""
from __future__ import annotations

import re
from typing import Dict, Tuple

import torch
import torch.nn as nn

from engine.checkpoint import CheckpointError, load_checkpoint

from .registry import build_model

__all__ = ["load_model", "model_from_state", "authors_state_dict", "load_weights",
           "model_kwargs_from_checkpoint", "pretrained_source", "load_pretrained_weights"]

_AUTHORS_ARCH = re.compile(r"^resnetv([12])(s?sn)(\d+)$")
_AUTHORS_NORM_NAME = re.compile(r"(^|\.)sn(\d+|_out)\.")
_BUILD_KEYS = ("name", "num_classes", "norm", "norm_kwargs", "zero_init_last", "dropout", "stem",
               "width", "input_size", "in_chans", "global_pool", "drop_path_rate", "stem_pool")


def _is_ours(state: dict) -> bool:
    return isinstance(state.get("config"), dict) and isinstance(state.get("model"), dict)


def authors_state_dict(state: dict) -> Dict[str, torch.Tensor]:
    """The authors' state dict mapped onto our names (``module.`` dropped, ``snK`` -> ``bnK``)."""
    sd = state.get("state_dict", state)
    out = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = key[len("module."):] if key.startswith("module.") else key
        out[_AUTHORS_NORM_NAME.sub(lambda m: f"{m.group(1)}bn{m.group(2)}.", key)] = value
    return out


def _authors_kwargs(path: str, state: dict, sd: Dict[str, torch.Tensor]) -> dict:
    arch = state.get("model")
    kwargs: dict = {}
    if isinstance(arch, str):
        m = _AUTHORS_ARCH.match(arch.lower())
        if not m:
            raise CheckpointError(f"{path}: unknown architecture {arch!r} in the checkpoint's "
                                  "'model' entry; pass name=... (e.g. name='resnet50_v1')")
        kwargs["name"] = f"resnet{m.group(3)}_v{m.group(1)}"
        kwargs["norm"] = m.group(2)
    if "fc.weight" in sd:
        kwargs["num_classes"] = sd["fc.weight"].shape[0]
    if any(k.endswith("mean_fixed") for k in sd):
        kwargs["norm"] = "ssn"
    ratio = next((v for k, v in sd.items() if k.endswith("mean_weight")), None)
    norm_kwargs = {"variance": "authors"}
    if ratio is not None and ratio.numel() == 2:
        norm_kwargs["using_bn"] = False
    kwargs["norm_kwargs"] = norm_kwargs
    kwargs.setdefault("norm", "sn")
    if kwargs["norm"] == "ssn":  # their ResNetV1SSN's stem pool
        kwargs["stem_pool"] = "ceil"
    return kwargs


def model_kwargs_from_checkpoint(path: str, state: dict) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """``build_model`` arguments and the state dict (in our names) of a checkpoint."""
    if _is_ours(state):
        cfg = state["config"]
        kwargs = {k: v for k, v in cfg["model"].items() if k in _BUILD_KEYS}
        image_size = cfg.get("data", {}).get("image_size")
        if image_size:
            kwargs["input_size"] = image_size
        return kwargs, state["model"]
    if not isinstance(state.get("state_dict", state), dict):
        raise CheckpointError(f"{path}: not a model checkpoint (no state_dict)")
    sd = authors_state_dict(state)
    if not sd:
        raise CheckpointError(f"{path}: not a model checkpoint (it holds no tensors)")
    return _authors_kwargs(path, state, sd), sd


def load_weights(model: nn.Module, sd: Dict[str, torch.Tensor], path: str,
                 ignore: Tuple[str, ...] = ()):
    """Strict load with one clear error listing missing and unexpected keys; model keys
    starting with one of ``ignore`` may be missing (they keep their values)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith(ignore)]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and sd[k].numel() != own[k].numel()]
    if missing or unexpected or wrong:
        def few(keys):
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")
        parts = [f"missing keys: {few(missing)}" if missing else "",
                 f"unexpected keys: {few(unexpected)}" if unexpected else "",
                 f"shape mismatches: {few(wrong)}" if wrong else ""]
        raise CheckpointError(f"{path}: the checkpoint does not fit the model; "
                              + "; ".join(p for p in parts if p))
    try:
        model.load_state_dict(sd, strict=not ignore)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: {str(e).strip().splitlines()[0]}") from None


def pretrained_source(path: str) -> Tuple[dict, Dict[str, torch.Tensor], dict]:
    """What timm needs of a checkpoint file: its ``build_model`` arguments, its state dict
    in our names, and timm ``pretrained_cfg`` entries: ``num_classes``, ``input_size``
    (input channels; for ours the validation crop), and for ours the evaluation
    transform (``crop_pct`` = val_crop / val_resize, ``mean``, ``std``)."""
    state = load_checkpoint(path)
    kwargs, sd = model_kwargs_from_checkpoint(path, state)
    fc, conv = sd.get("fc.weight"), sd.get("conv1.weight")
    cfg: dict = {}
    if fc is not None or "num_classes" in kwargs:
        cfg["num_classes"] = int(fc.shape[0]) if fc is not None else int(kwargs["num_classes"])
    data = (state["config"].get("data") or {}) if _is_ours(state) else {}
    crop = int(data.get("val_crop") or 224)
    cfg["input_size"] = (int(conv.shape[1]) if conv is not None else 3, crop, crop)
    if data.get("val_resize"):
        cfg["crop_pct"] = round(crop / float(data["val_resize"]), 4)
    for key in ("mean", "std"):
        if data.get(key):
            cfg[key] = tuple(float(v) for v in data[key])
    return kwargs, sd, cfg


def load_pretrained_weights(model: nn.Module, sd: Dict[str, torch.Tensor], path: str):
    """timm's rules for pretrained weights on our strict loader: when the checkpoint's
    classifier has another number of classes than the model (``num_classes`` given, or
    0), the model keeps its own new classifier; when the first conv has other input
    channels, its weights are adapted by timm's ``adapt_input_conv``. Every other
    tensor must fit (``load_weights``)."""
    sd, ignore = dict(sd), ()
    fc = sd.get("fc.weight")
    if fc is not None and fc.shape[0] != model.num_classes:
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
        ignore = ("fc.",)
    conv = sd.get("conv1.weight")
    if conv is not None and conv.dim() == 4 and conv.shape[1] != model.conv1.in_channels:
        from timm.models import adapt_input_conv
        sd["conv1.weight"] = adapt_input_conv(model.conv1.in_channels, conv)
    load_weights(model, sd, path, ignore=ignore)


def model_from_state(path: str, state: dict, **overrides) -> Tuple[nn.Module, dict]:
    """The model a checkpoint dict describes, weights loaded strictly, in eval mode, and
    its ``build_model`` arguments; ``path`` names the file in errors.

    ``overrides`` replace ``build_model`` arguments (e.g. ``name=`` for an
    authors' file without a ``model`` entry, ``norm_kwargs=``).
    """
    kwargs, sd = model_kwargs_from_checkpoint(path, state)
    unknown = [k for k in overrides if k not in _BUILD_KEYS]
    if unknown:
        raise TypeError(f"load_model: unknown argument(s) {unknown}; valid: {_BUILD_KEYS}")
    if "norm_kwargs" in overrides:
        overrides = {**overrides, "norm_kwargs": {**kwargs.get("norm_kwargs", {}),
                                                  **(overrides["norm_kwargs"] or {})}}
    kwargs.update(overrides)
    if "name" not in kwargs:
        raise CheckpointError(f"{path}: the checkpoint does not name its architecture; "
                              "pass name=... (e.g. resnet50_v1)")
    model = build_model(**kwargs)
    load_weights(model, sd, path)
    return model.eval(), kwargs


def load_model(path: str, map_location="cpu", **overrides) -> nn.Module:
    """The model stored in ``path`` (ours or the authors'), weights loaded, in eval mode
    (``overrides`` as in ``model_from_state``)."""
    return model_from_state(path, load_checkpoint(path, map_location=map_location),
                            **overrides)[0]
