#!/usr/bin/env python
"""Batch-average inference statistics (paper Sec. 4.1.3, "Inference") written to a new checkpoint.

    python tools/batch_average.py --checkpoint runs/resnet_sn/checkpoint_best.pth \\
        --samples 50000 --out runs/resnet_sn/checkpoint_best_ba.pth
    torchrun --nproc_per_node=8 tools/batch_average.py --config configs/imagenet/zoo/X.yaml \\
        --checkpoint "ResNet50v1+SN(8,32)-77.49.pth" --samples 50000 --out sn_ba.pth

The network is frozen (eval mode, no parameter changes; dropout off) and only
its batch-statistics layers run in training mode: it is fed about --samples
training images in minibatches of the training batch setting, each virtual
GPU's chunk of ``batch.per_gpu`` samples (ghost batch) counting as one
minibatch, as in training. Each layer's BN-branch statistics are replaced by
the average over all chunks (mean of the chunk means; variance
``E[var + mean^2] - mean^2`` over the chunks). Images go through the training
transform (random crops, flips), or with --transform val the validation one.
Under torchrun every rank feeds its own shard and the sums are all-reduced;
only rank 0 writes. The output is our checkpoint (config included), so
``evaluate.py --checkpoint OUT`` evaluates it; the stored config is the
checkpoint's own, or --config's with the checkpoint's model section.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Iterator

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import normalization  # noqa: E402
from data import build_loader, ensure_demo_dataset  # noqa: E402
from engine.checkpoint import save_checkpoint  # noqa: E402
from engine.cli import run_cli  # noqa: E402
from engine.config import Config, resolve  # noqa: E402
from models.checkpoint import model_from_state  # noqa: E402
from tools.convert_checkpoint import (checkpoint_config, our_checkpoint,  # noqa: E402
                                      read_checkpoint)

__all__ = ["train_loader", "batches", "collect", "main"]


def _eval_transform_loader(cfg: Config, batch: int, **common):
    """Training images through the validation transform, shuffled as in training."""
    from data.datasets import ImageDataset
    from data.loader import TorchvisionLoader, build_image_list, build_preset
    from data.sampler import ShardedBatchSampler
    images = build_image_list(cfg.data, "train")
    sampler = ShardedBatchSampler(len(images), batch, rank=common["rank"],
                                  world_size=common["world_size"], shuffle=True,
                                  even_shards=True, drop_last=True, seed=common["seed"])
    dataset = ImageDataset(images, build_preset(cfg.data, "val").prepare, "skip")
    return TorchvisionLoader(dataset, sampler, workers=cfg.data.workers, pin_memory=False,
                             prefetch_factor=cfg.data.prefetch_factor, device=common["device"],
                             mean=cfg.data.mean, std=cfg.data.std,
                             on_bad_image=cfg.data.on_bad_image,
                             reason="torchvision backend (validation transform)")


def train_loader(cfg: Config, transform: str, rank: int, world_size: int, device):
    """The training split in per-process batches, with the ``transform`` of "train" or "val"."""
    common = dict(rank=rank, world_size=world_size, seed=cfg.train.seed, device=device)
    if transform == "val":
        return _eval_transform_loader(cfg, cfg.batch.per_process, **common)
    return build_loader(cfg.data, "train", cfg.batch.per_process, **common)


def batches(loader, num_batches: int, first_epoch: int = 0) -> Iterator[torch.Tensor]:
    """``num_batches`` input batches, going through as many epochs as needed."""
    if len(loader) == 0:
        raise ValueError(f"the training set ({loader.dataset_size} images) has fewer than one "
                         "batch per process")
    done, epoch = 0, first_epoch
    while done < num_batches:
        loader.set_epoch(epoch)
        for images, _ in loader:
            yield images
            done += 1
            if done == num_batches:
                return
        epoch += 1


def collect(model: torch.nn.Module, inputs, num_batches: int, progress=None) -> float:
    """Replace the BN-branch statistics by their batch average over ``inputs`` (summed
    over ranks when distributed); returns the samples averaged per layer."""
    if not normalization.batch_stat_layers(model):
        raise ValueError("the model has no layer with BN-branch statistics (GN, IN, LN, or "
                         "SN without BN): nothing to average")

    def counted():
        for x in inputs:
            yield x
            if progress is not None:
                progress(x.shape[0])
    return normalization.update_batch_average(model, counted(), num_batches)


def _progress_bar(enabled: bool, total: int, world_size: int):
    """A tqdm bar in images (all ranks), its rate is images/s; None when disabled."""
    if not enabled:
        return None, None
    from tqdm import tqdm
    bar = tqdm(total=total, unit="img", unit_scale=True, desc="batch average", file=sys.stdout,
               dynamic_ncols=True, mininterval=1.0)
    return bar, (lambda n: bar.update(n * world_size))


def run(args) -> dict:
    from engine.distributed import init_distributed
    state = read_checkpoint(args.checkpoint)
    model, kwargs = model_from_state(args.checkpoint, state)
    cfg = resolve(checkpoint_config(args.checkpoint, state, kwargs, args.config, args.overrides),
                  int(os.environ.get("WORLD_SIZE", "1")))
    info = init_distributed(cfg.train.device)
    if cfg.data.dataset == "demo" and cfg.data.root is None:
        cfg.data.root = str(ensure_demo_dataset(None, cfg.data.demo_size))
    model = model.to(info.device)
    normalization.set_ghost_batches(model, cfg.batch.per_gpu)
    loader = train_loader(cfg, args.transform, info.rank, info.world_size, info.device)
    num_batches = max(1, math.ceil(args.samples / cfg.batch.total))
    bar, tick = _progress_bar(info.main and not args.quiet, num_batches * cfg.batch.total,
                              info.world_size)
    start = time.perf_counter()
    try:
        n = collect(model, batches(loader, num_batches, args.epoch), num_batches, tick)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    summary = {"samples": int(n), "batches": num_batches, "batch": [cfg.batch.gpus,
               cfg.batch.per_gpu], "transform": args.transform, "seconds": seconds}
    if info.main:
        out = our_checkpoint(cfg, model, batch_average=dict(summary, source=args.checkpoint),
                             epoch=state.get("epoch"))
        save_checkpoint(args.out, out)
        print(f"{args.checkpoint} -> {args.out}: BN statistics of "
              f"{len(normalization.batch_stat_layers(model))} layers averaged over {int(n)} "
              f"samples ({num_batches} minibatches of (gpus, per_gpu) = ({cfg.batch.gpus}, "
              f"{cfg.batch.per_gpu}), {args.transform} transform, "
              f"{n / max(seconds, 1e-9):.1f} images/s)", flush=True)
    return summary


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--checkpoint", required=True, help="checkpoint (ours or the authors')")
    ap.add_argument("--out", required=True, help="checkpoint to write (our format)")
    ap.add_argument("--config", help="YAML config (data, batch setting); default: the "
                    "checkpoint's own (required for the authors' files)")
    ap.add_argument("--samples", type=int, default=50000,
                    help="training samples to average over, in all (default 50000, the paper's)")
    ap.add_argument("--transform", choices=("train", "val"), default="train",
                    help="transform of the training images (default: the training one)")
    ap.add_argument("--epoch", type=int, default=0,
                    help="epoch of the sampler order to start from (seeds the order)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides, e.g. data.root=/data/imagenet batch.per_gpu=32")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
