"""When something fails: a copy error is retried, then fails the mirror but not the
disk; a write whose secondary part failed or was cancelled is copied again; the flush
and the map save that end the copy can fail; and a failed flush on either side never
lets the map call lost data copied."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from blockfuse.block import BlockDevice, FlushCursor
from blockfuse.devices.memory import MemoryDevice
from blockfuse.devices.mirror import (
    CopyMapError,
    MirrorDevice,
    MirrorFailed,
    MirrorState,
    copier,
    mapfile,
    open_mirror,
)
from blockfuse.devices.mirror import device as mirror_device
from blockfuse.devices.mirror.mapfile import read_saved_map
from blockfuse.errors import RequestFailed, Unreachable
from blockfuse.opening import background_tasks
from blockfuse.spec import compile_spec
from blockfuse.testing import Fault, FaultyDevice, PassThrough

from .mirrorkit import SIZE, SS, Gated, Slow, image
from .nbdserver import FakeServer
from .test_nbd_transport import remote

# --- copy errors ----------------------------------------------------------------------


async def test_a_passing_copy_error_is_retried() -> None:
    secondary_memory = MemoryDevice(SIZE)
    secondary = FaultyDevice(secondary_memory, [Fault("write", first=100, end=101, times=2)])
    primary = MemoryDevice(SIZE)
    await primary.write(0, [os.urandom(SIZE)])
    with trio.fail_after(10):
        async with open_mirror(primary, secondary, chunk=8192, backoff=0.01) as m:
            await m.wait_synced()
            st = m.statistics()
            assert st.errors == 2 and "injected write fault" in st.last_error
            assert m.status()["errors"] == "2"
            assert secondary_memory.data == primary.data


@pytest.mark.parametrize("op", ["read", "write"])
async def test_a_lasting_copy_error_fails_the_mirror_but_not_the_disk(op: str) -> None:
    primary, secondary = MemoryDevice(SIZE), MemoryDevice(SIZE)
    faulty = FaultyDevice(primary if op == "read" else secondary, [Fault(op, first=200, end=201)])
    pair = (faulty, secondary) if op == "read" else (primary, faulty)
    with trio.fail_after(10):
        async with open_mirror(*pair, chunk=8192, retries=3, backoff=0.01) as m:
            with pytest.raises(MirrorFailed, match=r"\(gave up after 4 tries\)$"):
                await m.wait_synced()
            status = m.status()
            assert status["state"] == "failed"
            assert status["last_error"].startswith("copying sectors 192-208: ")
            assert status["last_error"].endswith(" (gave up after 4 tries)")
            assert m.statistics().errors == 4
            await m.write(0, [b"x" * SS])  # foreground I/O goes on
            buf = bytearray(SS)
            await m.read(0, [buf])
            assert buf == b"x" * SS
            await m.flush()
            with pytest.raises(RequestFailed) as info:
                await m.pivot()
            assert info.value.errno == errno.EBUSY


async def test_a_failed_secondary_write_is_copied_again() -> None:
    secondary = MemoryDevice(SIZE)
    faulty = FaultyDevice(secondary)
    primary = MemoryDevice(SIZE)
    with trio.fail_after(10):
        async with open_mirror(primary, faulty, chunk=8192) as m:
            await m.wait_synced()
            faulty.faults.append(Fault("write", times=1))
            await m.write(10, [b"y" * SS])  # the primary has it; the secondary part failed
            assert m.statistics().errors == 1
            await m.wait_synced()
            assert secondary.data == primary.data


async def test_a_write_cancelled_half_way_is_copied_again() -> None:
    primary_memory = MemoryDevice(SIZE)
    primary = Gated(primary_memory, gate_sector=10)
    secondary = MemoryDevice(SIZE)
    with trio.fail_after(10):
        async with open_mirror(primary, secondary, chunk=8192) as m:
            await m.wait_synced()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(m.write, 8, [b"c" * 4 * SS])
                await primary.reached.wait()  # the primary waits at its gate...
                await trio.testing.wait_all_tasks_blocked()  # ...and the secondary has it
                nursery.cancel_scope.cancel()  # the write is cancelled half way
            assert secondary.data[8 * SS : 12 * SS] == b"c" * 4 * SS
            primary.release.set()
            await m.wait_synced()
            assert secondary.data == primary_memory.data


# --- the end of the copy --------------------------------------------------------------


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


def saves_fail_after(monkeypatch: pytest.MonkeyPatch, good: int, err: int = errno.ENOSPC) -> None:
    """The first ``good`` map saves succeed, then every one fails with ``err``."""
    real = mapfile._write_atomically
    calls = [0]

    def write(path: str, text: str) -> None:
        calls[0] += 1
        if calls[0] > good:
            raise OSError(err, os.strerror(err))
        real(path, text)

    monkeypatch.setattr(mapfile, "_write_atomically", write)


async def test_a_map_that_cannot_be_saved_fails_the_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saves_fail_after(monkeypatch, 1)  # the session's first save (open) goes through
    state = str(tmp_path / "map")
    with trio.fail_after(10):
        async with open_mirror(
            MemoryDevice(SIZE), MemoryDevice(SIZE), chunk=64 << 10, state=state, backoff=0.01
        ) as m:
            with pytest.raises(MirrorFailed, match=r"cannot save the copy map .*: No space"):
                await m.wait_synced()


async def test_a_map_that_cannot_be_saved_at_the_start_refuses_the_mirror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saves_fail_after(monkeypatch, 0, errno.EROFS)
    primary, secondary = MemoryDevice(SIZE), MemoryDevice(SIZE)
    with trio.fail_after(10), pytest.raises(CopyMapError, match="Read-only file system"):
        async with open_mirror(primary, secondary, chunk=64 << 10, state=str(tmp_path / "m")):
            pass


async def test_a_copy_that_fails_for_its_map_leaves_the_disk_writable_and_the_map_silent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In ``blockfuse mount`` every device lives in ``background_tasks()``: a copier that
    raised there would cancel the whole mount.  A write to a copied sector must be
    marked dirty in the map first; when the map cannot be saved, the map is made to
    vouch for nothing instead, and the write goes on."""
    saves_fail_after(monkeypatch, 2)  # open, and the first checkpoint's, part way
    monkeypatch.setattr(mirror_device, "CHECKPOINT_SECONDS", 0.05)
    state = tmp_path / "map"
    recipe = compile_spec(
        f"mirror(mem(1M), file({image(tmp_path, 's', SIZE)}), chunk=64K, rate=2M, state={state})"
    )
    with trio.fail_after(20):
        async with background_tasks() as nursery:
            dev = await recipe.open_alone(nursery)
            assert isinstance(dev, MirrorDevice)
            with pytest.raises(MirrorFailed):
                await dev.wait_synced()
            assert dev.status()["state"] == "failed"
            assert dev.status()["last_error"].startswith("cannot save the copy map")
            assert read_saved_map(str(state)).vouched().total > 0  # what it said is still true
            await dev.write(0, [b"w" * SS])
            await dev.flush()
            buf = bytearray(SS)
            await dev.read(0, [buf])
            assert buf == b"w" * SS
            await dev.aclose()
    assert read_saved_map(str(state)).invalidated


# --- failed flushes -------------------------------------------------------------------


async def test_the_secondary_is_flushed_during_the_copy_and_a_failed_flush_fails_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(copier, "FLUSH_BEHIND_BYTES", 64 << 10)
    primary = MemoryDevice(SIZE)
    await primary.write(0, [os.urandom(SIZE)])
    secondary = FaultyDevice(MemoryDevice(SIZE), [Fault("flush")])
    with trio.fail_after(10):
        async with open_mirror(primary, secondary, chunk=8192, in_flight=1) as m:
            with pytest.raises(MirrorFailed, match="flushing the secondary"):
                await m.wait_synced()
            assert m.statistics().copied_bytes < SIZE  # it failed half way, not at the end


class LosesUnflushedWrites(MemoryDevice):
    """A disk behind a page cache, as Linux behaves on a writeback error: the failing
    flush loses every write since the last good flush, and the next flush succeeds."""

    def __init__(self, size: int, fail_flush: int) -> None:
        super().__init__(size)
        self.on_disk = bytearray(size)
        self._flushes, self._fail_flush = 0, fail_flush

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()
        self._flushes += 1
        if self._flushes == self._fail_flush:
            await self.write(0, [bytes(self.on_disk)])  # the page cache forgets them
            raise RequestFailed(errno.EIO, "writeback failed")
        await self.read(0, [self.on_disk])


@pytest.mark.parametrize("fail_flush", [2, 3, 5])
async def test_after_a_failed_secondary_flush_the_map_never_calls_lost_data_copied(
    tmp_path: Path, fail_flush: int
) -> None:
    data = os.urandom(SIZE)
    primary = MemoryDevice(SIZE)
    await primary.write(0, [data])
    secondary = LosesUnflushedWrites(SIZE, fail_flush)
    state = str(tmp_path / "map")
    slow = Slow(primary, 0.002)  # 128 chunks: about 0.3 s of copying
    reached = {tenth: trio.Event() for tenth in range(1, 10)}

    def progress(percent: int | str) -> None:
        if isinstance(percent, int) and percent % 10 == 0 and 0 < percent < 100:
            reached[percent // 10].set()

    with trio.fail_after(10):
        async with open_mirror(
            slow, secondary, state=state, chunk=8192, in_flight=1, progress=progress
        ) as m:
            for tenth in range(1, 10):  # checkpoints (fsync) while the copy goes on
                await reached[tenth].wait()
                await m.write(tenth, [b"w" * SS])  # a foreground write into the copied part
                await m.flush()
                if not m.going_on():
                    break  # that flush failed: what it should have kept is lost
            with pytest.raises(MirrorFailed, match="flushing the secondary"):
                await m.wait_synced()
        expected = bytearray(data)
        expected[SS : (tenth + 1) * SS] = b"w" * tenth * SS
        for a, b in read_saved_map(state).vouched():
            assert secondary.on_disk[a * SS : b * SS] == expected[a * SS : b * SS]
        # after a restart the secondary holds only what reached its disk
        primary, again = MemoryDevice(SIZE), MemoryDevice(SIZE)
        await primary.write(0, [bytes(expected)])
        await again.write(0, [bytes(secondary.on_disk)])
        async with open_mirror(primary, again, state=state, chunk=8192) as m:
            await m.wait_synced()
            assert again.data == expected


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


class FailingStore:
    """A map store whose first ``good`` saves succeed; then saves and invalidations fail."""

    name = "failing map"

    def __init__(self, good: int) -> None:
        self.text: str | None = None
        self.good = good

    def load(self) -> str | None:
        return self.text

    async def save(self, text: str) -> None:
        await trio.lowlevel.checkpoint()
        if self.good <= 0:
            raise OSError(errno.EIO, "Input/output error")
        self.good -= 1
        self.text = text

    async def invalidate(self) -> None:
        await trio.lowlevel.checkpoint()
        raise OSError(errno.EROFS, "Read-only file system")


async def test_writers_waiting_on_a_map_that_freezes_are_refused_too() -> None:
    """Two writes to copied chunks at once; the map cannot be saved nor invalidated.
    The second one waited on the first one's failing save, and must not go on as if its
    chunk were dirty in the file (the crash harness found it going on)."""
    store = FailingStore(good=2)  # open, and the checkpoint at the end of the copy
    with trio.fail_after(10):
        async with open_mirror(
            MemoryDevice(SIZE), MemoryDevice(SIZE), chunk=64 << 10, state=store
        ) as m:
            await m.wait_synced()
            results: dict[int, BaseException | None] = {}

            async def write(sector: int) -> None:
                try:
                    await m.write(sector, [b"w" * SS])
                    results[sector] = None
                except RequestFailed as exc:
                    results[sector] = exc

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write, 0)
                nursery.start_soon(write, 512)  # another chunk
    assert all(isinstance(r, RequestFailed) for r in results.values()), results


class SlowFlush(PassThrough):
    """Flushes take ``delay`` seconds."""

    def __init__(self, inner: BlockDevice, delay: float) -> None:
        super().__init__(inner)
        self.delay = delay

    async def flush(self) -> None:
        await trio.sleep(self.delay)
        await super().flush()


async def test_a_primary_flush_error_reaches_every_caller_even_if_its_flush_is_cancelled(
    autojump_clock: object,
) -> None:
    """The primary's flush fails while the secondary's still runs, and the flush is then
    cancelled (a checkpoint at close, or a hurried one): the error must still reach
    every flush caller, or an fsync could promise what the primary lost."""
    primary = FaultyDevice(MemoryDevice(SIZE))
    with trio.fail_after(60):
        async with open_mirror(primary, SlowFlush(MemoryDevice(SIZE), 1.0), chunk=8192) as m:
            await m.wait_synced()
            user = FlushCursor(m)
            primary.faults.append(Fault("flush", times=1))
            with trio.move_on_after(0.5):  # cancelled while the secondary flushes
                await m.flush()
            with pytest.raises(RequestFailed, match="injected flush fault"):
                await user.flush()
