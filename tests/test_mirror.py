"""The mirror as a device: the block contract, what it refuses, its spec, where reads
come from once synced, and closing it.

The copier is ``test_mirror_copy.py``; foreground I/O against it ``test_mirror_races.py``;
errors and flushes ``test_mirror_errors.py``; the copy map and resuming
``test_mirror_resume.py``; pivot ``test_mirror_pivot.py``.  The fakes they share are in
``mirrorkit.py``; through a real mount, ``test_mirror_mount.py``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import trio

from blockfuse.block import BlockDevice
from blockfuse.devices.file import open_file
from blockfuse.devices.memory import MemoryDevice
from blockfuse.devices.mirror import MirrorDevice, MirrorRefused, open_mirror, start_mirror
from blockfuse.errors import Disconnected
from blockfuse.opening import background_tasks
from blockfuse.spec import SpecError, compile_spec
from blockfuse.testing import Fault, FaultyDevice, check_block_device

from .mirrorkit import SIZE, SS, CountingDevice, Slow, image


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


# --- refusals -------------------------------------------------------------------------


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


# --- reads and close ------------------------------------------------------------------


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


async def test_wait_synced_after_close_does_not_hang() -> None:
    with trio.fail_after(10):
        async with open_mirror(Slow(MemoryDevice(SIZE), 1), MemoryDevice(SIZE)) as m:
            pass
        assert isinstance(m, MirrorDevice)
        with pytest.raises(Disconnected):
            await m.wait_synced()


# --- the spec -------------------------------------------------------------------------


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
