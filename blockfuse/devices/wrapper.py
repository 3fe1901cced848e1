"""The pass-through wrapper: a device on top of another that changes one concern.

Like nbdkit's filters, ``PassThrough`` hands every call of the contract to ``inner``
unchanged; a wrapper overrides only what it is about (``ReadOnlyDevice`` the writes,
``SafeDevice`` the checks, ``FaultyDevice`` the errors).  A method added to the
contract later reaches every wrapper through here without touching them; ``lend``
(a range of a file to send a READ from) deliberately does not: a wrapper that changes
reads would be skipped, so it lends nothing unless it says so.

A wrapper's own ``status`` and ``control`` are empty: the front end walks every layer
through ``inner`` and asks each one, so passing them on here would ask the inner
device twice.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..block import BlockDevice, Buffer, Extent, Info, WriteErrors


class PassThrough(BlockDevice):
    """Every call goes to ``inner``; subclasses override what they change."""

    kind = "wrapper"

    def __init__(self, inner: BlockDevice) -> None:
        self._inner = inner
        self.capabilities = inner.capabilities
        self.cheap_extents = inner.cheap_extents

    @property
    def inner(self) -> BlockDevice:
        return self._inner

    @property
    def write_errors(self) -> WriteErrors:
        return self._inner.write_errors

    def hurry_close(self) -> None:
        self._inner.hurry_close()

    async def write_behind(self, sector: int, count: int) -> None:
        await self._inner.write_behind(sector, count)

    async def get_info(self) -> Info:
        return await self._inner.get_info()

    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        await self._inner.read(sector, buffers)

    async def write(self, sector: int, buffers: Sequence[Buffer]) -> None:
        await self._inner.write(sector, buffers)

    async def flush(self) -> None:
        await self._inner.flush()

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def discard(self, sector: int, count: int) -> None:
        await self._inner.discard(sector, count)

    async def write_zeroes(self, sector: int, count: int) -> None:
        await self._inner.write_zeroes(sector, count)

    async def resize(self, size_sectors: int) -> None:
        await self._inner.resize(size_sectors)

    async def extents(self, sector: int, count: int) -> list[Extent]:
        return await self._inner.extents(sector, count)
