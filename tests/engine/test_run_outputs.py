"""Writing the run folder fails in one line naming the path: a disk full at start, a file
system out of inodes for config.yaml or for TensorBoard's event file (whose writer thread
used to add a 40-line traceback), TensorBoard or matplotlib not installed.

Full file systems are real: a small tmpfs mounted by the test (root only; skipped with
the reason elsewhere), filled with real files.
"""
import errno
import os
import subprocess
import sys
import threading

import pytest

from engine.config import load_config, resolve
from engine.distributed import DistInfo
from engine.trainer import Trainer

from . import write_tiny_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_run_config(
        tmp_path_factory.mktemp("outputs"), size=28, num_classes=2, train_per_class=4,
        val_per_class=1, batch={"per_gpu": 2}, optim={"base_lr": 0.1})


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(options)`` mounts a fresh tmpfs and returns its folder; unmounted after."""
    mounted = []

    def mount(options: str):
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        try:
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                                  capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("no mount command")
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")
        mounted.append(where)
        return where
    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=True)


def _fill_bytes(folder):
    with open(folder / "filler", "wb", buffering=0) as f:
        with pytest.raises(OSError) as e:
            while True:
                f.write(b"\0" * 4096)
    assert e.value.errno == errno.ENOSPC and os.statvfs(folder).f_bavail == 0


def _fill_inodes(folder):
    (folder / "fillers").mkdir()
    with pytest.raises(OSError) as e:
        for i in range(100_000):
            (folder / "fillers" / str(i)).touch()
    assert e.value.errno == errno.ENOSPC


def _trainer(tiny, out, *overrides):
    return Trainer(resolve(load_config(tiny, [f"output_dir={out}", *overrides]), 1), DistInfo())


def test_disk_full_at_start_is_one_line_naming_the_folder(tiny, tmpfs):
    """The issue's case, as the user ran it: train.py on a full disk."""
    fs = tmpfs("size=64k")
    _fill_bytes(fs)
    proc = subprocess.run([sys.executable, "train.py", "--config", tiny, f"output_dir={fs}/run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: {fs}/run: no room for a checkpoint (0 bytes free on "
                                  "its disk, one checkpoint of this model takes at least ")
    assert proc.stderr.count("\n") == 1 and "Errno" not in proc.stderr
    assert os.listdir(fs / "run") == []  # refused before writing anything


def _join_tensorboard_threads():
    for thread in threading.enumerate():
        if type(thread).__module__.startswith("tensorboard."):
            thread.join(timeout=10)


def test_no_room_for_config_or_event_file_names_the_file(tiny, tmpfs, monkeypatch):
    """Out of inodes (bytes are left, so the start-up check passes): the failed write
    names config.yaml, or TensorBoard's folder with no traceback from its writer thread."""
    fs = tmpfs("size=4m,nr_inodes=64")
    (fs / "run").mkdir()
    _fill_inodes(fs)
    with pytest.raises(OSError) as e:
        _trainer(tiny, fs / "run")
    assert str(e.value) == f"{fs}/run/config.yaml: cannot write (No space left on device)"

    fs = tmpfs("size=4m,nr_inodes=64")
    for folder in ("run", "run/tb"):
        (fs / folder).mkdir()
    (fs / "run" / "config.yaml").touch()  # rewritten in place: no new inode
    _fill_inodes(fs)
    printed = []  # what reaches the process's thread-exception hook gets printed
    monkeypatch.setattr(threading, "excepthook", lambda args: printed.append(args.exc_value))
    with pytest.raises(OSError) as e:  # TensorBoard's thread reports a failed write at the
        # writer's next call: the first flush (in its constructor) or, rarely, the first scalar
        _trainer(tiny, fs / "run", "log.tensorboard=true")._scalar("probe", 0.0, 0)
    _join_tensorboard_threads()
    assert str(e.value) == (f"{fs}/run/tb: cannot write the TensorBoard events (No space left "
                            "on device)")
    assert printed == []  # the writer thread's traceback is left out


def test_tensorboard_or_matplotlib_missing_is_one_line(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not importable
    with pytest.raises(ValueError, match="^log.tensorboard is true but TensorBoard is not "
                       "installed: pip install tensorboard, or pass log.tensorboard=false$"):
        _trainer(tiny, tmp_path / "a")
    _trainer(tiny, tmp_path / "b", "log.tensorboard=false")  # runs without it
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ValueError, match="log.ratio_figures is true but matplotlib is not"):
        _trainer(tiny, tmp_path / "c")
    _trainer(tiny, tmp_path / "d", "log.ratio_figures=false").writer.close()
