"""Pivot: refused until synced, then the secondary serves alone; flushes and extents in
flight during a pivot are answered; a pivoted mirror is not copied again, and closing
it flushes the secondary.  Through a real mount: ``test_mirror_mount.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from blockfuse.block import Capability, Extent
from blockfuse.devices.file import open_file
from blockfuse.devices.memory import MemoryDevice
from blockfuse.devices.mirror import CopyMapError, MirrorState, open_mirror
from blockfuse.errors import Disconnected, RequestFailed

from .mirrorkit import SIZE, SS, Slow, image


async def test_pivot_is_refused_until_synced_then_serves_the_secondary() -> None:
    primary, secondary = MemoryDevice(SIZE), MemoryDevice(SIZE)
    await primary.write(0, [os.urandom(SIZE)])
    with trio.fail_after(10):
        async with open_mirror(Slow(primary, 0.05), secondary, chunk=8192) as m:
            with pytest.raises(RequestFailed, match=r"cannot pivot: the mirror is copying"):
                await m.pivot()
            for slow in [m._primary.dev]:
                assert isinstance(slow, Slow)
                slow.delay = 0
            await m.wait_synced()
            assert await m.control("pivot", b"") is True
            assert m.status()["state"] == "pivoted"
            with pytest.raises(Disconnected):
                await primary.read(0, [bytearray(SS)])
            await m.write(0, [b"p" * SS])
            buf = bytearray(SS)
            await m.read(0, [buf])
            assert buf == b"p" * SS
            assert secondary.data[:SS] == b"p" * SS
            await m.pivot()  # twice is fine


class SlowFlush(Slow):
    """Reads, flushes and extents take ``delay`` seconds (0 until ``slow_down``); extents
    fail once closed.  ``flushing`` and ``asked`` are set as a flush or an extents call
    begins."""

    def __init__(self, inner: MemoryDevice) -> None:
        super().__init__(inner, 0.0)
        self.capabilities = frozenset({Capability.EXTENTS})
        self.flushing, self.asked = trio.Event(), trio.Event()

    def slow_down(self, delay: float) -> None:
        """Calls take ``delay`` from now on; ``flushing`` and ``asked`` start unset."""
        self.delay = delay
        self.flushing, self.asked = trio.Event(), trio.Event()

    async def flush(self) -> None:
        self.flushing.set()
        await trio.sleep(self.delay)
        await super().flush()

    async def extents(self, sector: int, count: int) -> list[Extent]:
        self.asked.set()
        await trio.sleep(self.delay)
        await self.get_info()  # Disconnected once closed
        return [Extent(sector, count, True)]


@pytest.mark.parametrize("with_map", [False, True])
async def test_a_flush_racing_a_pivot_succeeds(tmp_path: Path, with_map: bool) -> None:
    primary = SlowFlush(MemoryDevice(SIZE))
    options = {"state": str(tmp_path / "map")} if with_map else {}
    with trio.fail_after(10):
        async with open_mirror(primary, MemoryDevice(SIZE), chunk=64 << 10, **options) as m:
            await m.wait_synced()
            primary.slow_down(0.05)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(m.pivot)
                await primary.flushing.wait()  # the pivot is flushing both sides
                nursery.start_soon(m.flush)
            assert m.statistics().state is MirrorState.PIVOTED


async def test_extents_racing_a_pivot_are_answered() -> None:
    primary = SlowFlush(MemoryDevice(SIZE))
    answers: list[list[Extent]] = []
    with trio.fail_after(10):
        async with open_mirror(primary, MemoryDevice(SIZE), chunk=64 << 10) as m:
            await m.wait_synced()
            primary.slow_down(0.05)

            async def ask() -> None:
                answers.append(await m.extents(0, 8))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                await primary.asked.wait()  # the primary is answering
                nursery.start_soon(m.pivot)
    assert answers == [[Extent(0, 8, True)]]


async def test_a_pivoted_mirror_is_not_copied_again_on_remount(tmp_path: Path) -> None:
    p = image(tmp_path, "p", SIZE, os.urandom(SIZE))
    s = image(tmp_path, "s")
    state = str(tmp_path / "map")
    with trio.fail_after(20):
        async with open_mirror(open_file(p), open_file(s), state=state, chunk=8192) as m:
            await m.wait_synced()
            await m.pivot()
            await m.write(0, [b"N" * SS])  # lives on the secondary alone
        with pytest.raises(CopyMapError, match="was pivoted: the secondary holds the newer"):
            async with open_mirror(open_file(p), open_file(s), state=state, chunk=8192):
                pass
    assert Path(s).read_bytes()[:SS] == b"N" * SS


class CountsFlushes(MemoryDevice):
    flushes = 0

    async def flush(self) -> None:
        self.flushes += 1
        await super().flush()


async def test_closing_a_pivoted_mirror_flushes_the_secondary() -> None:
    secondary = CountsFlushes(SIZE)
    async with open_mirror(MemoryDevice(SIZE), secondary, chunk=64 << 10) as m:
        await m.wait_synced()
        await m.pivot()
        await m.write(0, [b"x" * SS])
        before = secondary.flushes
    assert secondary.flushes > before
