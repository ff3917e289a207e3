"""A resumed epoch's time and images/s count all the work of that epoch, and the resume
line counts epochs from 1 like the rest of the console.

The real trainer in this process: a real SIGTERM (sent once the periodic checkpoint is on
disk) stops the first run in mid-epoch; the same config resumes it. With ``print_freq``
above the epoch's length no progress line comes before the checkpoints, which is where
the seconds of the samples saved since the last progress line used to be lost.
"""
import json
import os
import signal
import threading
import time

import pytest
import torch

from engine.config import load_config, resolve
from engine.distributed import DistInfo
from engine.trainer import Trainer

from . import write_tiny_run_config

ITERS, BATCH = 12, 4  # 48 training images in batches of 2 virtual GPUs x 2 samples


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_run_config(
        tmp_path_factory.mktemp("resume_timing"), size=28, num_classes=4, train_per_class=12,
        val_per_class=1, batch={"per_gpu": 2}, optim={"base_lr": 0.1},
        train={"print_freq": 100}, checkpoint={"every_iters": 2}, log={"tensorboard": False})


@pytest.fixture
def one_thread():
    """Two threads on a shared 2-core machine are ten times slower here than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trainer(tiny, out):
    return Trainer(resolve(load_config(tiny, [f"output_dir={out}"]), 1), DistInfo())


def _sigterm_after_first_checkpoint(trainer, path, done):
    """SIGTERM to this process once ``path`` exists, while the trainer's handler is set."""
    while not done.is_set():
        if os.path.exists(path) and signal.getsignal(signal.SIGTERM) == trainer._on_sigterm:
            os.kill(os.getpid(), signal.SIGTERM)
            return
        time.sleep(0.005)


def test_resumed_epoch_counts_the_seconds_of_every_sample(tiny, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    trainer = _trainer(tiny, out)
    done = threading.Event()
    watcher = threading.Thread(target=_sigterm_after_first_checkpoint,
                               args=(trainer, out / "checkpoint_last.pth", done))
    watcher.start()
    start = time.time()
    try:
        trainer.fit()
    finally:
        wall = time.time() - start
        done.set()
        watcher.join()
    state = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert state["epoch"] == 0 and 2 <= state["iter"] < ITERS  # stopped in mid-epoch
    _, _, samples, seconds, _ = state["meters"][0]
    assert samples == BATCH * state["iter"]
    # the stored seconds are those of the stored samples: the whole stretch trained until
    # the checkpoint was written (the old code stored 0 here: no progress line yet)
    until_saved = os.path.getmtime(out / "checkpoint_last.pth") - start
    assert 0.5 * until_saved < seconds <= wall

    capsys.readouterr()
    _trainer(tiny, out).fit()
    lines = capsys.readouterr().out.splitlines()
    resumed = next(line for line in lines if line.startswith("resumed from"))
    assert resumed == (f"resumed from {out / 'checkpoint_last.pth'}: epoch 1/1 after "
                       f"iteration {state['iter']}/{ITERS}")  # counted from 1, as below
    assert any(line.startswith(f"epoch 1/1 iter {ITERS}/{ITERS} ") for line in lines)
    (row,) = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert row["epoch"] == 1 and row["seconds"] > seconds  # both parts of the epoch
    assert row["images_per_sec"] == pytest.approx(BATCH * ITERS / row["seconds"])
