"""SyncBN / SyncSN on 2 gloo processes equal the single-process result on the concatenated batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import normalization as N

from ..conftest import free_port

pytestmark = pytest.mark.distributed

WORLD = 2
N_PER_RANK = 4


def _layer(name, ghost):
    torch.manual_seed(0)
    layer = N.build_norm(name, 5, ghost_batch_size=ghost)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
        layer.running_mean.normal_()  # the shift of the synced sums: identical on all ranks
    return layer


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD * N_PER_RANK, 5, 4, 3, generator=g) * 3 + 10
    return x, torch.randn(x.shape, generator=g)


def _interleave(t, ghost):
    """Single-process order in which chunk j of every rank forms one statistics group."""
    if ghost is None:
        return t
    per_rank = t.split(N_PER_RANK)
    chunks = [r.split(ghost) for r in per_rank]
    return torch.cat([c for j in range(len(chunks[0])) for c in (ch[j] for ch in chunks)])


CASES = [("syncbn", None), ("syncsn", None), ("syncsn", 2), ("syncbn", 2)]


def _worker(rank, port, out_dir):
    """All cases in one pair of processes (starting processes is the slow part)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for name, ghost in CASES:
            _sync_case(rank, name, ghost, out_dir)
        _batch_average_case(rank, out_dir)
    finally:
        dist.destroy_process_group()


def _sync_case(rank, name, ghost, out_dir):
    calls = {"n": 0}
    original = dist.all_reduce

    def counting(*a, **k):
        calls["n"] += 1
        return original(*a, **k)
    dist.all_reduce = counting
    try:
        layer = _layer(name, ghost)
        x, g = _data()
        xs = x[rank * N_PER_RANK:(rank + 1) * N_PER_RANK].clone().requires_grad_()
        gs = g[rank * N_PER_RANK:(rank + 1) * N_PER_RANK]
        y = layer(xs)
        forward_calls = calls["n"]
        y.backward(gs)
        backward_calls = calls["n"] - forward_calls
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        for t in grads.values():
            original(t)
        layer.eval()
        eval_y = layer(xs)
        torch.save(dict(y=y.detach(), dx=xs.grad, grads=grads, running_mean=layer.running_mean,
                        running_var=layer.running_var, eval_y=eval_y.detach(),
                        calls=(forward_calls, backward_calls, calls["n"] - forward_calls -
                               backward_calls)), os.path.join(out_dir, f"{name}{ghost}_{rank}.pt"))
    finally:
        dist.all_reduce = original


def _batch_average_case(rank, out_dir):
    layer = _layer("sn", 2)
    x, _ = _data()
    batches = [x[rank * N_PER_RANK:(rank + 1) * N_PER_RANK] * (i + 1) for i in range(3)]
    n = N.update_batch_average(layer, batches)
    torch.save(dict(n=n, mean=layer.running_mean, var=layer.running_var),
               os.path.join(out_dir, f"ba{rank}.pt"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sync")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("name,ghost", CASES)
def test_two_process_sync_equals_single_process(results, name, ghost):
    ranks = [torch.load(results / f"{name}{ghost}_{r}.pt", weights_only=True) for r in range(WORLD)]

    # single process: the non-synced layer on the whole batch, chunk j of each rank pooled
    ref = _layer(name.replace("sync", ""), None if ghost is None else WORLD * ghost)
    x, g = _data()
    order = _interleave(torch.arange(len(x)), ghost)
    xr = x[order].clone().requires_grad_()
    y = ref(xr)
    y.backward(g[order])
    inverse = torch.argsort(order)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach()[inverse], **tol)
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), xr.grad[inverse], **tol)
    for n, p in ref.named_parameters():
        for r in ranks:
            torch.testing.assert_close(r["grads"][n], p.grad, **tol, msg=n)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], ref.running_mean, **tol)
        torch.testing.assert_close(r["running_var"], ref.running_var, **tol)
        assert r["calls"] == (1, 1, 0)  # one all-reduce forward, one backward, none in eval
    # eval is local: each rank's eval output uses only its own samples and running stats
    ref.eval()
    torch.testing.assert_close(torch.cat([r["eval_y"] for r in ranks]), ref(x), **tol)


def test_batch_average_reduced_over_ranks(results):
    ranks = [torch.load(results / f"ba{r}.pt", weights_only=True) for r in range(WORLD)]
    ref = _layer("sn", 2)
    x, _ = _data()
    n = N.update_batch_average(ref, [x * (i + 1) for i in range(3)])
    for r in ranks:
        assert r["n"] == n == 24
        torch.testing.assert_close(r["mean"], ref.running_mean)
        torch.testing.assert_close(r["var"], ref.running_var)
