"""A run folder is one run, and the faults around it lose nothing: resume, refuse or report
a finished run; checksummed, atomic checkpoints; one-line errors. In one process, on a
real tiny run written by the real trainer."""
import json
import os
import shutil

import pytest
import torch
import yaml

from data import BadImageError
from engine.checkpoint import (CheckpointError, load_checkpoint, remove_stale_temporaries,
                               save_checkpoint)
from engine.config import (RESUMABLE_KEYS, ConfigError, config_fingerprint, load_config,
                           resolve)
from engine.distributed import DistInfo, thread_oversubscription
from engine.runfolder import inspect_run_folder
from engine.trainer import Trainer

from . import write_tiny_run_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-class generated dataset (16 train / 4 val images of 32 px) and its config file."""
    return write_tiny_run_config(
        tmp_path_factory.mktemp("runfolder"), size=32, num_classes=2, train_per_class=8,
        val_per_class=2, batch={"per_gpu": 4}, optim={"base_lr": 0.4},
        train={"print_freq": 100}, log={"tensorboard": False})


def _cfg(tiny, out, *overrides):
    return resolve(load_config(tiny, [f"output_dir={out}", *overrides]), 1)


def _train(tiny, out, *overrides):
    return Trainer(_cfg(tiny, out, *overrides), DistInfo()).fit()


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("finished") / "run")
    _train(tiny, out)
    return out


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished one-epoch run."""
    return shutil.copytree(finished, tmp_path / "run")


def _snapshot(folder):
    return {name: (os.path.getmtime(os.path.join(folder, name)),
                   open(os.path.join(folder, name), "rb").read()) for name in os.listdir(folder)}


def test_checkpoint_holds_fingerprint_checksum_and_best_epoch(tiny, run):
    state = load_checkpoint(os.path.join(run, "checkpoint_last.pth"))
    assert state["config_fingerprint"] == config_fingerprint(_cfg(tiny, run))
    assert state["checksum"].startswith("sha256:") and state["best_epoch"] == 1


def test_same_config_finished_run_is_complete(tiny, run):
    folder = inspect_run_folder(_cfg(tiny, run, "data.workers=2", "train.print_freq=1"))
    assert folder.complete.startswith("run already complete: best top-1 ")
    assert "at epoch 1 " in folder.complete
    shorter = inspect_run_folder(_cfg(tiny, run, "train.epochs=0"))  # nothing left either
    assert shorter.complete


def test_changed_config_is_refused_naming_the_keys(tiny, run):
    before = _snapshot(run)
    with pytest.raises(ConfigError) as e:
        inspect_run_folder(_cfg(tiny, run, "model.norm=gn", "optim.base_lr=0.8",
                                "train.epochs=5"))
    message = str(e.value)
    assert "model.norm 'sn' -> 'gn'" in message and "optim.base_lr 0.4 -> 0.8" in message
    assert "train.epochs" not in message and "optim.lr" not in message  # allowed, derived
    assert "output_dir=" in message and "train.resume=force" in message
    assert "\n" not in message
    assert _snapshot(run) == before
    with pytest.raises(ConfigError, match="checkpoint.resume is false"):
        inspect_run_folder(_cfg(tiny, run, "checkpoint.resume=false"))


def test_resumable_keys_extend_the_run(tiny, run, tmp_path):
    moved = shutil.move(run, tmp_path / "moved")  # output_dir is resumable too
    _train(tiny, moved, "train.epochs=2", "data.workers=1", "train.print_freq=1")
    rows = [json.loads(line) for line in open(os.path.join(moved, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert yaml.safe_load(open(os.path.join(moved, "config.yaml")))["train"]["epochs"] == 2
    assert "train.epochs" in RESUMABLE_KEYS and "model.norm" not in RESUMABLE_KEYS


def test_force_continues_with_the_new_hyperparameters(tiny, run):
    cfg = _cfg(tiny, run, "optim.base_lr=0.8", "optim.momentum=0.5", "train.epochs=2",
               "train.resume=force")
    trainer = Trainer(cfg, DistInfo())
    groups = trainer.optimizer.param_groups
    assert all(g["momentum"] == 0.5 for g in groups)
    assert trainer.scheduler.base_lrs[0] == pytest.approx(0.8 * 8 / 256)
    assert groups[0]["lr"] == pytest.approx(trainer.scheduler.base_lrs[0] *
                                            trainer.scheduler.lr_lambdas[0](2))
    kept = yaml.safe_load(open(os.path.join(run, "config.before_step2.yaml")))
    assert kept["optim"]["base_lr"] == 0.4
    assert yaml.safe_load(open(os.path.join(run, "config.yaml")))["optim"]["base_lr"] == 0.8


def test_foreign_checkpoint_is_one_line(tiny, run):
    with pytest.raises(CheckpointError) as e:
        Trainer(_cfg(tiny, run, "model.norm=gn", "train.epochs=2", "train.resume=force"),
                DistInfo())
    assert "does not fit the model" in str(e.value) and "unexpected keys" in str(e.value)
    assert "\n" not in str(e.value)


def test_stale_temporary_files_are_removed_at_start(tiny, run):
    stale = os.path.join(run, ".checkpoint_last.pth.tmp999999999")  # no such process
    live = os.path.join(run, f".checkpoint_last.pth.tmp{os.getppid()}")  # a live writer
    for path in (stale, live):
        open(path, "wb").write(b"half a checkpoint")
    Trainer(_cfg(tiny, run, "train.epochs=2"), DistInfo())
    assert not os.path.exists(stale) and os.path.exists(live)
    assert remove_stale_temporaries(run) == []


def test_flipped_bit_is_detected(run):
    path = os.path.join(run, "checkpoint_last.pth")
    weight = load_checkpoint(path)["model"]["fc.weight"]
    data = bytearray(open(path, "rb").read())
    at = data.find(weight.numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0x04
    open(path, "wb").write(data)
    with pytest.raises(CheckpointError, match="checksum mismatch: the file is damaged"):
        load_checkpoint(path)


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(run):
    """A real ENOSPC: the temporary file is a link to /dev/full."""
    path = os.path.join(run, "checkpoint_last.pth")
    before = open(path, "rb").read()
    os.symlink("/dev/full", os.path.join(run, f".checkpoint_last.pth.tmp{os.getpid()}"))
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(path, {"model": {"w": torch.zeros(1 << 16)}})
    assert "cannot write the checkpoint (No space left on device)" in str(e.value)
    assert "\n" not in str(e.value)
    assert open(path, "rb").read() == before and load_checkpoint(path)["epoch"] == 1
    assert not any(".tmp" in name for name in os.listdir(run))


def test_no_readable_training_image_is_an_error(tiny, tmp_path):
    root = yaml.safe_load(open(tiny))["data"]["root"]
    data = shutil.copytree(root, tmp_path / "data")
    for folder, _, files in os.walk(data / "train"):
        for name in files:
            open(os.path.join(folder, name), "wb").write(b"\xff\xd8\xff not a JPEG")
    trainer = Trainer(_cfg(tiny, str(tmp_path / "run"), f"data.root={data}"), DistInfo())
    with pytest.raises(BadImageError) as e:
        trainer.fit()
    assert "nor any of 16 other images of this rank's shard" in str(e.value)
    assert "\n" not in str(e.value)


def test_thread_oversubscription_warns():
    assert thread_oversubscription(threads=2, local_world_size=2, cores=2).startswith(
        "warning: 2 process(es) x 2 torch threads = 4 threads on 2 cores")
    assert "OMP_NUM_THREADS=1" in thread_oversubscription(2, 2, 2)
    assert thread_oversubscription(threads=1, local_world_size=2, cores=2) is None
