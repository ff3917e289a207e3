#!/usr/bin/env python
"""Forward+backward time of each normalizer at ResNet-50 layer shapes, against BatchNorm2d.

Every layer is timed in training mode (forward, then backward of a fixed
gradient). Layers take turns in rounds, so they share the machine's drift; in
each turn a layer runs a short block of steps (the first one unrecorded) so
that it is measured in its own steady state, as it would run in a training
loop. The median over all recorded steps is reported, with its ratio to
``nn.BatchNorm2d`` measured in the same process. ``sn-ref`` is the
authors' algorithm in plain PyTorch ops (``normalization.reference``). On CUDA
``sn`` runs the fused Triton kernels and ``sn-native`` the same layer on
PyTorch's native kernels; four modes: fp32 and bf16 autocast, NCHW and
channels_last (cuDNN BatchNorm2d is the reference in each). A name ending in
``:c`` is that layer under ``torch.compile`` (inductor); ``--compiled`` adds
``bn:c``, ``sn:c`` and ``sn-ref:c``, so compiled SN is compared with compiled
BatchNorm and the authors' algorithm compiled, side by side.

    python tools/benchmark_norm.py                   # CPU, and CUDA when present
    python tools/benchmark_norm.py --device cpu --repeats 15 --json out.json
    python tools/benchmark_norm.py --device cpu --norms sn --compiled
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine.host_memory import keep_freed_memory  # noqa: E402
from normalization import build_norm  # noqa: E402
from normalization.ops import set_triton_mode  # noqa: E402
from normalization.reference import ReferenceSwitchNorm2d  # noqa: E402

SHAPES = [(32, 64, 56, 56), (32, 256, 56, 56), (32, 512, 28, 28), (8, 1024, 14, 14),
          (2, 256, 56, 56)]
NORMS = ["bn", "gn", "in", "ln", "sn", "ssn", "sn-ref"]
CUDA_NORMS = ["bn", "gn", "sn", "sn-native", "ssn", "sn-ref"]
MODES = {"fp32": (False, False), "fp32-cl": (False, True), "bf16": (True, False),
         "bf16-cl": (True, True)}  # (bf16 autocast, channels_last)


COMPILED = ["bn:c", "sn:c", "sn-ref:c"]


def make_layer(name: str, channels: int) -> nn.Module:
    if name.endswith(":c"):
        return torch.compile(make_layer(name[:-2], channels))
    if name == "bn":
        return nn.BatchNorm2d(channels)
    if name == "sn-ref":
        return ReferenceSwitchNorm2d(channels)
    if name == "sn-native":
        return build_norm("sn", channels)
    layer = build_norm(name, channels)
    if name == "ssn":
        layer.set_radius(0.3)
    return layer


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def bench_shape(shape, norms, device, mode, warmup, repeats, block=3):
    """Median fwd+bwd milliseconds of each normalizer at one shape."""
    bf16, cl = MODES[mode]
    dtype_ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else nullcontext
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = torch.randn(shape, device=device).to(memory_format=fmt).requires_grad_()
    grad = torch.randn(shape, device=device, dtype=torch.bfloat16 if bf16 else torch.float32
                       ).to(memory_format=fmt)
    layers = {n: make_layer(n, shape[1]).to(device).train() for n in norms}

    def step(layer, name):
        def run():
            x.grad = None
            previous = set_triton_mode("0" if name.startswith("sn-native") else None)
            try:
                with dtype_ctx():
                    y = layer(x)
                y.backward(grad.to(y.dtype))
            finally:
                set_triton_mode(previous)
        return run

    timer = Timer(device)
    times = {n: [] for n in norms}
    for i in range(warmup + repeats):
        for n in norms:
            run = step(layers[n], n)
            run()
            for _ in range(block):
                t = timer(run)
                if i >= warmup:
                    times[n].append(t)
    return {n: statistics.median(ts) for n, ts in times.items()}


# The candidates for the per-(sample, channel) statistics pass on the CPU (ops._native_stats):
# the one that serves, and those it was chosen over (docs/internals.md quotes this table).
STATS_IMPLS = {
    "group-norm kernel": lambda x, n, c, m: torch.native_group_norm(x, None, None, n, c, m, c,
                                                                    0.0),
    "batch_norm_update_stats": lambda x, n, c, m: torch.batch_norm_update_stats(
        x.view(1, n * c, m), None, None, 0.0),
    "var_mean": lambda x, n, c, m: torch.var_mean(x.view(n, c, m), -1, correction=0),
}


def bench_statistics(shapes, warmup, repeats, block=3):
    """Median milliseconds of each statistics candidate at each shape (CPU, float32)."""
    rows = []
    timer = Timer(torch.device("cpu"))
    for shape in shapes:
        n, c = shape[:2]
        m = math.prod(shape[2:])
        x = torch.randn(shape)
        times = {k: [] for k in STATS_IMPLS}
        for i in range(warmup + repeats):
            for k, f in STATS_IMPLS.items():
                for _ in range(block):
                    t = timer(lambda: f(x, n, c, m))
                    if i >= warmup:
                        times[k].append(t)
        rows.append((shape, {k: statistics.median(v) for k, v in times.items()}))
    first = next(iter(STATS_IMPLS))
    print(f"\ncpu statistics pass: ms (ratio to the {first})")
    print(f"{'shape':>20s} " + " ".join(f"{k:>26s}" for k in STATS_IMPLS))
    for shape, res in rows:
        print(f"{str(tuple(shape)):>20s} " + " ".join(
            f"{res[k]:15.3f} ({res[k] / res[first]:6.2f}x)" for k in STATS_IMPLS))
    return rows


def print_table(title, rows, norms):
    print(f"\n{title}: forward+backward ms (ratio to bn)")
    head = f"{'shape':>20s} " + " ".join(f"{n:>16s}" for n in norms)
    print(head)
    print("-" * len(head))
    for shape, res in rows:
        cells = []
        for n in norms:
            r = res[n] / res["bn"]
            cells.append(f"{res[n]:9.2f} ({r:4.2f}x)")
        print(f"{str(tuple(shape)):>20s} " + " ".join(f"{c:>16s}" for c in cells))
    if "sn:c" in norms and "sn-ref:c" in norms:
        print("compiled sn / compiled sn-ref: " + ", ".join(
            f"{res['sn:c'] / res['sn-ref:c']:.2f}x" for _, res in rows))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="all", choices=["all", "cpu", "cuda"])
    ap.add_argument("--norms", default=None, help="comma-separated (default: all; bn is "
                    "always included)")
    ap.add_argument("--shapes", default=None,
                    help="semicolon-separated N,C,H,W (default: the ResNet-50 shapes)")
    ap.add_argument("--warmup", type=int, default=1, help="unrecorded rounds")
    ap.add_argument("--repeats", type=int, default=5, help="recorded rounds")
    ap.add_argument("--block", type=int, default=3, help="recorded steps per turn")
    ap.add_argument("--compiled", action="store_true",
                    help="add compiled bn, sn and sn-ref (" + ", ".join(COMPILED) + ")")
    ap.add_argument("--system-malloc", action="store_true",
                    help="leave glibc malloc as it is (default: as train.py on the CPU, "
                         "engine.host_memory.keep_freed_memory())")
    ap.add_argument("--statistics", action="store_true",
                    help="only time the CPU statistics candidates (group-norm kernel, "
                         "batch_norm_update_stats, var_mean) at the shapes")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    where = torch.device("cuda" if args.device == "cuda" else "cpu")  # the CPU unless cuda only
    malloc = "system" if args.system_malloc or not keep_freed_memory(where) else \
        "keep freed memory"

    def chosen(default):
        norms = [n for n in (args.norms or ",".join(default)).split(",") if n]
        norms = norms + [n for n in COMPILED if args.compiled and n not in norms]
        return norms if "bn" in norms else ["bn"] + norms
    shapes = SHAPES if not args.shapes else [
        tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    if args.statistics:
        bench_statistics(shapes, args.warmup, args.repeats, args.block)
        return
    runs = []
    if args.device in ("all", "cpu"):
        runs.append(("cpu", "fp32"))
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        runs += [("cuda", mode) for mode in MODES]
    elif args.device == "cuda":
        sys.exit("error: --device cuda but CUDA is not available")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, malloc: {malloc}"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    results = []
    for dev, mode in runs:
        norms = chosen(NORMS if dev == "cpu" else CUDA_NORMS)
        rows = []
        for shape in shapes:
            res = bench_shape(shape, norms, torch.device(dev), mode, args.warmup, args.repeats,
                              args.block)
            rows.append((shape, res))
            results.append({"device": dev, "mode": mode, "shape": list(shape), "ms": res})
        print_table(f"{dev} {mode}", rows, norms)
    if any(dev == "cuda" for dev, _ in runs):
        from normalization.ops import triton_status
        print("\nTriton self-check (SN_TRITON=auto):", triton_status() or "not used")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
