"""The byte/sector bridge: byte-granular file I/O as whole-sector device I/O.

A FUSE request names any byte range; a device takes whole sectors.  The sectors a byte
range touches::

      sector:   |  first  |         |         |  last   |
      bytes:         [head|=========|=========|==]tail
                     ^ offset                    ^ offset + length

Reads fetch the covering sectors and slice.  Writes whose two ends fall on sector
edges go straight through; otherwise ``patch_sectors`` reads the partial first and last
sectors, patches them, and hands them back with the aligned middle, for one device
call.  That read-modify-write must not interleave with another write to the same
sectors, or one writer's bytes are lost: the caller holds the sectors (the flat file
with ``blockfuse.fuse.rangelock``, swapfs with its per-handle state).

The FUSE flat files and swapfs both use it; everything but ``patch_sectors`` is pure
arithmetic on ints, tested without FUSE.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .block import Buffer
from .units import ceil_div


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
