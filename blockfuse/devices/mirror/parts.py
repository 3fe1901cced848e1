"""The pieces a mirror is built from: a throttle, a device seen in mirror sectors, a
count of foreground users, what identifies a side's file, and small helpers on calls
and ranges.  Each is independent
of the mirror's state; ``device.py`` says how they keep its invariant.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Awaitable, Sequence

import trio

from ...block import BlockDevice, Buffer, Capability, Filler, Info, layers, total_length
from ...errors import BlockError, Unimplemented
from ...extents import IntervalSet, align_out
from ...filerange import FileRange
from ...threads import WorkerThreads
from ...transport.blocking import Plane
from ...units import ceil_div


class Throttle:
    """At most ``rate`` bytes per second, with a burst of one request.  The rate can be
    changed at any time (``set_rate``): a request waiting for its turn goes at once,
    and the new rate counts from then on."""

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self._next = 0.0
        self._changed = trio.Event()

    def set_rate(self, rate: int | None) -> None:
        self.rate = rate
        self._next = 0.0
        self._changed.set()
        self._changed = trio.Event()

    async def take(self, n: int) -> None:
        if not self.rate:
            return
        start = max(self._next, trio.current_time())
        self._next = start + n / self.rate
        with trio.move_on_at(start):
            await self._changed.wait()


async def error_of(call: Awaitable[None]) -> BlockError | None:
    """Run ``call``; the ``BlockError`` it raised (caught), or ``None``.  Anything else
    propagates."""
    try:
        await call
    except BlockError as exc:
        return exc
    return None


async def run_both(a: Awaitable[None], b: Awaitable[None]) -> tuple[BlockError | None, ...]:
    """Run two calls at once; each one's ``BlockError`` (or ``None``)."""
    results: list[BlockError | None] = [None, None]

    async def run(i: int, call: Awaitable[None]) -> None:
        results[i] = await error_of(call)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, 0, a)
        nursery.start_soon(run, 1, b)
    return tuple(results)


class Side:
    """One of the two devices, addressed in mirror sectors.

    Given a ``grain`` (the secondary is), a side also keeps where it may hold data, so
    that the copier need not ask the device again for each run of holes it copies (a
    ``SEEK_DATA`` in a thread per item cost a tenth of the copy rate).  Every write is
    recorded from the start: the copier's exactly (they run in order and merge; data
    often ends in the middle of a chunk, and the holes after it must not look written),
    others in whole ``grain`` units, so that scattered small writes cost at most one
    interval per two grains.  ``find_data`` adds what the device held before, once.
    Until it has, or if the device cannot tell, the side may hold data anywhere.
    """

    def __init__(
        self, dev: BlockDevice, info: Info, sector_size: int, grain: int | None = None
    ) -> None:
        self.dev = dev
        self.ratio = sector_size // info.sector_size
        self.use_extents = Capability.EXTENTS in dev.capabilities
        self._sector_size = sector_size
        self._grain = grain
        self._written = IntervalSet()
        self._found: IntervalSet | None = None

    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        await self.dev.read(sector * self.ratio, buffers)

    def lend(self, sector: int, count: int) -> FileRange | None:
        """The device's ``lend`` of these sectors (the mirror proves what ``safe`` would
        check: whole sectors inside the device)."""
        return self.dev.unchecked.lend(sector * self.ratio, count * self.ratio)

    async def write(self, sector: int, buffers: Sequence[Buffer], *, exact: bool = False) -> None:
        """Write; ``exact``: record just these sectors as written, not whole grains."""
        if self._grain:  # before the write: it may half land
            end = sector + total_length(buffers) // self._sector_size
            self._written.add(*((sector, end) if exact else align_out(sector, end, self._grain)))
        await self.dev.write(sector * self.ratio, buffers)

    async def write_behind(self, sector: int, count: int) -> None:
        await self.dev.write_behind(sector * self.ratio, count * self.ratio)

    async def write_filled(
        self, sector: int, view: memoryview, fill: Filler, threads: WorkerThreads
    ) -> None:
        """``write_filled`` (``block.py``), recorded as written exactly (a copier's)."""
        if self._grain:  # before the write: it may half land
            self._written.add(sector, sector + len(view) // self._sector_size)
        await self.dev.write_filled(sector * self.ratio, view, fill, threads=threads)

    async def find_data(self, size: int) -> None:
        """Learn where the device holds data now (if it can tell: extents)."""
        if self._found is None and self.use_extents and self._grain:
            self._found = await self.data_map(0, size)

    def may_hold_data(self, start: int, end: int) -> list[tuple[int, int]]:
        """The pieces of ``[start, end)`` where this side may hold data."""
        if self._found is None:
            return [(start, end)]
        pieces = IntervalSet(self._found.intersection(start, end))
        for a, b in self._written.intersection(start, end):
            pieces.add(a, b)
        return list(pieces)

    async def data_map(self, start: int, end: int) -> IntervalSet:
        """The sectors of ``[start, end)`` that may hold data (all, without extents)."""
        data = IntervalSet()
        pos = start * self.ratio
        while self.use_extents and pos < end * self.ratio:
            try:
                answer = await self.dev.extents(pos, end * self.ratio - pos)
            except Unimplemented:
                self.use_extents = False
                break
            if not answer:
                break
            for ext in answer:
                if ext.is_data:
                    data.add(ext.sector // self.ratio, ceil_div(ext.end, self.ratio))
            pos = answer[-1].end
        if pos < end * self.ratio:
            data.add(pos // self.ratio, end)
        return IntervalSet(data.intersection(start, end))


def runs(data: IntervalSet, start: int, end: int) -> list[tuple[int, int, bool]]:
    """``[start, end)`` as ``(a, b, is_data)`` pieces in order, data being ``data``."""
    pieces = [(a, b, True) for a, b in data.intersection(start, end)]
    pieces += [(a, b, False) for a, b in data.gaps(start, end)]
    return sorted(pieces)


def spread(intervals: Sequence[tuple[int, int]], count: int, length: int) -> list[tuple[int, int]]:
    """Up to ``count`` ranges of up to ``length`` inside ``intervals``, spread evenly."""
    total = sum(b - a for a, b in intervals)
    out, seen = [], 0
    wanted = [k * total // count for k in range(count)] if total else []
    for a, b in intervals:
        while wanted and wanted[0] < seen + (b - a):
            start = a + wanted.pop(0) - seen
            out.append((start, min(b, start + length)))
        seen += b - a
    return out


def split(start: int, end: int, step: int) -> list[tuple[int, int]]:
    """``[start, end)`` cut at multiples of ``step``."""
    out = []
    while start < end:
        edge = min((start // step + 1) * step, end)
        out.append((start, edge))
        start = edge
    return out


class Users:
    """How many foreground requests use a device right now; waiters for it to go idle."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = trio.Event()

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self.wake()

    def wake(self) -> None:
        """Wake whoever waits in ``wait``; each one checks again why it waits."""
        self._idle.set()
        self._idle = trio.Event()

    async def wait(self) -> None:
        """Until the count drops to 0 or ``wake`` is called."""
        await self._idle.wait()


def backing_path(dev: BlockDevice) -> str | None:
    """The path of the file under ``dev``, if it stands on one."""
    for layer in layers(dev):
        path = getattr(layer, "path", None)
        if isinstance(path, str):
            return path
    return None


def identity(dev: BlockDevice) -> str | None:
    """``DEV:INO`` of the file under ``dev``, if it stands on one."""
    path = backing_path(dev)
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}"


def signature(dev: BlockDevice) -> str:
    """What changes when anybody writes the regular file under ``dev``: its size, mtime
    and ctime (``-`` for a block device, a remote, or memory: nothing to go by)."""
    path = backing_path(dev)
    if path is None:
        return "-"
    try:
        st = os.stat(path)
    except OSError:
        return "-"
    if not stat.S_ISREG(st.st_mode):
        return "-"
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


class Task:
    """A background task its owner can stop: a grace period to end by itself, then
    cancelled; ``begin`` returns the event the task sets when it ends."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self._done: trio.Event | None = None

    def begin(self) -> trio.Event:
        self._done = trio.Event()
        return self._done

    async def stop(self, grace: float) -> None:
        """Wait ``grace`` seconds for the task to end, then cancel it (if it ever began)."""
        if self._done is None:
            return
        with trio.move_on_after(grace):
            await self._done.wait()
        self.scope.cancel()
        await self._done.wait()


def data_plane(dev: BlockDevice) -> Plane | None:
    """Blocking connections for the copier's threads to read ``dev`` in bulk, where it is
    an NBD export that allows them, under nothing but ``safe`` wrappers (whose checks the
    copier's aligned reads pass anyway); ``None`` otherwise."""
    for layer in layers(dev):
        make = getattr(layer, "data_plane", None)
        if make is not None:
            plane: Plane | None = make()
            return plane
        if layer.kind != "safe":
            return None
    return None
