"""Bytes over sectors: byte-granular I/O on a device that takes whole sectors.

A front end's request (a FUSE read or write, an NBD request) names any byte range; a
device takes whole sectors.  The sectors a byte
range touches::

      sector:   |  first  |         |         |  last   |
      bytes:         [head|=========|=========|==]tail
                     ^ offset                    ^ offset + length

Reads fetch the covering sectors and slice.  Writes whose two ends fall on sector
edges go straight through; otherwise ``patch_sectors`` reads the partial first and last
sectors, patches them, and hands them back with the aligned middle, for one device
call.  That read-modify-write must not interleave with another write to the same
sectors, or one writer's bytes are lost: the caller holds the sectors
(``DeviceBytes`` with a ``RangeLock``, swapfs with its per-handle state).

``DeviceBytes`` is a device seen as a run of bytes: what every front end shares (the
FUSE flat file, the NBD server).  Everything else here is pure arithmetic on ints,
tested without a device.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from .block import BlockDevice, Buffer, Capability, Info, merged_status
from .errors import BlockError, RequestFailed
from .filerange import FileRange
from .log import Repeats, left_out
from .rangelock import Hold, RangeLock
from .units import ceil_div

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Span:
    """The sectors that the bytes ``[offset, offset+length)`` touch."""

    first: int
    count: int
    head: int
    """Bytes of the first sector before ``offset``."""
    tail: int
    """Bytes of the last sector after ``offset + length``."""

    @property
    def end(self) -> int:
        return self.first + self.count

    @property
    def aligned(self) -> bool:
        return self.head == 0 and self.tail == 0


def span(offset: int, length: int, sector_size: int) -> Span:
    """The sector span of a non-empty byte range."""
    first = offset // sector_size
    end = ceil_div(offset + length, sector_size)
    head = offset - first * sector_size
    tail = end * sector_size - (offset + length)
    return Span(first, end - first, head, tail)


def clip(offset: int, length: int, size: int) -> int:
    """How many of ``length`` bytes from ``offset`` lie within a file of ``size`` bytes."""
    return max(0, min(length, size - offset))


ReadSector = Callable[[int], Awaitable[bytearray]]
"""Reads the sector with the given index (in the span's numbering) into a new buffer."""


async def patch_sectors(
    s: Span, data: memoryview, sector_size: int, read_sector: ReadSector
) -> list[Buffer]:
    """``data`` as whole sectors from ``s.first``: the partial end sectors are read and
    patched with ``data``'s ends, the aligned middle is passed as it is (no copy)."""
    if s.aligned:
        return [data]
    ss = sector_size
    if s.count == 1:
        sector = await read_sector(s.first)
        sector[s.head : s.head + len(data)] = data
        return [sector]
    head_len = (ss - s.head) if s.head else 0
    tail_len = (ss - s.tail) if s.tail else 0
    buffers: list[Buffer] = []
    if head_len:
        head = await read_sector(s.first)
        head[s.head :] = data[:head_len]
        buffers.append(head)
    if len(data) > head_len + tail_len:
        buffers.append(data[head_len : len(data) - tail_len])
    if tail_len:
        tail = await read_sector(s.end - 1)
        tail[:tail_len] = data[len(data) - tail_len :]
        buffers.append(tail)
    return buffers


class DeviceBytes:
    """``device`` as bytes: reads and writes of any offset and length, ``resize`` in bytes.

    Invariant: two writes that touch one sector never run at once (the range lock on
    the sectors they touch), so a read-modify-write of a partial sector never loses
    another writer's bytes.

    Every FUSE request comes here, so whole sectors within the device take a lean path:
    those are exactly the checks a ``safe`` wrapper makes, so the device is called
    through ``device.unchecked`` (``safe``'s checks skipped, every other layer kept), with
    no ``Span`` and one ``get_info``.  A read may be given the buffer to fill (``into``),
    which spares zeroing a new one (~30 µs per MiB).  Everything else goes through the
    device itself, checks and all.
    """

    def __init__(self, device: BlockDevice) -> None:
        self.device = device
        self._direct = device.unchecked
        self._writes = RangeLock()
        self.io_errors = 0
        """I/O errors its front ends returned to users (``note_error``)."""
        self._error_lines = Repeats()

    def note_error(self, what: str, exc: BlockError) -> None:
        """A front end returned ``exc`` to a user for ``what`` (``write of 4096 bytes at
        0``): count it, and log it with its errno (a few lines per errno and 10 s)."""
        self.io_errors += 1
        skipped = self._error_lines.allow(exc.errno)
        if skipped is not None:
            name = errno.errorcode.get(exc.errno, str(exc.errno))
            label = self.device.label or self.device.kind
            log.warning("%s: %s failed: %s (%s)%s", label, what, name, exc, left_out(skipped))

    def status(self) -> dict[str, str]:
        """Every layer's status, and the count of I/O errors returned to users."""
        return {**merged_status(self.device), "io_errors": str(self.io_errors)}

    async def info(self) -> Info:
        return await self.device.get_info()

    async def read(self, offset: int, length: int, into: bytearray | None = None) -> memoryview:
        """Up to ``length`` bytes from ``offset``; fewer past the end, none beyond it.

        ``into``, if given and long enough, is the buffer filled (the answer is a view of
        it); the caller must not reuse it while the answer is in use."""
        info = await self._direct.get_info()
        ss = info.sector_size
        if not (offset | length) % ss and 0 < offset + length <= info.size_bytes and length:
            view = room(into, length)
            await self._direct.read(offset // ss, [view])
            return view
        length = clip(offset, length, info.size_bytes)
        if length == 0:
            return memoryview(b"")
        s = span(offset, length, info.sector_size)
        buf = bytearray(s.count * info.sector_size)
        await self.device.read(s.first, [buf])
        return memoryview(buf)[s.head : s.head + length]

    def read_now(
        self, offset: int, length: int, into: bytearray | None = None
    ) -> memoryview | None:
        """``read`` at once where the device can (``BlockDevice.read_now``), else ``None``."""
        view = room(into, length)
        return view if self._direct.read_now(offset, view) else None

    def write_now(self, offset: int, data: memoryview) -> bool:
        """``write`` at once where the device can (``BlockDevice.write_now``) while no
        other write through this object is in flight; ``False`` otherwise, and then the
        caller awaits ``write`` with all of ``data``.  With nothing in flight, nothing
        holds the range lock, and the call takes no turn from anybody: it ends before
        any other task runs."""
        return len(self._writes) == 0 and self._direct.write_now(offset, data)

    async def lend_writable(self, offset: int, length: int) -> WritableRange | None:
        """Whole sectors inside the device as a range of a file to write ``length`` bytes
        at ``offset`` into straight (``BlockDevice.lend_writable``), or ``None`` where
        the device lends none (the caller then writes as usual).  Each write into it
        takes turns with every other write through this object (``WritableRange``)."""
        ss = (await self._direct.get_info()).sector_size
        if (offset | length) % ss or length <= 0:
            return None
        lent = self._direct.lend_writable(offset // ss, length // ss)
        return WritableRange(lent, offset // ss, ss, self._writes) if lent is not None else None

    async def write(self, offset: int, data: bytes | memoryview) -> int:
        """Write ``data`` at ``offset``; a write running past the end is cut short there,
        one that starts at or past the end fails with ENOSPC (as on a block device)."""
        info = await self._direct.get_info()
        ss, length = info.sector_size, len(data)
        if not (offset | length) % ss and 0 < offset + length <= info.size_bytes and length:
            first = offset // ss
            hold = await self._writes.acquire(first, first + length // ss)
            try:
                await self._direct.write(first, [data])
            finally:
                self._writes.release(hold)
            return length
        length = clip(offset, len(data), info.size_bytes)
        if length == 0:
            if not data:
                return 0
            raise RequestFailed(errno.ENOSPC, f"write at byte {offset} is past the end")
        view = memoryview(data)[:length]
        s = span(offset, length, info.sector_size)
        hold = await self._writes.acquire(s.first, s.end)
        try:
            if s.aligned:
                await self.device.write(s.first, [view])
            else:
                buffers = await patch_sectors(s, view, info.sector_size, self._read_sector)
                await self.device.write(s.first, buffers)
        finally:
            self._writes.release(hold)
        return length

    async def _read_sector(self, sector: int) -> bytearray:
        buf = bytearray((await self.device.get_info()).sector_size)
        await self.device.read(sector, [buf])
        return buf

    def holding(self, first: int, end: int) -> AbstractAsyncContextManager[None]:
        """Sectors ``[first, end)`` held against every write through this object, for a
        front end that changes them with a device call of its own (``write_zeroes``)."""
        return self._writes.hold(first, end)

    async def flush(self) -> None:
        await self.device.flush()

    async def resize(self, size_bytes: int) -> None:
        """Change the size (EPERM where the device cannot; EINVAL for a partial sector)."""
        info = await self.device.get_info()
        if size_bytes == info.size_bytes:
            return
        if Capability.RESIZE not in self.device.capabilities:
            raise RequestFailed(errno.EPERM, f"{self.device.kind} devices cannot change size")
        if size_bytes % info.sector_size:
            raise RequestFailed(
                errno.EINVAL, f"size {size_bytes} is not a multiple of {info.sector_size}"
            )
        new = size_bytes // info.sector_size
        # A read-modify-write of a sector being cut off must not put its old bytes back
        # after a shrink and a grow: the sectors between the two sizes take turns.
        hold = await self._writes.acquire(min(new, info.size_sectors), max(new, info.size_sectors))
        try:
            await self.device.resize(new)
        finally:
            self._writes.release(hold)


class WritableRange:
    """A device's sectors as a range of a file to write into straight
    (``DeviceBytes.lend_writable``).  Each write holds the sectors it touches in the
    bridge's range lock for as long as it runs, and no longer: a write that covers part
    of a sector cannot interleave with another writer's read-modify-write of it, and a
    range lent to a payload still on its way holds nothing meanwhile."""

    def __init__(self, lent: FileRange, first: int, sector_size: int, lock: RangeLock) -> None:
        self._lent = lent
        self._first = first
        self._sector_size = sector_size
        self._lock = lock
        self.fd, self.offset, self.length = lent.fd, lent.offset, lent.length

    def hold_now(self, at: int, n: int) -> Hold | None:
        """The sectors bytes ``at`` to ``at + n`` of the file touch, held, if nobody
        holds or waits for any of them; else ``None``."""
        return self._lock.acquire_now(*self._sectors(at, n))

    async def hold(self, at: int, n: int) -> Hold:
        """The same, once every writer that asked for any of them before is done."""
        return await self._lock.acquire(*self._sectors(at, n))

    def unhold(self, hold: Hold) -> None:
        self._lock.release(hold)

    def _sectors(self, at: int, n: int) -> tuple[int, int]:
        assert self.offset <= at and at + n <= self.offset + self.length
        ss, start = self._sector_size, at - self.offset
        return self._first + start // ss, self._first + ceil_div(start + n, ss)

    def blocked(self) -> None:
        self._lent.blocked()

    def refused(self, exc: OSError) -> None:
        self._lent.failed(exc)

    def release(self) -> None:
        self._lent.release()


def room(into: bytearray | None, length: int) -> memoryview:
    """``length`` bytes to read into: the start of ``into`` if it is long enough."""
    buf = into if into is not None and len(into) >= length else bytearray(length)
    return memoryview(buf)[:length]
