#!/usr/bin/env python
"""Turn a soft-ratio SN checkpoint into a hard-ratio one, and write the config to finetune it.

    python tools/sparsify.py --checkpoint runs/resnet50_sn_8x32/checkpoint_e30.pth \\
        --out runs/resnet50_sn_8x32/hard_e30.pth --config-out configs/hard_e30.yaml

Paper Sec. 4.1.4 and Table 3 ("finetune ... by replacing soft ratios with
hard ratios"): every SN layer keeps only the normalizer its ratios weigh most,
separately for the mean and the variance. The argmax is written into the ratio
logits as ``margin * one_hot`` (default margin 10: even a softmax of these
logits is 0.9999 on the chosen normalizer, and the argmax cannot flip), SSN
layers get their "fixed" flags set, and the stored config says
``model.norm_kwargs.hard_ratios: true`` so every consumer rebuilds the
layers with hard ratios (one-hot of the argmax; the logits get no gradient).

--config-out writes a training config that finetunes the result for the rest
of the schedule: ``train.epochs`` = the epochs left after the checkpoint's
epoch (or --epochs), ``checkpoint.init`` = the new checkpoint, and the
schedule of the remaining epochs: for ``step``, base_lr times the decay
already applied and the milestones shifted (exact); for ``cosine``, a cosine
from the learning rate reached at that epoch down to ``min_lr`` over the
remaining epochs (the trainer's cosine always starts at its top, so this is
the closest it can run; the original tail is flatter at first); a warm-up not
yet finished continues from where it was. To finetune a finished run, give
--epochs N and --base-lr (the schedule's learning rate at its end is ~0).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import normalization  # noqa: E402
from engine.checkpoint import save_checkpoint  # noqa: E402
from engine.cli import run_cli  # noqa: E402
from engine.config import Config, resolve, strip_derived, to_dict  # noqa: E402
from engine.optim import lr_factor  # noqa: E402
from models.checkpoint import model_from_state  # noqa: E402
from tools.convert_checkpoint import (checkpoint_config, our_checkpoint,  # noqa: E402
                                      read_checkpoint)

__all__ = ["sparsify_model", "finetune_config", "main"]


@torch.no_grad()
def sparsify_model(model: nn.Module, margin: float = 10.0) -> Dict[str, Dict[str, str]]:
    """Hard ratios in every SN layer (in place); returns ``{layer: {"mean": .., "var": ..}}``."""
    if margin <= 0:
        raise ValueError(f"margin must be positive, got {margin}")
    choices = {}
    for name, layer in normalization.switch_layers(model):
        mean, var = layer.switch_ratios()
        picks = {}
        for stat, ratio, logits in (("mean", mean, layer.mean_weight),
                                    ("var", var, layer.var_weight)):
            k = int(torch.argmax(ratio))
            hot = torch.zeros_like(logits)
            hot[k] = margin
            logits.copy_(hot)
            picks[stat] = layer.normalizers[k]
        if isinstance(layer, normalization.SparseSwitchNorm2d):
            layer.mean_fixed.fill_(1)
            layer.var_fixed.fill_(1)
        layer.hard_ratios = True
        choices[name] = picks
    return choices


def _remaining_schedule(cfg: Config, epoch: float, epochs_left: int) -> dict:
    """Schedule and learning rate of a run that continues ``cfg`` (resolved) from ``epoch``."""
    s = cfg.schedule
    factor = lr_factor(cfg, int(round(epoch * 1000)), 1000)  # the lr factor at that epoch
    if epoch < s.warmup_epochs:  # the warm-up goes on linearly from where it was
        schedule = {"warmup_epochs": s.warmup_epochs - epoch, "warmup_factor": factor}
        base_lr = cfg.optim.base_lr
    else:
        schedule = {"warmup_epochs": 0.0, "warmup_factor": 0.0}
        base_lr = cfg.optim.base_lr * factor
    if s.name == "step":
        schedule["milestones"] = [m - epoch for m in s.milestones if m > epoch]
    return {"schedule": schedule, "optim": {"base_lr": base_lr},
            "train": {"epochs": int(epochs_left)}}


def finetune_config(cfg: Config, init: str, epoch: float, epochs: Optional[int] = None,
                    output_dir: Optional[str] = None, base_lr: Optional[float] = None,
                    ) -> Tuple[dict, int]:
    """The config dict that finetunes the hard-ratio checkpoint ``init`` (paper Table 3);
    ``base_lr`` replaces the learning rate the schedule reached at ``epoch``."""
    left = cfg.train.epochs - epoch if epochs is None else epochs
    if left < 1:
        raise ValueError(f"the checkpoint is at epoch {epoch:g} of a {cfg.train.epochs}-epoch "
                         "schedule: no epochs are left to finetune; pass --epochs N and "
                         "--base-lr")
    data = strip_derived(to_dict(cfg))
    for section, values in _remaining_schedule(cfg, epoch, int(round(left))).items():
        data[section].update(values)
    if base_lr is not None:
        data["optim"]["base_lr"] = float(base_lr)
    data["checkpoint"].update(init=os.path.abspath(init))
    data["output_dir"] = output_dir or f"{cfg.output_dir or 'runs/finetune'}_hard_e{epoch:g}"
    return data, int(round(left))


def _epoch_of(state: dict, override: Optional[float]) -> float:
    """The epochs the checkpoint has finished (ours: its 'epoch' entry)."""
    if override is not None:
        return float(override)
    epoch = state.get("epoch")
    if state.get("iter"):
        print(f"note: a mid-epoch checkpoint (epoch {epoch}, iteration {state['iter']}); "
              "finetuning counts from the start of that epoch", file=sys.stderr)
    return float(epoch) if isinstance(epoch, (int, float)) else 0.0


def _summary(choices: Dict[str, Dict[str, str]]) -> str:
    def count(stat):
        return " / ".join(f"{n.upper()} {sum(c[stat] == n for c in choices.values())}"
                          for n in ("in", "ln", "bn"))
    differ = sum(c["mean"] != c["var"] for c in choices.values())
    return (f"{len(choices)} SN layers; mean: {count('mean')}; variance: {count('var')}; "
            f"{differ}/{len(choices)} pick different normalizers for mean and variance")


def run(args) -> dict:
    state = read_checkpoint(args.checkpoint)
    model, kwargs = model_from_state(args.checkpoint, state)
    choices = sparsify_model(model, args.margin)
    if not choices:
        raise ValueError(f"{args.checkpoint}: the model has no SN layer to sparsify")
    kwargs["norm_kwargs"] = dict(kwargs.get("norm_kwargs") or {}, hard_ratios=True)
    cfg = checkpoint_config(args.checkpoint, state, kwargs, args.config, args.overrides)
    epoch = _epoch_of(state, args.from_epoch)
    out = our_checkpoint(cfg, model, hard_ratios=choices, source_epoch=epoch,
                         sparsified_from=os.path.basename(args.checkpoint))
    model_from_state(args.out, out)  # it rebuilds, with hard ratios, from its own config
    if args.config_out:  # before writing anything: it may find no epochs left
        data, left = finetune_config(resolve(cfg, 1), args.out, epoch, args.epochs,
                                     args.output_dir, args.base_lr)
    save_checkpoint(args.out, out)
    print(f"{args.checkpoint} -> {args.out}: {_summary(choices)}")
    if args.config_out:
        with open(args.config_out, "w") as f:
            f.write(f"# finetune {os.path.basename(args.out)} (hard ratios) for {left} epochs "
                    f"from epoch {epoch:g}; written by tools/sparsify.py\n")
            yaml.safe_dump(data, f, sort_keys=False, default_flow_style=False)
        print(f"finetuning config: {args.config_out} ({left} epochs, base_lr "
              f"{data['optim']['base_lr']:g}, output_dir {data['output_dir']})")
    return choices


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--checkpoint", required=True, help="soft-ratio checkpoint (ours or the "
                    "authors')")
    ap.add_argument("--out", required=True, help="hard-ratio checkpoint to write (our format)")
    ap.add_argument("--config-out", help="also write the finetuning config (YAML) here")
    ap.add_argument("--config", help="YAML config for the non-model sections (required to "
                    "finetune an authors' file)")
    ap.add_argument("--from-epoch", type=float, default=None,
                    help="epoch the checkpoint was taken at (default: its 'epoch' entry)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="epochs to finetune (default: those left in the schedule)")
    ap.add_argument("--base-lr", type=float, default=None,
                    help="base_lr of the finetuning run (default: the schedule's at that epoch; "
                    "give one to finetune a finished run)")
    ap.add_argument("--output-dir", help="output_dir of the finetuning run")
    ap.add_argument("--margin", type=float, default=10.0,
                    help="value written into the chosen logit (the others are 0)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
