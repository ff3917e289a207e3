"""Batch-average inference statistics for a whole model (paper Sec. 4.1.3, "Inference").

The paper freezes the trained network, feeds it training minibatches, and
uses the average of their BN statistics instead of the moving average::

    n = update_batch_average(model, (images for images, _ in loader), num_batches=200)

or step by step::

    begin_batch_average(model)          # reset the BN-branch accumulators
    with torch.no_grad():
        for images in batches:          # norm layers in train mode
            model(images)
    finalize_batch_average(model)       # running stats := collected mean / variance

Each ghost chunk (virtual GPU) counts as one minibatch, as on real GPUs.
Under DDP every rank calls ``finalize_batch_average`` and the sums are reduced.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from .batch_stats import BatchStatsMixin

__all__ = ["begin_batch_average", "finalize_batch_average", "abort_batch_average",
           "update_batch_average", "batch_stat_layers", "set_ghost_batches"]


def batch_stat_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, layer) of every layer whose BN branch has running statistics."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, BatchStatsMixin) and getattr(m, "running_mean", None) is not None]


def set_ghost_batches(model: nn.Module, per_gpu: Optional[int]) -> int:
    """Batch statistics per virtual GPU of ``per_gpu`` samples in every non-synced
    batch-statistics layer (synced layers pool all GPUs); returns the number of layers."""
    layers = batch_stat_layers(model)
    for _, layer in layers:
        if not layer.sync:
            layer.ghost_batch_size = per_gpu
    return len(layers)


def begin_batch_average(model: nn.Module) -> int:
    """Start collection in every BN-branch layer; returns how many there are."""
    layers = batch_stat_layers(model)
    for _, m in layers:
        m.begin_batch_average()
    return len(layers)


def abort_batch_average(model: nn.Module):
    for _, m in batch_stat_layers(model):
        m.abort_batch_average()


def finalize_batch_average(model: nn.Module, process_group=None) -> float:
    """Write the collected statistics; returns the samples seen per layer (the first layer's)."""
    counts = []
    for name, m in batch_stat_layers(model):
        try:
            counts.append(m.finalize_batch_average(process_group))
        except RuntimeError as e:
            abort_batch_average(model)
            raise RuntimeError(f"layer {name!r}: {e}") from None
    return counts[0] if counts else 0.0


def update_batch_average(model: nn.Module, batches: Iterable[torch.Tensor],
                         num_batches: Optional[int] = None, process_group=None,
                         progress=None) -> float:
    """Run the whole procedure over ``batches`` (input tensors, already on the device).

    The rest of the network is put in eval mode (no dropout) and only the
    normalization layers in training mode; parameters are not touched; modes
    are restored afterwards. ``progress`` is an optional callable(step).
    Returns the number of samples averaged (per layer, over all ranks).
    """
    modes = {m: m.training for m in model.modules()}
    begin_batch_average(model)
    try:
        model.eval()
        for _, m in batch_stat_layers(model):
            m.train()
        with torch.no_grad():
            for step, x in enumerate(batches):
                if num_batches is not None and step >= num_batches:
                    break
                model(x)
                if progress is not None:
                    progress(step)
        return finalize_batch_average(model, process_group)
    except BaseException:
        abort_batch_average(model)
        raise
    finally:
        for m, mode in modes.items():
            m.training = mode
