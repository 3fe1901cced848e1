"""What the mirror tests share: sizes, image files, and pass-through fakes.

Each fake is a ``blockfuse.testing.PassThrough`` that overrides only what it changes.
A fake that one file uses lives in that file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import trio

from blockfuse.block import BlockDevice, Buffer, Extent
from blockfuse.testing import PassThrough

SIZE = 1 << 20
SS = 512


def image(tmp_path: Path, name: str, size: int = SIZE, data: bytes = b"") -> str:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(size)
    return str(path)


class Slow(PassThrough):
    """Reads take ``delay`` seconds each."""

    def __init__(self, inner: BlockDevice, delay: float) -> None:
        super().__init__(inner)
        self.delay = delay

    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        await trio.sleep(self.delay)
        await super().read(sector, buffers)


class Gated(PassThrough):
    """Blocks writes that touch ``gate_sector`` until ``release`` is set."""

    def __init__(self, inner: BlockDevice, gate_sector: int) -> None:
        super().__init__(inner)
        self.gate_sector = gate_sector
        self.reached = trio.Event()
        self.release = trio.Event()

    async def write(self, sector: int, buffers: Sequence[Buffer]) -> None:
        n = sum(len(b) for b in buffers) // SS
        if sector <= self.gate_sector < sector + n and not self.release.is_set():
            self.reached.set()
            await self.release.wait()
        await super().write(sector, buffers)


class CountingDevice(PassThrough):
    """Counts the reads, the bytes read and the extents calls through it."""

    def __init__(self, inner: BlockDevice) -> None:
        super().__init__(inner)
        self.reads = 0
        self.bytes_read = 0
        self.extents_calls = 0

    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        self.reads += 1
        self.bytes_read += sum(len(b) for b in buffers)
        await super().read(sector, buffers)

    async def extents(self, sector: int, count: int) -> list[Extent]:
        self.extents_calls += 1
        return await super().extents(sector, count)
