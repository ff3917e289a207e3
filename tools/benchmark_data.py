#!/usr/bin/env python
"""Images per second of each data backend, for the train and val pipelines.

Each configuration (backend x split x workers) is timed over ``--repeats``
consecutive windows of ``--batches`` batches, crossing epoch boundaries as
training does, after ``--warmup`` untimed batches that absorb worker start-up;
the table shows the median images/s and the range over the windows.  Batches
end on ``--device`` as the trainer gets them (normalised float32), so on CUDA
the copy and normalisation are included, and DALI decodes on the GPU.
"workers" are DataLoader processes (torchvision) or DALI CPU threads (at
least 1).  ``--synthetic`` writes 4 classes x 128 images per split of
500x375 JPEGs (ImageNet's typical size) to the temp folder once.

    python tools/benchmark_data.py                         # the demo dataset, CPU
    python tools/benchmark_data.py --synthetic             # ImageNet-sized JPEGs (500x375)
    python tools/benchmark_data.py --root /data/imagenet --device cuda --workers 4,8,16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import DataConfig, build_loader, ensure_demo_dataset  # noqa: E402
from data.dali import dali_import_error  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", help="an ImageNet copy in the folder layout (default: demo data)")
    p.add_argument("--synthetic", action="store_true",
                   help="generate (once, in the temp folder) ImageNet-sized JPEGs and use them")
    p.add_argument("--backends", default="torchvision,dali")
    p.add_argument("--splits", default="train,val")
    p.add_argument("--workers", default=None,
                   help="comma-separated worker counts (default 0,1,2,4,8 up to the CPU count)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=None, help="default 224 (64 on demo data)")
    p.add_argument("--val-resize", type=int, default=None, help="default 256 (72 on demo data)")
    p.add_argument("--val-crop", type=int, default=None, help="default 224 (64 on demo data)")
    p.add_argument("--batches", type=int, default=20, help="batches per timed window")
    p.add_argument("--warmup", type=int, default=4, help="untimed batches first")
    p.add_argument("--repeats", type=int, default=5, help="timed windows")
    p.add_argument("--json", help="also write the rows to this JSON file")
    return p.parse_args(argv)


def synthetic_root(count_per_class: int = 128, classes: int = 4) -> Path:
    """ImageNet-like files: 500x375 JPEGs of about 100 KB (demo shapes plus texture)."""
    import numpy as np
    from PIL import Image

    from data.demo import render_demo_image

    root = Path(tempfile.gettempdir()) / f"sn_bench_synthetic_v2_{classes}x{count_per_class}"
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(0)
    for split, count in (("train", count_per_class), ("val", count_per_class)):
        for label in range(classes):
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = np.asarray(render_demo_image(label, 128, i * 97 + label)
                                 .resize((500, 375))).astype(np.int16)
                img = img + rng.integers(-12, 13, img.shape)
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(
                    folder / f"{i:05d}.JPEG", quality=90)
    (root / "done").touch()
    return root


def _endless(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        epoch += 1
        yield from loader


def measure(cfg: DataConfig, split: str, args, device: torch.device) -> dict:
    """Images/s over ``repeats`` consecutive windows of ``batches`` batches (epoch
    boundaries included, as in training), after ``warmup`` untimed batches."""
    loader = build_loader(cfg, split, args.batch_size, device=device, seed=0)
    if len(loader) == 0:
        raise SystemExit(f"{split}: no complete batch of {args.batch_size}")
    stream = _endless(loader)
    for _ in range(args.warmup):
        next(stream)
    rates = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, count = time.perf_counter(), 0
        for _ in range(args.batches):
            count += len(next(stream)[1])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(count / (time.perf_counter() - start))
    stream.close()
    loader.close()
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    demo = args.root is None and not args.synthetic
    root = synthetic_root() if args.synthetic else (args.root or ensure_demo_dataset())
    sizes = (64, 72, 64) if demo else (224, 256, 224)
    image_size = args.image_size or sizes[0]
    val_resize, val_crop = args.val_resize or sizes[1], args.val_crop or sizes[2]
    cpus = os.cpu_count() or 1
    workers = [int(w) for w in args.workers.split(",")] if args.workers else \
        [w for w in (0, 1, 2, 4, 8, 16) if w <= cpus]
    backends = [b for b in args.backends.split(",")
                if b != "dali" or dali_import_error() is None]
    print(f"data: {root}  device: {device}  CPUs: {cpus}  batch: {args.batch_size}  "
          f"train crop {image_size}, val {val_resize}->{val_crop}")
    rows = []
    print(f"{'backend':<12} {'decode':<6} {'split':<6} {'workers':>7} {'img/s':>9}  range")
    for backend in backends:
        for split in args.splits.split(","):
            for w in workers:
                if backend == "dali" and w == 0 and 1 in workers:
                    continue  # DALI runs at least one thread: the same as 1
                cfg = DataConfig(root=str(root), backend=backend, workers=w,
                                 image_size=image_size, val_resize=val_resize,
                                 val_crop=val_crop)
                result = measure(cfg, split, args, device)
                decode = "gpu" if backend == "dali" and device.type == "cuda" else "cpu"
                rows.append(dict(backend=backend, decode=decode, split=split, workers=w,
                                 **result))
                print(f"{backend:<12} {decode:<6} {split:<6} {w:>7} {result['median']:>9.0f}  "
                      f"{result['min']:.0f}-{result['max']:.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
