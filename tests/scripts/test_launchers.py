"""scripts/train_multi_node.sh, train_single_node.sh and paper_table2.sh as a user runs them,
on this machine (no GPU, no nvidia-smi on PATH): two "nodes" on 127.0.0.1 (two copies of the
multi-node script, c10d rendezvous) train like one process; a dead peer makes the surviving
rank exit at once and the restarted processes resume; every script runs on its CPU rule or
says in one line what it needs; the Table 2 grid runs every cell, then lists the failed ones."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import pytest
import yaml

from ..conftest import free_port
from .conftest import ROOT, assert_same_weights, checkpoint, metrics

pytestmark = pytest.mark.distributed


def _two_nodes(script_env, config, out, logs, *overrides, **env) -> List[subprocess.Popen]:
    """``NNODES=2 NPROC=1 MASTER=127.0.0.1 scripts/train_multi_node.sh CONFIG ...``, twice
    (two nodes), each in a session of its own, its output in ``logs[i]``."""
    port = free_port()
    env = script_env(NNODES="2", NPROC="1", MASTER="127.0.0.1", PORT=str(port),
                     RUN_ID=f"test{port}", **env)
    procs = []
    for log in logs:
        with open(log, "w") as f:
            procs.append(subprocess.Popen(
                ["scripts/train_multi_node.sh", config, f"output_dir={out}", *overrides],
                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                start_new_session=True))
    return procs


def _finish(procs, timeout: float) -> List[int]:
    """The exit statuses; every process group still running after ``timeout`` s is killed
    and the test fails."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout} s") from None
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _text(logs) -> str:
    return "".join(Path(log).read_text(errors="replace") for log in logs)


@pytest.fixture(scope="session")
def two_node_run(script_env, tiny_config, tmp_path_factory):
    """The tiny config on two nodes of one process each: (output_dir, both logs, statuses)."""
    base = tmp_path_factory.mktemp("two_nodes")
    out, logs = base / "run", [base / "node0.log", base / "node1.log"]
    statuses = _finish(_two_nodes(script_env, tiny_config, out, logs), 300)
    return out, _text(logs), statuses


def test_two_nodes_on_loopback_train_like_one_process(two_node_run, one_process_run):
    out, text, statuses = two_node_run
    assert statuses == [0, 0], text
    assert "on 2 process(es) x 1 virtual GPU(s)" in text
    assert text.count("finished epoch 2/2") == 1  # printed by rank 0 only
    assert_same_weights(out, one_process_run, exact=False)


def _workers(agent_pids) -> Dict[int, int]:
    """{rank: pid} of the training processes that the torchrun agents ``agent_pids`` run."""
    ranks = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent in agent_pids:
            env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
            if b"RANK" in env:
                ranks[int(env[b"RANK"])] = int(entry)
    return ranks


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_dead_peer_ends_the_survivor_and_the_restart_resumes(script_env, tiny_config,
                                                             two_node_run, tmp_path):
    """Rank 1 killed with SIGKILL in mid-epoch, under MAX_RESTARTS=1, with a DataLoader
    worker per rank. Before: rank 0 blocked in its next collective (the killed rank's
    worker, a forked child, kept its sockets open) and then at exit (multiprocessing
    stopping its own worker with SIGTERM, which the workers ignore), until torchrun killed
    it 30 s later. Now it exits as soon as its collective fails; both nodes restart, resume
    from the last checkpoint and end with the weights of the uninterrupted run."""
    out, logs = tmp_path / "run", [tmp_path / "node0.log", tmp_path / "node1.log"]
    procs = _two_nodes(script_env, tiny_config, out, logs, "data.workers=1", MAX_RESTARTS="1")
    try:
        deadline = time.monotonic() + 240
        while "epoch 1/2 iter 3/6 " not in _text(logs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                _text(logs)
            time.sleep(0.1)
        ranks = _workers({p.pid for p in procs})  # the scripts exec torchrun: same pids
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGKILL)
        killed = time.monotonic()
        while _alive(ranks[0]) and time.monotonic() - killed < 60:
            time.sleep(0.05)
        survivor_seconds = time.monotonic() - killed
    finally:
        statuses = _finish(procs, 300)
    text = _text(logs)
    print(f"rank 0 exited {survivor_seconds:.1f} s after rank 1 was killed")
    assert statuses == [0, 0], text
    assert survivor_seconds < 20, f"rank 0 lived {survivor_seconds:.1f} s after its peer died"
    assert "forcefully exiting via 9" not in text  # torchrun did not have to kill it
    assert "resumed from" in text, text
    assert_same_weights(out, two_node_run[0], exact=True)
    keys = ("train_loss", "train_top1", "val_top1", "val_loss", "lr")
    assert [{k: r[k] for k in keys} for r in metrics(out)] == \
        [{k: r[k] for k in keys} for r in metrics(two_node_run[0])]


def _run(cmd, env, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_without_nvidia_smi_scripts_run_on_the_cpu_rule(script_env, tiny_config):
    """Without nvidia-smi (the scripts exited 127 with no output): one process per node,
    said in one line, and torchrun starts (here train.py --print-config, which shows the
    world size)."""
    note = "no GPU found (no nvidia-smi): 1 process per node on the CPU; set NPROC=N for N"
    single = _run(["scripts/train_single_node.sh", tiny_config, "--print-config"], script_env())
    assert single.returncode == 0, single.stderr
    assert single.stderr.splitlines()[0] == f"train_single_node.sh: {note}"
    assert "  world_size: 1\n" in single.stdout
    multi = _run(["scripts/train_multi_node.sh", tiny_config, "--print-config"],
                 script_env(NNODES="1", MASTER="127.0.0.1", PORT=str(free_port())))
    assert multi.returncode == 0, multi.stderr
    assert multi.stderr.splitlines()[0] == f"train_multi_node.sh: {note}"
    assert "  world_size: 1\n" in multi.stdout


@pytest.mark.parametrize("cmd, env, message", [
    (["scripts/train_multi_node.sh", "{config}"], {},
     "train_multi_node.sh: set NNODES (the number of machines that run this command)"),
    (["scripts/train_multi_node.sh", "{config}"], {"NNODES": "2"},
     "train_multi_node.sh: set MASTER (the host name of one of the 2 machines)"),
    (["scripts/train_multi_node.sh", "{config}"], {"NNODES": "2", "NPROC": "2", "MASTER": "h"},
     "train_multi_node.sh: batch.gpus=2 is not divisible by the world size 4 (2 nodes x 2 "
     "processes): choose NNODES x NPROC among 2, 1"),
    (["scripts/train_single_node.sh"], {},
     "train_single_node.sh: usage: scripts/train_single_node.sh CONFIG [key=value ...]"),
    (["scripts/train_single_node.sh", "{config}"], {"NPROC": "3"},
     "train_single_node.sh: batch.gpus=2 is not divisible by 3 processes: set NPROC to one "
     "of 2, 1"),
    (["scripts/train_single_node.sh", "{config}", "model.nrom=gn"], {},
     "error: override 'model.nrom=gn': unknown config key 'model.nrom'; did you mean "
     "'model.norm'?"),
    (["scripts/paper_table2.sh"], {},
     "paper_table2.sh: set DATA=/path/to/imagenet (the folder with train/ and val/)"),
    (["scripts/train_slurm.sbatch", "{config}"], {},
     "train_slurm.sbatch: needs a SLURM allocation: submit it, e.g. sbatch --nodes=2 "
     "scripts/train_slurm.sbatch {config}"),
])
def test_what_is_missing_is_one_line(script_env, tiny_config, cmd, env, message):
    """Refused before torchrun starts, in one line on stderr, with status 2."""
    proc = _run([c.format(config=tiny_config) for c in cmd], script_env(**env), timeout=60)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == message.format(config=tiny_config) + "\n"


def test_paper_table2_runs_every_cell_then_lists_the_failed(script_env, tiny_config, tmp_path):
    """A grid of three cells pointed at by TABLE2_CONFIGS: one config with an unknown key,
    one missing, one good (run last): every cell runs, the failed ones are listed, exit 1."""
    cells = tmp_path / "cells"
    cells.mkdir()
    cfg = yaml.safe_load(open(tiny_config))
    cfg["train"].update(epochs=1, max_iters=2)
    (cells / "tiny_sn_2x8.yaml").write_text(yaml.safe_dump({**cfg, "output_dir": str(
        tmp_path / "sn")}))
    (cells / "tiny_bn_2x8.yaml").write_text(yaml.safe_dump({**cfg, "output_dir": str(
        tmp_path / "bn"), "model": {**cfg["model"], "norm": "bn", "widht": 8}}))
    proc = _run(["scripts/paper_table2.sh", "bn gn sn", "2x8"],
                script_env(TABLE2_CONFIGS=str(cells)), timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    notes = [line for line in proc.stderr.splitlines() if line.startswith("paper_table2.sh: ")]
    assert notes == [
        "paper_table2.sh: no GPU found (no nvidia-smi): 1 process per node on the CPU; set "
        "NPROC=N for N",
        f"paper_table2.sh: cell bn 2x8: {cells}/tiny_bn_2x8.yaml on 1 process(es)",
        f"paper_table2.sh: cell gn 2x8: no single config {cells}/*_gn_2x8.yaml",
        f"paper_table2.sh: cell sn 2x8: {cells}/tiny_sn_2x8.yaml on 1 process(es)",
        "paper_table2.sh: 2 of 3 cells failed: bn 2x8 (exit 1), gn 2x8 (no config)"]
    assert "unknown config key 'model.widht'" in proc.stderr
    assert checkpoint(tmp_path / "sn")["global_step"] == 2  # the cell after the failures ran
    assert not (tmp_path / "bn").exists()
