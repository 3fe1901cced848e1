"""A copier's write-behind on a file (``FileDevice.write_behind``): what it wrote leaves
the page cache once written back, and a writeback error it waits for is never lost.

Waiting for writeback (``sync_file_range`` with its WAIT flags) consumes the error the
kernel keeps for the open file: a later ``fdatasync`` on the same descriptor succeeds.
So the device must keep what the wait saw for every flush caller (``write_errors``)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from blockfuse.block import FlushCursor
from blockfuse.devices import file as file_module
from blockfuse.devices.file import FileDevice, open_file
from blockfuse.devices.writeback import WriteBehind
from blockfuse.errors import BlockError
from blockfuse.threads import WorkerThreads

from .conftest import require_tool

CHUNK = 4 << 20


def cached(path: Path, offset: int, length: int) -> bool:
    """Whether ``[offset, offset+length)`` of ``path`` is in the page cache (a read that
    must not wait: ``RWF_NOWAIT``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.preadv(fd, [bytearray(length)], offset, os.RWF_NOWAIT) == length
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


async def copy_in_chunks(dev: FileDevice, chunks: list[bytes], at: list[int] | None = None) -> None:
    """Write ``chunks`` at chunk indexes ``at`` (one after another by default), each with
    a write-behind after it, as the copier does."""
    sectors = CHUNK // 512
    for index, chunk in zip(at or range(len(chunks)), chunks, strict=True):
        await dev.write(index * sectors, [chunk])
        await dev.write_behind(index * sectors, sectors)


async def test_chunks_written_back_leave_the_page_cache(tmp_path: Path) -> None:
    path = tmp_path / "secondary.img"
    chunks = [os.urandom(CHUNK) for _ in range(16)]
    with open(path, "wb") as f:
        f.truncate(len(chunks) * CHUNK)
    dev = open_file(str(path))
    try:
        with trio.fail_after(60):
            await copy_in_chunks(dev, chunks)
            assert not cached(path, 0, CHUNK)  # the oldest: written back, dropped
            assert cached(path, 15 * CHUNK, CHUNK)  # the newest: still cached
            got = bytearray(CHUNK)
            await dev.read(0, [got])
            assert got == chunks[0]
    finally:
        await dev.aclose()
    assert path.read_bytes() == b"".join(chunks)


@pytest.fixture
def loop_on_full_tmpfs(short_tmp: Path) -> Iterator[str]:
    """A 64 MiB loop device backed by a sparse file on an 8 MiB tmpfs: writeback of its
    first chunk succeeds, and of more than 8 MiB fails (EIO), as a dying disk's would."""
    require_tool("losetup", "util-linux")
    where = short_tmp / "tmpfs"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(where)], check=True)
    try:
        backing = where / "backing.img"
        with open(backing, "wb") as f:
            f.truncate(64 << 20)
        out = subprocess.run(
            ["losetup", "--find", "--show", str(backing)],
            check=True,
            capture_output=True,
            text=True,
        )
        loop = out.stdout.strip()
        try:
            yield loop
        finally:
            subprocess.run(["losetup", "-d", loop], check=False)
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def test_a_writeback_error_seen_behind_fails_every_later_flush(
    loop_on_full_tmpfs: str,
) -> None:
    """Chunks 1-7 cannot be written back, and the write-behind waits for each of them;
    the last four chunks (the window still in flight at the flush) go where chunk 0 went,
    so the flush itself would meet no error of its own."""
    dev = open_file(loop_on_full_tmpfs)
    cursors = [FlushCursor(dev), FlushCursor(dev)]
    at = [*range(8), 0, 0, 0, 0]
    try:
        with trio.fail_after(60):
            for index, chunk in zip(at, [os.urandom(CHUNK) for _ in at], strict=True):
                # the write-behind may say so at once; the flushes must say so too
                with contextlib.suppress(BlockError):
                    await copy_in_chunks(dev, [chunk], [index])
            for cursor in cursors:
                with pytest.raises(BlockError):
                    await cursor.flush()
    finally:
        with trio.fail_after(60):
            await dev.aclose()


def test_ranges_given_back_are_due_again() -> None:
    """A write that failed after its write-behind took the ranges due to settle gives
    them back: they are settled (and dropped from the cache) by a later one."""
    behind = WriteBehind(window=8)
    assert behind.hand_over(0, 4) == [] and behind.hand_over(4, 4) == []
    due = behind.hand_over(8, 4)
    assert due == [(0, 4)]
    behind.give_back(due)
    assert behind.hand_over(12, 4) == [(0, 4), (4, 4)]


async def test_a_fill_runs_in_the_callers_threads_not_the_files(tmp_path: Path) -> None:
    """A stalled fill (a network read) must not hold one of the threads every local file
    shares for flushes and large writes."""
    path = tmp_path / "secondary.img"
    path.write_bytes(bytes(CHUNK))
    dev = open_file(str(path))
    mine = WorkerThreads(1, "mine")
    seen: list[str] = []

    def fill(view: memoryview) -> None:
        seen.append(threading.current_thread().name)
        view[:] = bytes(len(view))

    try:
        with trio.fail_after(30):
            await dev.write_filled(0, memoryview(bytearray(CHUNK)), fill, threads=mine)
    finally:
        await dev.aclose()
    assert seen == ["mine-1"]


async def test_ranges_due_stay_due_when_the_write_behind_never_ran(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write-behind whose thread call fails before it runs (cancelled while queued, no
    thread to start) settles nothing: the ranges it took stay due for the next one."""
    path = tmp_path / "secondary.img"
    with open(path, "wb") as f:
        f.truncate(3 * CHUNK)
    dev = open_file(str(path))
    dev._behind = WriteBehind(window=CHUNK)  # type: ignore[attr-defined]
    sectors = CHUNK // 512
    try:
        with trio.fail_after(60):
            await dev.write_behind(0, sectors)

            async def never_runs(*args: object) -> None:
                raise RuntimeError("can't start new thread")

            monkeypatch.setattr(file_module._threads, "run", never_runs)
            with pytest.raises(RuntimeError):
                await dev.write_behind(sectors, sectors)  # takes chunk 0 as due
            monkeypatch.undo()
            due = dev._behind.hand_over(2 * CHUNK, CHUNK)  # type: ignore[attr-defined]
            assert due == [(0, CHUNK), (CHUNK, CHUNK)]
    finally:
        with trio.fail_after(60):
            await dev.aclose()
