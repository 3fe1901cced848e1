"""A saved copy map is trusted only when nothing it vouches for can have changed: a
volatile secondary, a secondary emptied in place, a primary written while the mirror
was not mounted, a map left open by a crash over a secondary that lost its data, and
``verify=full`` (issue 12, defect 1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from blockfuse.devices.file import open_file
from blockfuse.devices.memory import MemoryDevice
from blockfuse.devices.mirror import MirrorState, open_mirror, prepare_mirror
from blockfuse.devices.sparse import open_sparse
from blockfuse.spec import SpecError, compile_spec

SIZE = 16 << 20
CHUNK = 256 << 10
SS = 512


def primary_image(tmp_path: Path) -> str:
    """A 16 MiB primary with data in a few places (mostly holes, as a real disk)."""
    path = tmp_path / "p.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset in (1 << 20, 5 << 20, (9 << 20) + 1, 13 << 20):  # not where 4 even samples land
            f.seek(offset)
            f.write(os.urandom(100_000))
    return str(path)


async def copy_once(primary: str, secondary: str, state: str) -> None:
    """Mount the mirror, let it sync, close it cleanly."""
    async with open_mirror(
        open_file(primary), open_sparse(secondary, size_bytes=SIZE), chunk=CHUNK, state=state
    ) as m:
        await m.wait_synced()


async def resume(primary: str, secondary: str, state: str, **options: str) -> tuple[str, bytes]:
    """Mount again: the notice it gives, and the secondary's bytes once synced."""
    async with open_mirror(
        open_file(primary),
        open_sparse(secondary, size_bytes=SIZE),
        chunk=CHUNK,
        state=state,
        **options,
    ) as m:
        notice = m.statistics().notice
        await m.wait_synced()
        assert m.statistics().state is MirrorState.SYNCED
    return notice, Path(secondary).read_bytes()


def test_a_memory_secondary_with_a_state_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"mem\(\) secondary forgets its data.*state="):
        compile_spec(f"mirror({primary_image(tmp_path)}, mem(16M), state={tmp_path}/map)")


async def test_a_saved_map_is_not_trusted_over_a_fresh_memory_secondary(tmp_path: Path) -> None:
    """Through the API the map is set aside: the new memory device holds nothing."""
    primary, state = primary_image(tmp_path), str(tmp_path / "map")
    with trio.fail_after(20):
        async with open_mirror(
            open_file(primary), MemoryDevice(SIZE), chunk=CHUNK, state=state
        ) as m:
            await m.wait_synced()
        fresh = MemoryDevice(SIZE)
        async with open_mirror(open_file(primary), fresh, chunk=CHUNK, state=state) as m:
            assert "copying anew" in m.statistics().notice
            await m.wait_synced()
            assert fresh.data == Path(primary).read_bytes()


async def test_a_secondary_emptied_in_place_between_mounts_is_copied_anew(tmp_path: Path) -> None:
    primary, secondary, state = (
        primary_image(tmp_path),
        str(tmp_path / "s.img"),
        str(tmp_path / "m"),
    )
    with trio.fail_after(20):
        await copy_once(primary, secondary, state)
        os.truncate(secondary, 0)  # same inode, all zeroes
        os.truncate(secondary, SIZE)
        notice, data = await resume(primary, secondary, state)
    assert "secondary was changed while the mirror was not mounted" in notice
    assert data == Path(primary).read_bytes()


async def test_a_primary_written_while_not_mounted_is_copied_anew(tmp_path: Path) -> None:
    primary, secondary, state = (
        primary_image(tmp_path),
        str(tmp_path / "s.img"),
        str(tmp_path / "m"),
    )
    with trio.fail_after(20):
        await copy_once(primary, secondary, state)
        with open(primary, "r+b") as f:
            f.seek(5 << 20)
            f.write(b"written while the mirror was not mounted")
        notice, data = await resume(primary, secondary, state)
    assert "primary was changed while the mirror was not mounted" in notice
    assert data == Path(primary).read_bytes()


async def test_a_crash_then_a_secondary_that_lost_its_data_is_caught_by_samples(
    tmp_path: Path,
) -> None:
    """After a crash the map is still open and identities prove nothing (both files were
    being written); samples where the primary holds data find the zeroes."""
    primary, secondary, state = (
        primary_image(tmp_path),
        str(tmp_path / "s.img"),
        str(tmp_path / "m"),
    )
    with trio.fail_after(20):
        await copy_once(primary, secondary, state)
        text = Path(state).read_text().splitlines()
        text[4] = "open session=0123456789abcdef"  # as a crash leaves it
        Path(state).write_text("\n".join(text) + "\n")
        os.truncate(secondary, 0)
        os.truncate(secondary, SIZE)
        notice, data = await resume(primary, secondary, state)
    assert "differ from the saved map" in notice
    assert data == Path(primary).read_bytes()


async def test_verify_full_copies_again_every_chunk_that_differs(tmp_path: Path) -> None:
    """One chunk changed on the secondary behind an open map: samples may miss it,
    ``verify=full`` compares everything before the mirror can be synced."""
    primary, secondary, state = (
        primary_image(tmp_path),
        str(tmp_path / "s.img"),
        str(tmp_path / "m"),
    )
    with trio.fail_after(20):
        await copy_once(primary, secondary, state)
        text = Path(state).read_text().splitlines()
        text[4] = "open session=0123456789abcdef"
        Path(state).write_text("\n".join(text) + "\n")
        with open(secondary, "r+b") as f:
            f.seek((13 << 20) + 4096)
            f.write(b"x" * 512)
        _, data = await resume(primary, secondary, state, verify="full")
    assert data == Path(primary).read_bytes()


async def test_verify_must_be_sample_or_full(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="verify"):
        compile_spec(f"mirror({primary_image(tmp_path)}, sparse({tmp_path}/s), verify=some)")
    with pytest.raises(ValueError, match="verify=some"):
        await prepare_mirror(MemoryDevice(SIZE), MemoryDevice(SIZE), verify="some")
