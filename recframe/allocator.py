"""The host allocator of a training process: keep freed memory for the next update.

A training update allocates and frees the same large temporaries every time
(activations, gradients, the sparse gradients of the tables). glibc's ``malloc``
serves blocks above its mmap threshold (128 KiB, raised on the fly up to 32 MiB) with
fresh ``mmap`` pages and returns the top of the heap to the kernel once more than the
trim threshold is free there. Either way the next update touches brand-new pages: a
minor page fault and a zeroed 4 KiB page each. Measured on a 2-core machine with the
DLRM of ``benchmarks/trainer_overhead.py`` (batch 2048, six rounds of 8 updates in one
process): 550-5200 faults per update with the defaults, 0-130 with the settings
below, for the same work.

`keep_freed_memory` sets them once per process (``mallopt``): blocks up to 1 GiB come
from the heap and the heap is never trimmed. The process keeps its peak footprint (a
training job does anyway: every update reaches the same peak); blocks of 1 GiB and
more (whole tables) are still mapped and unmapped on their own.

The readers (`recframe.readers.TabularDataset`) call it too when they start iterating or
converting: a decoded block's arrays are freed once its batches are cut, and the next
block's would otherwise be mapped and faulted in afresh (a process that only reads, such
as ``recframe data convert``, has no Trainer to set it).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from typing import Optional

logger = logging.getLogger("recframe")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30
"""Blocks below this come from the heap (glibc's default: 128 KiB, dynamic up to 32 MiB)."""
TRIM_THRESHOLD = (1 << 31) - 1
"""Free bytes at the top of the heap before it is returned to the kernel (the largest
value ``mallopt`` takes: never, in practice)."""

ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_applied: Optional[bool] = None


def _user_decided() -> Optional[str]:
    """Why the allocator is someone else's choice (an env setting or another
    allocator), or None."""
    for name in ALLOCATOR_ENV:
        if name in os.environ:
            return f"{name} is set"
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(lib in preload for lib in ("jemalloc", "tcmalloc", "mimalloc")):
        return "LD_PRELOAD replaces malloc"
    return None


def keep_freed_memory() -> bool:
    """Keep freed host memory in the heap for reuse (glibc only; once per process).

    Returns whether the settings are in force. A no-op off Linux/glibc, and when the
    user chose the allocator's behaviour (``MALLOC_*_`` variables, ``GLIBC_TUNABLES``,
    a preloaded jemalloc/tcmalloc/mimalloc)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    reason = _user_decided()
    if reason is not None:
        logger.debug("allocator left as is: %s", reason)
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
        # an allocator preloaded over glibc's (any name): glibc's mallopt does not reach it
        used = ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value
        own = ctypes.cast(libc.malloc, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return False
    if used != own:
        logger.debug("allocator left as is: malloc is not glibc's (preloaded)")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mmap threshold first: setting either fixes both (no more dynamic adjustment)
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _applied


def leave_allocator_alone() -> None:
    """Keep glibc's defaults in this process (``keep_freed_memory=False``): a later
    `keep_freed_memory` call, such as a reader's when it starts iterating, does nothing.
    Settings already applied stay."""
    global _applied
    if _applied is None:
        _applied = False


__all__ = ["keep_freed_memory", "leave_allocator_alone"]
