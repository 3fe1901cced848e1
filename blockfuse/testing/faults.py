"""A wrapper that injects errors, to prove that they surface where they should.

Like nbdkit's ``error`` filter: each ``Fault`` names an operation, an errno, optionally a
sector range and how many times it fires; the wrapper raises ``RequestFailed`` instead
of calling the inner device.  Faults can be added and cleared while I/O runs.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass

from ..block import BlockDevice, Buffer, Extent, total_length
from ..devices.wrapper import PassThrough
from ..errors import RequestFailed


@dataclass
class Fault:
    op: str
    """``read``, ``write``, ``flush``, ``discard``, ``write_zeroes`` or ``extents``."""
    err: int = errno.EIO
    first: int = 0
    end: int | None = None
    """Only requests touching sectors ``[first, end)`` fail (``None``: to the end)."""
    times: int | None = None
    """How many requests fail before the fault is spent (``None``: forever)."""
    fired: int = 0

    def matches(self, op: str, sector: int, count: int) -> bool:
        if op != self.op or (self.times is not None and self.fired >= self.times):
            return False
        end = self.end if self.end is not None else sector + count + 1
        return sector < end and self.first < sector + max(count, 1)


class FaultyDevice(PassThrough):
    kind = "faulty"

    def __init__(self, inner: BlockDevice, faults: Sequence[Fault] = ()) -> None:
        super().__init__(inner)
        self.faults = list(faults)

    async def _maybe_fail(self, op: str, sector: int = 0, count: int = 0) -> None:
        for fault in self.faults:
            if fault.matches(op, sector, count):
                fault.fired += 1
                raise RequestFailed(fault.err, f"injected {op} fault at sector {sector}")

    async def _count(self, buffers: Sequence[Buffer]) -> int:
        return total_length(buffers) // (await self._inner.get_info()).sector_size

    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        await self._maybe_fail("read", sector, await self._count(buffers))
        await self._inner.read(sector, buffers)

    async def write(self, sector: int, buffers: Sequence[Buffer]) -> None:
        await self._maybe_fail("write", sector, await self._count(buffers))
        await self._inner.write(sector, buffers)

    async def flush(self) -> None:
        """An injected flush failure is a lost write: it is recorded for every caller."""
        try:
            await self._maybe_fail("flush")
        except RequestFailed as exc:
            self.write_errors.record(exc)
            raise
        await self._inner.flush()

    async def discard(self, sector: int, count: int) -> None:
        await self._maybe_fail("discard", sector, count)
        await self._inner.discard(sector, count)

    async def write_zeroes(self, sector: int, count: int) -> None:
        await self._maybe_fail("write_zeroes", sector, count)
        await self._inner.write_zeroes(sector, count)

    async def extents(self, sector: int, count: int) -> list[Extent]:
        await self._maybe_fail("extents", sector, count)
        return await self._inner.extents(sector, count)
