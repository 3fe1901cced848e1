"""Write-behind for a bulk writer (the mirror's copier) on a file or block device.

A copy of gigabytes written into the page cache and left there costs twice: the kernel
must write it all back at the final flush, and then reclaim it, page by page, while the
copy goes on (on the dev VM the kernel's share of a copy's CPU time halved without it).
So, as ``nbdcopy`` does, each range the writer hands over is started on its way to the
disk at once (``sync_file_range(WRITE)``), and once ``WINDOW_BYTES`` of later ranges have
been started too, the range is waited for and dropped from the cache
(``sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)``, then ``POSIX_FADV_DONTNEED``).
Dropping takes only clean pages: a foreground write that landed since keeps its pages.

Waiting for writeback reports a writeback error *and consumes it*: the kernel keeps one
error per open file and hands it to the first waiter, so a later ``fdatasync`` on the
same descriptor succeeds.  What the wait saw is therefore raised to the writer, and the
device records it in its ``write_errors``, so that every flush caller still learns that
acknowledged writes may be lost.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
from collections.abc import Iterator

SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4
SETTLE = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER

WINDOW_BYTES = 16 << 20
"""Ranges started on their way to the disk and not yet waited for: four 4 MiB chunks,
one per copier worker (a 2 GiB copy from tmpfs ran at 1.8-2.4 GiB/s with it, 1.0-1.7
GiB/s with writeback only started)."""

_sync_file_range = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
"""Linux's ``sync_file_range`` (Python's os module has none); ``None`` elsewhere."""
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]

AVAILABLE = _sync_file_range is not None

Range = tuple[int, int]
"""``(offset, length)`` in bytes."""


class WriteBehind:
    """The ranges of one descriptor started and not yet settled, oldest first."""

    def __init__(self, window: int = WINDOW_BYTES) -> None:
        self._window = window
        self._started: collections.deque[Range] = collections.deque()
        self._started_bytes = 0

    def hand_over(self, offset: int, length: int) -> list[Range]:
        """Note ``[offset, offset+length)`` as started; the ranges now beyond the window,
        which the caller must ``settle`` (on the event loop's thread: no lock)."""
        self._started.append((offset, length))
        self._started_bytes += length
        due = []
        while self._started_bytes > self._window:
            old = self._started.popleft()
            self._started_bytes -= old[1]
            due.append(old)
        return due

    @contextlib.contextmanager
    def settling(self, offset: int, length: int) -> Iterator[list[Range]]:
        """``hand_over``; if the block that settles the ranges raises (or never runs
        them), they are given back: due still."""
        due = self.hand_over(offset, length)
        try:
            yield due
        except BaseException:
            self.give_back(due)
            raise

    def give_back(self, due: list[Range]) -> None:
        """``due`` could not be settled (the write before failed): they are due still."""
        for old in reversed(due):
            self._started.appendleft(old)
            self._started_bytes += old[1]


def start(fd: int, offset: int, length: int) -> None:
    """Start ``[offset, offset+length)`` on its way to the disk (blocking, briefly: a
    congested queue).  Takes no writeback error from the descriptor."""
    _sync(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def settle(fd: int, offset: int, length: int) -> None:
    """Wait for ``[offset, offset+length)`` to be written back and drop it from the cache
    (blocking).  Raises ``OSError`` (``EIO``: a writeback failed, and the descriptor no
    longer reports it: the caller must record it before any other flush can succeed)."""
    _sync(fd, offset, length, SETTLE)
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _sync(fd: int, offset: int, length: int, flags: int) -> None:
    assert _sync_file_range is not None
    if _sync_file_range(fd, offset, length, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
