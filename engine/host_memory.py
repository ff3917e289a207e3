"""Keep freed host memory in the process while training on the CPU.

glibc's ``malloc`` serves large blocks (above a threshold of at most 32 MiB) with
``mmap`` and returns them to the kernel on ``free``, and trims the heap's free top.
A CPU training step allocates and frees the same activations and gradients every
iteration, so the kernel maps and zeroes them again at every step: a ResNet-50
step at batch 16 took 1e5-5e5 minor page faults (0.5-2 GiB of fresh pages) and
varied by 20% from step to step on this project's 2-core machine. With
``keep_freed_memory()`` the heap serves every size and is never trimmed, so a step
reuses the pages of the previous one (faster and much steadier there; figures in
docs/performance.md). The price is memory: the process keeps its peak footprint,
plus what the heap's fragmentation adds while it settles in the first steps (a
ResNet-50 at batch 16 stayed at 3.1 GB from its second step on, against a 2.7 GB
peak with the system setting). This is what the usual advice of preloading jemalloc
or tcmalloc achieves, without a preload.

``SN_MALLOC=system`` leaves the allocator alone. Nothing happens off Linux/glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1   # mallopt parameters (glibc malloc.h)
_M_MMAP_MAX = -4
_applied = False


def keep_freed_memory(device=None) -> bool:
    """Switch glibc malloc to never ``mmap`` or trim (once per process) when the work runs
    on the CPU (``device``: a ``torch.device``; None counts as the CPU). Returns True when
    the setting is in force, False when it does not apply (another device,
    ``SN_MALLOC=system``, not glibc, or mallopt refused)."""
    global _applied
    if device is not None and device.type != "cpu":
        return False
    if _applied:
        return True
    if os.environ.get("SN_MALLOC", "keep").strip().lower() == "system" or \
            not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # large blocks from the heap, and a heap that is never trimmed (-1: man 3 mallopt)
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))
    return _applied
