"""An error that means acknowledged writes may be lost reaches every flush caller that
could rely on them, not just the first one to flush (Linux's errseq_t rule; issue 12,
defect 3)."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
import trio

from blockfuse.block import FlushCursor
from blockfuse.devices.file import FileDevice, open_file
from blockfuse.devices.memory import MemoryDevice
from blockfuse.devices.mirror import MirrorState, open_mirror
from blockfuse.errors import BlockError, RequestFailed
from blockfuse.fuse.flatfile import FlatFile
from blockfuse.fuse.ops import BlockFS
from blockfuse.testing import Fault, FaultyDevice

from .nbdserver import FakeServer
from .test_nbd_transport import remote

SIZE = 1 << 20


async def test_every_flush_caller_sees_a_failed_flush_once() -> None:
    dev = FaultyDevice(MemoryDevice(SIZE), [Fault("flush", times=1)])
    first, second = FlushCursor(dev), FlushCursor(dev)
    with pytest.raises(RequestFailed, match="injected"):
        await first.flush()
    with pytest.raises(RequestFailed, match="injected"):
        await second.flush()  # its writes may be among the lost ones too
    await first.flush()
    await second.flush()  # each was told once
    late = FlushCursor(dev)  # opened after the error: none of its writes were lost
    await late.flush()


async def test_a_file_whose_fsync_failed_tells_every_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(SIZE))
    dev = open_file(str(path))
    a, b = FlushCursor(dev), FlushCursor(dev)
    real = os.fdatasync
    monkeypatch.setattr(
        os, "fdatasync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "EIO"))
    )
    with trio.fail_after(5), pytest.raises(RequestFailed):
        await a.flush()
    monkeypatch.setattr(os, "fdatasync", real)  # Linux reports it once, then forgets
    with trio.fail_after(5), pytest.raises(RequestFailed):
        await b.flush()
    await dev.aclose()


async def test_a_lost_connection_reaches_the_users_fsync_after_the_mirrors_checkpoint(
    nursery: trio.Nursery,
) -> None:
    """The mirror's own checkpoint flushes the primary first and fails the copy; the
    user's fsync afterwards must fail too (it succeeded before)."""
    server = FakeServer(SIZE)
    primary = await remote(nursery, server, backoff=0.01)
    with trio.fail_after(20):
        async with open_mirror(primary, MemoryDevice(SIZE), chunk=64 << 10, rate=1 << 18) as m:
            user = FlushCursor(m)  # the user's open file
            await m.write(0, [os.urandom(4096)])  # acknowledged, not flushed
            server.drop_after = server.requests  # the connection drops at the next request
            with pytest.raises(RequestFailed, match="no flush had covered"):
                await m.flush()  # the mirror's checkpoint gets it first
            assert m.statistics().state is MirrorState.FAILED
            with pytest.raises(RequestFailed, match="no flush had covered") as info:
                await user.flush()
            assert info.value.errno == errno.EIO
            await user.flush()  # told once


async def test_each_open_file_of_a_flat_file_has_its_own_cursor() -> None:
    """Through the FUSE handlers: two opens of one file both see one failed flush."""
    dev = FaultyDevice(MemoryDevice(SIZE), [Fault("flush", times=1)])
    ops = BlockFS([FlatFile("disk", dev, kind="memory", spec="mem(1M)")])
    inode = next(iter(ops._by_inode))
    with trio.fail_after(5):
        one = (await ops.open(inode, os.O_RDWR, None)).fh
        two = (await ops.open(inode, os.O_RDWR, None)).fh
        assert one != two
        import pyfuse3

        with pytest.raises(pyfuse3.FUSEError) as err:
            await ops.fsync(one, False)
        assert err.value.errno == errno.EIO
        with pytest.raises(pyfuse3.FUSEError):
            await ops.fsync(two, False)
        await ops.fsync(one, False)
        await ops.release(one)
        await ops.release(two)


class OneReporter:
    """Linux's rule for a writeback error on one open file: the first ``fdatasync`` after
    it reports it, and later ones succeed.  The reporter's thread is then held up (as if
    descheduled) until another ``fdatasync`` has returned, or for a second at most."""

    def __init__(self) -> None:
        self.pending = True
        self.taken = threading.Event()
        self._overtaken = threading.Event()
        self._lock = threading.Lock()

    def sync(self, fd: int) -> None:
        with self._lock:
            report, self.pending = self.pending, False
        if not report:
            self._overtaken.set()
            return
        self.taken.set()
        if self._overtaken.wait(1.0):
            time.sleep(0.2)  # the overtaking flush's caller has its answer by now
        raise OSError(errno.EIO, os.strerror(errno.EIO))


async def test_a_flush_cannot_overtake_the_flush_that_took_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two callers flush at once: the one whose fdatasync comes second must not succeed
    while the first has the error and has not recorded it yet (its write may be lost)."""
    kernel = OneReporter()
    monkeypatch.setattr(FileDevice, "_sync", staticmethod(kernel.sync))
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    dev = open_file(str(path))
    first, second = FlushCursor(dev), FlushCursor(dev)
    outcomes: dict[str, str] = {}

    async def flush(name: str, cursor: FlushCursor) -> None:
        try:
            await cursor.flush()
            outcomes[name] = "ok"
        except BlockError:
            outcomes[name] = "error"

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flush, "first", first)
                await trio.to_thread.run_sync(kernel.taken.wait)
                nursery.start_soon(flush, "second", second)
    finally:
        await dev.aclose()
    assert outcomes == {"first": "error", "second": "error"}
