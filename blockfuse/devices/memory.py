"""A device held in memory: the reference oracle of the tests, and ``mem(SIZE)``.

The bytes live in an anonymous private mapping made with ``MAP_NORESERVE``: pages are
allocated when first written, so ``mem(1T)`` costs nothing until used, and ``resize``
is an ``mremap``.
"""

from __future__ import annotations

import errno
import mmap
from collections.abc import Sequence

from ..block import SECTOR_SIZE, BlockDevice, Buffer, Capability, Info, check_new_size
from ..errors import Disconnected, ReadOnly, RequestFailed
from ..units import format_size, format_spec_size, round_up

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
"""Linux's value; Python 3.11's mmap module does not name it."""


def _mapping(size: int) -> mmap.mmap:
    """Zeroed memory of at least ``size`` bytes (a mapping cannot be empty).  Raises
    ``ValueError`` saying how much could not be mapped (``too_large``)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
    try:
        return mmap.mmap(-1, max(size, mmap.PAGESIZE), flags=flags)
    except (OSError, OverflowError) as exc:
        raise ValueError(too_large(size, exc)) from exc


def too_large(size: int, exc: BaseException) -> str:
    """Why ``mem(size)`` cannot be had: the mapping is refused (address space, overcommit)."""
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    spec = format_spec_size(size)
    return (
        f"mem({spec}) keeps its data in RAM (taken as it is written), and this system "
        f"cannot map {format_size(size)} ({why}): use a smaller size, or "
        f"sparse(PATH, size={spec}) for a disk file that holds only what is written"
    )


def _round_up(n: int) -> int:
    return round_up(n, mmap.PAGESIZE)


def _zero(data: mmap.mmap, start: int, end: int) -> None:
    """Zero ``[start, end)``: whole pages are given back, the edges overwritten."""
    first, last = _round_up(start), end // mmap.PAGESIZE * mmap.PAGESIZE
    if last - first < mmap.PAGESIZE:
        data[start:end] = bytes(end - start)
        return
    data[start:first] = bytes(first - start)
    data.madvise(mmap.MADV_DONTNEED, first, last - first)
    data[last:end] = bytes(end - last)


class MemoryDevice(BlockDevice):
    kind = "memory"
    durable = False
    capabilities = frozenset({Capability.DISCARD, Capability.WRITE_ZEROES, Capability.RESIZE})

    def __init__(
        self, size_bytes: int, *, sector_size: int = SECTOR_SIZE, read_only: bool = False
    ) -> None:
        if size_bytes < 0 or size_bytes % sector_size:
            raise ValueError(f"memory size {size_bytes} is not a whole number of sectors")
        self._map: mmap.mmap | None = _mapping(size_bytes)
        self._size = size_bytes
        self._sector_size = sector_size
        self._read_only = read_only

    @property
    def data(self) -> bytes:
        """A copy of the contents, for tests that compare against it."""
        return self._open()[: self._size]

    def _open(self) -> mmap.mmap:
        if self._map is None:
            raise Disconnected("memory device is closed")
        return self._map

    async def get_info(self) -> Info:
        self._open()
        return Info(not self._read_only, self._sector_size, self._size // self._sector_size)

    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        data = self._open()
        offset = sector * self._sector_size
        with memoryview(data) as whole:  # one copy, not two (an mmap slice is a new bytes)
            for buf in buffers:
                n = len(buf)
                memoryview(buf).cast("B")[:] = whole[offset : offset + n]
                offset += n

    async def write(self, sector: int, buffers: Sequence[Buffer]) -> None:
        data = self._writable()
        offset = sector * self._sector_size
        for buf in buffers:
            n = len(buf)
            data[offset : offset + n] = buf
            offset += n

    async def write_zeroes(self, sector: int, count: int) -> None:
        start = sector * self._sector_size
        _zero(self._writable(), start, start + count * self._sector_size)

    async def discard(self, sector: int, count: int) -> None:
        await self.write_zeroes(sector, count)

    async def resize(self, size_sectors: int) -> None:
        check_new_size(size_sectors)
        data = self._writable()
        new_size = size_sectors * self._sector_size
        if new_size < self._size:
            # What is dropped must read back as zeroes if the device grows again; the
            # shrunk mapping keeps the rest of its last page, so zero up to its end.
            page_end = _round_up(max(new_size, mmap.PAGESIZE))
            _zero(data, new_size, min(self._size, page_end))
        try:
            data.resize(max(new_size, mmap.PAGESIZE))
        except (OSError, OverflowError) as exc:  # the mapping is left as it was
            message = f"cannot grow the memory device to {format_size(new_size)}: " + (
                "mem keeps its data in RAM, and this system cannot map that much"
            )
            raise RequestFailed(errno.ENOMEM, message) from exc
        self._size = new_size

    async def flush(self) -> None:
        self._open()

    async def aclose(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def _writable(self) -> mmap.mmap:
        data = self._open()
        if self._read_only:
            raise ReadOnly("memory device is read-only")
        return data
