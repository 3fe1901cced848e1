"""Safe: check every request against the contract before the inner device sees it.

After MirageOS's ``Mirage_block_safe``.  Some backends answer a bad request with a bare
``EINVAL`` or, worse, act on it; ``SafeDevice`` instead raises ``Unsafe`` with a message
that names the numbers, and the inner device is never touched.  ``unsafe_read`` and
``unsafe_write`` skip the checks for callers that can prove them.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..block import BlockDevice, Buffer, Extent, Filler, Info, check_new_size, total_length
from ..errors import ReadOnly, Unsafe
from ..threads import WorkerThreads
from .wrapper import PassThrough


def check_buffers(buffers: Sequence[Buffer], sector_size: int) -> None:
    """Raise ``Unsafe`` unless every buffer is a whole number of sectors."""
    for i, buf in enumerate(buffers):
        if len(buf) % sector_size:
            raise Unsafe(
                f"buffer {i + 1} of {len(buffers)} is {len(buf)} bytes, "
                f"not a whole number of {sector_size}-byte sectors"
            )


def check_range(sector: int, count: int, info: Info) -> None:
    """Raise ``Unsafe`` unless ``[sector, sector+count)`` lies within the device."""
    size = info.size_sectors
    if count < 0:
        raise Unsafe(f"negative sector count {count}")
    if sector < 0 or sector > size or (sector == size and count > 0):
        raise Unsafe(
            f"start sector {sector} is outside the device "
            f"({size} sectors of {info.sector_size} bytes)"
        )
    if sector + count > size:
        raise Unsafe(
            f"request of {count} sectors at sector {sector} runs "
            f"{sector + count - size} sectors past the end ({size} sectors)"
        )


def check_request(sector: int, buffers: Sequence[Buffer], info: Info) -> None:
    """Raise ``Unsafe`` unless ``buffers`` are whole sectors that fit from ``sector``."""
    check_buffers(buffers, info.sector_size)
    check_range(sector, total_length(buffers) // info.sector_size, info)


class SafeDevice(PassThrough):
    kind = "safe"

    @property
    def unchecked(self) -> BlockDevice:
        return self._inner.unchecked

    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        check_request(sector, buffers, await self._inner.get_info())
        await self._inner.read(sector, buffers)

    async def write(self, sector: int, buffers: Sequence[Buffer]) -> None:
        info = await self._inner.get_info()
        check_request(sector, buffers, info)
        if not info.read_write:
            raise ReadOnly("the device is read-only")
        await self._inner.write(sector, buffers)

    async def write_filled(
        self,
        sector: int,
        view: memoryview,
        fill: Filler,
        *,
        threads: WorkerThreads | None = None,
    ) -> None:
        info = await self._inner.get_info()
        check_request(sector, [view], info)
        if not info.read_write:
            raise ReadOnly("the device is read-only")
        await self._inner.write_filled(sector, view, fill, threads=threads)

    async def unsafe_read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        await self._inner.read(sector, buffers)

    async def unsafe_write(self, sector: int, buffers: Sequence[Buffer]) -> None:
        await self._inner.write(sector, buffers)

    async def _checked_change(self, sector: int, count: int) -> None:
        info = await self._inner.get_info()
        check_range(sector, count, info)
        if not info.read_write:
            raise ReadOnly("the device is read-only")

    async def discard(self, sector: int, count: int) -> None:
        await self._checked_change(sector, count)
        await self._inner.discard(sector, count)

    async def write_zeroes(self, sector: int, count: int) -> None:
        await self._checked_change(sector, count)
        await self._inner.write_zeroes(sector, count)

    async def resize(self, size_sectors: int) -> None:
        check_new_size(size_sectors)
        await self._checked_change(0, 0)
        await self._inner.resize(size_sectors)

    async def extents(self, sector: int, count: int) -> list[Extent]:
        check_range(sector, count, await self._inner.get_info())
        return await self._inner.extents(sector, count)
