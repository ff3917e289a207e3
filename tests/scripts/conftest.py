"""Fixtures for the launch scripts in scripts/ and tools/*.sh: the environment they run in, a
tiny config and its runs, and a real SLURM cluster of two nodes on this machine.

The config is the tiny one of tests/engine/test_train.py (4 classes of 40-px images, ResNet-18
at width 8, (2, 8) batch setting, 2 epochs of 6 iterations, a checkpoint every 2 iterations)
with synchronised statistics (``syncsn``) and no dropout: then one process and two processes
compute the same thing (the same 16 samples per step, batch statistics over all 16, no
per-process random numbers) and end with the same weights up to float32 rounding. (With
per-GPU statistics the samples that share a GPU differ: consecutive halves of the batch in
one process, every other sample across two ranks.)

The cluster (marker ``slurm``): Debian's ``slurmctld``, ``slurmd``, ``slurm-client`` and
``munge``, installed with apt-get when missing; munged, slurmctld and two slurmd (``n1``,
``n2``, both on localhost, each with its own port, spool, pid and log, and one simulated GPU:
a ``gpu`` gres on a character device made with mknod) started in a temporary folder, once per
session, and stopped at its end with every process they started. Skipped, with the reason in
one line, only where the packages cannot be installed or the daemons do not start.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest
import torch
import yaml

from ..conftest import free_port

ROOT = Path(__file__).resolve().parents[2]

SLURM_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SLURM_COMMANDS = ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue", "sinfo",
                  "munged")
#: Job states after which a job does not run again by itself.
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
            "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


# -- the environment of the scripts ----------------------------------------------------------------
def which(name: str) -> Optional[str]:
    """``shutil.which`` that also looks in the sbin folders (daemons live there)."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/local/sbin:/usr/sbin:/sbin"
    return shutil.which(name, path=path)


def apt_install(packages: Sequence[str], commands: Sequence[str]) -> Optional[str]:
    """Install the Debian ``packages`` when one of ``commands`` is missing (apt-get update,
    then install -y --no-install-recommends). None when the commands are there; else why
    they are not, in one line."""
    if all(which(c) for c in commands):
        return None
    missing = ", ".join(c for c in commands if not which(c))
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return f"{missing} not found, and installing {' '.join(packages)} needs apt-get as root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    for cmd in (["apt-get", *lock, "update", "-qq"],
                ["apt-get", *lock, "install", "-y", "-qq", "--no-install-recommends", *packages]):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return f"{' '.join(cmd)}: no answer in 900 s"
        if proc.returncode != 0:
            last = (proc.stderr.strip() or proc.stdout.strip() or "?").splitlines()[-1]
            return f"{' '.join(cmd)} failed ({proc.returncode}): {last}"
    still = ", ".join(c for c in commands if not which(c))
    return f"{still} still missing after installing {' '.join(packages)}" if still else None


@pytest.fixture(scope="session")
def script_path(tmp_path_factory) -> str:
    """PATH for the scripts: this interpreter's folder first (its ``python``; ``torchrun``
    too, or a two-line ``torchrun`` that runs this interpreter's torch.distributed.run),
    then PATH without any folder that has ``nvidia-smi`` (the scripts' CPU rule)."""
    folders = [os.path.dirname(sys.executable)]
    if not os.path.isfile(os.path.join(folders[0], "torchrun")):
        shim = tmp_path_factory.mktemp("bin")
        (shim / "torchrun").write_text(
            f'#!/bin/sh\nexec "{sys.executable}" -m torch.distributed.run "$@"\n')
        (shim / "torchrun").chmod(0o755)
        folders.append(str(shim))
    rest = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not os.path.exists(os.path.join(d, "nvidia-smi"))]
    return os.pathsep.join(folders + rest)


@pytest.fixture(scope="session")
def script_env(script_path):
    """``script_env(**extra)``: the environment of a script run: unbuffered output, one
    thread per process (2 processes share 2 cores), no torchrun variables."""
    def make(**extra) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
               and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
        env.update(PATH=script_path, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        env.update(extra)
        return env
    return make


# -- the tiny config and its runs -------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> str:
    """tests/engine/test_train.py's tiny config, with synchronised statistics and no dropout
    (see the module docstring), without TensorBoard."""
    from data import ensure_demo_dataset
    base = tmp_path_factory.mktemp("tiny_cluster")
    root = ensure_demo_dataset(str(base / "data"), size=40, num_classes=4, train_per_class=24,
                               val_per_class=6)
    cfg = {
        "data": {"dataset": "imagenet", "root": str(root), "image_size": 32, "val_resize": 36,
                 "val_crop": 32, "min_scale": 0.5, "workers": 0, "backend": "torchvision",
                 "resize_crop_last_epochs": 1},
        "model": {"name": "resnet18_v1", "norm": "syncsn", "num_classes": 4, "width": 8,
                  "stem": "small", "dropout": 0.0},
        "batch": {"gpus": 2, "per_gpu": 8},
        "optim": {"base_lr": 0.4},
        "schedule": {"name": "cosine", "warmup_epochs": 0.5},
        "train": {"epochs": 2, "print_freq": 1, "device": "cpu", "deterministic": True},
        "checkpoint": {"every_iters": 2},
        "log": {"tensorboard": False},
    }
    path = base / "tiny_syncsn.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="session")
def one_process_run(tiny_config, script_env, tmp_path_factory) -> Path:
    """The tiny config trained by one process: the weights that every world size must end
    with."""
    out = tmp_path_factory.mktemp("one_process") / "run"
    proc = subprocess.run([sys.executable, "train.py", "--config", tiny_config,
                           f"output_dir={out}"], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def checkpoint(out, name="checkpoint_last.pth") -> dict:
    return torch.load(Path(out) / name, weights_only=True, map_location="cpu")


def metrics(out) -> List[dict]:
    with open(Path(out) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def assert_same_weights(out, reference, exact: bool):
    """The final weights of two runs: bit for bit (``exact``: same world size), or within
    the tolerance of the distributed tests (tests/normalization/test_sync.py: SyncSN on 2
    gloo processes against one process, rtol = atol = 1e-5)."""
    a, b = checkpoint(out), checkpoint(reference)
    assert (a["epoch"], a["iter"], a["global_step"]) == (b["epoch"], b["iter"], b["global_step"])
    assert a["model"].keys() == b["model"].keys()
    for key, value in b["model"].items():
        if exact:
            assert torch.equal(a["model"][key], value), key
        else:
            torch.testing.assert_close(a["model"][key], value, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, key=key: f"{key}: {m}")


def wait_for_line(path: Path, pattern: str, proc_alive, timeout: float, start: int = 0) -> str:
    """Poll the log ``path`` (from byte ``start``) until a line matches ``pattern``; fails
    when ``proc_alive()`` turns false first or after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace")[start:] if path.exists() else ""
        match = re.search(pattern, text, re.MULTILINE)
        if match:
            return match.group(0)
        if not proc_alive():
            break
        time.sleep(0.1)
    raise AssertionError(f"no line matching {pattern!r} in {path}:\n"
                         f"{path.read_text(errors='replace') if path.exists() else '(none)'}")


# -- the SLURM cluster --------------------------------------------------------------------------
class SlurmCluster:
    """Two slurmd nodes (n1, n2), one slurmctld, one munged, all in ``folder``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.conf = folder / "slurm.conf"
        self.daemons: Dict[str, subprocess.Popen] = {}

    def env(self, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        return {**(base if base is not None else os.environ), "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, env=None, check=True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), cwd=ROOT, env=self.env(env), capture_output=True,
                              text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}: {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, *args: str, env=None) -> int:
        return int(self.run("sbatch", "--parsable", *args, env=env).stdout.split(";")[0])

    def job(self, job_id: int) -> Dict[str, str]:
        """``scontrol show job``'s fields: JobState, ExitCode, Restarts, ..."""
        line = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait(self, job_id: int, timeout: float = 240) -> Dict[str, str]:
        """The job's fields once it finished; it is cancelled after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["JobState"] in FINISHED:
                return job
            time.sleep(0.5)
        self.run("scancel", str(job_id), check=False)
        raise AssertionError(f"job {job_id} still {job['JobState']} after {timeout} s")

    def running(self, job_id: int) -> bool:
        return self.job(job_id)["JobState"] not in FINISHED

    # -- set-up and tear-down --------------------------------------------------------------
    def write_config(self, cpus: int) -> None:
        f = self.folder
        ctld, n1, n2 = free_port(), free_port(), free_port()
        for name in ("state", "spool/n1", "spool/n2", "log", "munge"):
            (f / name).mkdir(parents=True, exist_ok=True)
        gres = []
        for node in ("n1", "n2"):
            device = f / f"gpu-{node}"
            try:  # a simulated GPU: a character device (the numbers of /dev/null)
                os.mknod(device, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
            except OSError:
                device = Path("/dev/null")  # no CAP_MKNOD: the same device, already made
            gres.append(f"NodeName={node} Name=gpu File={device}")
        self.conf.write_text(f"""\
ClusterName=sntest
SlurmctldHost=localhost
SlurmctldPort={ctld}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={f}/munge/munge.socket
StateSaveLocation={f}/state
SlurmdSpoolDir={f}/spool/%n
SlurmctldPidFile={f}/slurmctld.pid
SlurmdPidFile={f}/slurmd-%n.pid
SlurmctldLogFile={f}/log/slurmctld.log
SlurmdLogFile={f}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=n1 NodeHostname=localhost Port={n1} CPUs={cpus} Gres=gpu:1 State=UNKNOWN
NodeName=n2 NodeHostname=localhost Port={n2} CPUs={cpus} Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
""")
        (f / "gres.conf").write_text("\n".join(gres) + "\n")

    def start(self, name: str, *cmd: str) -> None:
        """A daemon in the foreground of a session of its own (setsid: it outlives nothing
        of ours by accident and nothing of ours takes it down)."""
        log = open(self.folder / "log" / f"{name}.out", "w")
        self.daemons[name] = subprocess.Popen(
            list(cmd), env=self.env(), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def start_all(self) -> Optional[str]:
        """munged, slurmctld, slurmd n1 and n2; None once both nodes are idle, else why not."""
        f = self.folder
        key = f / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket = f / "munge" / "munge.socket"
        self.start("munged", which("munged"), "-F", "-f", f"--key-file={key}",
                   f"--socket={socket}", f"--pid-file={f}/munge/munged.pid",
                   f"--log-file={f}/log/munged.log", f"--seed-file={f}/munge/munged.seed")
        if not self._until(lambda: socket.exists(), 15):
            return f"munged did not start: {self._last_line('munged.log', 'munged.out')}"
        self.start("slurmctld", which("slurmctld"), "-D")
        self.start("slurmd-n1", which("slurmd"), "-D", "-N", "n1")
        self.start("slurmd-n2", which("slurmd"), "-D", "-N", "n2")
        if not self._until(self._nodes_idle, 45):
            return (f"the nodes did not come up idle in 45 s: slurmctld: "
                    f"{self._last_line('slurmctld.log', 'slurmctld.out')}; slurmd n1: "
                    f"{self._last_line('slurmd-n1.log', 'slurmd-n1.out')}")
        return None

    def _nodes_idle(self) -> bool:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env(),
                              capture_output=True, text=True, timeout=30)
        states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
        return proc.returncode == 0 and states == {"n1": "idle", "n2": "idle"}

    def _until(self, condition, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(d.poll() is not None for d in self.daemons.values()):
                return False
            if condition():
                return True
            time.sleep(0.2)
        return False

    def _last_line(self, *logs: str) -> str:
        for name in logs:
            path = self.folder / "log" / name
            lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
            if lines:
                return lines[-1]
        return "(no log)"

    def stop(self) -> None:
        """Cancel what still runs, stop the daemons (TERM, then KILL), and kill any process
        still left with this cluster's SLURM_CONF in its environment (job steps)."""
        ctld = self.daemons.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            ids = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env(),
                                 capture_output=True, text=True, timeout=30).stdout.split()
            if ids:
                subprocess.run(["scancel", *ids], env=self.env(), capture_output=True, timeout=30)
                self._until(lambda: not subprocess.run(
                    ["squeue", "-h"], env=self.env(), capture_output=True, text=True,
                    timeout=30).stdout.strip(), 60)
        daemons = list(self.daemons.values())[::-1]  # slurmd first, munged last
        for daemon in daemons:
            if daemon.poll() is None:
                daemon.terminate()
        for daemon in daemons:
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=15)
        for pid in self.leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def leftovers(self) -> List[int]:
        """Processes (slurmstepd, job steps) whose environment names this cluster."""
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                try:
                    environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
                except OSError:
                    continue
                if marker in environ:
                    found.append(int(entry))
        return found


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running two-node SLURM cluster (see the module docstring); SLURM_CONF is exported
    for the client commands while it runs."""
    reason = apt_install(SLURM_PACKAGES, SLURM_COMMANDS)
    if reason:
        pytest.skip(f"SLURM: {reason}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.write_config(cpus=len(os.sched_getaffinity(0)))
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        reason = cluster.start_all()
        if reason:
            pytest.skip(f"SLURM daemons: {reason}")
        yield cluster
    finally:
        cluster.stop()
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
