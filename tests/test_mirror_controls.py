"""A running mirror steered without a remount: retry a failed copy, cancel it (the
primary serves alone, the map keeps what was copied), change its rate; each refused
where it does not apply.  The rate and ETA count data, not holes.  On trio's autojump
clock: the rate limits take no real time."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Sequence

import pytest
import trio

from blockfuse.block import Buffer, Capability, Extent
from blockfuse.devices.memory import MemoryDevice
from blockfuse.devices.mirror import MirrorFailed, MirrorState, open_mirror
from blockfuse.devices.mirror.copier import Tally
from blockfuse.devices.mirror.device import parse_rate
from blockfuse.devices.mirror.mapfile import parse_map
from blockfuse.devices.mirror.state import STATES, Event
from blockfuse.errors import RequestFailed
from blockfuse.testing import Fault, FaultyDevice, PassThrough
from blockfuse.testing.simulated import SimDisk, SimStore

from .mirrorkit import SIZE, SS

MiB = 1 << 20


class Holey(PassThrough):
    """A memory device that reports data only in ``[data_from, data_to)`` (in sectors),
    as a sparse image would."""

    def __init__(self, inner: MemoryDevice, data_from: int, data_to: int) -> None:
        super().__init__(inner)
        self.capabilities = inner.capabilities | {Capability.EXTENTS}
        self.data = (data_from, data_to)

    async def extents(self, sector: int, count: int) -> list[Extent]:
        end = sector + count
        a, b = self.data
        pieces = [(sector, min(end, a), False), (max(sector, a), min(end, b), True)]
        pieces.append((max(sector, b), end, False))
        return [Extent(s, e - s, d) for s, e, d in pieces if e > s]


async def random_memory(size: int) -> MemoryDevice:
    dev = MemoryDevice(size)
    await dev.write(0, [os.urandom(size)])
    return dev


def test_the_transition_table_takes_the_controls() -> None:
    assert STATES[MirrorState.FAILED][Event.RETRY] is MirrorState.COPYING
    assert STATES[MirrorState.CANCELLED][Event.RETRY] is MirrorState.COPYING
    for state in (MirrorState.COPYING, MirrorState.SYNCED, MirrorState.FAILED):
        assert STATES[state][Event.CANCEL] is MirrorState.CANCELLED
    assert Event.CANCEL not in STATES[MirrorState.PIVOTED]
    assert Event.RETRY not in STATES[MirrorState.COPYING]


async def test_a_failed_copy_is_retried_without_a_remount(autojump_clock: object) -> None:
    primary = await random_memory(SIZE)
    faulty = FaultyDevice(primary, [Fault("read", first=200, end=201)])
    secondary = MemoryDevice(SIZE)
    with trio.fail_after(60):
        async with open_mirror(faulty, secondary, chunk=8192, retries=2, backoff=0.01) as m:
            with pytest.raises(RequestFailed) as refused:
                await m.control("retry", b"1")  # while copying: nothing to retry
            assert refused.value.errno == errno.EBUSY
            assert "only a failed or cancelled copy can be retried" in str(refused.value)
            with pytest.raises(MirrorFailed):
                await m.wait_synced()
            assert m.status()["state"] == "failed" and m.statistics().errors == 3
            faulty.faults.clear()  # the primary recovers
            assert await m.control("retry", b"1")
            assert m.status()["state"] == "copying" and m.statistics().reason == ""
            await m.wait_synced()
            assert secondary.data == primary.data
            assert m.statistics().errors == 3  # counted once, not again


async def test_cancel_serves_the_primary_alone_and_keeps_the_map(autojump_clock: object) -> None:
    """Simulated disks and map (durable, and in memory: the autojump clock and worker
    threads do not mix)."""
    primary = SimDisk(os.urandom(SIZE), rng=random.Random(1))
    secondary_disk = SimDisk(bytes(SIZE), rng=random.Random(2))
    secondary = FaultyDevice(secondary_disk)
    state = SimStore()
    with trio.fail_after(60):
        async with open_mirror(primary, secondary, chunk=8192, rate=256 << 10, state=state) as m:
            await trio.sleep(1.5)  # about 35% copied, at 256 KiB/s
            assert 20 < m.statistics().percent < 60
            await m.control("cancel", b"1")
            st = m.statistics()
            assert st.state is MirrorState.CANCELLED and m.status()["state"] == "cancelled"
            copied = st.copied_bytes
            await trio.sleep(5)  # the copier stays stopped
            assert m.statistics().copied_bytes == copied
            before = bytes(secondary_disk.current)
            await m.write(0, [b"n" * 4 * SS])  # copied data: the primary alone now
            assert bytes(secondary_disk.current) == before
            assert primary.current[: 4 * SS] == b"n" * 4 * SS
            secondary.faults.append(Fault("flush"))  # a broken secondary no longer matters:
            await m.flush()  # the primary alone is flushed
            with pytest.raises(RequestFailed) as refused:
                await m.pivot()
            assert "retry the copy, then pivot once it is synced" in str(refused.value)
            await m.control("cancel", b"1")  # cancelled already: nothing to do
        assert state.durable is not None
        saved = parse_map(state.durable, "map")
        assert saved.closed is not None
        assert not saved.vouched().overlaps(0, 4)  # the write the secondary missed
        assert saved.vouched().total * SS >= copied - 8192  # less the chunk made dirty
    primary = SimDisk(bytes(primary.current), rng=random.Random(3))
    secondary_disk = SimDisk(bytes(secondary_disk.current), rng=random.Random(4))
    with trio.fail_after(60):
        async with open_mirror(primary, secondary_disk, chunk=8192, state=state) as m:
            assert m.statistics().copied_bytes >= copied - 8192  # resumed, not anew
            await m.wait_synced()
    assert secondary_disk.current == primary.current


async def test_a_cancelled_copy_can_be_retried(autojump_clock: object) -> None:
    primary, secondary = await random_memory(SIZE), MemoryDevice(SIZE)
    with trio.fail_after(60):
        async with open_mirror(primary, secondary, chunk=8192, rate=256 << 10) as m:
            await trio.sleep(1)
            await m.cancel()
            await m.write(0, [b"c" * SS])
            m.retry()
            await m.wait_synced()
            assert secondary.data == primary.data


async def test_the_rate_limit_changes_at_once(autojump_clock: object) -> None:
    primary, secondary = await random_memory(8 * MiB), MemoryDevice(8 * MiB)
    with trio.fail_after(600):
        async with open_mirror(primary, secondary, chunk=64 << 10, rate=64 << 10) as m:
            assert m.status()["rate_limit"] == str(64 << 10)
            await trio.sleep(2)
            assert m.statistics().percent < 5  # 8 MiB at 64 KiB/s: two minutes
            started = trio.current_time()
            assert await m.control("rate_limit", b"4M")
            assert m.status()["rate_limit"] == str(4 * MiB)
            await m.wait_synced()
            assert trio.current_time() - started < 4  # about 2 s at 4 MiB/s
            await m.control("rate", b"none")  # the spec's name for it too
            assert m.status()["rate_limit"] == ""
            await m.pivot()
            with pytest.raises(RequestFailed) as refused:
                await m.control("rate_limit", b"1M")
            assert refused.value.errno == errno.EBUSY and "pivoted" in str(refused.value)
            with pytest.raises(RequestFailed) as refused:
                await m.control("cancel", b"1")
            assert refused.value.errno == errno.EBUSY and "its copy is over" in str(refused.value)


@pytest.mark.parametrize("text", ["0", "-1", "fast", "", "1Q"])
def test_a_bad_rate_limit_is_einval(text: str) -> None:
    with pytest.raises(RequestFailed) as refused:
        parse_rate(text)
    assert refused.value.errno == errno.EINVAL and "like 64M" in str(refused.value)
    assert parse_rate("64M") == 64 * MiB and parse_rate("None") is None


async def test_rate_and_eta_count_data_not_holes(autojump_clock: object) -> None:
    """16 MiB, of which the last 2 MiB hold data, at 256 KiB/s: the holes are copied at
    once, and must not make the rate look like megabytes per second."""
    size = 16 * MiB
    data_from = (size - 2 * MiB) // SS
    memory = MemoryDevice(size)
    await memory.write(data_from, [os.urandom(2 * MiB)])
    primary = Holey(memory, data_from, size // SS)
    with trio.fail_after(600):
        async with open_mirror(primary, MemoryDevice(size), chunk=64 << 10, rate=256 << 10) as m:
            await trio.sleep(4)
            st = m.statistics()
            assert st.copied_bytes > 14 * MiB  # the holes, and some data
            assert 128 << 10 < st.rate < 384 << 10, st.rate
            left = 2 * MiB - st.data_bytes
            assert st.eta is not None and abs(st.eta - left / st.rate) < 2, (st.eta, left)
            await m.wait_synced()
            assert m.statistics().data_bytes == 2 * MiB


def test_the_data_left_is_exact_where_planned_and_a_share_beyond() -> None:
    tally = Tally(planned=100, planned_data=20, swept=50, swept_data=10)
    assert tally.data_left(50) == 10  # all of the rest is planned: exact
    assert tally.data_left(250) == 10 + 200 * 20 // 100  # 200 beyond the plan, 20% data
    assert Tally().data_left(1000) == 1000  # nothing planned yet: all may be data


class Counting(PassThrough):
    """Counts writes that reach it."""

    def __init__(self, inner: MemoryDevice) -> None:
        super().__init__(inner)
        self.writes = 0

    async def write(self, sector: int, buffers: Sequence[Buffer]) -> None:
        self.writes += 1
        await super().write(sector, buffers)


async def test_nothing_reaches_the_secondary_once_cancelled(autojump_clock: object) -> None:
    primary = await random_memory(SIZE)
    secondary = Counting(MemoryDevice(SIZE))
    with trio.fail_after(60):
        async with open_mirror(primary, secondary, chunk=8192, rate=128 << 10) as m:
            async with trio.open_nursery() as nursery:

                async def writer() -> None:
                    for n in range(200):
                        await m.write((n * 7) % (SIZE // SS - 8), [os.urandom(8 * SS)])
                        await trio.sleep(0.01)

                nursery.start_soon(writer)
                await trio.sleep(0.5)
                await m.cancel()
                writes = secondary.writes
            assert secondary.writes == writes
