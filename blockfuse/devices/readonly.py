"""A wrapper that refuses every change with ``ReadOnly`` (``--read-only``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ..block import BlockDevice, Buffer, Extent, Info
from ..errors import ReadOnly


class ReadOnlyDevice(BlockDevice):
    kind = "read-only"

    def __init__(self, inner: BlockDevice) -> None:
        self._inner = inner
        self.capabilities = inner.capabilities

    @property
    def inner(self) -> BlockDevice:
        return self._inner

    async def get_info(self) -> Info:
        return replace(await self._inner.get_info(), read_write=False)

    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        await self._inner.read(sector, buffers)

    async def write(self, sector: int, buffers: Sequence[Buffer]) -> None:
        raise ReadOnly("the device is mounted read-only")

    async def discard(self, sector: int, count: int) -> None:
        raise ReadOnly("the device is mounted read-only")

    async def write_zeroes(self, sector: int, count: int) -> None:
        raise ReadOnly("the device is mounted read-only")

    async def resize(self, size_sectors: int) -> None:
        raise ReadOnly("the device is mounted read-only")

    async def extents(self, sector: int, count: int) -> list[Extent]:
        return await self._inner.extents(sector, count)

    async def flush(self) -> None:
        await self._inner.flush()

    async def aclose(self) -> None:
        await self._inner.aclose()
