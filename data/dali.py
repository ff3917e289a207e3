"""NVIDIA DALI backend: JPEG decoding on the GPU ("mixed") or in DALI's CPU threads.

The pipelines mirror :mod:`data.presets`:

* train: ``decoders.image_random_crop`` (area ``[min_scale, 1]``, aspect
  ``[3/4, 4/3]``, log-uniform, ten tries) -> linear antialiased resize ->
  optional ``color_twist`` (brightness, contrast, saturation; fixed order, and
  DALI's contrast pivots around mid-grey rather than the image mean) ->
  ``crop_mirror_normalize`` with a random flip.  The PCA lighting noise is
  folded into a per-sample normalisation mean: ``(x/255 + d - m)/s ==
  (x - 255 (m - d)) / (255 s)``, so it costs nothing.
* val: decode -> resize of the shorter side (linear, antialiased) -> center
  crop -> normalise, with the output size and crop position computed from the
  file header exactly as torchvision's ``Resize``/``CenterCrop`` do, so that
  the two backends' validation tensors agree to one intensity level.

Order and sharding are those of :class:`data.sampler.ShardedBatchSampler`
(the torchvision backend's): at every ``set_epoch`` this rank's remaining
batches are written to a file list, read in order by ``readers.file`` with
``pad_last_batch=True`` and emitted with ``LastBatchPolicy.PARTIAL``, so
a partial last batch holds only real samples and the next epoch starts
cleanly.  A mid-epoch resume (``start_iter``) starts that list at the
first batch not yet done, so no batch is read and discarded.  The sample order
and the images in each batch equal those of an uninterrupted run; the random
crops, flips and noise come from DALI's generators, seeded from ``(seed,
epoch, rank, start_iter)``, so they are reproducible but differ from those of
an uninterrupted run after a resume (only the torchvision backend reproduces
those).  The pipeline is rebuilt for each training epoch (milliseconds on the CPU).

Bad files: DALI stops the whole pipeline on an undecodable file and cannot
skip it, so files are checked when the loader is built (``data.dali_verify``:
``header`` checks magic bytes and the JPEG/PNG end marker, which catches empty,
non-image and truncated files; ``decode`` decodes every file with Pillow;
``none`` trusts the data).  Bad files are left out on every rank
(``on_bad_image: skip``; ``bad_images`` reports this rank's share each epoch)
or raise :class:`BadImageError` (``error``).  CMYK and grayscale JPEGs and
PNG files named ``.JPEG`` decode in DALI as in Pillow (checked bit-exact on
the CPU decoder).  EXIF orientation is ignored, as Pillow and torchvision do
(DALI would otherwise rotate the few such ImageNet files).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

from .base import Loader
from .config import LIGHTING_EIGVAL, LIGHTING_EIGVEC, DataConfig
from .datasets import BadImageError, ImageList, load_rgb
from .sampler import ShardedBatchSampler, mix_seed

__all__ = ["DaliLoader", "dali_import_error", "check_image_file"]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_OTHER_MAGIC = (b"BM", b"GIF8", b"II*\x00", b"MM\x00*", b"P5", b"P6")


def dali_import_error() -> Optional[str]:
    """None when DALI and its PyTorch plugin import, else the reason."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA runtime mismatch at import
        return f"{type(exc).__name__}: {exc}"
    return None


def check_image_file(path: str, mode: str = "header") -> Optional[str]:
    """The problem with an image file, or None: ``header`` checks the magic bytes and
    (JPEG, PNG) the end marker; ``decode`` decodes it with Pillow."""
    try:
        if mode == "decode":
            load_rgb(path)
            return None
        with open(path, "rb") as f:
            head = f.read(16)
            if not head:
                return "empty file"
            if head.startswith(b"\xff\xd8\xff") or head.startswith(_PNG_MAGIC):
                # 2 KiB: room for trailing bytes some encoders write after the marker.
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 2048))
                tail = f.read()
                marker = b"\xff\xd9" if head[0] == 0xFF else b"IEND"
                return None if marker in tail else "truncated (no end-of-image marker)"
            if head.startswith(_OTHER_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
                return None
            return "not an image file (unknown magic bytes)"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def verify_images(images: ImageList, mode: str, threads: int = 16
                  ) -> List[Tuple[int, str]]:
    """``(index, problem)`` of every bad file, checked by a thread pool in chunks."""
    if mode == "none":
        return []
    chunks = [range(i, min(i + 512, len(images))) for i in range(0, len(images), 512)]

    def check(chunk):
        out = []
        for i in chunk:
            problem = check_image_file(images.path(i), mode)
            if problem:
                out.append((i, problem))
        return out

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return [bad for part in pool.map(check, chunks) for bad in part]


def _subset(images: ImageList, keep: np.ndarray) -> ImageList:
    return ImageList(images.image_dir, images.paths[keep], images.labels[keep],
                     images.classes, images.source)


def _lighting_mean(fn, types, mean255: np.ndarray, std: float):
    """Per-sample normalisation mean ``255 (mean - delta)`` with AlexNet's PCA noise delta."""
    eigval = np.asarray(LIGHTING_EIGVAL, np.float32)
    eigvec = np.asarray(LIGHTING_EIGVEC, np.float32)
    weights = fn.random.normal(shape=[3]) * std * types.Constant(eigval)
    delta = (weights[0] * types.Constant(eigvec[:, 0]) + weights[1] * types.Constant(eigvec[:, 1])
             + weights[2] * types.Constant(eigvec[:, 2]))
    return types.Constant(mean255) - delta * 255.0


def _val_geometry(fn, types, jpegs, resize: int, crop: int):
    """torchvision's ``Resize(resize)`` + ``CenterCrop(crop)`` geometry from the file header:
    the long side is ``int(resize * long / short)`` (DALI's ``resize_shorter`` rounds), and
    the crop starts at ``round((size - crop) / 2)`` rounding halves to even, as Python's
    ``round`` does (DALI's ``crop_pos`` rounds them up)."""
    import nvidia.dali.math as dmath

    shape = fn.peek_image_shape(jpegs, adjust_orientation=False)  # H, W, C
    h, w = fn.cast(shape[0], dtype=types.FLOAT), fn.cast(shape[1], dtype=types.FLOAT)
    wide = fn.cast(w > h, dtype=types.FLOAT)
    new_h = wide * resize + (1 - wide) * dmath.floor(resize * h / w)
    new_w = wide * dmath.floor(resize * w / h) + (1 - wide) * resize

    def position(size):
        margin = size - crop
        half = dmath.floor(margin / 2)
        odd = margin - 2 * half
        start = half + odd * (half - 2 * dmath.floor(half / 2))  # half to even
        return start / dmath.max(margin, 1.0)

    return (new_h, new_w), (position(new_h), position(new_w))


def _build_pipeline(cfg: DataConfig, file_list: str, train: bool, batch_size: int,
                    device_id: Optional[int], seed: int, resize_crop: bool = False):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    gpu = device_id is not None
    mean255 = np.asarray(cfg.mean, np.float32) * 255.0
    std255 = (np.asarray(cfg.std, np.float32) * 255.0).tolist()

    @pipeline_def
    def pipeline():
        jpegs, labels = fn.readers.file(file_list=file_list, random_shuffle=False,
                                        pad_last_batch=True, name="Reader")
        decoder = "mixed" if gpu else "cpu"
        linear = dict(interp_type=types.INTERP_LINEAR, antialias=True)
        if train and resize_crop:  # Resize(val_resize) + RandomCrop(image_size)
            images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB,
                                       adjust_orientation=False)
            images = fn.resize(images, resize_shorter=cfg.val_resize, **linear)
            images = fn.crop(images, crop=(cfg.image_size, cfg.image_size),
                             crop_pos_x=fn.random.uniform(range=[0.0, 1.0]),
                             crop_pos_y=fn.random.uniform(range=[0.0, 1.0]))
        elif train:
            images = fn.decoders.image_random_crop(
                jpegs, device=decoder, output_type=types.RGB, adjust_orientation=False,
                random_area=[cfg.min_scale, 1.0], random_aspect_ratio=[3 / 4, 4 / 3],
                num_attempts=10)
            images = fn.resize(images, resize_x=cfg.image_size, resize_y=cfg.image_size,
                               **linear)
        if train:
            if cfg.color_jitter > 0:
                bounds = [max(0.0, 1.0 - cfg.color_jitter), 1.0 + cfg.color_jitter]
                images = fn.color_twist(images, brightness=fn.random.uniform(range=bounds),
                                        contrast=fn.random.uniform(range=bounds),
                                        saturation=fn.random.uniform(range=bounds))
            mean = _lighting_mean(fn, types, mean255, cfg.lighting) if cfg.lighting > 0 \
                else mean255.tolist()
            mirror = fn.random.coin_flip(probability=0.5) if cfg.hflip else 0
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                              mean=mean, std=std255, mirror=mirror)
        else:
            (new_h, new_w), (pos_y, pos_x) = _val_geometry(fn, types, jpegs, cfg.val_resize,
                                                           cfg.val_crop)
            images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB,
                                       adjust_orientation=False)
            images = fn.resize(images, resize_x=new_w, resize_y=new_h, **linear)
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                              crop=(cfg.val_crop, cfg.val_crop),
                                              crop_pos_x=pos_x, crop_pos_y=pos_y,
                                              mean=mean255.tolist(), std=std255)
        return images, (labels.gpu() if gpu else labels)

    pipe = pipeline(batch_size=batch_size, num_threads=max(1, cfg.workers),
                    device_id=device_id, seed=seed, prefetch_queue_depth=2)
    pipe.build()
    return pipe


class DaliLoader(Loader):
    """DALI pipelines behind the :class:`data.base.Loader` interface."""

    backend = "dali"

    def __init__(self, cfg: DataConfig, images: ImageList, sampler: ShardedBatchSampler, *,
                 train: bool, device: torch.device, reason: str):
        self.cfg, self.train = cfg, train
        good, self._excluded, note = self._verify(images, sampler)
        resized = ShardedBatchSampler(
            len(good), sampler.batch_size, rank=sampler.rank, world_size=sampler.world_size,
            shuffle=sampler.shuffle, even_shards=sampler.even_shards,
            drop_last=sampler.drop_last, seed=sampler.seed)
        super().__init__(good, resized, device, f"{reason}, {max(1, cfg.workers)} threads, {note}")
        self.dataset_size = len(images)
        self.bad_images = self._excluded
        self._device_id = None
        if self.device.type == "cuda":
            self._device_id = self.device.index if self.device.index is not None \
                else torch.cuda.current_device()
        self._tmpdir = tempfile.mkdtemp(prefix="sn_dali_")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._tmpdir, True)
        self._pipe = self._iterator = self._key = None
        self._num_batches = 0
        self._complete = False

    def _verify(self, images: ImageList, sampler: ShardedBatchSampler):
        """Check the files; return the good ones, this rank's share of bad ones, a note."""
        mode = self.cfg.dali_verify
        if mode == "none":
            return images, 0, "files not checked (data.dali_verify=none)"
        start = time.perf_counter()
        bad = verify_images(images, mode)
        note = f"{mode} check of {len(images)} files: {len(bad)} bad " \
               f"({time.perf_counter() - start:.1f} s)"
        if bad and (self.cfg.on_bad_image == "error" or len(bad) == len(images)):
            index, problem = bad[0]
            none = f"; none of the {len(images)} images of {images.source} is readable" \
                if len(bad) == len(images) else ""
            raise BadImageError(f"{images.path(index)}: cannot decode image ({problem}){none}")
        if bad and sampler.rank == 0:
            listed = "; ".join(f"{images.path(i)} ({p})" for i, p in bad[:5])
            warnings.warn(f"DALI: leaving out {len(bad)} unreadable image(s): {listed}"
                          + (" ..." if len(bad) > 5 else ""), stacklevel=3)
        if not bad:
            return images, 0, note
        keep = np.ones(len(images), dtype=bool)
        keep[[i for i, _ in bad]] = False
        return _subset(images, keep), len(bad[sampler.rank::sampler.world_size]), note

    def set_resize_crop(self, on: bool) -> None:
        if on and not self.train:
            raise ValueError("this loader has no Resize + RandomCrop transform (validation)")
        self.resize_crop = bool(on)  # the next epoch's pipeline is built with it

    def set_epoch(self, epoch: int, start_iter: int = 0) -> None:
        """As the base class; ``bad_images`` is this rank's share of the files left out."""
        super().set_epoch(epoch, start_iter)
        self.bad_images = self._excluded

    def _write_list(self, batches: List[List[int]]) -> str:
        path = os.path.join(self._tmpdir, "file_list.txt")
        with open(path, "w", encoding="utf-8") as f:
            for index in (i for batch in batches for i in batch):
                f.write(f"{self.images.path(index)} {int(self.images.labels[index])}\n")
        return path

    def _prepare(self) -> int:
        """Build (or reuse) the pipeline of the current epoch; return its batch count."""
        s = self.sampler
        key = (s.epoch if s.shuffle else None, s.start_iter, self.resize_crop)
        if key == self._key and self._complete:
            if self._iterator is not None:
                self._iterator.reset()
            return self._num_batches
        self.close()
        batches = s.batches()
        self._key, self._num_batches = key, len(batches)
        if batches:
            from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
            seed = mix_seed(s.seed, s.epoch, s.rank, s.start_iter) % (2 ** 31)
            self._pipe = _build_pipeline(self.cfg, self._write_list(batches), self.train,
                                         s.batch_size, self._device_id, seed, self.resize_crop)
            self._iterator = DALIGenericIterator(
                self._pipe, ["images", "labels"], reader_name="Reader",
                last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)
        return self._num_batches

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        self._begin_epoch()
        self._complete = False
        if self._prepare() == 0:
            self._complete = True
            return
        for out in self._iterator:
            images = out[0]["images"].to(self.device, non_blocking=True)
            targets = out[0]["labels"].view(-1).to(self.device, torch.int64, non_blocking=True)
            yield images, targets
        self._complete = True

    def close(self) -> None:
        """Drop the current pipeline (its memory and threads)."""
        self._iterator = self._pipe = None
        self._key = None
