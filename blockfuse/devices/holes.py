"""Holes in files: punching them (``fallocate``) and finding them (``SEEK_DATA``/``SEEK_HOLE``).

Shared by the raw ``file`` device and the ``sparse`` device.  Every function here is a
blocking syscall on an open descriptor; callers run them in a worker thread.

Python has no ``fallocate`` with modes (``os.posix_fallocate`` only allocates), so
``punch_hole`` calls libc through ctypes with ``FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE``:
the range reads back as zeroes, whole blocks inside it are freed, partial blocks at its
edges are zeroed in place, and the file's length never changes.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable

from ..block import Extent
from ..units import ceil_div
from .zeroes import ZEROES

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

MAX_EXTENTS = 1024
"""How many extents one ``file_extents`` answer holds at most (the caller asks again)."""

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", _libc.fallocate)
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Make ``[offset, offset+length)`` a hole; raises ``OSError`` (``EOPNOTSUPP``: cannot)."""
    if length <= 0:
        return
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def write_zero_bytes(fd: int, offset: int, length: int) -> None:
    """Write real zeroes over ``[offset, offset+length)`` (allocates; the fallback)."""
    while length > 0:
        n = os.pwrite(fd, ZEROES[: min(length, len(ZEROES))], offset)
        offset, length = offset + n, length - n


def make_zeroes(fd: int, offset: int, length: int) -> None:
    """Make the range read back as zeroes: a hole where the filesystem can punch one."""
    try:
        punch_hole(fd, offset, length)
    except OSError as exc:
        if exc.errno != errno.EOPNOTSUPP:
            raise
        write_zero_bytes(fd, offset, length)


def _next_data(fd: int, pos: int) -> int | None:
    """The first data byte at or after ``pos``, or ``None`` if only holes follow."""
    try:
        return os.lseek(fd, pos, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return None
        raise


def is_hole(fd: int, offset: int, length: int) -> bool:
    """Whether ``[offset, offset+length)`` holds no data (one ``lseek``, ~1 µs)."""
    data = _next_data(fd, offset)
    return data is None or data >= offset + length


def byte_runs(fd: int, start: int, end: int) -> list[tuple[int, int, bool]]:
    """``(offset, length, is_data)`` runs covering ``[start, end)`` in order.

    Bytes past the file's end count as a hole.  Stops after ``MAX_EXTENTS`` runs.
    """
    runs: list[tuple[int, int, bool]] = []
    pos = start
    while pos < end and len(runs) < MAX_EXTENTS:
        data = _next_data(fd, pos)
        if data is None or data >= end:
            runs.append((pos, end - pos, False))
            break
        if data > pos:
            runs.append((pos, data - pos, False))
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        runs.append((data, hole - data, True))
        pos = hole
    return runs


def to_sector_extents(runs: Iterable[tuple[int, int, bool]], sector_size: int) -> list[Extent]:
    """Byte runs as sector extents; a sector holding any data byte counts as data."""
    out: list[Extent] = []
    for offset, length, is_data in runs:
        end = offset + length
        if is_data:
            first, stop = offset // sector_size, ceil_div(end, sector_size)
        else:
            first, stop = ceil_div(offset, sector_size), end // sector_size
        if out:
            first = out[-1].end
        if stop > first:
            append_extent(out, Extent(first, stop - first, is_data))
    return out


def append_extent(extents: list[Extent], extent: Extent) -> None:
    """Append, merging with the last extent when it is of the same kind and touches."""
    if extent.count <= 0:
        return
    last = extents[-1] if extents else None
    if last is not None and last.is_data == extent.is_data and last.end == extent.sector:
        extents[-1] = Extent(last.sector, last.count + extent.count, last.is_data)
    else:
        extents.append(extent)


def file_extents(fd: int, first: int, count: int, sector_size: int) -> list[Extent]:
    """Data and hole extents of ``count`` sectors from ``first`` (may stop early)."""
    runs = byte_runs(fd, first * sector_size, (first + count) * sector_size)
    return to_sector_extents(runs, sector_size)
