"""Checkpoint files: written atomically with a checksum, read without executing anything.

A checkpoint of ours is a dict of tensors and plain values::

    {"format": "switchable-norm/1", "config": {...resolved config...},
     "config_fingerprint": hex, "model": state_dict, "optimizer": ..., "scheduler": ...,
     "scaler": ..., "epoch": e, "iter": i, "global_step": s, "best_top1": b,
     "best_epoch": k, "meters": [per-rank running sums], "rng": [per-rank torch RNG
     states], "metrics": {...}, "checksum": "sha256:..."}

``epoch``/``iter`` say where training continues: epoch ``e`` after its first
``i`` iterations.  ``checksum`` is a SHA-256 over every value (tensor bytes,
dtypes, shapes, keys, plain values) in order; ``load_checkpoint`` recomputes it,
so a flipped bit anywhere is an error rather than a silently different model.
Files without one (the authors', older ones) load unchecked.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import warnings
from typing import Any, Dict, List

import torch

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "CheckpointError", "checksum",
           "remove_stale_temporaries"]

FORMAT = "switchable-norm/1"
_TMP = re.compile(r"^\.checkpoint_.*\.tmp(\d+)$")


class CheckpointError(ValueError):
    """A file that is not a checkpoint, is damaged, cannot be written, or whose tensors do
    not fit the model."""


def _digest(obj: Any, h) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, dict):
        h.update(b"D%d" % len(obj))
        for key, value in obj.items():
            _digest(key, h)
            _digest(value, h)
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d" % len(obj))
        for value in obj:
            _digest(value, h)
    else:  # str, int, float, bool, None: repr round-trips them exactly
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def checksum(state: Dict[str, Any]) -> str:
    """SHA-256 of everything in ``state`` but its own ``checksum`` entry."""
    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != "checksum"}, h)
    return "sha256:" + h.hexdigest()


def save_checkpoint(path: str, state: Dict[str, Any]):
    """torch.save (with a checksum) to a temporary file in the same folder, fsync, rename
    over ``path``. A failed write (e.g. a full disk) is a one-line ``CheckpointError``; the
    previous file at ``path`` is left as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    state = {**state, "checksum": checksum(state)}
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(folder)
    except (OSError, RuntimeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else _first_line(e)
        raise CheckpointError(f"{path}: cannot write the checkpoint ({reason}); the previous "
                              f"{os.path.basename(path)}, if any, is unchanged") from None
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def _fsync_folder(folder: str):
    """Make the rename itself durable (the folder's entry)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """``torch.load(weights_only=True)`` with one-line errors naming the file; the checksum
    is verified when the file has one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (the file is empty)")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol: the error says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a damaged or foreign file fails in many ways inside the unpickler
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_unreadable(e)})"
                              ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint (a {type(obj).__name__}, not a dict)")
    stored = obj.get("checksum")
    if isinstance(stored, str) and stored.startswith("sha256:") and checksum(obj) != stored:
        others = [p for p in _run_checkpoints(path) if os.path.isfile(p)
                  and not os.path.samefile(p, path)]
        advice = f"; use another copy, or {others[0]}" if others else "; use another copy"
        raise CheckpointError(f"{path}: checksum mismatch: the file is damaged (changed after "
                              f"it was written){advice}")
    return obj


def _run_checkpoints(path: str) -> List[str]:
    """The checkpoints a run folder holds beside ``path``, best first."""
    folder = os.path.dirname(os.path.abspath(path))
    return [os.path.join(folder, "checkpoint_best.pth"),
            os.path.join(folder, "checkpoint_last.pth")]


def _unreadable(e: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, without torch's advice to load it
    unrestricted (which runs whatever the file holds) or to allow-list its classes: the
    file's own problem only."""
    text, kind = str(e), type(e).__name__
    if "WeightsUnpickler error:" in text:  # torch's wrapper around the unpickler's reason
        text = text.split("WeightsUnpickler error:", 1)[1]
        found = re.match(r"\s*Unsupported global: GLOBAL (\S+)", text)
        if found:
            return (f"it holds a pickled Python object, {found.group(1)}, and checkpoints are "
                    "read as tensors and plain values only")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0].split("  (Could this error message be improved?")[0] if lines else ""
    return kind if not line or "weights_only" in line else f"{kind}: {line}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str) -> List[str]:
    """Remove ``.checkpoint_*.tmp<PID>`` files left by writers killed mid-write (their PID
    is gone or is this process's); return their paths."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(folder), ".checkpoint_*.tmp*")):
        match = _TMP.match(os.path.basename(path))
        if match and (int(match.group(1)) == os.getpid() or not _alive(int(match.group(1)))):
            try:
                os.remove(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed
