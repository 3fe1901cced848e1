"""The byte/sector bridge: byte-granular file I/O as whole-sector device I/O.

A FUSE request names any byte range; a device takes whole sectors.  The sectors a byte
range touches::

      sector:   |  first  |         |         |  last   |
      bytes:         [head|=========|=========|==]tail
                     ^ offset                    ^ offset + length

Reads fetch the covering sectors and slice.  Writes whose two ends fall on sector
edges go straight through; otherwise the partial first and last sectors are read,
patched and written back with the aligned middle in one device call.  That
read-modify-write must not interleave with another write to the same sectors, or one
writer's bytes are lost; ``blockfuse.fuse.rangelock`` serialises writes that overlap.

Everything here is pure arithmetic on ints, tested without FUSE.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    end = -(-(offset + length) // sector_size)
    head = offset - first * sector_size
    tail = end * sector_size - (offset + length)
    return Span(first, end - first, head, tail)


def clip(offset: int, length: int, size: int) -> int:
    """How many of ``length`` bytes from ``offset`` lie within a file of ``size`` bytes."""
    return max(0, min(length, size - offset))
