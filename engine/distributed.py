"""Process-group set-up under torchrun (or a single process) and the few collectives the loop needs."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["DistInfo", "init_distributed", "is_main", "all_reduce_sum", "all_reduce_max",
           "all_gather_floats", "average_running_stats", "gather_rng_states", "broadcast_flag",
           "thread_oversubscription", "cleanup"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = "none"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available on this machine")
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def init_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's environment; NCCL on GPUs, gloo on CPUs (chosen automatically)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    info = DistInfo(rank, world_size, local_rank, dev)
    if world_size > 1 and not dist.is_initialized():
        info.backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(info.backend, timeout=datetime.timedelta(minutes=30),
                                device_id=dev if dev.type == "cuda" else None)
    return info


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_sum(values: List[float], device: torch.device) -> List[float]:
    """Sum of a few numbers over all ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def all_gather_floats(values: List[float], device: torch.device) -> List[List[float]]:
    """Every rank's ``values`` (the same length on all ranks), in rank order."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [t.tolist()]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


@torch.no_grad()
def all_reduce_max(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


@torch.no_grad()
def average_running_stats(model: nn.Module):
    """Average every BN-branch running statistic over the ranks (before eval and saving).

    Each process keeps the moving averages of its own (virtual) GPUs' batch
    statistics, as the paper's GPUs do; their mean is the model's statistic.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    bufs = [b for m in model.modules() for name, b in m.named_buffers(recurse=False)
            if name in ("running_mean", "running_var") and b is not None]
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1).float() for b in bufs])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for b in bufs:
        n = b.numel()
        b.copy_(flat[offset:offset + n].view_as(b))
        offset += n


def gather_rng_states(device: torch.device) -> List[torch.Tensor]:
    """Every rank's torch RNG state (CPU, and CUDA when used), gathered on all ranks."""
    state = torch.get_rng_state()
    if device.type == "cuda":
        state = torch.cat([state, torch.cuda.get_rng_state(device)])
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [state]
    comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    local = state.to(comm_device)
    out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return [t.cpu() for t in out]


def set_rng_state(states: List[torch.Tensor], rank: int, device: torch.device):
    if not states:
        return
    state = states[rank % len(states)]
    n = torch.get_rng_state().numel()
    torch.set_rng_state(state[:n])
    if device.type == "cuda" and state.numel() > n:
        torch.cuda.set_rng_state(state[n:], device)


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def thread_oversubscription(threads: Optional[int] = None, local_world_size: Optional[int] = None,
                            cores: Optional[int] = None) -> Optional[str]:
    """A warning when the processes of this machine run more compute threads than it has
    cores (e.g. OMP_NUM_THREADS exported to every torchrun process); None otherwise."""
    threads = threads or torch.get_num_threads()
    local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    affinity = getattr(os, "sched_getaffinity", None)  # Linux: the cores this process may use
    cores = cores or (len(affinity(0)) if affinity else os.cpu_count() or 1)
    if threads * local <= cores:
        return None
    return (f"warning: {local} process(es) x {threads} torch threads = {threads * local} threads "
            f"on {cores} cores: oversubscribed cores slow training down several times; set "
            f"OMP_NUM_THREADS={max(1, cores // local)} (cores / processes per machine)")


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()
