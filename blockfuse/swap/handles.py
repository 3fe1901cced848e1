"""swapfs: short-lived files ("handles") kept on a block device.

After MirageOS's swapfs, which opam-mirror uses to hold downloads while it checks their
hashes.  The device is cut into *units* (1 MiB by default, a whole number of sectors); a
handle owns a list of runs of units and a size in bytes.  The layout lives only in
memory, so nothing survives the process: the device is scratch space.

    device units:  | a a a | . . | b b | a a | . . . . |
    handle a:      runs [UnitRun(0, 3), UnitRun(7, 2)], size 4.5 units
    handle b:      runs [UnitRun(5, 2)]
    free space:    {3: 2, 9: 4}        (start -> count, coalesced)

**Invariant 1: no unit is owned twice.**  Every unit is in exactly one place: the free
map, one handle's ``runs``, or one handle's ``retired`` list (given up, waiting for that
handle's I/O to finish).  Units move between places only in synchronous code, with no
``await`` in the middle, so no other task ever sees a half-done move.

**Invariant 2: free never lets a read see another file's data.**  Every read and write
counts itself as a *user* of its handle while its device I/O runs, and works on the runs
it saw when it started.  ``free`` and a shrinking ``truncate`` never hand units straight
back to the free map: they move them to ``retired``, tagged with the handle's *epoch*,
which then moves on; a user is tagged with the epoch it started in.  Retired units go
back into circulation once no user of an epoch up to theirs is left, as only those
could touch them: a read that starts after a truncate never holds back the units the
truncate cut off, so overlapping reads cannot keep the space away for ever.  ``free``
marks the handle dead at once (later calls raise ``HandleFreed``), then waits for the
users to leave; if that wait is cancelled, the units still come back when the last one
leaves.  Writes to one handle take turns on its lock, so a partial-sector
read-modify-write never interleaves with another write.

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
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio

from ..block import BlockDevice, Buffer, total_length
from ..buffers import split_buffers
from ..errors import HandleFreed, ReadOnly, Unsafe
from ..sectors import patch_sectors, span
from ..units import ceil_div, round_up
from .space import FreeSpace, UnitRun, map_range, merge_runs, split_runs

DEFAULT_UNIT = 1 << 20
ZERO_FILL_BYTES = 1 << 20
"""Gaps (a write past the end, a growing truncate) are filled this many bytes at a time."""

DeviceCall = Callable[[int, Sequence[Buffer]], Awaitable[None]]


# --- handles ---------------------------------------------------------------------------


@dataclass(eq=False)
class _State:
    """What a handle owns; kept apart from ``Handle`` so that the handle can be collected."""

    runs: list[UnitRun] = field(default_factory=list)
    size: int = 0
    epoch: int = 0
    users: dict[int, int] = field(default_factory=dict)
    """Users in flight, by the epoch they started in."""
    retired: list[tuple[int, list[UnitRun]]] = field(default_factory=list)
    """Runs given up, with the epoch they were given up in."""
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

    def free_runs(self) -> list[UnitRun]:
        self._reclaim_orphans()
        return self._space.runs()

    def runs_of(self, handle: Handle) -> list[UnitRun]:
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
            self._retire(state, state.runs)
            state.runs, state.size = [], 0
            self._release_retired(state)
        await state.drained.wait()

    # --- handle state ----------------------------------------------------------------------

    def _live(self, handle: Handle) -> _State:
        if handle._state.freed:
            raise HandleFreed("the swapfs handle was freed")
        return handle._state

    @contextmanager
    def _using(self, state: _State) -> Iterator[None]:
        epoch = state.epoch
        state.users[epoch] = state.users.get(epoch, 0) + 1
        try:
            yield
        finally:
            state.users[epoch] -= 1
            if not state.users[epoch]:
                del state.users[epoch]
            self._release_retired(state)

    @staticmethod
    def _retire(state: _State, runs: list[UnitRun]) -> None:
        if runs:
            state.retired.append((state.epoch, runs))
            state.epoch += 1

    def _release_retired(self, state: _State) -> None:
        """Give back the retired runs that no user in flight can touch (invariant 2)."""
        oldest = min(state.users, default=state.epoch + 1)
        while state.retired and state.retired[0][0] < oldest:
            self._space.give(state.retired.pop(0)[1])
        if state.freed and not state.retired:
            state.drained.set()

    def _reclaim_orphans(self) -> None:
        while self._orphans:
            state = self._orphans.pop()
            if not state.freed:
                state.freed = True
                self._space.give(state.runs + [r for _, runs in state.retired for r in runs])

    def _reserve(self, state: _State, size: int) -> list[UnitRun]:
        """Own enough units for ``size`` bytes; ``NoSpace`` takes nothing."""
        need = ceil_div(size, self.unit_size) - state.units
        if need > 0:
            self._reclaim_orphans()
            after = state.runs[-1].end if state.runs else None
            state.runs = merge_runs(state.runs, self._space.take(need, after))
        return state.runs

    def _retire_beyond(self, state: _State, size: int) -> None:
        """Give up the units past those that ``size`` bytes need."""
        state.runs, rest = split_runs(state.runs, ceil_div(size, self.unit_size))
        self._retire(state, rest)

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

    async def _fill_zeroes(self, runs: list[UnitRun], start: int, stop: int) -> None:
        zeroes = memoryview(bytes(min(ZERO_FILL_BYTES, stop - start)))
        offset = start
        while offset < stop:
            n = min(stop, round_up(offset + 1, ZERO_FILL_BYTES)) - offset
            await self._write_span(runs, start, offset, zeroes[:n])
            offset += n

    async def _write_span(
        self, runs: list[UnitRun], size: int, offset: int, data: memoryview
    ) -> None:
        """Write ``data`` at ``offset`` of a file whose valid bytes end at ``size``."""
        if not data:
            return
        ss = self._sector_size

        async def old_sector(index: int) -> bytearray:
            return await self._old_sector(runs, size, index * ss)

        s = span(offset, len(data), ss)
        buffers = await patch_sectors(s, data, ss, old_sector)
        await self._device_io(self.device.write, runs, s.first * ss, buffers)

    async def _old_sector(self, runs: list[UnitRun], size: int, at: int) -> bytearray:
        """The sector at byte ``at`` of the file; zeroes if it lies wholly past ``size``."""
        sector = bytearray(self._sector_size)
        if at < size:
            await self._device_io(self.device.read, runs, at, [sector])
        return sector

    # --- reads and device calls ------------------------------------------------------------

    async def _read_span(self, runs: list[UnitRun], offset: int, length: int) -> memoryview:
        ss = self._sector_size
        first = offset - offset % ss
        buf = bytearray(round_up(offset + length, ss) - first)
        await self._device_io(self.device.read, runs, first, [buf])
        return memoryview(buf)[offset - first : offset - first + length].toreadonly()

    async def _device_io(
        self, call: DeviceCall, runs: list[UnitRun], offset: int, buffers: Sequence[Buffer]
    ) -> None:
        """One device call per contiguous piece of ``[offset, offset+len(buffers))``."""
        pieces = map_range(runs, self.unit_size, offset, total_length(buffers))
        groups = split_buffers(buffers, [n for _, n in pieces])
        for (device_offset, _), group in zip(pieces, groups, strict=True):
            await call(device_offset // self._sector_size, group)
