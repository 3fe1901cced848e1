"""A raw image file or a block device as a device.

Blocking syscalls must not stall the event loop, and handing a call to a worker thread
is not free.  Measured here (``scripts/bench_file_calls.py``, 2-core VM): from the page
cache a 4 KiB ``preadv`` costs ~1 µs in the loop and a 4 KiB ``pwritev`` ~5 µs, but a
hand-off to a worker thread costs 55-130 µs of CPU (``threads.py``; ``trio.to_thread``
cost 165-280 µs), and more under load, when the worker waits for the GIL (fio through
the mount: 3.5k write IOPS at depth 16 with threads, the same as depth 1).  A read that
misses the cache, or a write throttled by dirty-page writeback, can block for
milliseconds, though.  So:

- reads try ``preadv`` in the loop with ``RWF_NOWAIT`` (the kernel returns what the
  cache holds, or ``EAGAIN``, instead of waiting); only the rest goes to a thread.  Where
  the filesystem refuses ``RWF_NOWAIT`` for reads (tmpfs answers ``EOPNOTSUPP``), reads
  run in the loop as writes do (below): every 4 KiB read in a thread had cost ~200 µs of
  CPU and held fio at 4-5k IOPS from a tmpfs image;
- writes try the same; where the filesystem refuses ``RWF_NOWAIT`` for buffered writes
  (ext4 answers ``EOPNOTSUPP``), a write of at most ``IN_LOOP_WRITE_MAX`` bytes runs in
  the loop, and one that slept in the kernel for longer than ``SLOW_CALL`` (writeback
  throttling: once 190 ms for 1 MiB) sends the writes of the next ``SLOW_PERIOD`` to
  threads.  A 1 MiB write into the page cache costs ~45 µs in the loop and ~135 µs
  through a thread (``scripts/bench_file_calls.py``); fio 1 MiB writes through the
  mount went from 3.3k to 4.6k IOPS once they ran in the loop.  A write in a thread
  goes in pieces of at most ``THREAD_WRITE_PIECE`` bytes (see there why);
- flushes always go to a thread.

A regular file also offers ``discard``/``write_zeroes`` (punched holes) and ``extents``
(``SEEK_DATA``/``SEEK_HOLE``), from ``holes.py``; a block device offers neither.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import trio

from ..block import (
    BlockDevice,
    Buffer,
    Capability,
    Extent,
    Filler,
    Info,
    total_length,
)
from ..buffers import advance, byte_views, slice_views
from ..errors import (
    Disconnected,
    ReadOnly,
    RequestFailed,
    Unimplemented,
    map_os_errors,
    request_failed,
)
from ..filerange import FileRange
from ..threads import SLOW_CALL, WorkerThreads, thread_sleeps
from . import writeback
from .holes import file_extents, is_hole, make_zeroes
from .images import check_openable, check_raw, device_geometry, lock_image
from .pagecache import fully_cached

log = logging.getLogger(__name__)

T = TypeVar("T")
IoCall = Callable[[int, list[memoryview], int, int], int]

_threads = WorkerThreads(16, "blockfuse-file")
"""The threads every file device shares (``threads.py``: a hand-off to them costs less
than half of ``trio.to_thread``'s)."""

IOV_MAX = os.sysconf("SC_IOV_MAX")
"""The most buffers one ``preadv``/``pwritev`` takes (1024 on Linux)."""

IN_LOOP_WRITE_MAX = 1 << 20
"""Reads and writes up to this many bytes (every FUSE request) may run in the loop where
RWF_NOWAIT is refused; larger ones, from a mirror's copier with big chunks, go to a
thread."""
THREAD_WRITE_PIECE = 4 << 20
"""A write in a thread is issued in pieces of at most this many bytes: the copier's
default chunk in one call.  In interleaved 2 GiB mirror copies on the dev VM, 256 KiB
pieces copied at 1614-1729 MiB/s with 1.11-1.20 s of CPU, whole 4 MiB chunks at
1648-1900 MiB/s with 0.98-1.15 s.  Writing 1 GiB into the page cache took 0.25-0.3 s
with a few runs at 1-2 s whatever the piece size (256 KiB, 1 MiB, 4 MiB): dirty-page
throttling, not the size of the call."""
SLOW_PERIOD = 1.0
"""...for this long (seconds)."""

HOLE_CAPABILITIES = frozenset({Capability.DISCARD, Capability.WRITE_ZEROES, Capability.EXTENTS})
"""What a regular file offers on top of I/O: holes punched and found (``holes.py``)."""


class _NoWait:
    """Tries ``RWF_NOWAIT``; where the kernel refuses it, asks ``fallback`` (if any)."""

    def __init__(self, fallback: _BlockingGuard | None = None) -> None:
        self.supported = hasattr(os, "RWF_NOWAIT")
        self._fallback = fallback

    def attempt(
        self, call: IoCall, fd: int, views: list[memoryview], offset: int, nbytes: int
    ) -> int:
        """Bytes done without blocking (0 if the kernel would have to wait)."""
        if self.supported:
            try:
                return call(fd, views, offset, os.RWF_NOWAIT)
            except BlockingIOError:
                return 0
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise
                self.supported = False
        return self._fallback.attempt(call, fd, views, offset, nbytes) if self._fallback else 0

    def in_loop(self) -> bool:
        """Whether a call the kernel would make wait may run in the loop now: never
        where ``RWF_NOWAIT`` works or has not been tried yet; else as the fallback says."""
        return not self.supported and self._fallback is not None and self._fallback.in_loop()

    def blocked(self) -> None:
        if self._fallback is not None:
            self._fallback.blocked()


class _BlockingGuard:
    """Runs calls in the loop unless a recent one blocked for longer than ``SLOW_CALL``.

    A call counts as blocked only if the thread also slept in the kernel during it: on
    a busy machine, being preempted makes a call slow without blocking (measured: wall
    time alone sent 10.8k of 13.8k 4 KiB writes to threads at depth 16 under load).
    """

    def __init__(self) -> None:
        self._threads_until = 0.0

    def in_loop(self) -> bool:
        """Whether calls run in the loop now (no recent one blocked)."""
        return time.monotonic() >= self._threads_until

    def blocked(self) -> None:
        """A call made elsewhere in the loop blocked (a write into a lent range): the
        next ones go to threads, as after one of ``attempt``'s."""
        self._threads_until = time.monotonic() + SLOW_PERIOD

    def attempt(
        self, call: IoCall, fd: int, views: list[memoryview], offset: int, nbytes: int
    ) -> int:
        """Bytes done in the loop (0: the caller should use a thread)."""
        now = time.monotonic()
        if now < self._threads_until or nbytes > IN_LOOP_WRITE_MAX:
            return 0
        sleeps = thread_sleeps()
        done = call(fd, views, offset, 0)
        if time.monotonic() - now > SLOW_CALL and thread_sleeps() > sleeps:
            self.blocked()
        return done


class FileDevice(BlockDevice):
    """An open file descriptor as a device; ``open_file`` builds one from a path."""

    kind = "file"

    def __init__(self, fd: int, path: str, *, read_only: bool) -> None:
        self._fd = fd
        self.path = path
        self._read_only = read_only
        size, self._sector_size = device_geometry(fd)
        self._info = Info(not read_only, self._sector_size, size // self._sector_size)
        self._nowait_read = _NoWait(fallback=_BlockingGuard())
        self._nowait_write = _NoWait(fallback=_BlockingGuard())
        self._behind = writeback.WriteBehind()
        self._error_taking = threading.Lock()
        self._closed = False
        self._in_flight = 0
        self._idle = trio.Event()
        self._lending = True
        """Whether ``lend`` offers ranges (until a send from one failed)."""
        self._lending_writable = True
        """Whether ``lend_writable`` offers ranges (until the file refused a splice)."""
        self._regular = stat.S_ISREG(os.fstat(fd).st_mode)
        if self._regular:
            self.capabilities = HOLE_CAPABILITIES

    async def get_info(self) -> Info:
        self._check_open()
        return self._info

    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        views = byte_views(buffers)
        await self._io_at(os.preadv, self._nowait_read, sector * self._sector_size, views, "read")

    def read_now(self, offset: int, into: memoryview) -> bool:
        """``BlockDevice.read_now``: what ``read`` tries first in the loop, alone."""
        return self._now(os.preadv, self._nowait_read, offset, into)

    def write_now(self, offset: int, data: memoryview) -> bool:
        """``BlockDevice.write_now``: what ``write`` tries first in the loop, alone."""
        return not self._read_only and self._now(os.pwritev, self._nowait_write, offset, data)

    def _now(self, call: IoCall, nowait: _NoWait, offset: int, view: memoryview) -> bool:
        """Whether all of ``view`` was done at once (an error: not done)."""
        n = len(view)
        inside = 0 < n <= IN_LOOP_WRITE_MAX and offset + n <= self._info.size_bytes
        if self._closed or not inside or (offset | n) % self._sector_size:
            return False
        try:
            return nowait.attempt(call, self._fd, [view], offset, n) == n
        except OSError:
            return False

    def lend(self, sector: int, count: int) -> FileRange | None:
        """The sectors as a range of this file, for a front end to send straight from
        it (an NBD READ reply: ``os.sendfile`` hands the page cache's pages to the
        socket, where a read and a write would copy them twice); ``None`` where that is
        not offered: closed, outside the device, not all in the page cache (the send
        runs on the event loop's thread: ``pagecache.py``), or after such a send failed.

        The file's bytes are read when the range is sent, and on a local socket the
        socket holds the page cache's pages until the client reads them: a write made
        until then may show in what the client gets.  So only a front end whose
        request is not answered before the client has read it may ask (a write made
        meanwhile ran concurrently with the READ, which may see it or not).  Until
        ``release`` the range counts as a call in flight, so ``aclose`` waits for it
        before closing the descriptor (its number must not be another file's)."""
        if not self._may_lend(sector, count, self._info.size_sectors):
            return None
        ss = self._sector_size
        return self._lent(sector * ss, count * ss, self._leave)

    def lend_writable(self, sector: int, count: int) -> FileRange | None:
        """``BlockDevice.lend_writable``: the sectors as a range of this file to write
        into, counted as a call in flight until ``release`` (as ``lend``).  Only of a
        regular file.  A write into the range runs in the event loop, so only where
        writes do: once a write found that the file refuses ``RWF_NOWAIT`` (where it
        takes it, a write that would wait goes to a thread, which a splice cannot), and
        not while writes go to threads because one blocked (``_BlockingGuard``)."""
        if not self._regular or self._read_only:
            return None
        if not self._may_lend(sector, count, self._info.size_sectors):
            return None
        if not self._nowait_write.in_loop() or not self._lending_writable:
            return None
        ss = self._sector_size
        self._in_flight += 1
        lent = FileRange(self._fd, sector * ss, count * ss, self._leave, self._splice_refused)
        lent.blocked = self._nowait_write.blocked
        return lent

    def _may_lend(self, sector: int, count: int, size_sectors: int) -> bool:
        """Open, lending, and the sectors inside the device."""
        if self._closed or not self._lending or count <= 0:
            return False
        return sector >= 0 and sector + count <= size_sectors

    def _lent(self, offset: int, length: int, release: Callable[[], None]) -> FileRange | None:
        """The range, counted as in flight (``release`` ends that), if all of it is in the
        page cache."""
        if not fully_cached(self._fd, offset, length):
            return None
        self._in_flight += 1
        return FileRange(self._fd, offset, length, release, self._lend_failed)

    def _splice_refused(self, exc: OSError) -> None:
        """A writer found that the file takes no splice into it (a failed write is the
        writer's to report, as a write error)."""
        if self._lending_writable:
            self._lending_writable = False
            why = "WRITEs are received into memory from now on"
            log.warning("%s: writing straight into the file failed (%s); %s", self.path, exc, why)

    def _lend_failed(self, exc: OSError) -> None:
        if self._lending:
            self._lending = False
            why = "reads are copied from now on"
            log.warning("%s: sending straight from the file failed (%s); %s", self.path, exc, why)

    async def write(self, sector: int, buffers: Sequence[Buffer]) -> None:
        if self._read_only:
            raise ReadOnly(f"{self.path} is open read-only")
        views = byte_views(buffers)
        offset = sector * self._sector_size
        await self._io_at(os.pwritev, self._nowait_write, offset, views, "write")

    async def flush(self) -> None:
        """``fdatasync`` (``fsync`` for a sparse image); a failure is recorded in
        ``write_errors`` for every caller (Linux itself reports it to one fsync)."""
        self._check_open()
        if self._read_only:
            return
        where = f"flush {self.path}"
        await self._in_thread(where, self._taking_errors, where, self._sync, self._fd)

    def _taking_errors(self, what: str, call: Callable[..., None], *args: Any) -> None:
        """Run ``call``, one that takes the descriptor's writeback error (``fdatasync``, a
        write-behind's wait), in a worker thread, and record what it took in
        ``write_errors``.  Linux reports such an error to one caller only; holding
        ``_error_taking`` from the call to the record means that no other flush can
        return success in between, before the error is where every caller finds it."""
        with self._error_taking:
            try:
                call(*args)
            except OSError as exc:
                err = request_failed(exc, what)
                self.write_errors.record(err)
                raise err from exc

    @staticmethod
    def _sync(fd: int) -> None:
        os.fdatasync(fd)

    async def write_behind(self, sector: int, count: int) -> None:
        """Start writing those sectors back, and drop earlier ones from the cache once
        written back (``writeback.py``), in a thread.  A writeback error it waits for is
        recorded in ``write_errors`` (the descriptor will not report it again).  If the
        call fails, or never runs, the ranges it took to settle stay due."""
        if self._read_only or self._closed or not writeback.AVAILABLE:
            return
        ss = self._sector_size
        offset, length = sector * ss, count * ss
        with self._behind.settling(offset, length) as due:
            await self._in_thread(
                f"write back {self.path}", self._write_behind_now, offset, length, due
            )

    def _write_behind_now(self, offset: int, length: int, due: list[writeback.Range]) -> None:
        """Start writing ``[offset, offset+length)`` back and settle ``due`` (a thread)."""
        writeback.start(self._fd, offset, length)
        for at, n in due:
            self._taking_errors(
                f"write back {self.path} at byte {at}", writeback.settle, self._fd, at, n
            )

    async def write_filled(
        self,
        sector: int,
        view: memoryview,
        fill: Filler,
        *,
        threads: WorkerThreads | None = None,
    ) -> None:
        """``fill``, the write and the write-behind in one worker thread (see ``block.py``)."""
        self._check_writable()
        offset = sector * self._sector_size
        write = functools.partial(self._blocking_io, os.pwritev, [view], offset, "write")
        await self._fill_write_behind(offset, view, fill, write, threads)

    async def _fill_write_behind(
        self,
        offset: int,
        view: memoryview,
        fill: Filler,
        write: Callable[[], None],
        threads: WorkerThreads | None,
    ) -> None:
        """Run ``fill(view)``, ``write()`` and the write-behind of ``view``'s range in one
        thread of ``threads`` (the devices' own if ``None``; a writeback error recorded as
        ``write_behind``'s).  What ``fill`` raises comes out as it is, even an
        ``OSError``; if anything fails, the ranges due to settle stay due."""
        self._check_open()
        behind = self._behind.settling(offset, len(view)) if writeback.AVAILABLE else None

        def job(due: list[writeback.Range] | None) -> None:
            try:
                fill(view)
            except Exception as exc:
                raise _FillFailed(exc) from exc
            write()
            if due is not None:
                self._write_behind_now(offset, len(view), due)

        try:
            where = f"write {self.path} at byte {offset}"
            with behind or contextlib.nullcontext() as due, self._busy(), map_os_errors(where):
                await (threads or _threads).run(job, due)
        except _FillFailed as exc:
            raise exc.error from None

    async def discard(self, sector: int, count: int) -> None:
        await self.write_zeroes(sector, count)

    async def write_zeroes(self, sector: int, count: int) -> None:
        """Punch a hole (or, where the filesystem cannot, write zeroes)."""
        self._check_can(Capability.WRITE_ZEROES)
        self._check_writable()
        await self._zero_range(sector * self._sector_size, count * self._sector_size)

    async def _zero_range(self, offset: int, length: int) -> None:
        """Punch ``[offset, offset+length)`` in a thread, unless it is a hole already."""
        where = f"zero {self.path} at byte {offset}"
        self._check_open()  # closed while it waited: the descriptor may be another file's
        with map_os_errors(where):
            if is_hole(self._fd, offset, length):
                return
        await self._in_thread(where, make_zeroes, self._fd, offset, length)

    async def extents(self, sector: int, count: int) -> list[Extent]:
        self._check_can(Capability.EXTENTS)
        self._check_open()
        ss = self._sector_size
        return await self._in_thread(
            f"find holes in {self.path}", file_extents, self._fd, sector, count, ss
        )

    async def _in_thread(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call in a worker thread, counted as in flight."""
        self._check_open()
        with self._busy(), map_os_errors(what):
            return await _threads.run(fn, *args)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._in_flight:
            with trio.CancelScope(shield=True):
                await self._idle.wait()
        os.close(self._fd)

    async def _io_at(
        self, call: IoCall, nowait: _NoWait, offset: int, views: list[memoryview], what: str
    ) -> None:
        """All of ``views`` at byte ``offset``: first without blocking, the rest in a thread.

        Every FUSE read and write comes here, so the bookkeeping is spelled out (no
        context managers) and the error message is only formatted on an error."""
        if len(views) > IOV_MAX:  # one call takes at most IOV_MAX buffers
            for at in range(0, len(views), IOV_MAX):
                group = views[at : at + IOV_MAX]
                await self._io_at(call, nowait, offset, group, what)
                offset += total_length(group)
            return
        self._check_open()
        self._in_flight += 1
        try:
            nbytes = total_length(views)
            done = nowait.attempt(call, self._fd, views, offset, nbytes)
            if done < nbytes:
                rest = advance(views, done)
                await _threads.run(self._blocking_io, call, rest, offset + done, what)
        except OSError as exc:
            raise request_failed(exc, f"{what} {self.path} at byte {offset}") from exc
        finally:
            self._leave()

    def _blocking_io(self, call: IoCall, views: list[memoryview], offset: int, what: str) -> None:
        """Loop until every byte is done; a zero-length answer means the file ended.
        Writes go in pieces of at most ``THREAD_WRITE_PIECE`` bytes."""
        while views:
            part = slice_views(views, 0, THREAD_WRITE_PIECE) if call is os.pwritev else views
            n = call(self._fd, part, offset, 0)
            if n == 0:
                raise RequestFailed(
                    errno.EIO, f"{what} {self.path}: the file ended at byte {offset}"
                )
            views = advance(views, n)
            offset += n

    def _check_open(self) -> None:
        if self._closed:
            raise Disconnected(f"{self.path} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._read_only:
            raise ReadOnly(f"{self.path} is open read-only")

    def _check_can(self, capability: Capability) -> None:
        if capability not in self.capabilities:
            raise Unimplemented(f"{self.kind} device {self.path} cannot {capability.value}")

    def _busy(self) -> _InFlight:
        return _InFlight(self)

    def _leave(self) -> None:
        """A call counted as in flight is over; the last one lets a waiting ``aclose`` go."""
        self._in_flight -= 1
        if self._in_flight == 0 and self._closed:
            self._idle.set()


class _FillFailed(Exception):
    """What a ``write_filled`` fill raised, carried past ``map_os_errors``."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _InFlight:
    """Counts calls in progress so that ``aclose`` waits for them before closing the fd."""

    def __init__(self, dev: FileDevice) -> None:
        self._dev = dev

    def __enter__(self) -> None:
        self._dev._in_flight += 1

    def __exit__(self, *exc: object) -> None:
        self._dev._leave()


def open_file(path: str, *, read_only: bool = False, format: str | None = None) -> FileDevice:
    """Open a raw image or block device.  Raises ``OSError`` or ``ValueError`` (bad size;
    another image format, unless ``format="raw"``; in use by another device: see
    ``images.py``)."""
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    fd = os.open(path, flags)
    try:
        check_openable(fd, path)
        check_raw(fd, path, format)
        lock_image(fd, path, read_only=read_only)
        return FileDevice(fd, path, read_only=read_only)
    except BaseException:
        os.close(fd)
        raise
