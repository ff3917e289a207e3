#!/usr/bin/env python
"""Fold the hard-BN SN layers of a checkpoint for inference, and measure what it buys.

    python tools/sparsify.py --checkpoint K --out hard.pth        # hard ratios first
    python tools/export_inference.py --checkpoint hard.pth --out hard_folded.pt

Every SN layer whose (hard, or SSN one-hot) ratios pick BN for both the mean
and the variance is, in eval, a per-channel affine (``normalization.fold``):
it is folded into the convolution before it where the graph allows (conv ->
norm directly) and replaced by a ``FrozenAffine2d`` elsewhere; eval-mode BN
layers too, unless --keep-batchnorm. The tool then checks the folded model
against the unfolded one on random inputs (float32: max |difference| <= 1e-5
x max |output|; float64: <= 1e-12 x max |output|) and times both on the CPU
in this process (median of --repeats forward passes each, interleaved).

The output is a checkpoint that loads without executing code
(``torch.load(weights_only=True)``): ``{"format": "switchable-norm/folded-1",
"config", "model": folded state dict, "fold_plan": {layer: conv or null}}``;
``load_inference_model(path)`` (this module) rebuilds the folded model from it.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from typing import Dict, Tuple

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from engine.cli import run_cli  # noqa: E402
from models import build_model  # noqa: E402
from models.checkpoint import load_weights, model_kwargs_from_checkpoint  # noqa: E402
from normalization.fold import fold_hard_bn, fold_plan, restructure  # noqa: E402
from models.checkpoint import model_from_state  # noqa: E402
from tools.convert_checkpoint import (checkpoint_config, our_checkpoint,  # noqa: E402
                                      read_checkpoint)

__all__ = ["FOLDED_FORMAT", "TOLERANCE", "max_difference", "time_models", "export",
           "load_inference_model", "main"]

FOLDED_FORMAT = "switchable-norm/folded-1"
#: Max |folded - unfolded| relative to max |unfolded output|, per dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def load_inference_model(path: str) -> nn.Module:
    """The folded model written by this tool, in eval mode."""
    state = load_checkpoint(path)
    if state.get("format") != FOLDED_FORMAT or not isinstance(state.get("fold_plan"), dict):
        raise CheckpointError(f"{path}: not a folded inference checkpoint (written by "
                              "tools/export_inference.py)")
    kwargs, sd = model_kwargs_from_checkpoint(path, state)
    model = restructure(build_model(**kwargs), state["fold_plan"])
    load_weights(model, sd, path)
    return model.eval()


@torch.no_grad()
def max_difference(a: nn.Module, b: nn.Module, x: torch.Tensor) -> Tuple[float, float]:
    """(max |a(x) - b(x)|, max |a(x)|)."""
    ya, yb = a(x), b(x)
    return float((ya - yb).abs().max()), float(ya.abs().max())


@torch.no_grad()
def time_models(models: Dict[str, nn.Module], x: torch.Tensor, repeats: int = 20,
                warmup: int = 3) -> Dict[str, float]:
    """Median seconds per forward of each model; the models take turns, so that they
    share the machine's drift."""
    times: Dict[str, list] = {name: [] for name in models}
    for _ in range(warmup):
        for model in models.values():
            model(x)
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(x)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _check(model: nn.Module, shape, seed: int = 0, **fold_kwargs) -> Dict[str, float]:
    """Relative max |folded - unfolded| of ``model`` folded in float32 and in float64;
    raises when over TOLERANCE."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    out = {}
    for dtype in (torch.float32, torch.float64):
        unfolded = copy.deepcopy(model).to(dtype)
        folded, _ = fold_hard_bn(copy.deepcopy(unfolded), **fold_kwargs)
        diff, scale = max_difference(unfolded, folded, x.to(dtype))
        out[str(dtype).replace("torch.", "")] = rel = diff / max(scale, 1e-30)
        if rel > TOLERANCE[dtype]:
            raise RuntimeError(f"folded and unfolded outputs differ by {rel:.3g} (relative) in "
                               f"{dtype}, over the tolerance {TOLERANCE[dtype]:g}")
    return out


def export(src: str, dst: str, into_conv: bool = True, keep_batchnorm: bool = False,
           batch: int = 8, size: int = 0, repeats: int = 20, threads: int = 0) -> dict:
    """Fold ``src`` into ``dst``; returns the numbers (layers folded, differences, timing)."""
    state = read_checkpoint(src)
    model, kwargs = model_from_state(src, state)
    cfg = checkpoint_config(src, state, kwargs)
    plan = fold_plan(model, into_conv, include_batchnorm=not keep_batchnorm)
    folded, n = fold_hard_bn(copy.deepcopy(model), into_conv,
                             include_batchnorm=not keep_batchnorm)
    size = size or cfg.data.val_crop
    shape = (batch, 3, size, size)
    diffs = _check(model, shape, into_conv=into_conv, include_batchnorm=not keep_batchnorm)
    if threads:
        torch.set_num_threads(threads)
    times = time_models({"unfolded": model, "folded": folded}, torch.randn(*shape), repeats)
    out = our_checkpoint(cfg, folded, fold_plan=plan, folded_from=os.path.basename(src))
    out["format"] = FOLDED_FORMAT
    save_checkpoint(dst, out)
    load_inference_model(dst)  # it rebuilds from its own file
    return {"folded_layers": n, "into_conv": sum(c is not None for c in plan.values()),
            "input": list(shape), "relative_difference": diffs,
            "seconds_unfolded": times["unfolded"], "seconds_folded": times["folded"],
            "speedup": times["unfolded"] / times["folded"], "threads": torch.get_num_threads(),
            "repeats": repeats}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--checkpoint", required=True, help="hard-ratio checkpoint (ours or SSN)")
    ap.add_argument("--out", required=True, help="folded checkpoint to write (.pt)")
    ap.add_argument("--no-into-conv", action="store_true",
                    help="replace foldable layers by an affine, never fold into the conv")
    ap.add_argument("--keep-batchnorm", action="store_true", help="leave BN layers as they are")
    ap.add_argument("--batch", type=int, default=8, help="batch of the timing input")
    ap.add_argument("--size", type=int, default=0, help="image side (default: data.val_crop)")
    ap.add_argument("--repeats", type=int, default=20, help="timed forwards per model")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--json", help="also write the numbers here")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: report(args, export(
        args.checkpoint, args.out, not args.no_into_conv, args.keep_batchnorm, args.batch,
        args.size, args.repeats, args.threads)), extra_errors=(RuntimeError,))


def report(args, info: dict) -> int:
    print(f"{args.checkpoint} -> {args.out}: {info['folded_layers']} layers folded "
          f"({info['into_conv']} into their conv)")
    if not info["folded_layers"]:
        print("note: no layer is a per-channel affine in eval (soft ratios? run "
              "tools/sparsify.py first)")
    print(f"max |folded - unfolded| / max |output|: float32 "
          f"{info['relative_difference']['float32']:.2e} (tolerance 1e-5), float64 "
          f"{info['relative_difference']['float64']:.2e} (tolerance 1e-12)")
    print(f"CPU forward of {tuple(info['input'])}, median of {info['repeats']}, "
          f"{info['threads']} threads: unfolded {1e3 * info['seconds_unfolded']:.1f} ms, "
          f"folded {1e3 * info['seconds_folded']:.1f} ms: speed-up x{info['speedup']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
