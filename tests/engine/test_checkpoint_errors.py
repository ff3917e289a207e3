"""A file that is not a checkpoint, or a damaged one: one line that names the file and
its problem, never torch's advice to retry with ``weights_only=False`` (which would run
whatever an untrusted file holds), and a checksum error that points to the run's other
checkpoint only when there is one and it is not the damaged file.
"""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MARK = torch.arange(64, dtype=torch.float32) + 0.25  # bytes easy to find in the file


def _not_checkpoints(folder):
    """Real files a user may pass by mistake."""
    torch.save(nn.Linear(3, 2), folder / "module.pth")  # a whole pickled model
    with open(folder / "numpy.pkl", "wb") as f:
        pickle.dump({"w": np.ones(3)}, f)  # plain pickle, protocol 5
    (folder / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / "empty.pth").write_bytes(b"")
    return {name: str(folder / name)
            for name in ("module.pth", "numpy.pkl", "random.bin", "empty.pth")}


def test_non_checkpoints_are_one_line_without_weights_only_advice(tmp_path, recwarn):
    expected = {
        "module.pth": "it holds a pickled Python object, torch.nn.modules.linear.Linear, and "
                      "checkpoints are read as tensors and plain values only",
        "numpy.pkl": "UnpicklingError: ",
        "random.bin": "",
        "empty.pth": "the file is empty",
    }
    for name, path in _not_checkpoints(tmp_path).items():
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        message = str(e.value)
        assert message.startswith(f"{path}: not a readable PyTorch checkpoint (")
        assert expected[name] in message and "\n" not in message
        assert "weights_only" not in message and "safe_globals" not in message, message
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


def test_evaluate_on_a_pickled_model_says_so_in_one_line(tmp_path):
    """evaluate.py as the issue ran it, on a whole model saved with torch.save (the case
    where torch advised weights_only=False); tests/engine/test_train.py feeds it bytes."""
    path = _not_checkpoints(tmp_path)["module.pth"]
    proc = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", path], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr == (f"error: {path}: not a readable PyTorch checkpoint (it holds a "
                           "pickled Python object, torch.nn.modules.linear.Linear, and "
                           "checkpoints are read as tensors and plain values only)\n")


def test_no_project_message_recommends_weights_only_false():
    for folder, _, names in os.walk(ROOT):
        parts = os.path.relpath(folder, ROOT).split(os.sep)
        if parts[0] in {".git", ".venv", "tests", "build", "runs"}:
            continue
        for name in names:
            if name.endswith(".py"):
                text = open(os.path.join(folder, name), encoding="utf-8").read()
                assert "weights_only=False" not in text, os.path.join(folder, name)


def _damage(path):
    data = bytearray(open(path, "rb").read())
    at = data.find(MARK.numpy().tobytes())
    assert at > 0
    data[at + 7] ^= 0x10
    open(path, "wb").write(data)


def _checksum_error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    message = str(e.value)
    assert message.startswith(f"{path}: checksum mismatch: the file is damaged") and \
        "\n" not in message
    return message


def test_checksum_error_advises_the_other_checkpoint_only_when_it_helps(tmp_path):
    last, best = tmp_path / "checkpoint_last.pth", tmp_path / "checkpoint_best.pth"
    save_checkpoint(str(last), {"model": {"w": MARK}, "epoch": 2})
    _damage(last)  # no checkpoint_best.pth beside it
    assert _checksum_error(str(last)).endswith("; use another copy")

    save_checkpoint(str(best), {"model": {"w": MARK}, "epoch": 1})
    assert _checksum_error(str(last)).endswith(f"; use another copy, or {best}")

    save_checkpoint(str(last), {"model": {"w": MARK}, "epoch": 2})
    _damage(best)  # the damaged file is checkpoint_best.pth itself
    message = _checksum_error(str(best))
    assert message.endswith(f"; use another copy, or {last}")

    os.remove(last)
    assert _checksum_error(str(best)).endswith("; use another copy")
