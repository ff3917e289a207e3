"""Deterministic, resumable, sharded batch order.

The order of an epoch and the seed of every sample's augmentation are
functions of ``(seed, epoch, dataset index)`` only: not of the number of
workers, and (for the seeds) not of the world size.  ``set_epoch(epoch,
start_iter)`` starts an epoch after ``start_iter`` batches, so a run resumed
mid-epoch yields exactly the batches an uninterrupted run would have.

Sharding: training shards are equal, like ``DistributedSampler`` (the
permutation is truncated to a multiple of the world size when ``drop_last``,
padded with its head otherwise) and rank ``r`` takes ``perm[r::world]``.
Validation shards are ``index[r::world]`` without padding or truncation, so
that summing over ranks counts every image exactly once.
"""
from __future__ import annotations

import hashlib
from typing import Iterator, List, Tuple

import torch

__all__ = ["mix_seed", "ShardedBatchSampler"]


def mix_seed(*values: int) -> int:
    """A 63-bit seed that depends on every value (a hash, so nearby inputs decorrelate)."""
    digest = hashlib.blake2b(repr(tuple(int(v) for v in values)).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


class ShardedBatchSampler:
    """Yields batches (lists) of ``(index, sample_seed)`` for one rank."""

    def __init__(self, size: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, even_shards: bool = True, drop_last: bool = True,
                 seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.size, self.batch_size = size, batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.even_shards, self.drop_last = shuffle, even_shards, drop_last
        self.seed = seed
        self.epoch, self.start_iter = 0, 0

    def set_epoch(self, epoch: int, start_iter: int = 0) -> None:
        if start_iter < 0:
            raise ValueError(f"start_iter must be >= 0, got {start_iter}")
        self.epoch, self.start_iter = int(epoch), int(start_iter)

    @property
    def shard_size(self) -> int:
        """Indices in this rank's shard (before dropping a partial last batch)."""
        if self.even_shards:
            per_rank, rest = divmod(self.size, self.world_size)
            return per_rank if self.drop_last or rest == 0 else per_rank + 1
        return len(range(self.rank, self.size, self.world_size))

    @property
    def num_samples(self) -> int:
        """Samples this rank yields in a whole epoch."""
        if self.drop_last:
            return self.shard_size // self.batch_size * self.batch_size
        return self.shard_size

    def __len__(self) -> int:
        """Batches in a whole epoch (regardless of ``start_iter``)."""
        if self.drop_last:
            return self.shard_size // self.batch_size
        return -(-self.shard_size // self.batch_size)

    def shard(self) -> torch.Tensor:
        """This rank's dataset indices for the current epoch, in order."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 0))
            order = torch.randperm(self.size, generator=gen)
        else:
            order = torch.arange(self.size)
        if self.even_shards:
            total = self.shard_size * self.world_size
            if total > self.size:  # pad with the head, like DistributedSampler
                order = torch.cat([order, order[: total - self.size]])
            order = order[:total]
        return order[self.rank::self.world_size]

    def sample_seeds(self) -> torch.Tensor:
        """One augmentation seed per dataset index for the current epoch."""
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 1))
        return torch.randint(0, 2 ** 62, (self.size,), generator=gen)

    def batches(self) -> List[List[int]]:
        """The remaining batches of dataset indices, from ``start_iter`` on."""
        shard = self.shard()[: self.num_samples].tolist()
        starts = range(self.start_iter * self.batch_size, len(shard), self.batch_size)
        return [shard[i:i + self.batch_size] for i in starts]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        batches = self.batches()
        flat = torch.tensor([i for batch in batches for i in batch], dtype=torch.int64)
        seeds = iter(self.sample_seeds()[flat].tolist())
        for batch in batches:
            yield [(i, next(seeds)) for i in batch]
