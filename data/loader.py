"""``build_loader``: the one factory that turns ``DataConfig`` into batches on a device.

Both backends return an object with the same interface (see :class:`Loader`):
``len()`` batches per epoch on this rank, iteration yielding normalised
float32 ``(N, 3, H, W)`` images and int64 targets on ``device``, and
``set_epoch(epoch, start_iter)`` before each epoch.

Unreadable images (``data.on_bad_image: skip``): in training each one is replaced
by another sample of the same rank's shard, chosen from ``(seed, epoch, rank,
position)`` only, so every rank runs the same iterations with whole batches (and
whole per-GPU chunks) and a resumed run sees the same batches; in validation it is
left out, so every image counts at most once. Either way it is counted in
``bad_images``. A shard in which no replacement decodes is an error.
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional, Tuple

import torch
from torch.utils.data import DataLoader

from .base import Loader
from .config import DataConfig
from .datasets import (BadImageError, BadSample, ImageDataset, ImageList, class_folders,
                       read_list_file, scan_folder)
from .demo import ensure_demo_dataset
from .presets import ClassificationPresetEval, ClassificationPresetTrain, Normalizer
from .sampler import ShardedBatchSampler, mix_seed

__all__ = ["build_loader", "build_image_list", "build_preset", "select_backend",
           "TorchvisionLoader"]

SPLITS = ("train", "val")

#: Other samples of the shard tried in place of an unreadable one before giving up.
REPLACEMENT_TRIES = 16


class Batch(NamedTuple):
    """What a DataLoader worker hands over: uint8 images, RGB shifts and labels of the
    decoded samples, and ``(position in the batch, BadSample)`` of the others."""

    images: torch.Tensor
    shifts: torch.Tensor
    labels: torch.Tensor
    bad: List[Tuple[int, BadSample]]


def collate_samples(samples: list) -> Batch:
    """Stack the decoded samples; carry the bad ones, with their positions, separately."""
    good = [s for s in samples if not isinstance(s, BadSample)]
    bad = [(i, s) for i, s in enumerate(samples) if isinstance(s, BadSample)]
    if not good:
        empty = torch.empty(0, dtype=torch.uint8)
        return Batch(empty, torch.empty(0, 3), torch.empty(0, dtype=torch.int64), bad)
    return Batch(torch.stack([s[0] for s in good]), torch.stack([s[1] for s in good]),
                 torch.tensor([s[2] for s in good], dtype=torch.int64), bad)


def _ignore_sigterm(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM: torchrun, SLURM and ``kill -TERM -- -PGID`` signal
    the whole process group, and the main process decides (the trainer saves and exits;
    the workers then follow their parent). A worker dies with its parent: see
    :func:`_die_with_parent`."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    _die_with_parent()


def _die_with_parent() -> None:
    """SIGKILL this worker as soon as its parent dies (Linux; elsewhere PyTorch's watchdog
    notices within 5 s). A forked worker holds copies of its parent's sockets, the process
    group's too: while an orphaned worker lives on, the other ranks do not see that a
    killed rank's connections closed, and wait in their next collective instead of failing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import multiprocessing
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before prctl
        os._exit(1)


#: The loaders whose DataLoader workers may be alive (see _stop_workers_at_exit).
_LIVE: "weakref.WeakSet[TorchvisionLoader]" = weakref.WeakSet()


@atexit.register
def _stop_workers_at_exit() -> None:
    """Stop the workers of every loader still alive when the process exits.

    At exit, multiprocessing stops daemonic children with SIGTERM, which these workers
    ignore, and then waits for them: a process that ended with a loader's persistent
    workers alive (a traceback holds the trainer, a script holds a loader) waited forever
    (PyTorch stops persistent workers at exit itself only with pin_memory). Registered
    after multiprocessing's own exit function, this one runs before it."""
    for loader in list(_LIVE):
        loader.close()


@contextmanager
def _sigterm_held():
    """Hold SIGTERM while workers start, so none arrives before they ignore it (a forked
    worker inherits the mask; the main process gets the signal when this block ends)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class TorchvisionLoader(Loader):
    """Pillow decoding and transforms in DataLoader workers; normalisation on ``device``."""

    backend = "torchvision"

    def __init__(self, dataset: ImageDataset, sampler: ShardedBatchSampler, *, workers: int,
                 pin_memory: bool, prefetch_factor: int, device: torch.device,
                 mean, std, on_bad_image: str, reason: str, replace_bad: bool = False,
                 resize_crop_transform=None):
        super().__init__(dataset.images, sampler, device, reason)
        self.on_bad_image, self.replace_bad = on_bad_image, replace_bad
        self._dataset = dataset
        self._transforms = {False: dataset.transform, True: resize_crop_transform}
        self._normalize = Normalizer(mean, std)
        self._warned = set()
        self._shard: Tuple[Optional[int], List[int]] = (None, [])
        self._options = dict(num_workers=workers, pin_memory=pin_memory,
                             prefetch_factor=prefetch_factor)
        self._loader = self._data_loader()
        if workers > 0:
            _LIVE.add(self)

    def _data_loader(self) -> DataLoader:
        # A generator of its own: starting an epoch draws the workers' base seed from it, not
        # from the global RNG, which belongs to the model (dropout) and is restored on resume.
        # (Augmentation is seeded per sample by the sampler; the base seed is unused.)
        workers = self._options["num_workers"]
        return DataLoader(
            self._dataset, batch_sampler=self.sampler, num_workers=workers,
            collate_fn=collate_samples, pin_memory=self._options["pin_memory"],
            persistent_workers=workers > 0,
            prefetch_factor=self._options["prefetch_factor"] if workers > 0 else None,
            generator=torch.Generator().manual_seed(0),
            worker_init_fn=_ignore_sigterm if workers > 0 else None)

    def set_resize_crop(self, on: bool) -> None:
        on = bool(on)
        if on == self.resize_crop:
            return
        if self._transforms[on] is None:
            raise ValueError("this loader has no Resize + RandomCrop transform (validation, "
                             "or data.image_size larger than data.val_resize)")
        # Persistent workers hold a copy of the dataset: new workers see the new transform.
        self._dataset.transform = self._transforms[on]
        self.resize_crop = on
        self._loader = self._data_loader()

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        self._begin_epoch()
        with _sigterm_held():
            batches = iter(self._loader)
        for i, batch in enumerate(batches, self.sampler.start_iter):
            if batch.bad:
                batch = self._handle_bad(batch, i)
            if batch.labels.numel() == 0:  # validation only: every image was unreadable
                continue
            yield self._to_device(batch)

    def _to_device(self, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        images = batch.images.to(self.device, non_blocking=True)
        shifts = batch.shifts.to(self.device, non_blocking=True)
        targets = batch.labels.to(self.device, non_blocking=True)
        return self._normalize(images, shifts), targets

    def _handle_bad(self, batch: Batch, batch_index: int) -> Batch:
        """Apply ``on_bad_image`` to the unreadable samples of batch ``batch_index``."""
        if self.on_bad_image == "error":
            bad = batch.bad[0][1]
            raise BadImageError(f"{bad.path}: cannot decode image ({bad.error})")
        self.bad_images += len(batch.bad)
        what = "replaced by another image of this rank's shard" if self.replace_bad \
            else "left out"
        for _, bad in batch.bad:
            if bad.path not in self._warned:  # once per file and process, on one line
                self._warned.add(bad.path)
                error = " ".join(str(bad.error).split())
                print(f"warning: unreadable image {bad.path} ({error}): {what}",
                      file=sys.stderr, flush=True)
        return self._fill(batch, batch_index) if self.replace_bad else batch

    def _fill(self, batch: Batch, batch_index: int) -> Batch:
        """The whole batch, each unreadable sample replaced in its position."""
        good = iter(zip(batch.images, batch.shifts, batch.labels.tolist()))
        slots = dict(batch.bad)
        first = batch_index * self.sampler.batch_size
        samples = [self._substitute(slots[p], first + p) if p in slots else next(good)
                   for p in range(len(batch.labels) + len(slots))]
        return Batch(torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples]),
                     torch.tensor([s[2] for s in samples], dtype=torch.int64), [])

    def _substitute(self, bad: BadSample, position: int):
        """A decoded sample of this rank's shard in place of ``bad`` (the sample at
        ``position`` of the epoch): candidates drawn from ``(seed, epoch, rank, position)``,
        augmented with the bad sample's own seed."""
        s = self.sampler
        if self._shard[0] != s.epoch:
            self._shard = (s.epoch, s.shard()[: s.num_samples].tolist())
        shard = self._shard[1]
        for attempt in range(REPLACEMENT_TRIES):
            index = shard[mix_seed(s.seed, s.epoch, s.rank, position, attempt) % len(shard)]
            sample = self._dataset[(index, bad.seed)] if index != bad.index else bad
            if not isinstance(sample, BadSample):
                return sample
        raise BadImageError(f"{bad.path}: cannot decode image ({bad.error}), nor any of "
                            f"{REPLACEMENT_TRIES} other images of this rank's shard tried in "
                            f"its place: are the images under {self.images.image_dir} readable?")

    def close(self) -> None:
        """Stop the DataLoader workers now, the way the DataLoader does when it is freed,
        and release it."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            for worker in getattr(iterator, "_workers", []):
                if worker.is_alive():  # it ignores the SIGTERM of the shutdown's last resort
                    os.kill(worker.pid, signal.SIGKILL)
                    worker.join()
        self._loader = None


def select_backend(requested: str, device: torch.device) -> Tuple[str, str]:
    """(backend, reason): DALI for 'dali', or for 'auto' when importable and on CUDA."""
    from .dali import dali_import_error
    error = dali_import_error()
    if requested == "torchvision":
        return "torchvision", "torchvision backend (data.backend=torchvision)"
    if requested == "dali":
        if error:
            raise ValueError(f"data.backend: 'dali' requested but DALI cannot be imported "
                             f"({error}); install nvidia-dali-cuda130 or use 'torchvision'")
        where = "GPU (mixed) decoding" if device.type == "cuda" else "CPU decoding"
        return "dali", f"DALI backend with {where} (data.backend=dali)"
    if error:
        return "torchvision", f"torchvision backend (data.backend=auto: DALI not importable: " \
                              f"{error})"
    if device.type != "cuda":
        return "torchvision", "torchvision backend (data.backend=auto: device is " \
                              f"{device.type}, DALI is chosen only for CUDA devices)"
    return "dali", f"DALI backend with GPU (mixed) decoding on {device} (data.backend=auto)"


def _resolve(root: Path, name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else root / path


def _dataset_root(cfg: DataConfig) -> Path:
    if cfg.dataset == "demo":
        return ensure_demo_dataset(cfg.root, cfg.demo_size, variant=cfg.demo_variant)
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data.root not found")
    return root


def build_image_list(cfg: DataConfig, split: str) -> ImageList:
    """Index a split (structural errors are raised here, before training starts)."""
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
    root = _dataset_root(cfg)
    image_dir = root / (cfg.train_dir if split == "train" else cfg.val_dir)
    if cfg.layout == "list" and cfg.dataset != "demo":
        list_name = cfg.train_list if split == "train" else cfg.val_list
        if not list_name:
            raise ValueError(f"data.{split}_list: required with data.layout=list")
        images = read_list_file(_resolve(root, list_name), image_dir, cfg.num_classes)
    else:
        train_dir = root / cfg.train_dir
        classes = class_folders(train_dir) if split == "val" and train_dir.is_dir() else None
        images = scan_folder(image_dir, classes or None)
    images.check_num_classes(cfg.num_classes)
    return images


def build_preset(cfg: DataConfig, split: str, resize_crop: bool = False):
    """The transform of ``split``; ``resize_crop``: the training one with Resize(val_resize)
    + RandomCrop(image_size) in place of RandomResizedCrop."""
    if split == "train":
        return ClassificationPresetTrain(cfg.image_size, min_scale=cfg.min_scale, hflip=cfg.hflip,
                                         color_jitter=cfg.color_jitter, lighting=cfg.lighting,
                                         mean=cfg.mean, std=cfg.std,
                                         resize_size=cfg.val_resize if resize_crop else None)
    return ClassificationPresetEval(cfg.val_crop, cfg.val_resize, mean=cfg.mean, std=cfg.std)


def build_loader(cfg: DataConfig, split: str, batch_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, device: torch.device = torch.device("cpu"),
                 drop_last: Optional[bool] = None) -> Loader:
    """The loader of ``split`` ('train' or 'val') for one rank; ``batch_size`` is per process.

    Train: shuffled, equal shards, ``drop_last`` True by default.  Val: in order,
    shard ``r::world_size`` without padding, ``drop_last`` False by default.
    """
    cfg.validate()
    device = torch.device(device)
    images = build_image_list(cfg, split)
    train = split == "train"
    sampler = ShardedBatchSampler(
        len(images), batch_size, rank=rank, world_size=world_size, shuffle=train,
        even_shards=train, drop_last=train if drop_last is None else drop_last, seed=seed)
    backend, reason = select_backend(cfg.backend, device)
    if backend == "dali":
        from .dali import DaliLoader
        return DaliLoader(cfg, images, sampler, train=train, device=device, reason=reason)
    reason += f", {cfg.workers} workers"
    # Workers hand bad samples over and the main process applies the policy: a worker
    # that raises leaves its DataLoader iterator slow to shut down.
    dataset = ImageDataset(images, build_preset(cfg, split).prepare, "skip")
    pin = cfg.pin_memory and device.type == "cuda" and torch.cuda.is_available()
    return TorchvisionLoader(dataset, sampler, workers=cfg.workers, pin_memory=pin,
                             prefetch_factor=cfg.prefetch_factor, device=device,
                             mean=cfg.mean, std=cfg.std, on_bad_image=cfg.on_bad_image,
                             reason=reason, replace_bad=train,
                             resize_crop_transform=build_preset(cfg, split, resize_crop=True)
                             .prepare if train and cfg.image_size <= cfg.val_resize else None)
