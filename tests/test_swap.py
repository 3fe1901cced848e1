"""swapfs on a memory device: the allocator, the handle API, and free racing reads."""

from __future__ import annotations

import contextlib
import gc
import random
from collections.abc import Sequence

import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from blockfuse.block import BlockDevice, Buffer
from blockfuse.buffers import split_buffers
from blockfuse.devices.memory import MemoryDevice
from blockfuse.errors import HandleFreed, NoSpace, ReadOnly, RequestFailed
from blockfuse.swap import Handle, Swap, open_swap
from blockfuse.swap.space import FreeSpace, UnitRun, map_range, merge_runs, split_runs
from blockfuse.testing import Fault, FaultyDevice, PassThrough

from . import timing

time_limit = timing.time_limit(60)

UNIT = 4096
UNITS = 16


async def make_swap(units: int = UNITS, device: BlockDevice | None = None) -> Swap:
    return await open_swap(device or MemoryDevice(units * UNIT), unit_size=UNIT)


class CountingDevice(PassThrough):
    """Counts device calls; reads wait on ``gate`` while it is set to an unset event."""

    def __init__(self, inner: BlockDevice) -> None:
        super().__init__(inner)
        self.reads = 0
        self.writes = 0
        self.gate: trio.Event | None = None
        self.read_started = trio.Event()

    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        self.reads += 1
        self.read_started.set()
        if self.gate is not None:
            await self.gate.wait()
        await super().read(sector, buffers)

    async def write(self, sector: int, buffers: Sequence[Buffer]) -> None:
        self.writes += 1
        await super().write(sector, buffers)


# --- the free-space map and layout arithmetic -----------------------------------------


def test_free_space_coalesces_and_prefers_contiguous_runs() -> None:
    space = FreeSpace(10)
    a, b, c = space.take(3), space.take(3), space.take(4)
    assert (a, b, c) == ([UnitRun(0, 3)], [UnitRun(3, 3)], [UnitRun(6, 4)])
    space.give(a)
    space.give(c)
    assert space.runs() == [UnitRun(0, 3), UnitRun(6, 4)]
    assert space.take(4) == [UnitRun(6, 4)]  # first fit that is big enough, not the first run
    space.give([UnitRun(6, 4)])
    assert space.take(5) == [UnitRun(0, 3), UnitRun(6, 2)]  # no run fits: gather from the lowest
    space.give([UnitRun(0, 3), UnitRun(6, 2)])
    space.give(b)
    assert space.runs() == [UnitRun(0, 10)]


def test_free_space_grows_in_place_first() -> None:
    space = FreeSpace(10)
    space.take(2)
    assert space.take(3, after=2) == [UnitRun(2, 3)]
    space.give([UnitRun(0, 2)])
    assert space.take(4, after=5) == [UnitRun(5, 4)]
    assert space.take(2, after=9) == [UnitRun(9, 1), UnitRun(0, 1)]  # the rest by first fit


def test_free_space_refuses_what_it_cannot_give_and_takes_nothing() -> None:
    space = FreeSpace(4)
    space.take(3)
    with pytest.raises(NoSpace):
        space.take(2)
    assert space.runs() == [UnitRun(3, 1)]


def test_free_space_catches_a_double_free() -> None:
    space = FreeSpace(8)
    run = space.take(4)
    space.give(run)
    with pytest.raises(AssertionError):
        space.give(run)
    with pytest.raises(AssertionError):
        space.give([UnitRun(6, 4)])


def test_layout_helpers() -> None:
    assert merge_runs([UnitRun(0, 2)], [UnitRun(2, 3), UnitRun(7, 1)]) == [
        UnitRun(0, 5),
        UnitRun(7, 1),
    ]
    assert split_runs([UnitRun(0, 2), UnitRun(5, 3)], 3) == (
        [UnitRun(0, 2), UnitRun(5, 1)],
        [UnitRun(6, 2)],
    )
    assert map_range([UnitRun(2, 1), UnitRun(0, 1)], 100, 50, 100) == [(250, 50), (0, 50)]
    groups = split_buffers([b"abcd", b"efgh"], [3, 2, 3])
    assert [b"".join(g) for g in groups] == [b"abc", b"de", b"fgh"]


# --- the handle API ----------------------------------------------------------------------


async def test_append_and_read_back() -> None:
    swap = await make_swap()
    h = await swap.empty()
    await swap.append(h, b"hello ")
    await swap.append(h, b"world" * 2000)
    assert await swap.size(h) == 6 + 10000
    data = b"hello " + b"world" * 2000
    assert bytes(await swap.get_partial(h, 0, 1 << 20)) == data
    assert bytes(await swap.get_partial(h, 4000, 300)) == data[4000:4300]
    assert bytes(await swap.get_partial(h, len(data), 10)) == b""
    assert swap.free_bytes == (UNITS - 3) * UNIT


async def test_a_large_append_is_one_device_call() -> None:
    dev = CountingDevice(MemoryDevice(UNITS * UNIT))
    swap = await make_swap(device=dev)
    h = await swap.empty()
    await swap.append(h, bytes(10 * UNIT))
    assert dev.writes == 1
    assert swap.runs_of(h) == [UnitRun(0, 10)]
    await swap.get_partial(h, 0, 10 * UNIT)
    assert dev.reads == 1


async def test_overwrite_gap_and_truncate() -> None:
    swap = await make_swap()
    h = await swap.empty()
    await swap.append(h, b"a" * 1000)
    await swap.write(h, 10, b"B" * 5)
    await swap.write(h, 3000, b"tail")
    expected = b"a" * 10 + b"B" * 5 + b"a" * 985 + bytes(2000) + b"tail"
    assert bytes(await swap.get_partial(h, 0, 5000)) == expected
    await swap.truncate(h, 12)
    assert bytes(await swap.get_partial(h, 0, 100)) == b"aaaaaaaaaaBB"
    await swap.truncate(h, 3 * UNIT)
    assert bytes(await swap.get_partial(h, 0, 3 * UNIT)) == b"aaaaaaaaaaBB" + bytes(3 * UNIT - 12)
    await swap.truncate(h, 0)
    assert swap.free_bytes == UNITS * UNIT


async def test_no_space_leaves_the_handle_and_others_unchanged() -> None:
    swap = await make_swap(units=4)
    a, b = await swap.empty(), await swap.empty()
    await swap.append(a, b"x" * (2 * UNIT + 1))
    await swap.append(b, b"y" * 100)
    with pytest.raises(NoSpace) as info:
        await swap.append(b, bytes(2 * UNIT))
    assert info.value.errno == 28
    assert await swap.size(b) == 100
    assert swap.free_bytes == 0
    with pytest.raises(NoSpace):
        await swap.write(b, 10 * UNIT, b"z")
    assert bytes(await swap.get_partial(a, 0, 3 * UNIT)) == b"x" * (2 * UNIT + 1)
    assert bytes(await swap.get_partial(b, 0, UNIT)) == b"y" * 100


async def test_a_failed_device_write_gives_back_what_it_took() -> None:
    dev = FaultyDevice(MemoryDevice(UNITS * UNIT))
    swap = await make_swap(device=dev)
    h = await swap.empty()
    await swap.append(h, b"keep")
    dev.faults.append(Fault("write", times=1))
    with pytest.raises(RequestFailed):
        await swap.append(h, bytes(5 * UNIT))
    assert await swap.size(h) == 4
    assert swap.free_bytes == (UNITS - 1) * UNIT
    assert bytes(await swap.get_partial(h, 0, 10)) == b"keep"


async def test_freed_handle_refuses_use_and_space_returns() -> None:
    swap = await make_swap()
    h = await swap.empty()
    await swap.append(h, bytes(3 * UNIT))
    await swap.free(h)
    await swap.free(h)  # idempotent
    assert swap.free_bytes == UNITS * UNIT
    with pytest.raises(HandleFreed):
        await swap.get_partial(h, 0, 1)
    with pytest.raises(HandleFreed):
        await swap.append(h, b"x")


async def test_a_garbage_collected_handle_frees_its_space() -> None:
    swap = await make_swap()
    h = await swap.empty()
    await swap.append(h, bytes(5 * UNIT))
    assert swap.free_bytes == (UNITS - 5) * UNIT
    del h
    gc.collect()
    assert swap.free_bytes == UNITS * UNIT


async def test_read_only_device_is_refused() -> None:
    with pytest.raises(ReadOnly):
        await open_swap(MemoryDevice(UNIT, read_only=True), unit_size=UNIT)


# --- free racing a read ---------------------------------------------------------------


async def test_free_waits_for_a_read_in_flight_and_never_leaks_other_data() -> None:
    dev = CountingDevice(MemoryDevice(2 * UNIT))
    swap = await make_swap(units=2, device=dev)
    victim = await swap.empty()
    await swap.append(victim, b"v" * UNIT)
    dev.gate = trio.Event()
    dev.read_started = trio.Event()
    results: dict[str, object] = {}

    async def read() -> None:
        results["read"] = bytes(await swap.get_partial(victim, 0, UNIT))

    async def free() -> None:
        await swap.free(victim)
        results["freed"] = True

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await dev.read_started.wait()
            nursery.start_soon(free)
            await trio.testing.wait_all_tasks_blocked()
            assert "freed" not in results
            other = await swap.empty()
            with pytest.raises(NoSpace):  # the victim's unit is still held by the read
                await swap.append(other, b"o" * (2 * UNIT))
            await swap.append(other, b"o" * UNIT)  # the other unit is fine
            with pytest.raises(HandleFreed):  # reads after free fail cleanly
                await swap.get_partial(victim, 0, 1)
            dev.gate.set()
    assert results == {"read": b"v" * UNIT, "freed": True}
    assert swap.free_bytes == UNIT


class SlowReads(MemoryDevice):
    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        await trio.sleep(0.002)
        await super().read(sector, buffers)


async def test_overlapping_reads_do_not_keep_truncated_space_away(
    autojump_clock: object,
) -> None:
    """Space a truncate cut off waits only for reads that began before it: with reads
    always in flight, it used to wait for ever (a 16-unit device ran out at round 17).
    On the autojump clock, so that the reads overlap as planned however slow the
    machine."""
    swap = await open_swap(SlowReads(UNITS * UNIT), unit_size=UNIT)
    h = await swap.empty()
    await swap.append(h, b"a" * UNIT)
    done = trio.Event()

    async def reader(delay: float) -> None:
        await trio.sleep(delay)
        while not done.is_set():
            await swap.get_partial(h, 0, UNIT)
            await trio.lowlevel.checkpoint()  # an empty file reads without waiting

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, 0)
            nursery.start_soon(reader, 0.001)  # two readers: one is always in flight
            for _ in range(3 * UNITS):
                await swap.truncate(h, 0)
                await swap.append(h, b"b" * UNIT)
                await trio.sleep(0.003)
            done.set()
    assert swap.free_bytes >= (UNITS - 3) * UNIT


async def test_cancelled_free_still_returns_space_when_the_read_ends() -> None:
    dev = CountingDevice(MemoryDevice(UNIT))
    swap = await make_swap(units=1, device=dev)
    h = await swap.empty()
    await swap.append(h, b"x")
    dev.gate = trio.Event()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(swap.get_partial, h, 0, 1)
            await dev.read_started.wait()
            with trio.move_on_after(0.01):
                await swap.free(h)
            assert swap.free_bytes == 0
            dev.gate.set()
    assert swap.free_bytes == UNIT


# --- random sequences against a model --------------------------------------------------

Op = tuple[str, int, int]
ops = st.lists(
    st.tuples(
        st.sampled_from(["append", "append", "write", "free", "truncate"]),
        st.integers(0, 5),
        st.integers(0, 3 * UNIT),
    ),
    max_size=40,
)


async def run_model(sequence: list[Op]) -> None:
    swap = await make_swap()
    handles = [await swap.empty() for _ in range(6)]
    model = [bytearray() for _ in handles]
    for op, i, n in sequence:
        await apply(swap, handles, model, op, i, n)
        check_ownership(swap, handles)
    for h, data in zip(handles, model, strict=True):
        assert bytes(await swap.get_partial(h, 0, len(data) + 1)) == data
    for h in handles:
        await swap.free(h)
    assert swap.free_runs() == [UnitRun(0, UNITS)]


async def apply(swap: Swap, handles: list, model: list[bytearray], op: str, i: int, n: int) -> None:  # type: ignore[type-arg]
    blob = bytes([i + 1]) * n
    size_wanted = {"append": len(model[i]) + n, "write": n // 2 + min(n, 300)}.get(op, n)
    try:
        if op == "append":
            await swap.append(handles[i], blob)
            model[i] += blob
        elif op == "write":
            offset, piece = n // 2, blob[:300]
            await swap.write(handles[i], offset, piece)
            end = offset + len(piece)
            if piece:
                model[i].extend(bytes(max(0, end - len(model[i]))))
            model[i][offset:end] = piece
        elif op == "truncate":
            await swap.truncate(handles[i], n)
            model[i] = model[i][:n] + bytes(max(0, n - len(model[i])))
        else:
            await swap.free(handles[i])
            handles[i], model[i] = await swap.empty(), bytearray()
    except NoSpace:
        assert await swap.size(handles[i]) == len(model[i])
        owned = swap.allocated_bytes(handles[i]) // UNIT
        assert -(-size_wanted // UNIT) - owned > swap.free_bytes // UNIT, "freed space not reused"


def check_ownership(swap: Swap, handles: list) -> None:  # type: ignore[type-arg]
    owned = [u for h in handles for r in swap.runs_of(h) for u in range(r.start, r.end)]
    free = [u for r in swap.free_runs() for u in range(r.start, r.end)]
    assert len(owned) == len(set(owned)), "a unit is owned by two handles"
    assert sorted(owned + free) == list(range(UNITS)), "a unit is lost or double-counted"
    used_runs = sum(len(swap.runs_of(h)) for h in handles)
    assert len(swap.free_runs()) <= used_runs + 1, "free runs did not coalesce"


@settings(max_examples=150, deadline=None)
@given(ops)
def test_random_sequences_match_a_model(sequence: list[Op]) -> None:
    async def main() -> None:
        with trio.fail_after(10):
            await run_model(sequence)

    trio.run(main)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=12), st.data())
def test_a_run_that_fits_is_taken_whole(sizes: list[int], data: st.DataObject) -> None:
    space = FreeSpace(32)
    taken = []
    for n in sizes:
        if n <= space.free_units:
            taken.append(space.take(n))
    for runs in data.draw(st.permutations(taken))[: len(taken) // 2]:
        space.give(runs)
    biggest = max((r.count for r in space.runs()), default=0)
    if biggest:
        got = space.take(biggest)
        assert len(got) == 1


class JitteryDevice(CountingDevice):
    """Yields to other tasks a random number of times inside every call."""

    def __init__(self, inner: BlockDevice, seed: int) -> None:
        super().__init__(inner)
        self._rng = random.Random(seed)

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


async def read_or_freed(swap: Swap, h: Handle, expected: bytes) -> None:
    """A read racing ``free`` gets the file's own bytes or fails cleanly."""
    with contextlib.suppress(HandleFreed):
        assert bytes(await swap.get_partial(h, 0, len(expected))) == expected


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32))
def test_concurrent_files_never_see_each_others_data(seed: int) -> None:
    """Tasks append, read, truncate and free their own files on a small device at once."""

    async def worker(swap: Swap, me: int, rng: random.Random) -> None:
        for _ in range(15):
            h, expected = await swap.empty(), b""
            for _ in range(rng.randrange(1, 4)):
                blob = bytes([me]) * rng.randrange(1, 2 * UNIT)
                try:
                    await swap.append(h, blob)
                    expected += blob
                except NoSpace:
                    pass
                data = bytes(await swap.get_partial(h, 0, len(expected)))
                assert data == expected, f"task {me} read another file's bytes"
            async with trio.open_nursery() as nursery:  # free racing a read
                nursery.start_soon(read_or_freed, swap, h, expected)
                nursery.start_soon(swap.free, h)

    async def main() -> None:
        swap = await make_swap(device=JitteryDevice(MemoryDevice(UNITS * UNIT), seed))
        rng = random.Random(seed)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for me in range(1, 6):
                    nursery.start_soon(worker, swap, me, random.Random(rng.random()))
        assert swap.free_runs() == [UnitRun(0, UNITS)]

    trio.run(main)
