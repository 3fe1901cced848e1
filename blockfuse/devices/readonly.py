"""A wrapper that refuses every change with ``ReadOnly`` (``--read-only``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ..block import Buffer, Info
from ..errors import ReadOnly
from .wrapper import PassThrough


class ReadOnlyDevice(PassThrough):
    kind = "read-only"

    async def get_info(self) -> Info:
        return replace(await self._inner.get_info(), read_write=False)

    async def write(self, sector: int, buffers: Sequence[Buffer]) -> None:
        raise ReadOnly("the device is mounted read-only")

    async def discard(self, sector: int, count: int) -> None:
        raise ReadOnly("the device is mounted read-only")

    async def write_zeroes(self, sector: int, count: int) -> None:
        raise ReadOnly("the device is mounted read-only")

    async def resize(self, size_sectors: int) -> None:
        raise ReadOnly("the device is mounted read-only")
