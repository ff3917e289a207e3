"""The interface both backends implement (see :func:`data.build_loader`)."""
from __future__ import annotations

from typing import Iterator, List, Tuple

import torch

from .datasets import ImageList
from .sampler import ShardedBatchSampler

__all__ = ["Loader"]


class Loader:
    """The interface shared by the backends.

    Attributes: ``backend`` ("torchvision" or "dali"), ``reason`` (one log line),
    ``dataset_size`` (samples in the split), ``num_samples`` (samples this rank
    yields per epoch), ``num_classes``, ``classes``, ``bad_images`` (unreadable
    images met on this rank since the last ``set_epoch``: replaced by other samples of the
    rank's shard in training, left out in validation), ``device``.
    """

    backend = ""

    def __init__(self, images: ImageList, sampler: ShardedBatchSampler, device: torch.device,
                 reason: str):
        self.images, self.sampler = images, sampler
        self.device, self.reason = torch.device(device), reason
        self.classes: List[str] = list(images.classes)
        self.num_classes = len(self.classes)
        self.dataset_size = len(images)
        self.bad_images = 0
        self._epoch_pending = True

    @property
    def num_samples(self) -> int:
        return self.sampler.num_samples

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def __len__(self) -> int:
        return len(self.sampler)

    #: Training crops by Resize + RandomCrop instead of RandomResizedCrop (``set_resize_crop``).
    resize_crop = False

    def set_resize_crop(self, on: bool) -> None:
        """Crop training images with ``Resize(val_resize) + RandomCrop(image_size)`` from the
        next epoch on (``on``), or with RandomResizedCrop again; the authors' SSN recipe in
        its last epochs (``data.resize_crop_last_epochs``)."""
        raise NotImplementedError(f"{type(self).__name__} has one crop only")

    def set_epoch(self, epoch: int, start_iter: int = 0) -> None:
        """Start ``epoch`` after ``start_iter`` batches (a resumed run); resets ``bad_images``."""
        self.sampler.set_epoch(epoch, start_iter)
        self.bad_images = 0
        self._epoch_pending = True

    def _begin_epoch(self) -> None:
        """Iterating again without ``set_epoch`` moves on to the next epoch."""
        if not self._epoch_pending:
            self.set_epoch(self.sampler.epoch + 1)
        self._epoch_pending = False

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release workers or pipelines (also done when the loader is garbage collected)."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(backend={self.backend!r}, batches={len(self)}, "
                f"num_samples={self.num_samples}, dataset_size={self.dataset_size}, "
                f"num_classes={self.num_classes})")
