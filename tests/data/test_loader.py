"""build_loader with the torchvision backend: determinism, resume, sharding, bad images."""
import dataclasses
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from data import DataConfig, build_loader
from data.datasets import BadImageError

from .conftest import make_folder_dataset, write_image, write_list


def _cfg(root, **kw):
    base = dict(root=str(root), backend="torchvision", workers=0, image_size=24, val_resize=28,
                val_crop=24, color_jitter=0.2)
    base.update(kw)
    return DataConfig(**base)


def _epoch(loader, epoch, start_iter=0):
    loader.set_epoch(epoch, start_iter)
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2)
                                    for (x1, y1), (x2, y2) in zip(a, b))


def test_attributes_and_batches(folder_root):
    loader = build_loader(_cfg(folder_root), "train", 5)
    assert (loader.backend, loader.dataset_size, loader.num_classes) == ("torchvision", 24, 3)
    assert loader.classes == ["n01", "n02", "n10"]
    assert len(loader) == 4 and loader.num_samples == 20
    assert "torchvision" in loader.reason
    batches = _epoch(loader, 0)
    assert len(batches) == 4
    for x, y in batches:
        assert x.shape == (5, 3, 24, 24) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and x.device.type == "cpu"
    val = build_loader(_cfg(folder_root), "val", 4)
    assert len(val) == 4 and val.num_samples == 15 and val.dataset_size == 15
    sizes = [len(y) for _, y in _epoch(val, 0)]
    assert sizes == [4, 4, 4, 3]  # nothing dropped in validation


def test_order_and_augmentation_independent_of_workers_and_resumable(folder_root):
    runs = {w: build_loader(_cfg(folder_root, workers=w), "train", 3, seed=7) for w in (0, 2)}
    full0, full2 = _epoch(runs[0], 1), _epoch(runs[2], 1)
    assert _same(full0, full2)
    assert not _same(full0, _epoch(runs[0], 2))  # another epoch: another order and crops
    for loader in runs.values():  # a run killed after 3 batches and resumed
        assert _same(_epoch(loader, 1, start_iter=3), full0[3:])
    fresh = build_loader(_cfg(folder_root, workers=2), "train", 3, seed=7)
    assert _same(_epoch(fresh, 1, start_iter=5), full0[5:])
    other_seed = build_loader(_cfg(folder_root), "train", 3, seed=8)
    assert not _same(_epoch(other_seed, 1), full0)


def test_next_epoch_without_set_epoch(folder_root):
    loader = build_loader(_cfg(folder_root), "train", 4, seed=1)
    first = [y.tolist() for _, y in loader]
    second = [y.tolist() for _, y in loader]  # no set_epoch: moves on to epoch 1
    assert loader.epoch == 1 and first != second
    assert second == [y.tolist() for _, y in _epoch(loader, 1)]


@pytest.mark.parametrize("world", [2, 3])
def test_val_shards_cover_every_image_exactly_once(folder_root, world):
    single = torch.cat([x for x, _ in _epoch(build_loader(_cfg(folder_root), "val", 4), 0)])
    for rank in range(world):
        loader = build_loader(_cfg(folder_root, workers=2 if rank == 0 else 0), "val", 2,
                              rank=rank, world_size=world)
        shard = torch.cat([x for x, _ in _epoch(loader, 0)])
        assert loader.num_samples == len(shard) == len(range(rank, 15, world))
        assert torch.equal(shard, single[rank::world])


def test_train_shards_are_disjoint(folder_root):
    seen = []
    for rank in range(2):
        loader = build_loader(_cfg(folder_root, min_scale=1.0, hflip=False, lighting=0.0,
                                   color_jitter=0.0, image_size=8), "train", 3, rank=rank,
                              world_size=2, seed=3)
        assert len(loader) == 4
        seen.extend(x for batch, _ in _epoch(loader, 0) for x in batch)
    assert len(seen) == 24 and len({tuple(x.flatten().tolist()) for x in seen}) == 24


def _with_bad_file(tmp_path):
    root = make_folder_dataset(tmp_path / "ds", 4, 2)
    bad = write_image(root / "train" / "n02" / "n02_bad.JPEG", 1, "truncated")
    return root, bad


def _warnings(capsys):
    """The warning lines printed since the last call."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_image_replaced_in_training_and_left_out_in_validation(tmp_path, workers, capsys):
    root, bad = _with_bad_file(tmp_path)
    write_image(root / "val" / "n01" / "n01_bad.JPEG", 2, "truncated")
    loader = build_loader(_cfg(root, workers=workers), "train", 13, drop_last=False)
    batches = _epoch(loader, 0)
    assert loader.bad_images == 1 and [len(y) for _, y in batches] == [13]  # batch stays whole
    lines = _warnings(capsys)  # one line, naming the file, from one place
    assert len(lines) == 1 and str(bad) in lines[0] and "replaced" in lines[0]
    _epoch(loader, 1)
    assert _warnings(capsys) == []  # once per file
    assert _same(batches, _epoch(build_loader(_cfg(root), "train", 13, drop_last=False), 0))
    loader.set_epoch(1)
    assert loader.bad_images == 0
    val = build_loader(_cfg(root, workers=workers), "val", 4)
    _warnings(capsys)
    assert sum(len(y) for _, y in _epoch(val, 0)) == val.dataset_size - 1
    lines = _warnings(capsys)
    assert len(lines) == 1 and "n01_bad.JPEG" in lines[0] and "left out" in lines[0]
    assert val.bad_images == 1


def _corrupt(loader, indices):
    for i in indices:
        with open(loader.images.path(i), "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 not a JPEG")


def test_every_rank_keeps_its_batches_and_counts_every_bad_image(tmp_path):
    """A shard whose first and last batches are all unreadable: same iterations, whole
    batches, every bad file counted, and a resumed epoch sees the same batches."""
    root = make_folder_dataset(tmp_path / "ds", 8, 1)
    loaders = [build_loader(_cfg(root), "train", 3, rank=r, world_size=2, seed=5)
               for r in range(2)]
    loaders[1].set_epoch(0)
    batches = loaders[1].sampler.batches()
    _corrupt(loaders[1], batches[0] + batches[-1])
    epochs = [_epoch(loader, 0) for loader in loaders]
    assert [len(e) for e in epochs] == [4, 4]
    assert all(len(y) == 3 for e in epochs for _, y in e)
    assert [loader.bad_images for loader in loaders] == [0, 6]
    assert _same(_epoch(loaders[1], 0, start_iter=3), epochs[1][3:])


def test_no_readable_image_is_an_error(tmp_path):
    root = make_folder_dataset(tmp_path / "ds", 4, 1)
    loader = build_loader(_cfg(root), "train", 4)
    _corrupt(loader, range(loader.dataset_size))
    with pytest.raises(BadImageError, match="nor any of 16 other"):
        _epoch(loader, 0)


def test_workers_ignore_sigterm(folder_root):
    """torchrun and SLURM signal the whole process group: the workers live on and the
    main process decides."""
    loader = build_loader(_cfg(folder_root, workers=2), "train", 3)
    loader.set_epoch(0)
    batches = iter(loader)
    next(batches)
    workers = loader._loader._iterator._workers
    for w in workers:
        os.kill(w.pid, signal.SIGTERM)
    assert len(list(batches)) == len(loader) - 1
    assert all(w.is_alive() for w in workers)


_CHILD = """
import sys, time
from data import DataConfig, build_loader
loader = build_loader(DataConfig(root=sys.argv[1], backend="torchvision", workers=1,
                                 image_size=24, val_resize=28, val_crop=24), "train", 3)
loader.set_epoch(0)
batches = iter(loader)
next(batches)
print(loader._loader._iterator._workers[0].pid, flush=True)
if sys.argv[2] == "raise":
    raise RuntimeError("the loader's worker is alive")
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux: /proc, PDEATHSIG")
@pytest.mark.parametrize("end", ["raise", "kill"])
def test_workers_end_with_their_process(folder_root, end):
    """A process that ends with a traceback while its loader's worker lives exits (before,
    multiprocessing's exit function stopped the worker with SIGTERM, which it ignores, and
    waited for it forever); a process killed with SIGKILL takes its worker along at once
    (before, the orphan lived on for up to 5 s, holding copies of its parent's sockets: the
    other ranks of a killed rank kept waiting on them)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(folder_root), end], cwd=root,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        worker = int(proc.stdout.readline())
        if end == "kill":
            proc.kill()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    if end == "raise":
        assert proc.returncode == 1 and "the loader's worker is alive" in err
    deadline = time.monotonic() + 1  # PyTorch's watchdog would take 0-5 s
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_image_error_names_the_file(tmp_path, workers):
    root, bad = _with_bad_file(tmp_path)
    loader = build_loader(_cfg(root, workers=workers, on_bad_image="error"), "train", 13)
    with pytest.raises(BadImageError, match="n02_bad.JPEG"):
        _epoch(loader, 0)


def test_clear_errors_when_the_loader_is_built(tmp_path, folder_root):
    with pytest.raises(FileNotFoundError, match="data.root not found"):
        build_loader(_cfg(tmp_path / "nowhere"), "train", 2)
    with pytest.raises(FileNotFoundError, match="split folder not found"):
        build_loader(_cfg(folder_root, val_dir="validation"), "val", 2)
    (folder_root / "train" / "n05").mkdir()
    with pytest.raises(ValueError, match="n05: class folder has no images"):
        build_loader(_cfg(folder_root), "train", 2)
    (folder_root / "train" / "n05").rmdir()
    with pytest.raises(ValueError, match="data.num_classes is 1000"):
        build_loader(_cfg(folder_root, num_classes=1000), "val", 2)
    with pytest.raises(ValueError, match="data.train_list: required"):
        build_loader(_cfg(folder_root, layout="list"), "train", 2)
    with pytest.raises(ValueError, match="split"):
        build_loader(_cfg(folder_root), "test", 2)


def test_list_layout_matches_folder_layout(folder_root):
    folder = build_loader(_cfg(folder_root), "val", 4)
    lines = [f"{folder.images.paths[i].decode()} {folder.images.labels[i]}"
             for i in range(folder.dataset_size)]
    write_list(folder_root / "val.txt", lines)
    write_list(folder_root / "bad.txt", lines[:3] + ["n01/x.JPEG 1 2 three"])
    cfg = _cfg(folder_root, layout="list", val_list="val.txt", train_list="bad.txt",
               num_classes=3)
    listed = build_loader(cfg, "val", 4)
    assert listed.classes == folder.classes
    assert _same(_epoch(listed, 0), _epoch(folder, 0))
    with pytest.raises(ValueError, match=r"bad.txt:4: label 'three' is not an integer"):
        build_loader(dataclasses.replace(cfg, train_dir="val"), "train", 4)


def test_auto_backend_on_cpu_is_torchvision(folder_root):
    loader = build_loader(_cfg(folder_root, backend="auto"), "val", 4)
    assert loader.backend == "torchvision" and "data.backend=auto" in loader.reason
