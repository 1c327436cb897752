"""Transparent huge pages for host state, so a copy-on-write snapshot stays cheap.

An async save of host state forks a writer process (see `CheckpointManager`); the
training loop is blocked for the ``fork()`` itself, whose cost is copying the page
tables of the parent: one entry per 4 KiB page, ~40 ms for 1.6 GB of tables on this
machine kind. Backed by 2 MiB huge pages, the same memory needs 512 times fewer
entries (~8 ms). Linux's ``MADV_COLLAPSE`` (5.17+) turns the 2 MiB-aligned inside of
each big tensor into huge pages in place, without changing its contents.

Writes to a page shared with a live writer process split its huge page again (the
kernel copies 4 KiB on write), so the manager re-collapses after every forked save,
in the background (a fraction of a second; only the first collapse copies memory).
Anything unsupported (another OS, an old kernel, THP set to ``never``) is a no-op.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Iterable
from typing import Any, Optional

logger = logging.getLogger("recframe.checkpoint")

HUGE_PAGE = 2 << 20
MADV_COLLAPSE = 25
MIN_BYTES = 2 * HUGE_PAGE  # smaller tensors hold at most one huge page: not worth it

_libc: Optional[Any] = None
_supported: Optional[bool] = None


def _madvise() -> Optional[Any]:
    global _libc, _supported
    if _supported is False or not sys.platform.startswith("linux"):
        return None
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _libc.madvise.restype = ctypes.c_int
        except (OSError, AttributeError):
            _supported = False
            return None
    return _libc.madvise


def huge_page_ranges(tensors: Iterable[Any]) -> list[tuple[int, int]]:
    """The 2 MiB-aligned ``(start, end)`` address ranges inside the big, contiguous
    CPU tensors of ``tensors`` (overlapping views merged), as plain integers."""
    ranges = []
    for t in tensors:
        if getattr(t, "device", None) is None or t.device.type != "cpu":
            continue
        if not t.is_contiguous():
            continue
        nbytes = t.numel() * t.element_size()
        if nbytes < MIN_BYTES:
            continue
        start = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
        end = (t.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
        if end > start:
            ranges.append((start, end))
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def collapse(ranges: list[tuple[int, int]]) -> int:
    """Back ``ranges`` with huge pages (``MADV_COLLAPSE``); returns the bytes collapsed.

    Safe on memory in use (the kernel keeps its contents) and on memory freed since the
    ranges were taken (the call fails, and is skipped). The first ``EINVAL`` (kernel
    without ``MADV_COLLAPSE``) turns the feature off for the process."""
    global _supported
    madvise = _madvise()
    if madvise is None:
        return 0
    done = 0
    for start, end in ranges:
        if madvise(start, end - start, MADV_COLLAPSE) == 0:
            done += end - start
            _supported = True
            continue
        errno = ctypes.get_errno()
        if errno == 22 and not _supported:  # EINVAL: no MADV_COLLAPSE here
            _supported = False
            logger.debug("MADV_COLLAPSE is not supported: async saves fork 4 KiB pages")
            return 0
    return done
