"""A run folder is one run: what ``output_dir`` holds decides whether a start resumes it,
refuses, or has nothing to do.

``inspect_run_folder(cfg)`` reads ``output_dir/checkpoint_last.pth`` once (the trainer
resumes from the same dict) and compares the config that produced it with ``cfg``:

* no checkpoint: a new run;
* the same config except ``RESUMABLE_KEYS`` (engine/config.py; e.g. ``train.epochs``
  to extend the run): resume; when the checkpoint has already reached
  ``train.epochs`` (or ``train.max_iters``) the run is complete, and ``train.py`` says
  so and exits 0 without touching anything;
* any other difference: a one-line ``ConfigError`` naming the keys and the two ways
  out (``output_dir=...`` for a new run, ``train.resume=force`` to continue anyway).

Writing into the folder: ``check_free_space`` refuses a start on a disk that cannot hold
one checkpoint, and ``write_text``/``naming`` turn a failed write (a full disk or quota
gives ``[Errno 28]`` or ``[Errno 122]`` without a path) into one line naming the file.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

from .checkpoint import CheckpointError, load_checkpoint
from .config import Config, ConfigError, config_differences, config_fingerprint

__all__ = ["RunFolder", "inspect_run_folder", "check_free_space", "write_text", "naming"]


@dataclass
class RunFolder:
    """What a start does with ``output_dir``."""

    path: str                               # output_dir/checkpoint_last.pth
    state: Optional[dict] = None            # the checkpoint to resume from; None: a new run
    complete: Optional[str] = None          # "run already complete: ...": nothing to do
    forced: List[Tuple[str, Any, Any]] = field(default_factory=list)  # train.resume=force


def inspect_run_folder(cfg: Config) -> RunFolder:
    path = os.path.join(cfg.output_dir, "checkpoint_last.pth")
    if not os.path.isfile(path):
        return RunFolder(path)
    if not cfg.checkpoint.resume:
        raise ConfigError(f"{cfg.output_dir} already holds a run and checkpoint.resume is "
                          "false: pass output_dir=... for a new run")
    state = load_checkpoint(path)
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path}: not a training checkpoint of this framework (it holds "
                              "no config): pass output_dir=... for a new run")
    diffs = [] if state.get("config_fingerprint") == config_fingerprint(cfg) else \
        config_differences(state["config"], cfg)
    if diffs and cfg.train.resume != "force":
        raise ConfigError(_refusal(path, diffs))
    return RunFolder(path, state, _complete(cfg, state), diffs)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _refusal(path: str, diffs: List[Tuple[str, Any, Any]]) -> str:
    shown = ", ".join(f"{key} {_short(old)} -> {_short(new)}" for key, old, new in diffs[:6])
    more = f" and {len(diffs) - 6} more" if len(diffs) > 6 else ""
    return (f"{path} was trained with another config ({shown}{more}): pass output_dir=... to "
            "start a new run, or train.resume=force to continue this one with the new config")


def _complete(cfg: Config, state: dict) -> Optional[str]:
    """The 'run already complete' line when the checkpoint has reached the end of ``cfg``."""
    t = cfg.train
    epoch, step = int(state.get("epoch", 0)), int(state.get("global_step", 0))
    if epoch < t.epochs and (t.max_iters is None or step < t.max_iters):
        return None
    best_epoch = state.get("best_epoch") or _best_epoch(cfg.output_dir)
    return (f"run already complete: best top-1 {float(state.get('best_top1', 0.0)):.2f}% at "
            f"epoch {best_epoch if best_epoch else '?'} ({epoch} epoch{'s' * (epoch != 1)} in "
            f"{cfg.output_dir}; "
            f"train.epochs above {epoch} extends it, output_dir=... starts a new run)")


def _best_epoch(out: str) -> Optional[int]:
    """For checkpoints written before ``best_epoch`` was stored: from metrics.jsonl."""
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return None
    rows = [r for r in rows if "val_top1" in r]
    return max(rows, key=lambda r: r["val_top1"])["epoch"] + 1 if rows else None


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def check_free_space(folder: str, need: int):
    """A one-line ``OSError`` naming ``folder`` when its file system has fewer than ``need``
    bytes free (the least one checkpoint takes), before anything is written. File systems
    that report no size (some network mounts) are not checked."""
    fs = os.statvfs(folder)
    free = fs.f_bavail * fs.f_frsize
    if fs.f_blocks and free < need:
        raise OSError(f"{folder}: no room for a checkpoint ({_size(free)} free on its disk, one "
                      f"checkpoint of this model takes at least {_size(need)}): free some "
                      "space, or pass output_dir=... on another disk")


@contextmanager
def naming(path: str, what: str = ""):
    """Re-raise an ``OSError`` of the block as one line naming ``path`` (and ``what``)."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e).strip().split("\n")[0] or type(e).__name__
        raise OSError(f"{path}: cannot write{' ' + what if what else ''} ({reason})") from None


def write_text(path: str, text: str, mode: str = "w"):
    """Write (``mode="a"``: append) ``text`` to ``path``; a failure names the file."""
    with naming(path):
        with open(path, mode) as f:
            f.write(text)
