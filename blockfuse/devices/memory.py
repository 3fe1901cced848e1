"""A device held in a bytearray: the reference oracle of the tests."""

from __future__ import annotations

from collections.abc import Sequence

from ..block import SECTOR_SIZE, BlockDevice, Buffer, Capability, Info
from ..errors import Disconnected, ReadOnly


class MemoryDevice(BlockDevice):
    kind = "memory"
    capabilities = frozenset({Capability.DISCARD, Capability.WRITE_ZEROES, Capability.RESIZE})

    def __init__(
        self, size_bytes: int, *, sector_size: int = SECTOR_SIZE, read_only: bool = False
    ) -> None:
        if size_bytes < 0 or size_bytes % sector_size:
            raise ValueError(f"memory size {size_bytes} is not a whole number of sectors")
        self._data: bytearray | None = bytearray(size_bytes)
        self._sector_size = sector_size
        self._read_only = read_only

    @property
    def data(self) -> bytearray:
        """The contents, for tests that compare against it."""
        return self._open()

    def _open(self) -> bytearray:
        if self._data is None:
            raise Disconnected("memory device is closed")
        return self._data

    async def get_info(self) -> Info:
        data = self._open()
        return Info(not self._read_only, self._sector_size, len(data) // self._sector_size)

    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        data = self._open()
        offset = sector * self._sector_size
        for buf in buffers:
            n = len(buf)
            memoryview(buf).cast("B")[:] = data[offset : offset + n]
            offset += n

    async def write(self, sector: int, buffers: Sequence[Buffer]) -> None:
        data = self._writable()
        offset = sector * self._sector_size
        for buf in buffers:
            n = len(buf)
            data[offset : offset + n] = buf
            offset += n

    async def write_zeroes(self, sector: int, count: int) -> None:
        data = self._writable()
        start, n = sector * self._sector_size, count * self._sector_size
        data[start : start + n] = bytes(n)

    async def discard(self, sector: int, count: int) -> None:
        await self.write_zeroes(sector, count)

    async def resize(self, size_sectors: int) -> None:
        data = self._writable()
        new_len = size_sectors * self._sector_size
        if new_len < len(data):
            del data[new_len:]
        else:
            data.extend(bytes(new_len - len(data)))

    async def flush(self) -> None:
        self._open()

    async def aclose(self) -> None:
        self._data = None

    def _writable(self) -> bytearray:
        data = self._open()
        if self._read_only:
            raise ReadOnly("memory device is read-only")
        return data
