"""Whether a file's range is all in the page cache: Linux's ``cachestat`` (6.5 and later).

A READ sent straight from a file (``FileDevice.lend``) is read by ``os.sendfile`` on the
event loop's thread, where a read from the disk would stall every request of the
process (1.6-3.4 ms per MiB measured on the dev VM's virtio disk, against 0.11-0.13 ms
from the cache).  So a range is lent only when ``cachestat`` finds every page of it
cached; on a kernel without the call (``ENOSYS``) or a file it cannot look at, never.
A page evicted between the look and the send costs one read from the disk in the loop.
The call costs ~6 µs through ctypes, against ~50 µs for a 64 KiB READ.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

SYS_CACHESTAT = 451
"""The system call's number, the same on every architecture Linux gave it to."""
PAGE = os.sysconf("SC_PAGE_SIZE")


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


_syscall: Callable[..., int] | None
try:
    _syscall = ctypes.CDLL(None, use_errno=True).syscall
except (OSError, AttributeError):  # no C library to call through
    _syscall = None


def fully_cached(fd: int, offset: int, length: int) -> bool:
    """Whether every page of ``[offset, offset+length)`` of ``fd`` is in the page cache
    (``False`` where that cannot be told)."""
    if _syscall is None or length <= 0:
        return False
    stat = _Stat()
    if _syscall(SYS_CACHESTAT, fd, ctypes.byref(_Range(offset, length)), ctypes.byref(stat), 0):
        return False
    pages = (offset + length + PAGE - 1) // PAGE - offset // PAGE
    return int(stat.nr_cache) >= pages
