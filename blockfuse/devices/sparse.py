"""Sparse: an image file with a virtual size, padded with zeroes (the seed's padded image).

The device is ``size`` bytes long whatever the backing file's length; the file holds
only what was written.  Three regions, by byte offset::

    0                         length                          size
    |--- backing file --------|--- virtual zeroes ------------|
    | data and holes (reads   | reads: zeroes, no syscall     |
    | as zeroes: SEEK_HOLE)   | writes: grow the file first   |

- Reads take the file's bytes below ``length`` and zeroes above it.
- A write is cut at the file's 4 KiB blocks (``zeroes.py``); a zero piece is never
  written: below ``length`` it is punched (``FALLOC_FL_PUNCH_HOLE``) unless ``SEEK_DATA``
  says it is a hole already, above it skipped (it reads as zeroes already).  The rest is
  written; if it ends past ``length``, the file first grows (a sparse ``ftruncate``) to
  the end of the last non-zero piece and no further.
- ``discard``/``write_zeroes`` punch holes; ``extents`` asks ``SEEK_DATA``/``SEEK_HOLE``
  below ``length`` and reports everything above it as one hole.
- ``resize`` truncates the file to the new size (growing is sparse, shrinking drops data),
  so that the file's length records the size and reopening without ``size=`` finds it.
- ``flush`` is ``fsync``: the data and the file's length are durable.

A file created here is created at its full size (sparse), so it records its size too; an
existing file shorter than ``size=`` is left as it is until a write needs more of it.  A
block device cannot grow: ``size=`` may be at most its size (a prefix), and it offers no
resize, holes or extents (every write is written).

**Invariant** (concurrency): ``length`` is the backing file's length and never exceeds the
device's size.  Only an *exclusive* holder of ``_gate`` changes it (a write that must grow
the file, ``resize``); reads, writes within ``length``, discards and extents hold it
*shared* and may rely on ``length`` not moving under them.  So a read never meets an end of
file it did not expect, and a shrink never races a write that would regrow the file.

This class is a ``file`` device with a virtual size, and its data I/O runs exactly as the
file device's does (see its essay for when a call stays in the loop).  Punching, growing,
resizing, finding extents and ``fsync`` go to a thread; only the ``SEEK_DATA`` that spares
punching a hole twice (~1 µs) runs in the loop.  Per 128 KiB request the zero scan and
the gate add ~1-3 µs to the file device's cost.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio

from ..block import (
    BlockDevice,
    Buffer,
    Capability,
    Extent,
    Filler,
    Info,
    check_new_size,
    total_length,
)
from ..buffers import byte_views, split_views
from ..errors import Unsafe
from ..filerange import FileRange
from ..opening import OpenContext
from ..threads import WorkerThreads
from ..units import format_size
from .file import HOLE_CAPABILITIES, FileDevice
from .holes import append_extent, file_extents, is_hole, make_zeroes
from .images import check_format, check_raw, device_geometry, empty_image, lock_image
from .zeroes import Stretch, data_end, fill_zeroes, zero_runs


class LengthGate:
    """Many shared holders at once, or one exclusive holder; first come, first served.

    An exclusive holder (or waiter) holds ``_lock``; a shared entrant queues on it only
    then, so the common case -- no resize, no growth -- costs no trip through the
    scheduler (two checkpoints, ~10 µs, per request otherwise).
    """

    def __init__(self) -> None:
        self._lock = trio.Lock()
        self._holders = 0
        self._drained = trio.Event()
        self.shared = _Shared(self)

    async def enter_shared(self) -> None:
        if self._lock.locked():
            async with self._lock:  # wait behind the exclusive holder and waiters
                pass
        self._holders += 1

    def leave_shared(self) -> None:
        self._holders -= 1
        if self._holders == 0:
            self._drained.set()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._lock:
            while self._holders:
                self._drained = trio.Event()
                await self._drained.wait()
            yield


class _Shared:
    """``async with gate.shared:`` (a plain class: a generator-based one costs ~2 µs)."""

    def __init__(self, gate: LengthGate) -> None:
        self._gate = gate

    async def __aenter__(self) -> None:
        await self._gate.enter_shared()

    async def __aexit__(self, *exc: object) -> None:
        self._gate.leave_shared()


# --- the device ----------------------------------------------------------------------


class SparseDevice(FileDevice):
    """A file (or block device) seen as ``size_bytes`` bytes; ``open_sparse`` builds one."""

    kind = "sparse"

    def __init__(self, fd: int, path: str, *, size_bytes: int, read_only: bool = False) -> None:
        super().__init__(fd, path, read_only=read_only)
        self._length = min(device_geometry(fd)[0], size_bytes)  # a block device's prefix
        self._size_sectors = size_bytes // self._sector_size
        self._regular = stat.S_ISREG(os.fstat(fd).st_mode)
        self._gate = LengthGate()
        self._lent_out = 0
        """Ranges lent and not yet released (``lend``)."""
        self._all_back = trio.Event()
        self._resizing = 0
        """Resizes under way: each waits for the lent ranges, and nothing more is lent."""
        if self._regular:
            self.capabilities = HOLE_CAPABILITIES | {Capability.RESIZE}

    @property
    def backing_length(self) -> int:
        """The backing file's length in bytes (at most the device's size)."""
        return self._length

    async def get_info(self) -> Info:
        self._check_open()
        return Info(not self._read_only, self._sector_size, self._size_sectors)

    def lend(self, sector: int, count: int) -> FileRange | None:
        """``FileDevice.lend`` for sectors inside the backing file (past it they read as
        zeroes, with nothing to send from).  Growing the file cannot cut a lent range
        off, so it does not wait for one; a resize, which may shrink the file, waits
        until every lent range is back, and nothing is lent meanwhile.  A lent range
        does not hold the gate: a client slow to read it would hold up every read and
        write of the device behind a growing write."""
        ss = self._sector_size
        offset, length = sector * ss, count * ss
        if self._resizing or not self._may_lend(sector, count, self._size_sectors):
            return None
        if offset + length > self._length:
            return None
        lent = self._lent(offset, length, self._release_lent)
        if lent is not None:
            self._lent_out += 1
        return lent

    def _release_lent(self) -> None:
        self._lent_out -= 1
        if not self._lent_out:
            self._all_back.set()
        self._leave()

    async def _wait_lent_back(self) -> None:
        while self._lent_out:
            self._all_back = trio.Event()
            await self._all_back.wait()

    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        self._check_open()
        offset = sector * self._sector_size
        views = byte_views(buffers)
        async with self._gate.shared:
            inside = self._length - offset
            if inside < total_length(views):  # some of it lies past the backing file
                views, past = split_views(views, max(0, inside))
                fill_zeroes(past)
            if views:
                await self._io_at(os.preadv, self._nowait_read, offset, views, "read")

    write_now = BlockDevice.write_now
    """Not a raw file's: a write keeps zeroes as holes, grows the backing file under the
    gate and stops at the device's own size, none of which ``FileDevice.write_now`` knows
    about (and front ends see that none is offered, as for any device)."""

    lend_writable = BlockDevice.lend_writable
    """Not offered, for the reasons ``write_now`` is not."""

    async def write(self, sector: int, buffers: Sequence[Buffer]) -> None:
        self._check_writable()
        offset = sector * self._sector_size
        views = byte_views(buffers)
        if self._regular:
            runs = zero_runs(offset, views)
        else:  # a block device: no holes to keep, every byte is written
            runs = [Stretch(offset, False, views, total_length(views))]
        needed = data_end(runs)
        while True:
            if needed > self._length:
                await self._grow_to(needed)
            async with self._gate.shared:
                if needed <= self._length:
                    for run in runs:
                        await self._write_run(run)
                    return

    async def write_filled(
        self,
        sector: int,
        view: memoryview,
        fill: Filler,
        *,
        threads: WorkerThreads | None = None,
    ) -> None:
        """Inside the backing file: ``fill``, the write (its zero runs punched, as
        ``write`` does) and the write-behind in one worker thread, holding the gate
        shared.  Past its end: the fill first, then ``write``, which grows the file only
        as far as the data goes (an exclusive grow must not wait for fills in flight)."""
        self._check_writable()
        offset = sector * self._sector_size
        async with self._gate.shared:
            if offset + len(view) <= self._length:
                write = functools.partial(self._write_runs_blocking, offset, view)
                return await self._fill_write_behind(offset, view, fill, write, threads)
        await BlockDevice.write_filled(self, sector, view, fill, threads=threads)

    def _write_runs_blocking(self, offset: int, view: memoryview) -> None:
        """``write``'s runs, in a worker thread, inside the backing file (the gate held)."""
        if not self._regular:
            return self._blocking_io(os.pwritev, [view], offset, "write")
        for run in zero_runs(offset, [view]):
            if not run.zero:
                self._blocking_io(os.pwritev, run.views, run.offset, "write")
            elif not is_hole(self._fd, run.offset, run.length):
                make_zeroes(self._fd, run.offset, run.length)
        return None

    async def _write_run(self, run: Stretch) -> None:
        if run.zero:
            await self._zero_inside(run.offset, run.length)
        else:
            await self._io_at(os.pwritev, self._nowait_write, run.offset, run.views, "write")

    async def _zero_inside(self, offset: int, length: int) -> None:
        """Make a range read as zeroes; past ``length`` it does already.  Holds the gate."""
        length = min(length, self._length - offset)
        if length > 0:
            await self._zero_range(offset, length)

    async def _grow_to(self, end: int) -> None:
        """Make the backing file at least ``end`` bytes long (sparse)."""
        if end <= self._length:
            return
        async with self._gate.exclusive():
            size = self._size_sectors * self._sector_size
            if end > size:
                raise Unsafe(f"write up to byte {end} runs past the end ({format_size(size)})")
            if end > self._length:
                await self._in_thread(f"grow {self.path}", os.ftruncate, self._fd, end)
                self._length = end

    async def write_zeroes(self, sector: int, count: int) -> None:
        self._check_can(Capability.WRITE_ZEROES)
        self._check_writable()
        async with self._gate.shared:
            await self._zero_inside(sector * self._sector_size, count * self._sector_size)

    async def resize(self, size_sectors: int) -> None:
        self._check_can(Capability.RESIZE)
        self._check_writable()
        check_new_size(size_sectors)
        new_length = size_sectors * self._sector_size
        self._resizing += 1
        try:
            await self._wait_lent_back()  # a range sent from the file must not be cut off
            async with self._gate.exclusive():
                await self._in_thread(f"resize {self.path}", os.ftruncate, self._fd, new_length)
                self._length = new_length
                self._size_sectors = size_sectors
        finally:
            self._resizing -= 1

    async def extents(self, sector: int, count: int) -> list[Extent]:
        self._check_can(Capability.EXTENTS)
        self._check_open()
        ss = self._sector_size
        async with self._gate.shared:
            backed = max(0, min(count, self._length // ss - sector))
            out: list[Extent] = []
            if backed:
                where = f"find holes in {self.path}"
                out = await self._in_thread(where, file_extents, self._fd, sector, backed, ss)
            if not out or out[-1].end == sector + backed:
                first = sector + backed
                append_extent(out, Extent(first, sector + count - first, False))
            return out

    @staticmethod
    def _sync(fd: int) -> None:
        os.fsync(fd)

    def status(self) -> dict[str, str]:
        """The backing file's length and what it holds on disk (what `du` shows)."""
        if self._closed:
            return {}
        if not self._regular:  # a block device holds all of itself
            return {"backing_length": str(self._length)}
        allocated = os.fstat(self._fd).st_blocks * 512
        return {"backing_length": str(self._length), "allocated": str(allocated)}


# --- opening -------------------------------------------------------------------------


def check_backing(path: str, size_bytes: int | None) -> None:
    """Raise ``ValueError`` (one line) unless ``sparse(path, size=size_bytes)`` can open.

    Changes nothing.  ``size_bytes`` of ``None`` means the file's own length.
    """
    if size_bytes is not None and (size_bytes < 0 or size_bytes % 512):
        raise ValueError(f"size {size_bytes} is not a whole number of 512-byte sectors")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        _check_creatable(path, size_bytes)
        return
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ValueError(f"{path} is not a regular file or block device")
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            length, sector_size = device_geometry(fd)
        finally:
            os.close(fd)
    else:
        length, sector_size = st.st_size, 512
    _check_length(path, length, sector_size, size_bytes, stat.S_ISBLK(st.st_mode))


def _check_creatable(path: str, size_bytes: int | None) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"cannot create {path}: the directory {parent} does not exist")
    if size_bytes is None:
        raise ValueError(
            f"{path} does not exist; give its size to create it: sparse({path}, size=1G)"
        )
    if size_bytes:
        _check_filesystem_holds(path, size_bytes)


def _check_length(
    path: str, length: int, sector_size: int, size_bytes: int | None, is_block: bool
) -> None:
    if length % sector_size:
        raise ValueError(
            f"{path} is {length} bytes, not a whole number of {sector_size}-byte sectors "
            f"(`truncate -s` it to a multiple of {sector_size})"
        )
    if size_bytes is None:
        if length == 0:
            raise ValueError(empty_image(path, is_block))
        return
    if size_bytes % sector_size:
        raise ValueError(f"size {size_bytes} is not a whole number of {sector_size}-byte sectors")
    if size_bytes < length and not is_block:
        raise ValueError(
            f"{path} is {length} bytes, more than size={size_bytes}; "
            f"leave out size= to use the file's length, or `truncate -s` the file"
        )
    if is_block and size_bytes > length:
        raise ValueError(
            f"{path} is a block device of {length} bytes; it cannot hold size={size_bytes}"
        )
    if not is_block and size_bytes > length:
        _check_filesystem_holds(path, size_bytes)


def _check_filesystem_holds(path: str, size_bytes: int) -> None:
    """Refuse a size the file's filesystem cannot reach (ext4: 16 TiB), found with a
    sparse scratch file beside it, so that writes near the end do not fail later."""
    try:
        with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(path))) as probe:
            os.ftruncate(probe.fileno(), size_bytes)
    except OSError as exc:
        if exc.errno != errno.EFBIG:
            return  # cannot probe here (a read-only directory): writes will tell
        raise ValueError(
            f"size={format_size(size_bytes)} is more than the filesystem of {path} can hold "
            f"in one file ({exc.strerror})"
        ) from None


def open_sparse(
    path: str,
    *,
    size_bytes: int | None = None,
    ctx: OpenContext | None = None,
    format: str | None = None,
    read_only: bool = False,
) -> SparseDevice:
    """Open ``path`` as a sparse device, creating it (sparse, ``size_bytes`` long) if missing
    (and noting so in ``ctx``, which removes it again if the opening fails).  A
    ``read_only`` device takes no lock, as ``open_file``'s.

    Raises ``ValueError`` (see ``check_backing``; an existing image of another format,
    unless ``format="raw"``: see ``images.py``) or ``OSError``.
    """
    check_format(format)
    check_backing(path, size_bytes)
    fd, created = _open_or_create(path, size_bytes, read_only)
    if created and ctx is not None:
        ctx.note_created(path)
    try:
        if not created:
            check_raw(fd, path, format)
        lock_image(fd, path, read_only=read_only)
        length = device_geometry(fd)[0]
        size = length if size_bytes is None else size_bytes
        return SparseDevice(fd, path, size_bytes=size, read_only=read_only)
    except BaseException:
        os.close(fd)
        if created:
            os.unlink(path)
        raise


def _open_or_create(path: str, size_bytes: int | None, read_only: bool) -> tuple[int, bool]:
    flags = os.O_RDWR | os.O_CLOEXEC
    if size_bytes is not None:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        else:
            try:
                _make_durable_new_file(fd, path, size_bytes)
            except BaseException:
                os.close(fd)
                os.unlink(path)
                raise
            return fd, True
    fd = os.open(path, (os.O_RDONLY | os.O_CLOEXEC) if read_only else flags)
    try:
        check_backing(path, size_bytes)
    except BaseException:
        os.close(fd)
        raise
    return fd, False


def _make_durable_new_file(fd: int, path: str, size_bytes: int) -> None:
    """Give a new file its length and make it and its name durable (fsync file and dir)."""
    os.ftruncate(fd, size_bytes)
    os.fsync(fd)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
