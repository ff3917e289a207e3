"""train.py / evaluate.py end to end on a tiny generated dataset: real processes, real files.

Covers the outputs of a run, torchrun with 2 gloo processes, kill -9 and resume
equality, SIGTERM, the non-finite-loss stop, and evaluation under 2 processes.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from ..conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 4-class generated dataset (96 train / 24 val images of 40 px) and a config for it."""
    from data import ensure_demo_dataset
    base = tmp_path_factory.mktemp("tiny")
    root = ensure_demo_dataset(str(base / "data"), size=40, num_classes=4, train_per_class=24,
                               val_per_class=6)
    cfg = {
        "data": {"dataset": "imagenet", "root": str(root), "image_size": 32, "val_resize": 36,
                 "val_crop": 32, "min_scale": 0.5, "workers": 0, "backend": "torchvision"},
        "model": {"name": "resnet18_v1", "norm": "sn", "num_classes": 4, "width": 8,
                  "stem": "small", "dropout": 0.2},
        "batch": {"gpus": 2, "per_gpu": 8},
        "optim": {"base_lr": 0.4},
        "schedule": {"name": "cosine", "warmup_epochs": 0.5},
        "train": {"epochs": 2, "print_freq": 1, "device": "cpu", "deterministic": True},
        "checkpoint": {"every_iters": 2},
    }
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _env(**extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}
    env.pop("WORLD_SIZE", None)
    return env


def _train(config, out, *overrides, check=True, nproc=1):
    if nproc == 1:
        cmd = [sys.executable, "train.py"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "train.py"]
    proc = subprocess.run(cmd + ["--config", config, f"output_dir={out}", *overrides], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _weights(out, name="checkpoint_last.pth"):
    return torch.load(os.path.join(out, name), weights_only=True, map_location="cpu")


@pytest.fixture(scope="module")
def reference_run(tiny, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "run")
    proc = _train(tiny, out)
    return out, proc


def test_outputs_of_a_run(reference_run):
    out, proc = reference_run
    for name in ("config.yaml", "metrics.jsonl", "checkpoint_last.pth", "checkpoint_best.pth"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tb")))
    rows = _metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1]
    for key in ("epoch", "lr", "train_loss", "val_top1", "val_top5", "images_per_sec", "seconds"):
        assert key in rows[0]
    assert rows[-1]["val_count"] == 24  # every validation image exactly once
    state = _weights(out)
    assert state["epoch"] == 2 and state["iter"] == 0 and state["config"]["batch"]["total"] == 16
    assert not any(k.startswith("module.") for k in state["model"])
    resolved = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    assert resolved["optim"]["lr"] == pytest.approx(0.4 * 16 / 256)
    assert "iter 6/6" in proc.stdout and "eta" in proc.stdout and "img/s" in proc.stdout


def test_kill_and_resume_equals_uninterrupted(tiny, reference_run, tmp_path):
    ref_out, _ = reference_run
    out = str(tmp_path / "run")
    cmd = [sys.executable, "train.py", "--config", tiny, f"output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # kill -9 in the middle of the second epoch
        if line.startswith("epoch 2/2 iter 4/6"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    state = _weights(out)
    assert state["epoch"] == 1 and 0 < state["iter"] < 6  # an iteration checkpoint
    _train(tiny, out)  # the same command resumes
    a, b = _weights(ref_out), _weights(out)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    keys = ("train_loss", "train_top1", "val_top1", "val_top5", "val_loss", "lr")
    assert [{k: r[k] for k in keys} for r in _metrics(ref_out)] == \
        [{k: r[k] for k in keys} for r in _metrics(out)]


def test_sigterm_saves_and_exits_cleanly(tiny, tmp_path):
    out = str(tmp_path / "run")
    cmd = [sys.executable, "train.py", "--config", tiny, f"output_dir={out}",
           "checkpoint.every_iters=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("epoch 1/2 iter 3/6"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "SIGTERM: saved" in rest
    state = _weights(out)
    assert state["epoch"] == 0 and 3 <= state["iter"] < 6


def test_non_finite_loss_stops_naming_the_iteration(tiny, tmp_path):
    out = str(tmp_path / "run")
    proc = _train(tiny, out, "optim.base_lr=1.0e12", "model.norm=none", check=False)
    assert proc.returncode == 1
    assert "non-finite loss at iteration" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    bad = int(proc.stderr.split("iteration ")[1].split()[0])
    if os.path.isfile(os.path.join(out, "checkpoint_last.pth")):
        assert _weights(out)["global_step"] < bad  # the last good one is kept


def test_torchrun_two_processes_and_evaluate(tiny, reference_run, tmp_path):
    out = str(tmp_path / "run")
    proc = _train(tiny, out, "train.epochs=1", nproc=2)
    assert "on 2 process(es) x 1 virtual GPU(s)" in proc.stdout
    rows = _metrics(out)
    assert rows[-1]["val_count"] == 24
    ckpt = os.path.join(out, "checkpoint_last.pth")

    def evaluate(nproc):
        js = str(tmp_path / f"eval{nproc}.json")
        cmd = ([sys.executable, "evaluate.py"] if nproc == 1 else
               [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={free_port()}", "evaluate.py"])
        subprocess.run(cmd + ["--checkpoint", ckpt, "--json", js], cwd=ROOT, env=_env(),
                       check=True, capture_output=True, text=True, timeout=300)
        return json.load(open(js))
    one, two = evaluate(1), evaluate(2)
    assert one["val_count"] == two["val_count"] == 24
    assert one["val_top1"] == two["val_top1"] == pytest.approx(rows[-1]["val_top1"])
    assert one["val_top5"] == two["val_top5"]


def test_bad_checkpoint_and_missing_data_are_one_line_errors(tiny, tmp_path):
    bogus = tmp_path / "bogus.pth"
    bogus.write_bytes(b"this is not a checkpoint")
    proc = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(bogus), "--config",
                           tiny], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 1 and "not a readable PyTorch checkpoint" in proc.stderr
    proc = _train(tiny, str(tmp_path / "r"), f"data.root={tmp_path}/nowhere", check=False)
    assert proc.returncode == 1 and "nowhere" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_demo_config_under_torchrun_on_generated_data(tmp_path):
    """The README's demo config, unchanged but shortened, on 2 gloo processes; the demo
    dataset is generated on first use into SN_DEMO_DIR."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", "train.py", "--config", "configs/demo/resnet_sn.yaml",
           f"output_dir={tmp_path / 'run'}", "train.max_iters=3", "train.print_freq=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(SN_DEMO_DIR=str(tmp_path / "cache")),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "on 2 process(es) x 2 virtual GPU(s)" in proc.stdout  # (4, 16) on 2 processes
    assert "iter 3/" in proc.stdout
    rows = _metrics(tmp_path / "run")
    assert rows[-1]["val_count"] == 500


def test_demo_config_with_dali_on_the_cpu(tiny, tmp_path):
    pytest.importorskip("nvidia.dali")
    proc = _train("configs/demo/resnet_sn.yaml", str(tmp_path / "run"),
                  f"data.root={yaml.safe_load(open(tiny))['data']['root']}",
                  "data.demo_size=40", "model.num_classes=4", "data.backend=dali",
                  "train.max_iters=3",
                  "data.workers=1")
    assert "DALI" in proc.stdout
    assert _metrics(tmp_path / "run")[-1]["val_count"] == 24
