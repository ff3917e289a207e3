#!/usr/bin/env python
"""Train a ResNet with any normalizer, in the paper's batch settings.

    python train.py --config configs/demo/resnet_sn.yaml                 # one process
    torchrun --nproc_per_node=8 train.py --config configs/imagenet/table2/resnet50_sn_8x2.yaml
    python train.py --config C train.epochs=1 data.root=/data/imagenet  # dotted overrides
    python train.py --config C --print-config                           # resolved config
    python train.py --help-config                                       # every key, with help
"""
from __future__ import annotations

import argparse
import os
import sys

from engine.config import ConfigError, describe_schema, format_config, load_config, resolve


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--config", help="YAML config file (with _base_ inheritance)")
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved config (derived values included) and exit")
    ap.add_argument("--help-config", action="store_true", help="list every config key and exit")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides, e.g. train.epochs=1 model.norm=gn")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print(describe_schema())
        return 0
    if not args.config:
        print("error: --config is required (see configs/)", file=sys.stderr)
        return 2
    try:
        cfg = resolve(load_config(args.config, args.overrides),
                      int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(format_config(cfg), end="")
        return 0
    from engine.cli import run_cli
    from engine.trainer import NonFiniteLossError
    return run_cli(lambda: train(cfg), extra_errors=(NonFiniteLossError,))


def train(cfg) -> int:
    """Resume, refuse or start the run in ``cfg.output_dir`` (engine.runfolder), then train."""
    from engine.distributed import init_distributed
    from engine.runfolder import inspect_run_folder
    from engine.trainer import Trainer
    folder = inspect_run_folder(cfg)
    if folder.complete:  # nothing to do, and nothing in output_dir is touched
        if os.environ.get("RANK", "0") == "0":
            print(folder.complete, flush=True)
        return 0
    Trainer(cfg, init_distributed(cfg.train.device), folder).fit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
