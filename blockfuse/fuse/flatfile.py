"""One device seen as a flat file of bytes: the FUSE handlers' only way to a device.

No pyfuse3 here, so the byte-level behaviour is tested against a memory device alone.
"""

from __future__ import annotations

import errno

from ..block import BlockDevice, Capability, Info
from ..bridge import clip, patch_sectors, span
from ..errors import RequestFailed
from .rangelock import RangeLock


class FlatFile:
    def __init__(self, name: str, device: BlockDevice, *, kind: str, spec: str) -> None:
        self.name = name
        self.device = device
        self.kind = kind
        self.spec = spec
        self._writes = RangeLock()

    async def info(self) -> Info:
        return await self.device.get_info()

    async def read(self, offset: int, length: int) -> memoryview:
        info = await self.device.get_info()
        length = clip(offset, length, info.size_bytes)
        if length == 0:
            return memoryview(b"")
        s = span(offset, length, info.sector_size)
        buf = bytearray(s.count * info.sector_size)
        await self.device.read(s.first, [buf])
        return memoryview(buf)[s.head : s.head + length]

    async def write(self, offset: int, data: bytes | memoryview) -> int:
        """Write ``data`` at ``offset``; a write running past the end is cut short there."""
        info = await self.device.get_info()
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

    async def flush(self) -> None:
        await self.device.flush()

    async def resize(self, size_bytes: int) -> None:
        info = await self.device.get_info()
        if size_bytes == info.size_bytes:
            return
        if Capability.RESIZE not in self.device.capabilities:
            raise RequestFailed(errno.EPERM, f"{self.kind} devices cannot change size")
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

    async def control(self, key: str, value: bytes) -> None:
        """Hand ``user.blockfuse.KEY`` to the first layer (outermost first) that takes it."""
        dev: BlockDevice | None = self.device
        while dev is not None:
            if await dev.control(key, value):
                return
            dev = dev.inner
        raise RequestFailed(errno.EPERM, f"{self.name} has no control named {key!r}")

    def status(self) -> dict[str, str]:
        """Every layer's status, outermost last so that it wins on a shared key."""
        layers = []
        dev: BlockDevice | None = self.device
        while dev is not None:
            layers.append(dev)
            dev = dev.inner
        out: dict[str, str] = {}
        for layer in reversed(layers):
            out.update(layer.status())
        return out
