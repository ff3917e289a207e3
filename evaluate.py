#!/usr/bin/env python
"""Single-crop top-1/top-5 of a checkpoint on the validation set (ours or the authors' model zoo).

    python evaluate.py --checkpoint runs/resnet_sn/checkpoint_best.pth
    python evaluate.py --config configs/imagenet/zoo/resnet50_v1_sn_8x32_cosine.yaml \\
        --checkpoint ResNet50v1+SN(8,32)-77.49.pth data.root=/data/imagenet
    torchrun --nproc_per_node=8 evaluate.py --checkpoint K --batch-average 50000 --json out.json

The model is rebuilt from the checkpoint (our config inside it, or the
authors' 'model' entry); --config supplies the data section (and the batch
setting for --batch-average), overriding the one stored in the checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from engine.checkpoint import load_checkpoint
from engine.config import ConfigError, config_from_dict, load_config, resolve, strip_derived


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--checkpoint", required=True, help="checkpoint file (.pth)")
    ap.add_argument("--config", help="YAML config (data and batch sections); default: the "
                    "checkpoint's own")
    ap.add_argument("--batch-average", type=int, default=0, metavar="N",
                    help="first replace the BN-branch statistics by their average over about N "
                    "training samples (paper Sec. 4.1.3), in minibatches of the batch setting")
    ap.add_argument("--batch-size", type=int, default=None, help="per-process batch for eval")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides, e.g. data.root=/data/imagenet data.val_resize=256")
    return ap.parse_args(argv)


def _config(args, state):
    if args.config:
        return load_config(args.config, args.overrides)
    if isinstance(state.get("config"), dict):
        return config_from_dict(strip_derived(state["config"]), args.overrides,
                                f"{args.checkpoint} (its stored config)")
    raise ConfigError(f"{args.checkpoint} holds no config: pass --config (e.g. a file in "
                      "configs/imagenet/zoo/) for the data and batch settings")


def run(args) -> dict:
    from data import build_loader, ensure_demo_dataset
    from engine.distributed import init_distributed
    from engine.host_memory import keep_freed_memory
    from engine.trainer import evaluate
    from models.checkpoint import model_from_state
    import normalization

    state = load_checkpoint(args.checkpoint)
    cfg = resolve(_config(args, state), int(os.environ.get("WORLD_SIZE", "1")))
    info = init_distributed(cfg.train.device)
    keep_freed_memory(info.device)
    if cfg.data.dataset == "demo" and cfg.data.root is None:
        cfg.data.root = str(ensure_demo_dataset(None, cfg.data.demo_size))
    model = model_from_state(args.checkpoint, state)[0].to(info.device)
    common = dict(rank=info.rank, world_size=info.world_size, seed=cfg.train.seed,
                  device=info.device)
    val = build_loader(cfg.data, "val", args.batch_size or cfg.batch.per_process, **common)
    if args.batch_average:
        normalization.set_ghost_batches(model, cfg.batch.per_gpu)  # per virtual GPU
        train = build_loader(cfg.data, "train", cfg.batch.per_process, **common)
        train.set_epoch(0)
        n = -(-args.batch_average // cfg.batch.total)
        normalization.update_batch_average(model, (x for x, _ in train), n)
    val.set_epoch(0)
    result = evaluate(model, val, info.device, cfg.train.amp, cfg.train.channels_last)
    result.update(checkpoint=args.checkpoint, batch_average_samples=args.batch_average,
                  val_resize=cfg.data.val_resize, val_crop=cfg.data.val_crop)
    if info.main:
        print(f"{args.checkpoint}: top-1 {result['val_top1']:.2f}%  top-5 "
              f"{result['val_top5']:.2f}%  loss {result['val_loss']:.4f}  "
              f"({result['val_count']} images, {val.reason})", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    return result


def main(argv=None) -> int:
    from engine.cli import run_cli
    args = parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
