"""Foreground I/O against the copier: writes racing it never leave stale data on the
secondary; a write waits only for the chunks it overlaps (not for the rate limit, not
for a whole run of holes); the copier makes way for foreground I/O, and stops at once
when the mirror closes."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import trio
import trio.lowlevel
import trio.testing

from blockfuse.block import BlockDevice, Buffer, Capability, Extent
from blockfuse.devices.file import open_file
from blockfuse.devices.memory import MemoryDevice
from blockfuse.devices.mirror import MirrorDevice, open_mirror, start_mirror
from blockfuse.errors import Disconnected
from blockfuse.testing import PassThrough

from .mirrorkit import SIZE, SS, Gated, Slow, image

# --- writes racing the copier ---------------------------------------------------------


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
                await trio.testing.wait_all_tasks_blocked()  # the write waits for chunk 2
                secondary.release.set()
            await m.wait_synced()
            assert secondary_memory.data == primary.data
            assert primary.data[chunk * SS : 3 * chunk * SS] == new


# --- foreground writes wait for nothing they do not overlap ---------------------------


async def test_the_rate_limit_does_not_hold_back_foreground_writes(
    autojump_clock: object,
) -> None:
    """On the autojump clock, time passes only while every task waits: the write takes
    none unless it waits for a worker's turn at the rate."""
    primary = MemoryDevice(4 << 20)
    await primary.write(0, [b"d" * (4 << 20)])
    chunk = 64 << 10
    with trio.fail_after(30):
        async with open_mirror(
            primary, MemoryDevice(4 << 20), chunk=chunk, rate=640 << 10, in_flight=16
        ) as m:
            await (
                trio.testing.wait_all_tasks_blocked()
            )  # each worker has an item, waits for the rate
            start = trio.current_time()
            await m.write(15 * chunk // SS, [b"w" * SS])
            assert trio.current_time() - start < 0.2  # was 1.45 s: it waited for the rate


class HeldZeroing(PassThrough):
    """No extents, no write_zeroes: zeroing it means reading it.  Every read waits for
    ``release``; ``reading`` is set once one does."""

    def __init__(self, inner: BlockDevice) -> None:
        super().__init__(inner)
        self.capabilities = frozenset()
        self.reading, self.release = trio.Event(), trio.Event()

    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        self.reading.set()
        await self.release.wait()
        await super().read(sector, buffers)


async def test_a_run_of_holes_is_not_locked_whole_on_a_secondary_without_holes(
    tmp_path: Path,
) -> None:
    """Such a secondary is zeroed chunk by chunk: as one item of the whole run, a write
    into the run's last chunk waited for all of it (2.2 s at 2 ms a read)."""
    size, chunk = 64 << 20, 64 << 10
    p, s = image(tmp_path, "p", size), image(tmp_path, "s", size)  # all holes
    secondary = HeldZeroing(open_file(s))
    with trio.fail_after(60):
        async with open_mirror(open_file(p), secondary, chunk=chunk) as m:
            await secondary.reading.wait()  # the copier is zeroing the run's first chunks
            with trio.fail_after(10):  # a write waiting for the held zeroing never ends
                await m.write((size - chunk) // SS, [b"w" * SS])  # the run's last chunk
            secondary.release.set()


# --- the copier makes way -------------------------------------------------------------


async def test_the_copier_keeps_two_chunks_in_flight_while_the_disk_is_used(
    autojump_clock: object,
) -> None:
    """On the autojump clock: the seconds below pass only while every task waits."""
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


async def test_close_stops_the_copier_at_once_while_foreground_reads_keep_going(
    autojump_clock: object,
) -> None:
    """Copy workers that wait for the primary to be idle give up when the mirror stops
    (on the autojump clock: time passes only while every task waits)."""
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
