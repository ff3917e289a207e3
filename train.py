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
    from engine.distributed import init_distributed
    from engine.trainer import NonFiniteLossError, Trainer
    return run_cli(lambda: Trainer(cfg, init_distributed(cfg.train.device)).fit(),
                   extra_errors=(NonFiniteLossError,))


if __name__ == "__main__":
    sys.exit(main())
