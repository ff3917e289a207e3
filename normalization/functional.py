"""``switch_norm``: one SN (or ghost/sync BN) layer call, and the choice of how it runs.

The definition is ``algebra.py`` (Eq. 3-5 from the IN statistics) around the
passes of ``ops.py``. ``switch_norm`` runs it one of two ways (``current_path``),
the picture in ``docs/normalization.md``:

* ``eager`` (eager mode, and the graph of a ``torch.fx``-traced model when it
  runs): ONE autograd node per layer, ``eager.FastSwitchNorm``; while fx traces,
  ``switch_norm`` is a single leaf call in the graph (``torch.fx.wrap``), so the
  traced model runs exactly the eager layer, output dtype under autocast included;
* under ``torch.compile``: ``plain`` (default) records the definition as plain
  ops, which inductor fuses with their neighbours; ``ops`` (``SN_COMPILE=ops``)
  keeps the passes as the opaque custom operators (the Triton kernels on CUDA).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

import torch
import torch.fx
from torch import Tensor

from .algebra import (BatchSpec, BatchStats, hard_ratios, out_dtype, softmax_ratios,
                      switch_norm_definition)
from .eager import FastSwitchNorm, LayerSpec
from .ops import acc_dtype

__all__ = ["switch_norm", "BatchSpec", "BatchStats", "current_path", "compile_path",
           "set_compile_path", "fx_tracing", "softmax_ratios", "hard_ratios", "spatial_size",
           "autocast_output", "chunk_average", "acc_dtype"]

COMPILE_PATHS = ("plain", "ops")
_compile_override: Optional[str] = None


def compile_path() -> str:
    """How SN runs under ``torch.compile``: ``plain`` ops (default) or the custom ``ops``
    (``SN_COMPILE`` or ``set_compile_path``)."""
    path = _compile_override or os.environ.get("SN_COMPILE", "plain").strip().lower()
    if path not in COMPILE_PATHS:
        raise ValueError(f"SN_COMPILE must be one of {', '.join(COMPILE_PATHS)}, got {path!r}")
    return path


def set_compile_path(path: Optional[str]) -> Optional[str]:
    """Override ``SN_COMPILE`` (None: back to the environment); returns the previous override."""
    global _compile_override
    if path is not None and path not in COMPILE_PATHS:
        raise ValueError(f"compile path must be one of {', '.join(COMPILE_PATHS)}, got {path!r}")
    previous, _compile_override = _compile_override, path
    return previous


def fx_tracing() -> bool:
    """True while ``torch.fx.symbolic_trace`` runs Python code on proxies."""
    check = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing",
                    torch.fx._symbolic_trace.is_fx_tracing)
    return check()


def current_path() -> str:
    """``plain`` or ``ops`` under torch.compile, else ``eager``."""
    return compile_path() if torch.compiler.is_compiling() else "eager"


# -- leaf calls while fx traces (run with real tensors when the graph runs) ------------------
def spatial_size(x: Tensor) -> int:
    """Number of positions per (sample, channel): H*W (1 for (N, C))."""
    return math.prod(x.shape[2:])


def autocast_output(y: Tensor) -> Tensor:
    """A float32 output of a normalizer under autocast, in the autocast dtype (the contract
    of every normalizer here: statistics in float32, output in the autocast dtype)."""
    if y.dtype == torch.float32 and torch.is_autocast_enabled(y.device.type):
        return y.to(torch.get_autocast_dtype(y.device.type))
    return y


def chunk_average(stat: Tensor, dtype: torch.dtype) -> Tensor:
    """The average over the chunks (rows) of a per-chunk statistic (k, C), in ``dtype``."""
    avg = stat[0] if stat.shape[0] == 1 else stat.mean(0)
    return avg if avg.dtype == dtype else avg.to(dtype)


def switch_norm(x: Tensor, normalizers: Sequence[str], eps: float,
                weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                ratios: Optional[Tensor] = None, batch: Optional[BatchSpec] = None,
                running: Optional[Tuple[Tensor, Tensor]] = None,
                unbiased: Optional[str] = None,
                path: Optional[str] = None) -> Tuple[Tensor, Optional[BatchStats]]:
    """Normalize ``x`` (N, C, *spatial) by Eq. (3): the ``normalizers`` (in, ln, bn) mixed
    by ``ratios`` (2, K) (None: a single normalizer); BN from the batch (``batch``) or
    from ``running``; ``unbiased`` as in ``algebra.coefficients``. Returns the output and,
    with ``batch``, the per-chunk BN statistics (for the running averages or the batch
    average). ``path`` overrides ``current_path()``."""
    path = path or current_path()
    if path != "eager":
        return switch_norm_definition(x, normalizers, eps, weight, bias, ratios, batch,
                                      running, unbiased, use_ops=path == "ops")
    sync = batch is not None and batch.group is not None
    spec = LayerSpec(tuple(normalizers), eps, unbiased, batch is not None,
                     batch.ghost if batch is not None else None,
                     batch.group if sync else None, out_dtype(x))
    # copies: the buffers move in place after this forward, the node keeps what it used
    shift = batch.shift.detach().clone() if sync else None
    rm, rv = (t.detach().clone() for t in running) if running is not None else (None, None)
    y, mean, var, count = FastSwitchNorm.apply(x, weight, bias, ratios, shift, rm, rv, spec)
    return y, (BatchStats(mean, var, count) if batch is not None else None)


for _name in ("spatial_size", "autocast_output", "chunk_average", "switch_norm", "softmax_ratios",
              "hard_ratios"):
    torch.fx.wrap(_name)
