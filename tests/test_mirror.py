"""The mirror device: contract, the write/copy race, holes, errors, progress, resume, pivot."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from blockfuse.block import BlockDevice, Buffer, Capability, Extent, Info
from blockfuse.devices.file import open_file
from blockfuse.devices.memory import MemoryDevice
from blockfuse.devices.mirror import (
    CopyMapError,
    MirrorDevice,
    MirrorFailed,
    MirrorRefused,
    MirrorState,
    copier,
    open_mirror,
    start_mirror,
)
from blockfuse.devices.mirror.copymap import read_saved_map
from blockfuse.devices.sparse import open_sparse
from blockfuse.errors import Disconnected, RequestFailed
from blockfuse.extents import IntervalSet
from blockfuse.opening import background_tasks
from blockfuse.spec import SpecError, compile_spec
from blockfuse.testing import Fault, FaultyDevice, PassThrough, check_block_device

SIZE = 1 << 20
SS = 512


async def test_mirror_of_memory_conforms() -> None:
    async with trio.open_nursery() as nursery:

        async def make() -> BlockDevice:
            return await start_mirror(
                nursery, MemoryDevice(SIZE), MemoryDevice(SIZE), chunk=64 << 10
            )

        await check_block_device(make)


async def test_mirror_of_files_with_a_map_conforms(tmp_path: Path) -> None:
    count = 0

    async def make() -> BlockDevice:
        nonlocal count
        count += 1
        p, s = image(tmp_path, f"p{count}"), image(tmp_path, f"s{count}")
        state = str(tmp_path / f"map{count}")
        return await start_mirror(nursery, open_file(p), open_file(s), state=state, chunk=8192)

    async with trio.open_nursery() as nursery:
        await check_block_device(make)


def image(tmp_path: Path, name: str, size: int = SIZE, data: bytes = b"") -> str:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(size)
    return str(path)


# --- the race ---------------------------------------------------------------------------


class Jittery(PassThrough):
    """Yields to the scheduler a random number of times before and after each call."""

    def __init__(self, inner: MemoryDevice, rng: random.Random) -> None:
        super().__init__(inner)
        self._rng = rng

    async def _jitter(self) -> None:
        for _ in range(self._rng.randrange(4)):
            await trio.lowlevel.checkpoint()

    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        await self._jitter()
        await super().read(sector, buffers)
        await self._jitter()

    async def write(self, sector: int, buffers: Sequence[Buffer]) -> None:
        await self._jitter()
        await super().write(sector, buffers)
        await self._jitter()

    async def write_zeroes(self, sector: int, count: int) -> None:
        await self._jitter()
        await super().write_zeroes(sector, count)
        await self._jitter()

    async def extents(self, sector: int, count: int) -> list[Extent]:
        await self._jitter()
        answer = await super().extents(sector, count)
        await self._jitter()
        return answer

    async def flush(self) -> None:
        await self._jitter()
        await super().flush()


class HoleyMemory(MemoryDevice):
    """Memory whose all-zero sectors are holes, as its ``extents`` tell; it can also be
    made to lack some capabilities."""

    def __init__(
        self, size: int, sector_size: int = SS, lacks: frozenset[Capability] = frozenset()
    ) -> None:
        super().__init__(size, sector_size=sector_size)
        self.capabilities = (MemoryDevice.capabilities | {Capability.EXTENTS}) - lacks
        self._ss = sector_size

    async def extents(self, sector: int, count: int) -> list[Extent]:
        data, ss = self.data, self._ss
        kinds = [any(data[(sector + i) * ss : (sector + i + 1) * ss]) for i in range(count)]
        out: list[Extent] = []
        for i, is_data in enumerate(kinds):
            if out and out[-1].is_data == is_data:
                out[-1] = Extent(out[-1].sector, out[-1].count + 1, is_data)
            else:
                out.append(Extent(sector + i, 1, is_data))
        return out


def holey_bytes(rng: random.Random, n: int) -> bytes:
    """Random sectors, about half of them zero (holes)."""
    return b"".join(bytes(SS) if rng.random() < 0.5 else rng.randbytes(SS) for _ in range(n // SS))


async def racing_writes(
    m: MirrorDevice,
    rng: random.Random,
    model: bytearray,
    ss: int,
    rounds: int,
    most: int,
    longest: int,
    blob: Callable[[int], bytes],
) -> None:
    """``rounds`` times, up to ``most`` writes at once of up to ``longest`` sectors (none
    overlapping another of its round), each also applied to ``model``."""
    sectors = len(model) // ss
    for _ in range(rounds):
        taken: list[tuple[int, int]] = []
        async with trio.open_nursery() as nursery:
            for _ in range(rng.randrange(1, most + 1)):
                first = rng.randrange(sectors)
                count = rng.randrange(1, min(longest, sectors - first) + 1)
                if any(a < first + count and first < b for a, b in taken):
                    continue
                taken.append((first, first + count))
                data = blob(count * ss)
                model[first * ss : (first + count) * ss] = data
                nursery.start_soon(m.write, first, [data])


async def race_with_holes_once(seed: int) -> None:
    """Writes of data into the primary's holes, and of zeroes over its data, race the
    copier, whose plan of the holes they make old; sector sizes differ or not, and the
    secondary may lack extents or write_zeroes."""
    rng = random.Random(seed)
    size = 64 << 10
    p_ss, s_ss = rng.choice([(SS, SS), (SS, 4096), (4096, SS)])
    ss = max(p_ss, s_ss)  # the mirror's sector
    lacks = rng.choice([set(), {Capability.EXTENTS}, {Capability.WRITE_ZEROES}])
    chunk_sectors = rng.choice([1, 3, 8])
    start = holey_bytes(rng, size)
    primary = HoleyMemory(size, p_ss)
    secondary = HoleyMemory(size, s_ss, frozenset(lacks))
    await primary.write(0, [start])
    await secondary.write(0, [holey_bytes(rng, size)])  # old contents must not survive
    model = bytearray(start)
    async with open_mirror(
        Jittery(primary, rng), Jittery(secondary, rng), chunk=chunk_sectors * ss,
        in_flight=rng.choice([1, 4]),
    ) as m:  # fmt: skip
        blob = partial(holey_bytes, rng)
        await racing_writes(m, rng, model, ss, 20, 5, 2 * chunk_sectors + 2, blob)
        await m.wait_synced()
        assert primary.data == model, f"seed {seed}: primary differs from the model"
        assert secondary.data == model, f"seed {seed}: secondary differs from the model"


async def test_writes_racing_the_copier_over_holes_never_leave_stale_data() -> None:
    with trio.fail_after(120):
        for seed in range(60):
            await race_with_holes_once(seed)


async def race_once(seed: int) -> None:
    rng = random.Random(seed)
    size = 256 << 10
    chunk_sectors = rng.choice([1, 3, 8, 16])
    start = rng.randbytes(size)
    primary_mem, secondary_mem = MemoryDevice(size), MemoryDevice(size)
    await primary_mem.write(0, [start])
    await secondary_mem.write(0, [rng.randbytes(size)])  # old contents must not survive
    model = bytearray(start)
    async with open_mirror(
        Jittery(primary_mem, rng),
        Jittery(secondary_mem, rng),
        chunk=chunk_sectors * SS,
        in_flight=rng.choice([1, 4, 8]),
    ) as m:
        await racing_writes(m, rng, model, SS, 30, 7, 3 * chunk_sectors + 2, rng.randbytes)
        await m.wait_synced()
        await m.flush()
        assert primary_mem.data == model, f"seed {seed}: primary differs from the model"
        assert secondary_mem.data == model, f"seed {seed}: secondary differs from the model"


async def test_writes_racing_the_copier_never_leave_stale_data() -> None:
    with trio.fail_after(120):
        for seed in range(60):
            await race_once(seed)


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


async def test_a_write_running_into_a_chunk_in_flight_waits_for_it() -> None:
    """Mirage checked only a write's first sector against the chunk being copied."""
    chunk = 16
    primary = MemoryDevice(SIZE)
    await primary.write(0, [b"o" * SIZE])
    secondary_memory = MemoryDevice(SIZE)
    secondary = Gated(secondary_memory, gate_sector=2 * chunk)
    with trio.fail_after(10):
        async with open_mirror(primary, secondary, chunk=chunk * SS, in_flight=1) as m:
            await secondary.reached.wait()  # chunk 2 has read "o" and waits to write it
            new = b"n" * (2 * chunk * SS)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(m.write, chunk, [new])  # starts in chunk 1, runs into 2
                for _ in range(20):
                    await trio.lowlevel.checkpoint()
                secondary.release.set()
            await m.wait_synced()
            assert secondary_memory.data == primary.data
            assert primary.data[chunk * SS : 3 * chunk * SS] == new


# --- holes, sizes, progress ---------------------------------------------------------------


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


async def test_holes_are_skipped_and_the_secondary_stays_sparse(tmp_path: Path) -> None:
    size = 64 << 20
    p = image(tmp_path, "p", size)
    with open(p, "r+b") as f:
        for offset in (0, 20 << 20, size - (1 << 20)):
            f.seek(offset)
            f.write(os.urandom(1 << 20))
    s = image(tmp_path, "s", size)
    primary = CountingDevice(open_file(p))
    with trio.fail_after(30):
        async with open_mirror(primary, open_file(s), chunk=256 << 10) as m:
            await m.wait_synced()
            assert primary.bytes_read <= 4 << 20, "holes were read"
    assert Path(p).read_bytes() == Path(s).read_bytes()
    assert os.stat(s).st_blocks * 512 <= 4 << 20, "the secondary lost its holes"


async def test_holes_in_the_primary_are_zeroed_on_an_old_secondary(tmp_path: Path) -> None:
    p = image(tmp_path, "p", SIZE, b"data" * 1000)
    s = image(tmp_path, "s", SIZE, os.urandom(SIZE))
    with trio.fail_after(10):
        async with open_mirror(open_file(p), open_file(s), chunk=64 << 10) as m:
            await m.wait_synced()
    assert Path(p).read_bytes() == Path(s).read_bytes()


async def test_a_fresh_secondary_is_not_asked_for_holes_per_item(tmp_path: Path) -> None:
    p = image(tmp_path, "p", SIZE, b"data" * (16 << 10))  # one chunk of data, 15 of holes
    s = image(tmp_path, "s")
    secondary = CountingDevice(open_file(s))
    with trio.fail_after(10):
        async with open_mirror(open_file(p), secondary, chunk=64 << 10) as m:
            await m.wait_synced()
    assert secondary.extents_calls == 1, "asked once, before the copy"
    assert Path(p).read_bytes() == Path(s).read_bytes()


async def test_a_fresh_secondary_is_asked_once_when_data_ends_mid_chunk(
    tmp_path: Path,
) -> None:
    size = 16 << 20
    p = image(tmp_path, "p", size)
    with open(p, "r+b") as f:  # 4 KiB of data every 256 KiB
        for offset in range(0, size, 256 << 10):
            f.seek(offset)
            f.write(os.urandom(4096))
    s = image(tmp_path, "s", size)
    secondary = CountingDevice(open_file(s))
    with trio.fail_after(10):
        async with open_mirror(open_file(p), secondary, chunk=1 << 20) as m:
            await m.wait_synced()
    assert secondary.extents_calls == 1
    assert Path(p).read_bytes() == Path(s).read_bytes()


async def test_what_the_mirror_wrote_where_the_primary_became_a_hole_is_zeroed(
    tmp_path: Path,
) -> None:
    chunk = 64 << 10
    p = image(tmp_path, "p", SIZE, os.urandom(2 * chunk))
    s = image(tmp_path, "s")
    faulty = FaultyDevice(open_file(s))
    with trio.fail_after(10):
        async with open_mirror(open_sparse(p), faulty, chunk=chunk) as m:
            await m.wait_synced()  # the secondary holds data in the first two chunks
            faulty.faults.append(Fault("write", times=1))
            # The sparse primary punches these zeroes; the secondary misses them, so
            # the range is copied again, now as a hole of the primary.
            await m.write(0, [bytes(chunk)])
            await m.wait_synced()
    assert Path(p).read_bytes() == Path(s).read_bytes()


@pytest.mark.parametrize("size", [0, SS, 1000 * SS, SIZE])
async def test_progress_is_every_percent_then_complete(size: int) -> None:
    seen: list[int | str] = []
    primary = MemoryDevice(size)
    await primary.write(0, [os.urandom(size)])
    secondary = MemoryDevice(size)
    with trio.fail_after(10):
        async with open_mirror(primary, secondary, chunk=8192, progress=seen.append) as m:
            await m.wait_synced()
            st = m.statistics()
            assert st.state is MirrorState.SYNCED and st.percent == 100
            assert st.copied_bytes == st.total_bytes == size
            assert secondary.data == primary.data
    assert seen == [*range(101), "complete"]


# --- errors ------------------------------------------------------------------------------


async def test_a_passing_copy_error_is_retried() -> None:
    secondary = FaultyDevice(MemoryDevice(SIZE), [Fault("write", first=100, end=101, times=2)])
    primary = MemoryDevice(SIZE)
    await primary.write(0, [os.urandom(SIZE)])
    with trio.fail_after(10):
        async with open_mirror(primary, secondary, chunk=8192, backoff=0.01) as m:
            await m.wait_synced()
            st = m.statistics()
            assert st.errors == 2 and "injected write fault" in st.last_error
            assert m.status()["errors"] == "2"
            assert secondary.inner.data == primary.data  # type: ignore[union-attr]


@pytest.mark.parametrize("op", ["read", "write"])
async def test_a_lasting_copy_error_fails_the_mirror_but_not_the_disk(op: str) -> None:
    primary, secondary = MemoryDevice(SIZE), MemoryDevice(SIZE)
    faulty = FaultyDevice(primary if op == "read" else secondary, [Fault(op, first=200, end=201)])
    pair = (faulty, secondary) if op == "read" else (primary, faulty)
    with trio.fail_after(10):
        async with open_mirror(*pair, chunk=8192, retries=3, backoff=0.01) as m:
            with pytest.raises(MirrorFailed, match="the copy gave up after 3 retries of its own"):
                await m.wait_synced()
            assert m.status()["state"].startswith("failed: copying sectors 192-208")
            assert m.statistics().errors == 4
            await m.write(0, [b"x" * SS])  # foreground I/O goes on
            buf = bytearray(SS)
            await m.read(0, [buf])
            assert buf == b"x" * SS
            await m.flush()
            with pytest.raises(RequestFailed) as info:
                await m.pivot()
            assert info.value.errno == errno.EBUSY


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


async def test_close_stops_the_copier_at_once_while_foreground_reads_keep_going() -> None:
    """Copy workers that wait for the primary to be idle give up when the mirror stops."""
    primary = MemoryDevice(SIZE)
    with trio.fail_after(20):
        await close_under_foreground_reads(primary)


async def close_under_foreground_reads(primary: MemoryDevice) -> None:
    async with trio.open_nursery() as nursery:
        m = await start_mirror(nursery, Slow(primary, 0.002), MemoryDevice(SIZE), chunk=8192)

        async def read_until_closed(sector: int) -> None:
            buf = bytearray(SS)
            with contextlib.suppress(Disconnected):
                while True:
                    await m.read(sector, [buf])

        for sector in range(3):  # the primary is never idle
            nursery.start_soon(read_until_closed, sector)
        await trio.sleep(0.1)
        started = trio.current_time()
        await m.aclose()  # shielded: it cannot be timed out, so time it
        assert trio.current_time() - started < 2  # the copier's grace is 10 s


async def test_a_failed_secondary_write_is_copied_again() -> None:
    faulty = FaultyDevice(MemoryDevice(SIZE))
    primary = MemoryDevice(SIZE)
    with trio.fail_after(10):
        async with open_mirror(primary, faulty, chunk=8192) as m:
            await m.wait_synced()
            faulty.faults.append(Fault("write", times=1))
            await m.write(10, [b"y" * SS])  # the primary has it; the secondary part failed
            assert m.statistics().errors == 1
            await m.wait_synced()
            assert faulty.inner.data == primary.data  # type: ignore[union-attr]


# --- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("primary", "secondary", "message"),
    [
        (MemoryDevice(SIZE), MemoryDevice(SIZE, read_only=True), "secondary is read-only"),
        (MemoryDevice(SIZE), MemoryDevice(SIZE // 2), "they must be the same size"),
        (
            MemoryDevice(3 << 12, sector_size=1024),
            MemoryDevice(3 << 12, sector_size=1536),
            "not multiples of each other",
        ),
    ],
)
async def test_refusals_are_one_line_and_write_nothing(
    primary: MemoryDevice, secondary: MemoryDevice, message: str
) -> None:
    before = bytes(secondary.data)
    async with trio.open_nursery() as nursery:
        with pytest.raises(MirrorRefused, match=message) as info:
            await start_mirror(nursery, primary, secondary)
    assert "\n" not in str(info.value)
    assert secondary.data == before


async def test_the_same_file_twice_is_refused(tmp_path: Path) -> None:
    p = image(tmp_path, "p")
    async with trio.open_nursery() as nursery:
        with pytest.raises(MirrorRefused, match="the primary itself"):
            await start_mirror(nursery, open_file(p, read_only=True), open_file(p))
    with pytest.raises(ValueError, match="already open for writing by another"):
        open_file(p), open_file(p)  # two writers of one image: the second cannot lock it


async def test_sector_sizes_that_are_multiples_mirror() -> None:
    primary = MemoryDevice(SIZE, sector_size=512)
    await primary.write(0, [os.urandom(SIZE)])
    secondary = MemoryDevice(SIZE, sector_size=4096)
    with trio.fail_after(10):
        async with open_mirror(primary, secondary, chunk=64 << 10) as m:
            assert (await m.get_info()).sector_size == 4096
            await m.write(3, [b"z" * 4096])
            await m.wait_synced()
            assert secondary.data == primary.data


# --- the copy map and resume ---------------------------------------------------------------


class Slow(PassThrough):
    """Reads take ``delay`` seconds each."""

    def __init__(self, inner: BlockDevice, delay: float) -> None:
        super().__init__(inner)
        self.delay = delay

    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        await trio.sleep(self.delay)
        await super().read(sector, buffers)


async def test_the_copier_keeps_two_chunks_in_flight_while_the_disk_is_used() -> None:
    primary = MemoryDevice(SIZE)
    await primary.write(0, [os.urandom(SIZE)])

    async def use_the_disk(m: MirrorDevice) -> None:
        buf = bytearray(SS)
        for _ in range(25):  # 0.25 s, one read always in progress
            await m.read(0, [buf])

    async def most_in_flight(m: MirrorDevice, seconds: float) -> int:
        seen = 0
        with trio.move_on_after(seconds):
            while True:
                seen = max(seen, m.statistics().chunks_in_flight)
                await trio.sleep(0.001)
        return seen

    with trio.fail_after(10):
        async with open_mirror(Slow(primary, 0.01), MemoryDevice(SIZE), chunk=8192) as m:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(use_the_disk, m)
                await trio.sleep(0.03)  # the chunks that started before it end
                assert await most_in_flight(m, 0.15) <= 2
            assert await most_in_flight(m, 0.05) > 2
            await m.wait_synced()


async def test_a_stopped_copy_resumes_from_its_map(tmp_path: Path) -> None:
    p = image(tmp_path, "p", SIZE, os.urandom(SIZE))
    s = image(tmp_path, "s")
    state = str(tmp_path / "map")
    at_30 = trio.Event()

    def progress(p: int | str) -> None:
        if p == 30:
            at_30.set()

    with trio.fail_after(20):
        async with open_mirror(
            Slow(open_file(p), 0.01),
            open_file(s),
            state=state,
            chunk=8192,
            in_flight=2,
            progress=progress,
        ) as m:
            await at_30.wait()
            await m.write(0, [b"w" * 4 * SS])  # into the copied part: both sides
        copied_at_stop = m.statistics().copied_bytes
        assert 0 in read_saved_map(state).copied
        seen: list[int | str] = []
        async with open_mirror(
            open_file(p), open_file(s), state=state, chunk=8192, progress=seen.append
        ) as again:
            assert again.statistics().copied_bytes == copied_at_stop
            await again.wait_synced()
    assert seen[0] == 0 and seen[-1] == "complete"
    assert Path(p).read_bytes() == Path(s).read_bytes()
    assert Path(p).read_bytes()[: 4 * SS] == b"w" * 4 * SS


class WatchMap(PassThrough):
    """Checks, at each write, that the map file already lists the chunk as dirty."""

    def __init__(self, inner: BlockDevice, state: str) -> None:
        super().__init__(inner)
        self.state = state
        self.checked = 0

    async def write(self, sector: int, buffers: Sequence[Buffer]) -> None:
        if os.path.exists(self.state):
            assert sector in read_saved_map(self.state).dirty, f"sector {sector} not dirty"
            self.checked += 1
        await super().write(sector, buffers)


async def test_a_write_to_a_copied_region_is_dirty_on_disk_first(tmp_path: Path) -> None:
    state = str(tmp_path / "map")
    primary = WatchMap(MemoryDevice(SIZE), state)
    with trio.fail_after(10):
        async with open_mirror(primary, MemoryDevice(SIZE), state=state, chunk=8192) as m:
            await m.wait_synced()
            await m.write(100, [os.urandom(SS)])
            await m.write(1000, [os.urandom(3 * SS)])
            assert primary.checked == 2
            await m.flush()
            assert read_saved_map(state).dirty == IntervalSet()


async def test_a_map_of_another_mirror_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "map"
    async with open_mirror(MemoryDevice(SIZE), MemoryDevice(SIZE), state=str(state)) as m:
        await m.wait_synced()
    async with trio.open_nursery() as nursery:
        with pytest.raises(CopyMapError, match="belongs to another mirror"):
            await start_mirror(
                nursery, MemoryDevice(2 * SIZE), MemoryDevice(2 * SIZE), state=str(state)
            )


# --- pivot -------------------------------------------------------------------------------


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


async def test_wait_synced_after_close_does_not_hang() -> None:
    with trio.fail_after(10):
        async with open_mirror(Slow(MemoryDevice(SIZE), 1), MemoryDevice(SIZE)) as m:
            pass
        assert isinstance(m, MirrorDevice)
        with pytest.raises(Disconnected):
            await m.wait_synced()


# --- the spec ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mirror(mem(1M), mem(1M), chunk=1000)", "chunk 1000 is not a whole number of 512-byte"),
        ("mirror(mem(1M), mem(1M), chunk=1T)", "more than 64 MiB: each chunk in flight"),
        ("mirror(mem(1M), mem(1M), rate=0)", "rate must be more than 0"),
        ("mirror(mem(1M), mem(1M), state=/no/such/dir/map)", "does not exist"),
        ("mirror(mem(1M))", "needs 'secondary'"),
        ("mirror(mem(1M), mem(1M), speed=1)", "has no argument 'speed'"),
    ],
)
def test_bad_mirror_specs(spec: str, message: str) -> None:
    with pytest.raises(SpecError, match=re.escape(message)):
        compile_spec(spec)


async def test_a_mirror_spec_opens_and_copies() -> None:
    recipe = compile_spec("mirror(mem(1M), mem(1M), chunk=64K, rate=100M)")
    assert recipe.kind == "mirror" and len(recipe.children) == 2
    with trio.fail_after(10):
        async with background_tasks() as nursery:
            dev = await recipe.open_alone(nursery)
            assert isinstance(dev, MirrorDevice)
            await dev.wait_synced()
            assert dev.status()["state"] == "synced"
            await dev.aclose()


@pytest.mark.parametrize("how", ["another file", "the same name, made anew"])
async def test_a_map_kept_while_the_secondary_was_replaced_is_set_aside(
    tmp_path: Path, how: str
) -> None:
    p = image(tmp_path, "p", SIZE, os.urandom(SIZE))
    s = image(tmp_path, "s")
    state = str(tmp_path / "map")
    with trio.fail_after(20):
        async with open_mirror(open_file(p), open_file(s), state=state, chunk=8192) as m:
            await m.wait_synced()
        if how == "another file":
            s = image(tmp_path, "s2")
        else:
            os.unlink(s)
            s = image(tmp_path, "s")
        async with open_mirror(open_file(p), open_file(s), state=state, chunk=8192) as m:
            assert m.statistics().copied_bytes == 0
            assert "copying anew" in m.statistics().notice
            await m.wait_synced()
    assert Path(p).read_bytes() == Path(s).read_bytes()


async def test_a_write_cancelled_half_way_is_copied_again() -> None:
    primary_memory = MemoryDevice(SIZE)
    primary = Gated(primary_memory, gate_sector=10)
    secondary = MemoryDevice(SIZE)
    with trio.fail_after(10):
        async with open_mirror(primary, secondary, chunk=8192) as m:
            await m.wait_synced()
            with trio.move_on_after(0.2):
                await m.write(8, [b"c" * 4 * SS])  # the secondary has it, the primary waits
            assert secondary.data[8 * SS : 12 * SS] == b"c" * 4 * SS
            primary.release.set()
            await m.wait_synced()
            assert secondary.data == primary_memory.data


# --- crash safety of the copy map ------------------------------------------------------------


class VolatileMemory(BlockDevice):
    """A disk with a write cache: writes land in ``data``; ``flush`` copies it to ``durable``.

    After every call it asks ``check`` whether a crash now would be safe.
    """

    def __init__(self, size: int, rng: random.Random) -> None:
        self.data, self.durable = bytearray(size), bytearray(size)
        self.rng = rng
        self.check = lambda: None

    async def _jitter(self) -> None:
        for _ in range(self.rng.randrange(3)):
            await trio.lowlevel.checkpoint()

    async def get_info(self):  # type: ignore[no-untyped-def]
        return Info(True, SS, len(self.data) // SS)

    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        await self._jitter()
        pos = sector * SS
        for b in buffers:
            memoryview(b).cast("B")[:] = self.data[pos : pos + len(b)]
            pos += len(b)

    async def write(self, sector: int, buffers: Sequence[Buffer]) -> None:
        await self._jitter()
        self.check()
        pos = sector * SS
        for b in buffers:
            self.data[pos : pos + len(b)] = b
            pos += len(b)
        self.check()
        await self._jitter()

    async def flush(self) -> None:
        await self._jitter()
        self.durable[:] = self.data
        self.check()

    async def aclose(self) -> None:
        pass


def saved_clean(state: Path) -> list[tuple[int, int]]:
    """What a resume from the map file would take as copied: copied minus dirty."""
    return read_saved_map(str(state)).vouched().to_list() if state.exists() else []


async def crash_run(seed: int, state: Path) -> int:
    rng = random.Random(seed)
    size = 128 * SS
    primary, secondary = VolatileMemory(size, rng), VolatileMemory(size, rng)
    primary.data[:] = primary.durable[:] = rng.randbytes(size)
    checks = 0

    def check() -> None:
        nonlocal checks
        checks += 1
        for a, b in saved_clean(state):
            for side in (primary.data, primary.durable, secondary.data, secondary.durable):
                assert side[a * SS : b * SS] == primary.durable[a * SS : b * SS], (
                    f"seed {seed}: sectors {a}-{b} are called clean but differ"
                )

    primary.check = secondary.check = check
    async with open_mirror(primary, secondary, state=str(state), chunk=4 * SS) as m:
        for _ in range(60):
            async with trio.open_nursery() as nursery:
                for k in range(rng.randrange(1, 4)):
                    if rng.random() < 0.4:
                        nursery.start_soon(m.flush)
                        continue
                    first = rng.randrange(0, 120) // 3 * 3 + k
                    blob = rng.randbytes(rng.randrange(1, 9) * SS)
                    nursery.start_soon(m.write, first, [blob[: (128 - first) * SS]])
            check()
        await m.wait_synced()
        await m.flush()
        check()
        assert saved_clean(state) == [(0, 128)]
    return checks


async def test_a_crash_at_any_moment_leaves_a_map_that_resumes_safely(tmp_path: Path) -> None:
    """At every device call: what the map file calls copied and clean is equal on both
    sides and nothing unflushed is pending there, so a crash (even one losing every
    unflushed write) could resume from it."""
    with trio.fail_after(60):
        for seed in range(20):
            assert await crash_run(seed, tmp_path / f"map{seed}") > 100


async def test_reads_come_from_the_secondary_once_synced() -> None:
    primary = CountingDevice(MemoryDevice(SIZE))
    secondary = FaultyDevice(MemoryDevice(SIZE))
    data = os.urandom(SIZE)
    await primary.write(0, [data])
    with trio.fail_after(10):
        async with open_mirror(primary, secondary, chunk=64 << 10) as m:
            await m.wait_synced()
            before = primary.reads
            buf = bytearray(8 * SS)
            await m.read(100, [buf])
            assert primary.reads == before and buf == data[100 * SS : 108 * SS]
            secondary.faults.append(Fault("read", times=1))  # a failing secondary read
            await m.read(100, [buf])  # falls back to the primary
            assert primary.reads == before + 1 and m.statistics().errors == 1
            assert buf == data[100 * SS : 108 * SS]


async def test_a_new_sparse_secondary_takes_the_primarys_size(tmp_path: Path) -> None:
    p = image(tmp_path, "p", 3 * SIZE, os.urandom(SIZE))
    s = tmp_path / "new.img"
    recipe = compile_spec(f"mirror({p}, sparse({s}), chunk=64K)")
    assert not s.exists()
    with trio.fail_after(10):
        async with background_tasks() as nursery:
            dev = await recipe.open_alone(nursery)
            assert isinstance(dev, MirrorDevice)
            await dev.wait_synced()
            await dev.aclose()
    assert s.stat().st_size == 3 * SIZE
    assert s.read_bytes() == Path(p).read_bytes()
    assert s.stat().st_blocks * 512 < 2 * SIZE, "the holes of the primary were written"


@pytest.mark.parametrize("length", [SIZE, 4 * SIZE])
async def test_an_existing_sparse_secondary_of_another_size_is_refused(
    tmp_path: Path, length: int
) -> None:
    """Only a new ``sparse(PATH)`` takes the primary's size; an existing file keeps its
    own (taking the primary's left a short file that later mounted 43 MiB long)."""
    p = image(tmp_path, "p", 2 * SIZE, os.urandom(SIZE))
    s = image(tmp_path, "s", length, b"old")
    recipe = compile_spec(f"mirror({p}, sparse({s}), chunk=64K)")
    with trio.fail_after(10), pytest.raises(MirrorRefused, match="must be the same size"):
        async with background_tasks() as nursery:
            await recipe.open_alone(nursery)
    assert os.path.getsize(s) == length
    assert Path(s).read_bytes()[:3] == b"old"
