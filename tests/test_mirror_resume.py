"""The copy map and resuming: a stopped copy resumes from its map, a write to a copied
region is marked dirty on disk first, a map of another mirror or of a replaced
secondary is not trusted, and a crash at any moment leaves a map that resumes safely.
Through a real mount (SIGTERM, kill -9): ``test_mirror_mount.py``."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from blockfuse.block import BlockDevice, Buffer, Info
from blockfuse.devices.file import open_file
from blockfuse.devices.memory import MemoryDevice
from blockfuse.devices.mirror import CopyMapError, open_mirror, start_mirror
from blockfuse.devices.mirror.mapfile import read_saved_map
from blockfuse.extents import IntervalSet
from blockfuse.testing import PassThrough

from .mirrorkit import SIZE, SS, Slow, image

# --- resume ---------------------------------------------------------------------------


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


# --- maps that are not trusted --------------------------------------------------------


async def test_a_map_of_another_mirror_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "map"
    async with open_mirror(MemoryDevice(SIZE), MemoryDevice(SIZE), state=str(state)) as m:
        await m.wait_synced()
    async with trio.open_nursery() as nursery:
        with pytest.raises(CopyMapError, match="belongs to another mirror"):
            await start_mirror(
                nursery, MemoryDevice(2 * SIZE), MemoryDevice(2 * SIZE), state=str(state)
            )


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


# --- crash safety of the copy map -----------------------------------------------------


class VolatileMemory(BlockDevice):
    """A disk with a write cache: writes land in ``data``; ``flush`` copies it to ``durable``.

    After every call it asks ``check`` whether a crash now would be safe.
    """

    def __init__(self, size: int, rng: random.Random) -> None:
        self.data, self.durable = bytearray(size), bytearray(size)
        self.rng = rng
        self.check: Callable[[], None] = lambda: None

    async def _jitter(self) -> None:
        for _ in range(self.rng.randrange(3)):
            await trio.lowlevel.checkpoint()

    async def get_info(self) -> Info:
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
