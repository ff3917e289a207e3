import pytest
import torch

from data.sampler import ShardedBatchSampler


def _flat(sampler):
    return [i for batch in sampler for i, _ in batch]


@pytest.mark.parametrize("size, world, batch", [(10, 3, 2), (11, 2, 3), (8, 4, 1), (5, 1, 5)])
def test_train_shards_are_equal_disjoint_and_batched(size, world, batch):
    samplers = [ShardedBatchSampler(size, batch, rank=r, world_size=world, seed=1)
                for r in range(world)]
    lengths = {len(s) for s in samplers}
    assert len(lengths) == 1  # every rank runs the same number of batches
    shards = [_flat(s) for s in samplers]
    assert all(len(x) == samplers[0].num_samples == len(s) * batch
               for x, s in zip(shards, samplers))
    everything = [i for x in shards for i in x]
    assert len(set(everything)) == len(everything)  # no duplicates with drop_last


def test_train_without_drop_last_pads_like_distributed_sampler():
    samplers = [ShardedBatchSampler(10, 3, rank=r, world_size=3, drop_last=False) for r in range(3)]
    shards = [_flat(s) for s in samplers]
    assert [len(x) for x in shards] == [4, 4, 4] and [len(s) for s in samplers] == [2, 2, 2]
    assert set(i for x in shards for i in x) == set(range(10))


@pytest.mark.parametrize("size, world", [(10, 3), (7, 2), (2, 4)])
def test_val_shards_cover_every_index_once(size, world):
    shards = [_flat(ShardedBatchSampler(size, 3, rank=r, world_size=world, shuffle=False,
                                        even_shards=False, drop_last=False))
              for r in range(world)]
    assert sorted(i for x in shards for i in x) == list(range(size))
    assert shards[0] == list(range(0, size, world))


def test_order_and_seeds_depend_on_seed_and_epoch_only():
    a = ShardedBatchSampler(50, 4, seed=3)
    b = ShardedBatchSampler(50, 4, seed=3)
    a.set_epoch(2), b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)
    # a sample's augmentation seed is independent of the world size and of the rank
    seeds = dict(pair for batch in a for pair in batch)
    other = ShardedBatchSampler(50, 4, seed=3, rank=1, world_size=2)
    other.set_epoch(2)
    assert all(seeds.get(i, s) == s for batch in other for i, s in batch)


def test_start_iter_resumes_exactly():
    full = ShardedBatchSampler(40, 3, seed=5)
    full.set_epoch(1)
    batches = list(full)
    resumed = ShardedBatchSampler(40, 3, seed=5)
    resumed.set_epoch(1, start_iter=4)
    assert list(resumed) == batches[4:] and len(resumed) == len(batches) == 13
    resumed.set_epoch(1, start_iter=13)
    assert list(resumed) == []


def test_sample_seeds_are_reproducible():
    s = ShardedBatchSampler(20, 2, seed=9)
    assert torch.equal(s.sample_seeds(), ShardedBatchSampler(20, 2, seed=9).sample_seeds())
