"""The copier: holes in the primary are skipped and stay holes on the secondary, what
it asks a fresh secondary, and progress every percent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from blockfuse.devices.file import open_file
from blockfuse.devices.memory import MemoryDevice
from blockfuse.devices.mirror import MirrorState, open_mirror
from blockfuse.devices.sparse import open_sparse
from blockfuse.testing import Fault, FaultyDevice

from .mirrorkit import SIZE, SS, CountingDevice, image

# --- holes ----------------------------------------------------------------------------


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


# --- progress -------------------------------------------------------------------------


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
