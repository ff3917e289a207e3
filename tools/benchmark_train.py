#!/usr/bin/env python
"""Images/s of a full training step (forward, backward, SGD) of a ResNet per normalizer.

All models are built in one process and timed in turns on the same synthetic
batch (median over the recorded steps), with each one's ratio to BatchNorm.
``sn-ref`` is SN computed by the authors' algorithm in plain PyTorch ops
(``normalization.reference.ReferenceSwitchNorm2d``). On CUDA the table is
repeated with AMP (bf16) and channels_last. A name ending in ``:c`` is that
model under ``torch.compile`` (inductor, compiled before timing); ``--compiled``
adds ``bn:c``, ``sn:c`` and ``sn-ref:c``.

    python tools/benchmark_train.py                              # ResNet-50, batch 16, 224 px
    python tools/benchmark_train.py --norms bn,gn,sn,ssn,sn-ref --batch 32 --steps 5
    python tools/benchmark_train.py --norms bn,sn --compiled    # eager and compiled
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine.host_memory import keep_freed_memory  # noqa: E402
from models import build_model  # noqa: E402
from normalization import replace_modules  # noqa: E402
from normalization.reference import ReferenceSwitchNorm2d  # noqa: E402


COMPILED = ["bn:c", "sn:c", "sn-ref:c"]


def make_model(arch: str, norm: str, num_classes: int) -> nn.Module:
    if norm.endswith(":c"):
        return make_model(arch, norm[:-2], num_classes)
    if norm == "sn-ref":
        model = build_model(arch, num_classes, "bn", zero_init_last=False)
        return replace_modules(model, lambda m: ReferenceSwitchNorm2d(m.num_features)
                               if isinstance(m, nn.BatchNorm2d) else None)
    if norm == "bn-torch":  # PyTorch's own BatchNorm2d (ours is the same without ghosts)
        model = build_model(arch, num_classes, "bn", zero_init_last=False)
        return replace_modules(model, lambda m: nn.BatchNorm2d(m.num_features)
                               if isinstance(m, nn.BatchNorm2d) else None)
    kwargs = {"num_groups": 32} if norm == "gn" else {}
    return build_model(arch, num_classes, norm, kwargs, zero_init_last=False)


def bench(args, device, amp: bool, channels_last: bool):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).to(memory_format=fmt)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    runs = {}
    for norm in args.norms:
        model = make_model(args.model, norm, 1000).to(device).to(memory_format=fmt).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        runs[norm] = (torch.compile(model) if norm.endswith(":c") else model, opt)
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else nullcontext
    crit = nn.CrossEntropyLoss()

    def step(model, opt):
        with ctx():
            loss = crit(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = {n: [] for n in args.norms}
    for i in range(args.warmup + args.steps):
        for norm, (model, opt) in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.inner):
                step(model, opt)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[norm].append((time.perf_counter() - t0) / args.inner)
    return {n: args.batch / statistics.median(ts) for n, ts in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet50_v1")
    ap.add_argument("--norms", default="bn,gn,sn,sn-ref")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=3, help="recorded rounds")
    ap.add_argument("--warmup", type=int, default=1, help="unrecorded rounds")
    ap.add_argument("--inner", type=int, default=1, help="steps per timed turn")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--compiled", action="store_true",
                    help="add compiled bn, sn and sn-ref (" + ", ".join(COMPILED) + ")")
    ap.add_argument("--system-malloc", action="store_true",
                    help="leave glibc malloc as it is (default: as train.py on the CPU, "
                         "engine.host_memory.keep_freed_memory())")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.norms = [n for n in args.norms.split(",") if n]
    args.norms += [n for n in COMPILED if args.compiled and n not in args.norms]
    if "bn" not in args.norms:
        args.norms.insert(0, "bn")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    malloc = "system" if args.system_malloc or not keep_freed_memory(device) else \
        "keep freed memory"
    if use_cuda:
        torch.backends.cudnn.benchmark = True
    modes = [("fp32", False, False)] + ([("bf16 autocast + channels_last", True, True)]
                                        if use_cuda else [])
    print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, torch {torch.__version__},"
          f" {torch.cuda.get_device_name() if use_cuda else f'{torch.get_num_threads()} CPU threads'}"
          f", malloc: {malloc}")
    results = []
    for label, amp, cl in modes:
        ips = bench(args, device, amp, cl)
        print(f"\n{device.type} {label}: images/s (time per step relative to bn; "
              "compiled rows relative to bn:c)")
        for norm, v in ips.items():
            base = ips["bn:c"] if norm.endswith(":c") and "bn:c" in ips else ips["bn"]
            print(f"  {norm:>8s} {v:9.2f} img/s  {base / v:5.2f}x")
        results.append({"device": device.type, "mode": label, "images_per_sec": ips})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
