"""swapfs: short-lived files ("handles") kept on a block device.

After MirageOS's swapfs, which opam-mirror uses to hold downloads while it checks their
hashes.  The device is cut into *units* (1 MiB by default, a whole number of sectors); a
handle owns a list of runs of units and a size in bytes.  The layout lives only in
memory, so nothing survives the process: the device is scratch space.

    device units:  | a a a | . . | b b | a a | . . . . |
    handle a:      runs [Run(0, 3), Run(7, 2)], size 4.5 units
    handle b:      runs [Run(5, 2)]
    free space:    {3: 2, 9: 4}        (start -> count, coalesced)

**Invariant 1: no unit is owned twice.**  Every unit is in exactly one place: the free
map, one handle's ``runs``, or one handle's ``retired`` list (given up, waiting for that
handle's I/O to finish).  Units move between places only in synchronous code, with no
``await`` in the middle, so no other task ever sees a half-done move.

**Invariant 2: free never lets a read see another file's data.**  Every read and write
counts itself as a *user* of its handle while its device I/O runs, and works on the runs
it saw when it started.  ``free`` and a shrinking ``truncate`` never hand units straight
back to the free map: they move them to ``retired``, and the last user to leave returns
them.  A unit goes back into circulation only when no I/O of its old owner can touch it.
``free`` marks the handle dead at once (later calls raise ``HandleFreed``), then waits
for the users to leave; if that wait is cancelled, the units still come back when the
last user leaves.

Allocation is first-fit over the address-ordered free map, preferring contiguity: a write
first grows the handle's last run in place, then takes the first free run big enough for
the rest, and only when there is none gathers the lowest runs one after another.  Freed
runs coalesce with their neighbours, so the map never holds more runs than there are
owned runs plus one.  Device I/O is one call per contiguous run that a request touches,
never one per sector.  A write that does not fit fails with ``NoSpace`` and gives back
what it took: the handle is unchanged.

A handle that nobody references any more is garbage: its finalizer queues its state, and
the next allocation returns its units.  The finalizer never touches the map itself,
because the garbage collector may run it in the middle of a map update.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio
from sortedcontainers import SortedDict

from .block import BlockDevice, Buffer, total_length
from .errors import HandleFreed, NoSpace, ReadOnly, Unsafe

DEFAULT_UNIT = 1 << 20
ZERO_CHUNK = 1 << 20
"""Gaps (a write past the end, a growing truncate) are filled this many bytes at a time."""

DeviceCall = Callable[[int, Sequence[Buffer]], Awaitable[None]]


@dataclass(frozen=True)
class Run:
    """``count`` units from unit ``start``."""

    start: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count


# --- the free-space map --------------------------------------------------------------


class FreeSpace:
    """The free units as disjoint runs, coalesced: no two free runs touch."""

    def __init__(self, total_units: int) -> None:
        self.total_units = total_units
        self.free_units = 0
        self._runs: SortedDict = SortedDict()  # start -> count
        self.give([Run(0, total_units)])

    def runs(self) -> list[Run]:
        return [Run(start, count) for start, count in self._runs.items()]

    def take(self, count: int, after: int | None = None) -> list[Run]:
        """``count`` units, as few runs as first-fit allows; ``NoSpace`` takes nothing.

        ``after`` is the unit just past the caller's last run: growing there comes first.
        """
        if count > self.free_units:
            raise NoSpace(f"{count} units needed, {self.free_units} free")
        taken: list[Run] = []
        if count and after is not None and after in self._runs:
            taken.append(self._cut(after, count))
            count -= taken[-1].count
        if count and (start := self._first_fit(count)) is not None:
            taken.append(self._cut(start, count))
            count = 0
        while count:
            taken.append(self._cut(self._runs.keys()[0], count))
            count -= taken[-1].count
        return taken

    def give(self, runs: Iterable[Run]) -> None:
        """Return ``runs`` to the map, merging each with the free runs it touches."""
        for run in runs:
            if run.count:
                self._check_owned(run)
                self._insert(run)

    def _first_fit(self, count: int) -> int | None:
        for start, n in self._runs.items():
            if n >= count:
                return int(start)
        return None

    def _cut(self, start: int, want: int) -> Run:
        """Up to ``want`` units from the front of the free run at ``start``."""
        n = self._runs.pop(start)
        got = min(n, want)
        if got < n:
            self._runs[start + got] = n - got
        self.free_units -= got
        return Run(start, got)

    def _insert(self, run: Run) -> None:
        start, count = run.start, run.count
        i = self._runs.bisect_left(start)
        if i:
            before, before_count = self._runs.peekitem(i - 1)
            if before + before_count == start:
                del self._runs[before]
                start, count = before, before_count + count
        if run.end in self._runs:
            count += self._runs.pop(run.end)
        self._runs[start] = count
        self.free_units += run.count

    def _check_owned(self, run: Run) -> None:
        """A run given back must lie on the device and overlap no free run."""
        if run.start < 0 or run.end > self.total_units:
            raise AssertionError(f"{run} lies outside {self.total_units} units")
        i = self._runs.bisect_right(run.start)
        if i and sum(self._runs.peekitem(i - 1)) > run.start:
            raise AssertionError(f"{run} is already free in part")
        if i < len(self._runs) and self._runs.keys()[i] < run.end:
            raise AssertionError(f"{run} is already free in part")


# --- pure layout arithmetic ----------------------------------------------------------


def merge_runs(runs: Sequence[Run], more: Iterable[Run]) -> list[Run]:
    """``runs + more``, joining neighbours that continue one another on the device."""
    out = list(runs)
    for run in more:
        if out and out[-1].end == run.start:
            out[-1] = Run(out[-1].start, out[-1].count + run.count)
        else:
            out.append(run)
    return out


def split_runs(runs: Sequence[Run], keep: int) -> tuple[list[Run], list[Run]]:
    """The first ``keep`` units of ``runs``, and the rest."""
    head: list[Run] = []
    tail: list[Run] = []
    for run in runs:
        n = max(0, min(run.count, keep))
        keep -= n
        if n:
            head.append(Run(run.start, n))
        if n < run.count:
            tail.append(Run(run.start + n, run.count - n))
    return head, tail


def map_range(runs: Sequence[Run], unit: int, offset: int, length: int) -> list[tuple[int, int]]:
    """The device byte ranges ``(offset, length)`` that hold a handle's bytes, in order."""
    out: list[tuple[int, int]] = []
    stop, pos = offset + length, 0
    for run in runs:
        lo, hi = max(offset, pos), min(stop, pos + run.count * unit)
        if lo < hi:
            out.append((run.start * unit + lo - pos, hi - lo))
        pos += run.count * unit
        if pos >= stop:
            break
    if sum(n for _, n in out) != length:
        raise AssertionError(f"bytes {offset}..{stop} run past the handle's units")
    return out


def split_buffers(buffers: Sequence[Buffer], lengths: Sequence[int]) -> list[list[memoryview]]:
    """Cut ``buffers`` (without copying) into consecutive groups of ``lengths`` bytes."""
    views = deque(memoryview(b).cast("B") for b in buffers)
    groups: list[list[memoryview]] = []
    for n in lengths:
        group: list[memoryview] = []
        while n:
            view = views.popleft()
            if len(view) > n:
                views.appendleft(view[n:])
                view = view[:n]
            group.append(view)
            n -= len(view)
        groups.append(group)
    return groups


def round_up(n: int, step: int) -> int:
    return -(-n // step) * step


# --- handles ---------------------------------------------------------------------------


@dataclass(eq=False)
class _State:
    """What a handle owns; kept apart from ``Handle`` so that the handle can be collected."""

    runs: list[Run] = field(default_factory=list)
    size: int = 0
    users: int = 0
    retired: list[Run] = field(default_factory=list)
    freed: bool = False
    lock: trio.Lock = field(default_factory=trio.Lock)
    drained: trio.Event = field(default_factory=trio.Event)

    @property
    def units(self) -> int:
        return sum(run.count for run in self.runs)


class Handle:
    """One swapfs file; opaque, used only with the ``Swap`` that made it."""

    __slots__ = ("__weakref__", "_state")

    def __init__(self, state: _State) -> None:
        self._state = state


async def open_swap(device: BlockDevice, unit_size: int = DEFAULT_UNIT) -> Swap:
    """A swapfs over all of ``device`` (its old contents are overwritten as files grow)."""
    info = await device.get_info()
    if not info.read_write:
        raise ReadOnly("swapfs needs a writable device")
    if unit_size <= 0 or unit_size % info.sector_size:
        raise Unsafe(
            f"swapfs unit {unit_size} is not a whole number of {info.sector_size}-byte sectors"
        )
    return Swap(device, info.sector_size, info.size_bytes // unit_size, unit_size)


class Swap:
    """Handles on one device: ``empty``, ``append``, ``write``, ``get_partial``, ``free``."""

    def __init__(self, device: BlockDevice, sector_size: int, units: int, unit_size: int) -> None:
        self.device = device
        self.unit_size = unit_size
        self._sector_size = sector_size
        self._space = FreeSpace(units)
        self._orphans: list[_State] = []

    # --- space ------------------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self._space.total_units * self.unit_size

    @property
    def free_bytes(self) -> int:
        self._reclaim_orphans()
        return self._space.free_units * self.unit_size

    def free_runs(self) -> list[Run]:
        self._reclaim_orphans()
        return self._space.runs()

    def runs_of(self, handle: Handle) -> list[Run]:
        """The units ``handle`` owns, in file order (empty once freed)."""
        return list(handle._state.runs)

    def allocated_bytes(self, handle: Handle) -> int:
        return handle._state.units * self.unit_size

    # --- the API -------------------------------------------------------------------------

    async def empty(self) -> Handle:
        """A new handle of size 0, owning nothing."""
        state = _State()
        handle = Handle(state)
        weakref.finalize(handle, self._orphans.append, state)
        return handle

    async def size(self, handle: Handle) -> int:
        return self._live(handle).size

    async def append(self, handle: Handle, data: Buffer) -> None:
        """Add ``data`` at the end; ``NoSpace`` leaves the handle unchanged."""
        await self._locked_write(handle, None, data)

    async def write(self, handle: Handle, offset: int, data: Buffer) -> None:
        """Write ``data`` at ``offset``; a gap left before it reads back as zeroes."""
        if offset < 0:
            raise Unsafe(f"negative offset {offset}")
        if len(data):
            await self._locked_write(handle, offset, data)
        else:
            self._live(handle)

    async def truncate(self, handle: Handle, size: int) -> None:
        """Cut the handle to ``size`` bytes (freeing whole units) or grow it with zeroes."""
        if size < 0:
            raise Unsafe(f"negative size {size}")
        state = self._live(handle)
        async with state.lock:
            self._live(handle)
            with self._using(state):
                if size >= state.size:
                    await self._write_at(state, size, memoryview(b""))
                else:
                    state.size = size
                    self._retire_beyond(state, size)

    async def get_partial(self, handle: Handle, offset: int, length: int) -> memoryview:
        """Up to ``length`` bytes from ``offset`` (fewer at the end), as a read-only view."""
        state = self._live(handle)
        if offset < 0 or length < 0:
            raise Unsafe(f"bad range: {length} bytes at {offset}")
        length = max(0, min(length, state.size - offset))
        if length == 0:
            return memoryview(b"")
        with self._using(state):
            return await self._read_span(state.runs, offset, length)

    async def free(self, handle: Handle) -> None:
        """Drop the handle; its units return once its in-flight I/O is done (awaited)."""
        state = handle._state
        if not state.freed:
            state.freed = True
            state.retired += state.runs
            state.runs, state.size = [], 0
            self._release_if_idle(state)
        await state.drained.wait()

    # --- handle state ----------------------------------------------------------------------

    def _live(self, handle: Handle) -> _State:
        if handle._state.freed:
            raise HandleFreed("the swapfs handle was freed")
        return handle._state

    @contextmanager
    def _using(self, state: _State) -> Iterator[None]:
        state.users += 1
        try:
            yield
        finally:
            state.users -= 1
            self._release_if_idle(state)

    def _release_if_idle(self, state: _State) -> None:
        if state.users:
            return
        retired, state.retired = state.retired, []
        self._space.give(retired)
        if state.freed:
            state.drained.set()

    def _reclaim_orphans(self) -> None:
        while self._orphans:
            state = self._orphans.pop()
            if not state.freed:
                state.freed = True
                self._space.give(state.runs + state.retired)

    def _reserve(self, state: _State, size: int) -> list[Run]:
        """Own enough units for ``size`` bytes; ``NoSpace`` takes nothing."""
        need = -(-size // self.unit_size) - state.units
        if need > 0:
            self._reclaim_orphans()
            after = state.runs[-1].end if state.runs else None
            state.runs = merge_runs(state.runs, self._space.take(need, after))
        return state.runs

    def _retire_beyond(self, state: _State, size: int) -> None:
        """Give up the units past those that ``size`` bytes need."""
        state.runs, rest = split_runs(state.runs, -(-size // self.unit_size))
        state.retired += rest

    # --- writes ----------------------------------------------------------------------------

    async def _locked_write(self, handle: Handle, offset: int | None, data: Buffer) -> None:
        state = self._live(handle)
        async with state.lock:
            self._live(handle)
            with self._using(state):
                start = state.size if offset is None else offset
                await self._write_at(state, start, memoryview(data).cast("B"))

    async def _write_at(self, state: _State, offset: int, data: memoryview) -> None:
        """Write with ``state.lock`` held; on failure give back the units it took."""
        end = offset + len(data)
        runs = self._reserve(state, max(end, state.size))
        try:
            if offset > state.size:
                await self._fill_zeroes(runs, state.size, offset)
            await self._write_span(runs, state.size, offset, data)
        except BaseException:
            self._retire_beyond(state, state.size)
            raise
        state.size = max(state.size, end)

    async def _fill_zeroes(self, runs: list[Run], start: int, stop: int) -> None:
        zeroes = memoryview(bytes(min(ZERO_CHUNK, stop - start)))
        offset = start
        while offset < stop:
            n = min(stop, round_up(offset + 1, ZERO_CHUNK)) - offset
            await self._write_span(runs, start, offset, zeroes[:n])
            offset += n

    async def _write_span(self, runs: list[Run], size: int, offset: int, data: memoryview) -> None:
        """Write ``data`` at ``offset`` of a file whose valid bytes end at ``size``."""
        if not data:
            return
        ss = self._sector_size
        first, stop = offset - offset % ss, round_up(offset + len(data), ss)
        buffers: list[Buffer] = [data]
        if first != offset or stop != offset + len(data):
            buffers = await self._with_edges(runs, size, offset, data, first, stop)
        await self._device_io(self.device.write, runs, first, buffers)

    async def _with_edges(
        self, runs: list[Run], size: int, offset: int, data: memoryview, first: int, stop: int
    ) -> list[Buffer]:
        """``data`` padded to whole sectors with the bytes around it."""
        ss = self._sector_size
        if stop - first == ss:
            sector = await self._old_sector(runs, size, first)
            sector[offset - first : offset - first + len(data)] = data
            return [sector]
        head_len = (ss - (offset - first)) % ss
        tail_len = (len(data) - head_len) % ss
        buffers: list[Buffer] = []
        if head_len:
            head = await self._old_sector(runs, size, first)
            head[ss - head_len :] = data[:head_len]
            buffers.append(head)
        if len(data) > head_len + tail_len:
            buffers.append(data[head_len : len(data) - tail_len])
        if tail_len:
            tail = await self._old_sector(runs, size, stop - ss)
            tail[:tail_len] = data[len(data) - tail_len :]
            buffers.append(tail)
        return buffers

    async def _old_sector(self, runs: list[Run], size: int, at: int) -> bytearray:
        """The sector at byte ``at`` of the file; zeroes if it lies wholly past ``size``."""
        sector = bytearray(self._sector_size)
        if at < size:
            await self._device_io(self.device.read, runs, at, [sector])
        return sector

    # --- reads and device calls ------------------------------------------------------------

    async def _read_span(self, runs: list[Run], offset: int, length: int) -> memoryview:
        ss = self._sector_size
        first = offset - offset % ss
        buf = bytearray(round_up(offset + length, ss) - first)
        await self._device_io(self.device.read, runs, first, [buf])
        return memoryview(buf)[offset - first : offset - first + length].toreadonly()

    async def _device_io(
        self, call: DeviceCall, runs: list[Run], offset: int, buffers: Sequence[Buffer]
    ) -> None:
        """One device call per contiguous piece of ``[offset, offset+len(buffers))``."""
        pieces = map_range(runs, self.unit_size, offset, total_length(buffers))
        groups = split_buffers(buffers, [n for _, n in pieces])
        for (device_offset, _), group in zip(pieces, groups, strict=True):
            await call(device_offset // self._sector_size, group)
