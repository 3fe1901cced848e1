"""Bytes over sectors (the shared byte bridge), the range lock and the flat file, without FUSE."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Sequence

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from blockfuse.block import Buffer
from blockfuse.devices.memory import MemoryDevice
from blockfuse.errors import RequestFailed
from blockfuse.fuse.flatfile import FlatFile
from blockfuse.rangelock import RangeLock
from blockfuse.sectors import clip, span


@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [
        (0, 512, (0, 1, 0, 0)),
        (0, 1, (0, 1, 0, 511)),
        (511, 2, (0, 2, 511, 511)),
        (512, 1024, (1, 2, 0, 0)),
        (100, 1000, (0, 3, 100, 436)),
    ],
)
def test_span(offset: int, length: int, expected: tuple[int, int, int, int]) -> None:
    s = span(offset, length, 512)
    assert (s.first, s.count, s.head, s.tail) == expected


@given(st.integers(0, 1 << 40), st.integers(1, 1 << 21), st.sampled_from([512, 4096]))
def test_span_covers_exactly(offset: int, length: int, ss: int) -> None:
    s = span(offset, length, ss)
    assert s.first * ss + s.head == offset
    assert s.end * ss - s.tail == offset + length
    assert 0 <= s.head < ss and 0 <= s.tail < ss


def test_clip() -> None:
    assert clip(0, 10, 100) == 10
    assert clip(95, 10, 100) == 5
    assert clip(100, 10, 100) == 0
    assert clip(200, 10, 100) == 0


def flat(size: int = 1 << 16, ss: int = 512) -> tuple[FlatFile, MemoryDevice]:
    mem = MemoryDevice(size, sector_size=ss)
    return FlatFile("disk", mem, kind="memory", spec="mem"), mem


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, (1 << 16) - 1), st.binary(min_size=1, max_size=3000)),
        max_size=20,
    ),
    st.sampled_from([512, 4096]),
)
def test_random_byte_writes_match_a_bytearray(writes: list[tuple[int, bytes]], ss: int) -> None:
    async def run() -> None:
        f, mem = flat(ss=ss)
        model = bytearray(1 << 16)
        for offset, data in writes:
            n = await f.write(offset, data)
            assert n == min(len(data), len(model) - offset)
            model[offset : offset + n] = data[:n]
        assert mem.data == model
        for offset, data in writes:
            assert bytes(await f.read(offset, len(data))) == model[offset : offset + len(data)]

    trio.run(run)


async def test_write_past_the_end_is_enospc() -> None:
    f, _ = flat()
    with trio.fail_after(5), pytest.raises(RequestFailed) as info:
        await f.write(1 << 16, b"x")
    assert info.value.errno == errno.ENOSPC


async def test_concurrent_writers_to_one_sector_lose_nothing() -> None:
    """Many tasks each write their own bytes of the same few sectors at once."""

    class Slow(MemoryDevice):
        async def read(self, sector, buffers):  # type: ignore[no-untyped-def]
            await trio.sleep(random.random() / 1000)
            await super().read(sector, buffers)

    slow = Slow(4096)
    f = FlatFile("disk", slow, kind="memory", spec="mem")
    rng = random.Random(7)
    offsets = list(range(0, 2048, 3))
    rng.shuffle(offsets)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for offset in offsets:
                nursery.start_soon(f.write, offset, bytes([offset % 251 + 1]) * 2)
    for offset in offsets:
        assert slow.data[offset] == offset % 251 + 1, f"byte {offset} was lost"


async def test_range_lock_serialises_overlaps_only(autojump_clock: object) -> None:
    lock = RangeLock()
    order: list[str] = []

    async def holder(name: str, start: int, end: int, delay: float) -> None:
        async with lock.hold(start, end):
            order.append(f"{name}+")
            await trio.sleep(delay)
            order.append(f"{name}-")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder, "a", 0, 10, 0.05)
            await trio.sleep(0.01)
            nursery.start_soon(holder, "b", 5, 15, 0)  # overlaps a: waits
            nursery.start_soon(holder, "c", 15, 20, 0)  # overlaps neither: runs now
    assert order.index("c+") < order.index("a-") < order.index("b+")


async def test_large_aligned_write_is_one_device_call() -> None:
    calls: list[int] = []

    class Counting(MemoryDevice):
        async def write(self, sector, buffers):  # type: ignore[no-untyped-def]
            calls.append(sum(len(b) for b in buffers))
            await super().write(sector, buffers)

    f = FlatFile("disk", Counting(4 << 20), kind="memory", spec="mem")
    with trio.fail_after(5):
        await f.write(0, os.urandom(1 << 20))
        await f.write(100, os.urandom(1 << 20))
    assert calls == [1 << 20, (1 << 20) + 512]


class HeldReads(MemoryDevice):
    """A memory device whose reads wait for ``hold`` while it is set."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.hold: trio.Event | None = None
        self.entered = trio.Event()

    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        await super().read(sector, buffers)
        if self.hold is not None:
            self.entered.set()
            await self.hold.wait()


async def test_a_shrink_and_grow_never_bring_back_a_partial_writes_old_bytes() -> None:
    dev = HeldReads(1 << 20)
    f = FlatFile("disk", dev, kind="memory", spec="")
    last = (1 << 20) - 512
    await f.write(last, b"OLD!" * 128)
    release = dev.hold = trio.Event()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(f.write, last + 10, b"new")  # reads the old sector, held
            await dev.entered.wait()
            dev.hold = None

            async def shrink_and_grow() -> None:
                await f.resize(1 << 19)
                await f.resize(1 << 20)

            nursery.start_soon(shrink_and_grow)
            await trio.testing.wait_all_tasks_blocked()
            release.set()
    assert bytes(await f.read(last, 512)) == bytes(512)  # the write came first, then the cut


async def test_range_lock_takes_turns_in_arrival_order(autojump_clock: object) -> None:
    """A waiter waits for the overlapping entries before it, waiting ones included: a
    later request for an overlapping range cannot overtake an earlier waiter."""
    lock = RangeLock()
    order: list[str] = []

    async def holder(name: str, start: int, end: int) -> None:
        async with lock.hold(start, end):
            order.append(name)
            await trio.sleep(0.01)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder, "a", 0, 10)
            await trio.sleep(0.001)
            nursery.start_soon(holder, "b", 0, 20)  # waits for a
            await trio.sleep(0.001)
            nursery.start_soon(holder, "c", 15, 20)  # overlaps only b, which waits: after b
    assert order == ["a", "b", "c"]


async def test_a_cancelled_waiter_lets_the_next_one_go(autojump_clock: object) -> None:
    lock = RangeLock()
    with trio.fail_after(5):
        first = await lock.acquire(0, 10)
        with trio.move_on_after(0.1):
            await lock.acquire(0, 10)
        assert len(lock) == 1
        lock.release(first)
        async with lock.hold(0, 10):
            pass
    assert len(lock) == 0


async def test_acquire_now_takes_no_turn_from_anybody(autojump_clock: object) -> None:
    """``acquire_now`` holds a range only where no entry, holding or waiting, overlaps
    it: it never overtakes a waiter."""
    lock = RangeLock()
    with trio.fail_after(5):
        first = await lock.acquire(0, 10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lock.acquire, 20, 30)  # holds at once
            nursery.start_soon(lock.acquire, 5, 40)  # waits for both
            await trio.testing.wait_all_tasks_blocked()
            assert lock.acquire_now(9, 11) is None  # the holder's
            assert lock.acquire_now(35, 36) is None  # only the waiter's
            beside = lock.acquire_now(40, 50)
            assert beside is not None and len(lock) == 4
            lock.release(beside)
            nursery.cancel_scope.cancel()
        lock.release(first)
