"""The mirror at its edges: the end of the copy, pivot against I/O in flight, remounts
after a pivot, the rate limit and hole items against foreground writes, flushes that
fail on either side.  Each case was a bug found in review."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio

from blockfuse.block import BlockDevice, Capability, Extent
from blockfuse.devices.file import open_file
from blockfuse.devices.memory import MemoryDevice
from blockfuse.devices.mirror import (
    CopyMapError,
    MirrorDevice,
    MirrorFailed,
    MirrorState,
    copier,
    copymap,
    open_mirror,
)
from blockfuse.devices.mirror.copymap import read_saved_map
from blockfuse.errors import RequestFailed, Unreachable
from blockfuse.extents import IntervalSet
from blockfuse.opening import background_tasks
from blockfuse.spec import compile_spec
from blockfuse.testing import Fault, FaultyDevice

from .nbdserver import FakeServer
from .test_mirror import LosesUnflushedWrites, Slow, image
from .test_nbd_transport import remote

SIZE = 1 << 20
SS = 512


class SlowFlush(Slow):
    """Reads, flushes and extents take ``delay`` seconds (0 at first); extents fail once
    closed."""

    def __init__(self, inner: MemoryDevice) -> None:
        super().__init__(inner, 0.0)
        self.capabilities = frozenset({Capability.EXTENTS})

    async def flush(self) -> None:
        await trio.sleep(self.delay)
        await super().flush()

    async def extents(self, sector: int, count: int) -> list[Extent]:
        await trio.sleep(self.delay)
        await self.get_info()  # Disconnected once closed
        return [Extent(sector, count, True)]


# --- the end of the copy ------------------------------------------------------------------


async def test_a_failed_primary_flush_at_the_end_fails_the_copy_not_the_disk() -> None:
    primary = FaultyDevice(MemoryDevice(SIZE), [Fault("flush", times=1)])
    with trio.fail_after(10):
        async with open_mirror(primary, MemoryDevice(SIZE), chunk=64 << 10) as m:
            with pytest.raises(MirrorFailed, match="flushing the primary: injected"):
                await m.wait_synced()
            await m.write(0, [b"w" * SS])  # the disk still works, on the primary
            buf = bytearray(SS)
            await m.read(0, [buf])
            assert buf == b"w" * SS


async def test_a_map_that_cannot_be_saved_at_the_end_is_retried_then_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(path: str, text: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(copymap, "_write_atomically", no_space)
    state = str(tmp_path / "map")
    with trio.fail_after(10):
        async with open_mirror(
            MemoryDevice(SIZE), MemoryDevice(SIZE), chunk=64 << 10, state=state, backoff=0.01
        ) as m:
            with pytest.raises(MirrorFailed, match=r"making the copy durable.*gave up after 5"):
                await m.wait_synced()
            assert m.statistics().errors == 6


async def test_a_copy_that_fails_at_the_end_leaves_the_mount_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In ``blockfuse mount`` every device lives in ``background_tasks()``: a copier that
    raised there would cancel the whole mount."""

    def no_space(path: str, text: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(copymap, "_write_atomically", no_space)
    recipe = compile_spec(f"mirror(mem(1M), mem(1M), chunk=64K, state={tmp_path}/map)")
    with trio.fail_after(20):
        async with background_tasks() as nursery:
            dev = await recipe.open_alone(nursery)
            assert isinstance(dev, MirrorDevice)
            with pytest.raises(MirrorFailed):
                await dev.wait_synced()
            assert dev.status()["state"].startswith("failed: making the copy durable")
            await dev.read(0, [bytearray(SS)])
            with pytest.raises(RequestFailed) as info:  # a copied sector: it must be marked
                await dev.write(0, [b"w" * SS])  # dirty in the map first, which cannot be
            assert info.value.errno == errno.ENOSPC
            await dev.aclose()


# --- pivot ------------------------------------------------------------------------------


@pytest.mark.parametrize("with_map", [False, True])
async def test_a_flush_racing_a_pivot_succeeds(tmp_path: Path, with_map: bool) -> None:
    primary = SlowFlush(MemoryDevice(SIZE))
    options = {"state": str(tmp_path / "map")} if with_map else {}
    with trio.fail_after(10):
        async with open_mirror(primary, MemoryDevice(SIZE), chunk=64 << 10, **options) as m:
            await m.wait_synced()
            primary.delay = 0.05
            async with trio.open_nursery() as nursery:
                nursery.start_soon(m.pivot)
                await trio.sleep(0.01)  # the pivot is flushing both sides
                nursery.start_soon(m.flush)
            assert m.statistics().state is MirrorState.PIVOTED


async def test_extents_racing_a_pivot_are_answered() -> None:
    primary = SlowFlush(MemoryDevice(SIZE))
    answers: list[list[Extent]] = []
    with trio.fail_after(10):
        async with open_mirror(primary, MemoryDevice(SIZE), chunk=64 << 10) as m:
            await m.wait_synced()
            primary.delay = 0.05

            async def ask() -> None:
                answers.append(await m.extents(0, 8))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                await trio.sleep(0.01)
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


# --- resume -----------------------------------------------------------------------------


async def test_a_map_found_wrong_is_rewritten_before_the_copy_starts(tmp_path: Path) -> None:
    state = tmp_path / "map"
    async with open_mirror(MemoryDevice(SIZE), MemoryDevice(SIZE), state=str(state)) as m:
        await m.wait_synced()  # a map that says "all copied"
    primary, secondary = MemoryDevice(SIZE), MemoryDevice(SIZE)
    await primary.write(0, [os.urandom(SIZE)])
    slow = Slow(primary, 0.02)  # 128 chunks one at a time: the copy takes 2.5 s
    with trio.fail_after(10):
        async with open_mirror(slow, secondary, state=str(state), chunk=8192, in_flight=1) as m:
            assert "copying anew" in m.statistics().notice
            # a crash from now on must not trust the old map
            assert read_saved_map(str(state)).vouched() == IntervalSet()


# --- foreground writes wait for nothing they do not overlap -----------------------------


async def test_the_rate_limit_does_not_hold_back_foreground_writes() -> None:
    primary = MemoryDevice(4 << 20)
    await primary.write(0, [b"d" * (4 << 20)])
    chunk = 64 << 10
    with trio.fail_after(30):
        async with open_mirror(
            primary, MemoryDevice(4 << 20), chunk=chunk, rate=640 << 10, in_flight=16
        ) as m:
            await trio.sleep(0.05)  # every worker has taken an item and waits for the rate
            start = trio.current_time()
            await m.write(15 * chunk // SS, [b"w" * SS])
            assert trio.current_time() - start < 0.2  # was 1.45 s: it waited for the rate


class PlainSlow(Slow):
    """No extents, no write_zeroes: zeroing it means reading it (2 ms a read)."""

    def __init__(self, inner: BlockDevice, delay: float) -> None:
        super().__init__(inner, delay)
        self.capabilities = frozenset()


async def test_a_run_of_holes_is_not_locked_whole_on_a_secondary_without_holes(
    tmp_path: Path,
) -> None:
    size, chunk = 64 << 20, 64 << 10
    p, s = image(tmp_path, "p", size), image(tmp_path, "s", size)  # all holes
    with trio.fail_after(60):
        async with open_mirror(open_file(p), PlainSlow(open_file(s), 0.002), chunk=chunk) as m:
            await trio.sleep(0.05)
            start = trio.current_time()
            await m.write((size - chunk) // SS, [b"w" * SS])  # the run's last chunk
            assert trio.current_time() - start < 0.5  # was 2.2 s: the whole run's zeroing


# --- failed flushes ---------------------------------------------------------------------


class FailsOneFlushSlowly(LosesUnflushedWrites):
    """Flush number ``fail_flush`` loses what it should write, and says so ``delay`` later;
    a flush overlapping it succeeds (as two fsyncs of one file can, on Linux)."""

    def __init__(self, size: int, fail_flush: int, delay: float) -> None:
        super().__init__(size, fail_flush)
        self.delay = delay
        self.failing = trio.Event()

    async def flush(self) -> None:
        if self._flushes + 1 == self._fail_flush:
            self._flushes += 1
            self.failing.set()
            await trio.sleep(self.delay)
            await self.write(0, [bytes(self.on_disk)])
            raise RequestFailed(errno.EIO, "writeback failed")
        await super().flush()


async def test_a_checkpoint_overlapping_a_failing_flush_behind_saves_nothing_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(copier, "FLUSH_BEHIND_BYTES", 64 << 10)
    data = os.urandom(SIZE)
    primary = MemoryDevice(SIZE)
    await primary.write(0, [data])
    secondary = FailsOneFlushSlowly(SIZE, fail_flush=1, delay=0.05)
    state = str(tmp_path / "map")
    with trio.fail_after(10):
        async with open_mirror(primary, secondary, state=state, chunk=8192, in_flight=1) as m:
            await secondary.failing.wait()  # the copier's flush-behind is under way
            await m.flush()  # a user's fsync: it waits for the flush-behind, sees it fail
            assert m.statistics().state is MirrorState.FAILED
    if Path(state).exists():
        for a, b in read_saved_map(state).vouched():
            assert secondary.on_disk[a * SS : b * SS] == data[a * SS : b * SS]


async def test_a_failed_primary_flush_stops_the_map_from_cleaning(tmp_path: Path) -> None:
    primary = LosesUnflushedWrites(SIZE, fail_flush=10**9)
    state = str(tmp_path / "map")
    with trio.fail_after(10):
        async with open_mirror(primary, MemoryDevice(SIZE), state=state, chunk=8192) as m:
            await m.wait_synced()
            await m.flush()
            primary._fail_flush = primary._flushes + 1
            await m.write(10, [b"W" * SS])  # chunk 0 is marked dirty first
            with pytest.raises(RequestFailed, match="writeback failed"):
                await m.flush()
            await m.flush()  # succeeds (as a second fsync does), and proves nothing
            assert m.statistics().state is MirrorState.FAILED
    assert 10 not in read_saved_map(state).vouched()


async def test_an_nbd_primary_away_for_a_while_fails_a_flush_but_not_the_copy(
    nursery: trio.Nursery,
) -> None:
    """A flush that cannot reach the server lost nothing by itself: the copy goes on once
    the server is back (it used to fail as 'flushing the primary' after ~3 s away)."""
    server = FakeServer(SIZE)
    server.disk[:] = os.urandom(SIZE)
    primary = await remote(nursery, server, backoff=0.01, retries=2)
    with trio.fail_after(20):
        async with open_mirror(primary, MemoryDevice(SIZE), chunk=8192, rate=1 << 20) as m:
            server.up = False  # no new connections...
            server.drop_after = server.requests  # ...and the current one drops
            with pytest.raises(Unreachable):
                await m.flush()
            assert m.statistics().state is MirrorState.COPYING
            server.up = True
            await m.wait_synced()
