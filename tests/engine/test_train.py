"""train.py / evaluate.py end to end on a tiny generated dataset: real processes, real files.

Covers the outputs of a run, torchrun with 2 gloo processes, kill -9 and resume
equality, SIGTERM to the trainer and to a whole process group, the non-finite-loss
stop, evaluation under 2 processes, the run-folder rules on the command line, and
unreadable images under 2 ranks.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys

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
                 "val_crop": 32, "min_scale": 0.5, "workers": 0, "backend": "torchvision",
                 "resize_crop_last_epochs": 1},  # the SSN recipe's switch, in epoch 2
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
    assert [r["epoch"] for r in rows] == [1, 2]  # counted from 1, as on the console
    for key in ("epoch", "lr", "train_loss", "val_top1", "val_top5", "images_per_sec", "seconds"):
        assert key in rows[0]
    assert rows[-1]["val_count"] == 24  # every validation image exactly once
    state = _weights(out)
    assert state["epoch"] == 2 and state["iter"] == 0 and state["config"]["batch"]["total"] == 16
    assert not any(k.startswith("module.") for k in state["model"])
    resolved = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    assert resolved["optim"]["lr"] == pytest.approx(0.4 * 16 / 256)
    assert "iter 6/6" in proc.stdout and "eta" in proc.stdout and "img/s" in proc.stdout
    assert proc.stdout.count("training crops are now Resize(36) + RandomCrop(32)") == 1
    # each epoch's time is the whole epoch's; the run ends with a summary
    assert "epoch 2/2 done in 0:" in proc.stdout and ", val 0:" in proc.stdout
    assert ", checkpoint and logs 0:" in proc.stdout
    best = max(rows, key=lambda r: r["val_top1"])
    summary = proc.stdout.splitlines()[-2:]
    assert summary[0].startswith("finished epoch 2/2 in 0:")
    assert summary[0].endswith(f": best val top-1 {best['val_top1']:.2f}% at epoch "
                               f"{best['epoch']}, last {rows[-1]['val_top1']:.2f}%")
    assert summary[1].startswith(f"outputs in {out}/: metrics.jsonl, checkpoint_best.pth")


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


@pytest.fixture(scope="module")
def two_process_run(tiny, tmp_path_factory):
    """One epoch of the tiny config under torchrun with 2 gloo processes."""
    out = str(tmp_path_factory.mktemp("two") / "run")
    return out, _train(tiny, out, "train.epochs=1", nproc=2)


def test_torchrun_two_processes_and_evaluate(two_process_run, tmp_path):
    out, proc = two_process_run
    assert "on 2 process(es) x 1 virtual GPU(s)" in proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr  # e.g. DDP's broadcast_buffers, per rank
    assert proc.stdout.count("finished epoch 1/1") == 1  # rank 0 only
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
    generating = [line for line in proc.stdout.splitlines() if "generating the demo" in line]
    assert len(generating) == 1  # by the one rank that generates it, the other one waits
    assert generating[0].startswith(f"generating the demo dataset (3500 images of 72 px) "
                                    f"into {tmp_path / 'cache'}")
    assert " 50% " in generating[0] and " 100% (" in generating[0]
    assert "iter 3/" in proc.stdout
    rows = _metrics(tmp_path / "run")
    assert rows[-1]["val_count"] == 500


def test_demo_dataset_generation_says_what_it_does(tmp_path, capfd):
    """The first run is not silent while it draws the demo images: one line, with progress."""
    from data import ensure_demo_dataset
    root = ensure_demo_dataset(str(tmp_path / "demo"), size=24, num_classes=2, train_per_class=4,
                               val_per_class=1)
    out = capfd.readouterr().out
    assert out.startswith(f"generating the demo dataset (10 images of 24 px) into {root}: ")
    assert " 100% (" in out and out.endswith(" s)\n") and out.count("\n") == 1
    ensure_demo_dataset(str(root), size=24, num_classes=2, train_per_class=4, val_per_class=1)
    assert capfd.readouterr().out == ""  # already there: nothing to say


def test_demo_config_with_dali_on_the_cpu(tiny, tmp_path):
    pytest.importorskip("nvidia.dali")
    proc = _train("configs/demo/resnet_sn.yaml", str(tmp_path / "run"),
                  f"data.root={yaml.safe_load(open(tiny))['data']['root']}",
                  "data.demo_size=40", "model.num_classes=4", "data.backend=dali",
                  "train.max_iters=3",
                  "data.workers=1")
    assert "DALI" in proc.stdout
    assert _metrics(tmp_path / "run")[-1]["val_count"] == 24


def _files(folder):
    """Every file under ``folder`` with its modification time and bytes."""
    return {os.path.relpath(os.path.join(d, name), folder):
            (os.path.getmtime(os.path.join(d, name)), open(os.path.join(d, name), "rb").read())
            for d, _, names in os.walk(folder) for name in names}


def test_run_folder_complete_or_refused_touches_nothing(tiny, reference_run, tmp_path):
    """The same command on a finished run says so and exits 0; another config is refused
    in one line naming the keys; neither changes a file of the run folder."""
    out = str(shutil.copytree(reference_run[0], tmp_path / "run"))
    before = _files(out)
    done = _train(tiny, out)
    best = max(_metrics(out), key=lambda r: r["val_top1"])
    assert done.stdout.startswith(f"run already complete: best top-1 {best['val_top1']:.2f}% "
                                  f"at epoch {best['epoch']} ")
    refused = _train(tiny, out, "train.epochs=1", "model.norm=gn", check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "model.norm 'sn' -> 'gn'" in refused.stderr and "train.epochs" not in refused.stderr
    assert "output_dir=" in refused.stderr and "train.resume=force" in refused.stderr
    assert _files(out) == before


def _group(cmd, timeout, stop_at=None, **env):
    """Run ``cmd`` as its own process group; SIGTERM the whole group when a stdout line
    starts with ``stop_at``. A run still going after ``timeout`` s is killed (group) and
    fails the test."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        if stop_at is not None:
            for line in proc.stdout:
                if line.startswith(stop_at):
                    os.killpg(proc.pid, signal.SIGTERM)
                    break
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"{' '.join(cmd[:6])} ... still running after {timeout} s")
    return proc.returncode, out, err


def _torchrun(config, out, *overrides):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            f"--master_port={free_port()}", "train.py", "--config", config,
            f"output_dir={out}", *overrides]


def test_unreadable_images_keep_two_ranks_in_step(tiny, tmp_path):
    """Rank 1's first and last batches unreadable, one image of rank 0 and one validation
    image too: both ranks run every iteration with whole batches (the bad images replaced
    from their own shards) and finish; every bad file is counted. (Before: rank 1 ran two
    iterations less and the collectives hung until the process-group timeout.)"""
    from data.datasets import scan_folder
    from data.sampler import ShardedBatchSampler
    root = shutil.copytree(yaml.safe_load(open(tiny))["data"]["root"], tmp_path / "data")
    train = scan_folder(root / "train")
    shards = [ShardedBatchSampler(len(train), 8, rank=r, world_size=2, seed=0).batches()
              for r in range(2)]
    bad = [train.path(i) for i in shards[1][0] + shards[1][-1] + shards[0][2][3:4]]
    bad.append(scan_folder(root / "val", train.classes).path(3))
    for path in bad:
        open(path, "wb").write(b"\xff\xd8\xff\xe0 truncated")
    rc, out, err = _group(_torchrun(tiny, tmp_path / "run", f"data.root={root}",
                                    "train.epochs=1"), timeout=150)
    assert rc == 0, out + err
    # 2 processes x 1 thread (OMP_NUM_THREADS=1): a warning only on a 1-core machine
    assert ("torch threads =" in err) == (len(os.sched_getaffinity(0)) < 2)
    assert "epoch 1/1 iter 6/6" in out and "replaced by another image" in err
    warned = [line for line in err.splitlines() if "unreadable image" in line]
    assert len(warned) == len(set(bad)) and all(line.startswith("warning: ") for line in warned)
    assert sorted(line.split()[3] for line in warned) == sorted(map(str, set(bad)))
    assert "loader:" not in err  # no source line of a Python warning
    row = _metrics(tmp_path / "run")[0]
    assert (row["train_bad_images"], row["bad_images"], row["val_count"]) == (17, 1, 23)


def _two_ranks(config, out, *overrides):
    """train.py as ranks 0 and 1 of one process group, with the environment torchrun gives
    them (env:// rendezvous on loopback)."""
    port, procs = free_port(), []
    for rank in range(2):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        group = procs[0].pid if procs else 0  # rank 0 leads a new group, rank 1 joins it
        procs.append(subprocess.Popen(
            [sys.executable, "train.py", "--config", config, f"output_dir={out}", *overrides],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: os.setpgid(0, group)))
    return procs


def test_sigterm_to_the_process_group_saves_every_rank(tiny, two_process_run, tmp_path):
    """torchrun, SLURM and ``kill -TERM -- -PGID`` signal every process of the group,
    DataLoader workers included: the workers ignore it, both ranks save the current
    iteration and exit 0, and the resumed epoch (under torchrun) ends with each rank's own
    running sums: the metrics of the uninterrupted run."""
    out = tmp_path / "run"
    ranks = _two_ranks(tiny, out, "train.epochs=1", "data.workers=1")
    try:
        for line in ranks[0].stdout:
            if line.startswith("epoch 1/1 iter 3/6"):
                os.killpg(ranks[0].pid, signal.SIGTERM)
                break
        results = [p.communicate(timeout=90) for p in ranks]
    finally:
        if any(p.poll() is None for p in ranks):
            os.killpg(ranks[0].pid, signal.SIGKILL)
    assert [p.returncode for p in ranks] == [0, 0], results
    assert "SIGTERM: saved" in results[0][0]
    state = _weights(out)
    assert state["epoch"] == 0 and 3 <= state["iter"] < 6 and len(state["meters"]) == 2
    rc, stdout, err = _group(_torchrun(tiny, out, "train.epochs=1", "data.workers=1"),
                             timeout=90)  # the same run resumes
    assert rc == 0 and "resumed from" in stdout, stdout + err
    keys = ("train_loss", "train_top1", "train_bad_images", "val_top1", "val_count")
    assert [{k: r[k] for k in keys} for r in _metrics(out)] == \
        [{k: r[k] for k in keys} for r in _metrics(two_process_run[0])]


def test_demo_config_compiled(tiny, tmp_path):
    """train.compile=true: the README's demo config (SN with ghost batches, the small stem)
    trains 3 iterations through torch.compile and validates, with the losses, validation
    accuracy and weights of the same iterations in eager mode (deterministic, one thread).
    The whole model goes through dynamo and AOT autograd (``aot_eager``): inductor's code
    for every normalizer is compared with eager layer by layer in
    tests/normalization/test_compile.py; generating it for a whole ResNet-18 (training
    and eval graphs) did not finish in 5 minutes on the 2-core machine (busy), a third
    of the suite's budget."""
    root = yaml.safe_load(open(tiny))['data']['root']
    common = (f"data.root={root}", "data.demo_size=40", "model.num_classes=4",
              "train.max_iters=3", "data.workers=0", "train.deterministic=true")
    runs = {}
    for mode in ("eager", "compiled"):
        out = str(tmp_path / mode)
        _train("configs/demo/resnet_sn.yaml", out, *common,
               *(("train.compile=true", "train.compile_backend=aot_eager")
                 if mode == "compiled" else ()))
        runs[mode] = (_metrics(out)[-1], _weights(out)["model"])
    (eager, w_eager), (compiled, w_compiled) = runs["eager"], runs["compiled"]
    assert compiled["val_count"] == eager["val_count"] == 24
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
    assert compiled["val_top1"] == pytest.approx(eager["val_top1"], abs=100 / 24 + 1e-6)
    for name, w in w_eager.items():
        if w.is_floating_point():
            torch.testing.assert_close(w_compiled[name], w, rtol=1e-3, atol=1e-4, msg=name)