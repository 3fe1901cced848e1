"""The mirror's background copier: one sweep over what is not yet copied, several items
in flight.

A planner walks the uncopied ranges in order, asks the primary where its data is, and
hands out items: data in chunks, runs of holes in long items.  Workers copy items,
each with a chunk buffer of its own.

The plan is only a guess -- a write may land in a hole after the planner looked -- so a
*hole* item whose range a foreground write touched since the planner asked asks the
primary again *under the range lock*, and only that answer decides what is copied and
what is zeroed.  A write tells (``primary_written``) as it ends, still holding its
lock: the item holds the lock when it looks, so any write into its range has either
not started or told, and a write that ran across the planner's question counts too.
An untouched hole item trusts the plan: asking anyway, a block status per run of holes
queued behind the chunks in flight, cost 5-10% of the copy rate.  A *data* item needs no second
answer: it is read from the primary under the lock whatever it holds (a hole in it
reads as zeroes, which the secondary then holds as zeroes), and asking again cost an
extra round trip per chunk (an NBD block status: 8 chunks in flight copied at 0.28x
nbdcopy instead of 0.78x).  That is the copier's half of the invariant at the top of
``device.py``: an item holds the lock on its range from before it reads the primary (or
trusts the plan) until its range is in ``copied``.

A hole item zeroes the secondary only where it may hold data (``Side.may_hold_data``:
what it held when the copy started, plus what was written to it since), so on a fresh
secondary it asks nothing and writes nothing, unless a foreground write reached the
secondary in the same chunk.

A data item is copied in *pieces*, each holding the range lock on its own sectors only,
and the bytes in flight are paced by how quickly the primary answers (``pace.py``): on
a slow link a foreground write waits for at most one piece and the queue ahead of it.

Where the primary is an NBD export that lets several connections read it, a chunk is
copied by one worker thread: it reads the chunk over a blocking connection of its own
(the data plane, ``transport/blocking.py``) and, where the secondary writes in threads
(files and sparse images: ``write_filled``), writes it and starts its writeback in the
same thread.  One thread hop per chunk instead of three took a 2 GiB copy on the dev
VM from 1300-1320 to 1310-1450 MiB/s (nbdcopy: 1340-1460 in the same runs), and its
CPU time from 1.40-1.55 s to 0.91-1.08 s.  The
threads change nothing in the rules above: the piece's range lock is taken on the
event loop's thread before the thread starts and released after it returns, and the
range is marked copied only then.  But a read on another connection need not see a
write the primary acknowledged on ours: ``CAN_MULTI_CONN`` promises only that "the
effects of NBD_CMD_FLUSH and NBD_CMD_FLAG_FUA MUST be visible across all connections
when the server sends its reply" (the NBD spec), and a server may keep a write cache
per connection until then.  So the copier keeps the chunks foreground writes reached
since the last flush of the primary began (``primary_written``, under the write's
lock), and a chunk among them is read through the plane only after a flush of the
primary (the chunk's lock held: no write can slip in between).  A plane that fails is
retired, and the chunk and the rest of the copy are read over the trio client.

A failed item is retried after ``backoff * 2**attempt`` seconds, ``retries`` times;
then the copier reports the failure (``CopyEvents.fail``) and stops handing out work.
An item that fails once the copy is no longer going on (another item gave up, or the
copy was cancelled) is not counted: its error changes nothing.  Each item checks again
under its range lock that the copy goes on: a cancel (``device.py``) holds the whole
range while it stops the copy, and an item that was waiting behind it must not write
the secondary after it.

The copier counts what it copies for the status: the bytes of data it read and wrote
(``data_bytes``, the base of the rate), and per sweep a ``Tally`` of what the planner
saw (data and holes) and what was done, from which ``data_left`` estimates the data
that remains: exact for what the planner has asked about, the same share of data for
the rest.

Foreground I/O comes first: while a foreground request is using the primary, only the
first workers, with ``FOREGROUND_BYTES`` of chunks between them (one or two workers),
take new items; the others wait until the primary is idle (or every item has been handed
out) before they take one, so that none holds an item it cannot start: under foreground
I/O that never stopped, three workers each held one and the copy never ended.
Requests share one connection to the primary, and 16 MiB of chunks queued ahead of a
4 KiB read cut fio's random reads during the copy to 0.08-0.15x of the NBD export
alone; with 2 MiB they kept 0.60-0.66x, and the copy went on.  Those first workers then
share the primary too: after an item that held its ranges for *t* seconds (waits for
the rate limit, the pace and the lock not counted), a worker waits up to
``FOREGROUND_PAUSE`` x *t* (at most ``FOREGROUND_PAUSE_MAX``) for the foreground to
leave the primary, so a foreground that keeps it busy gets about four fifths of it and
the copy the rest (with the default 4 MiB chunks, where one worker goes on; with two,
about two thirds).  On a simulated 30 Mbit/s link, 4 KiB reads one after another ran
72 times in 10 s during the copy against 9156 alone; with the wait 7108, and the copy
had 22% of the link.  On the dev VM (an NBD export on tmpfs, fio 4 KiB random reads at
depth 16 through the mount during an unthrottled copy, 3 interleaved runs each) 0.53x
of the export alone without the wait, 0.82x with it (the copy 43-50% done after 1 s
instead of 78-88%).  Once every item has been handed out nobody waits so: the sweep
ends as soon as its last item is copied, where on that simulated link it ended 4.5 s
later.  When nothing else uses the disk, every worker copies without a pause.

Every ``FLUSH_BEHIND_BYTES`` written to the secondary, the copier starts a flush of it
and goes on copying without waiting (one flush at a time).  The kernel then writes the
copy back while it is being made, as ``nbdcopy`` does with ``sync_file_range``, instead
of all at the flush that ends the copy: with a sparse secondary, 1 GiB of data copied
in 1.0-1.2 s plus a 0.5-0.6 s final flush before, and in about the same copy time plus
0.01-0.04 s after.  A failed flush is a failed copy: what it should have made durable
may be lost, and a later flush would not say so, so the copy map stops counting what the
secondary got since the last checkpoint (rule 4 in copymap.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import trio

from ...block import Capability
from ...errors import BlockError
from ...extents import IntervalSet, align_out
from ...rangelock import RangeLock
from ...threads import WorkerThreads
from ...transport.blocking import Plane
from .copymap import CopyMap
from .pace import Pace
from .parts import Side, Throttle, error_of, runs, split

HOLE_ITEM_CHUNKS = 1024
"""A run of holes is handed out in items of up to this many chunks, when the secondary
finds and punches holes cheaply (extents and write_zeroes); else chunk by chunk, as
zeroing it means reading it, and a write into an item waits for the whole item."""
PLAN_SPAN_BYTES = 1 << 30
"""The planner asks the primary for extents this many bytes at a time."""
FOREGROUND_BYTES = 2 << 20
"""While foreground I/O uses the primary, only this many bytes of chunks are copied at
once (but always one chunk, and at most two)."""
FOREGROUND_PAUSE = 4.0
"""While foreground I/O uses the primary, a worker that held an item's ranges *t* seconds
waits up to this many times *t* for it to stop before the next item."""
FOREGROUND_PAUSE_MAX = 5.0
"""...but never longer than this many seconds (a piece that waited long for an answer)."""
FLUSH_BEHIND_BYTES = 64 << 20
"""The copier starts a flush of the secondary after writing this many bytes to it."""

Item = tuple[int, int, bool]
"""Sectors ``[start, end)`` and whether the planner saw data there."""


class CopyEvents(Protocol):
    """What the copier tells its mirror, and asks it."""

    def going_on(self) -> bool:
        """Whether to go on handing out and copying items."""

    def note_error(self, message: str) -> None:
        """A copy error (to be retried, or the last one before ``fail``)."""

    def fail(self, reason: str) -> None:
        """The copy cannot go on."""

    def copied_more(self) -> None:
        """An item is now in ``copied``."""

    async def flush_secondary(self) -> None:
        """Flush the secondary; a failure fails the copy (what the secondary got since
        the last checkpoint is no longer counted as copied) and is raised."""

    async def flush_primary(self) -> None:
        """Flush the primary (``primary_flush_begins`` is called); a failure is recorded
        for every flush caller of the mirror, fails the copy, and is raised."""

    async def wait_foreground_idle(self) -> None:
        """Return once no foreground request is using the primary, or once the copy no
        longer goes on."""


@dataclass
class Tally:
    """What one sweep planned and did, in bytes (see the module text)."""

    planned: int = 0
    planned_data: int = 0
    swept: int = 0
    swept_data: int = 0

    def data_left(self, uncopied: int) -> int:
        """The data estimated to remain of the ``uncopied`` bytes not copied yet."""
        share = self.planned_data / self.planned if self.planned else 1.0
        beyond = max(0, uncopied - max(0, self.planned - self.swept))
        return max(0, self.planned_data - self.swept_data) + int(beyond * share)


@dataclass(frozen=True)
class Settings:
    """How the copier copies, fixed when the mirror opens (sectors are mirror sectors)."""

    chunk: int
    """Sectors per data item, and per item of holes where zeroing them reads them."""
    rate: int | None
    in_flight: int
    """Workers: items copied at once, at most."""
    retries: int
    backoff: float


class Copier:
    def __init__(
        self,
        primary: Side,
        secondary: Side,
        ranges: RangeLock,
        copy_map: CopyMap,
        events: CopyEvents,
        settings: Settings,
        plane: Plane | None = None,
    ) -> None:
        self._primary, self._secondary = primary, secondary
        self._plane = plane
        """The primary's data plane: blocking connections read in worker threads."""
        self._ranges = ranges
        self._map = copy_map
        self._events = events
        self.settings = settings
        geometry = copy_map.geometry
        self._size, self._sector_size = geometry.size_sectors, geometry.sector_size
        cheap_holes = {Capability.EXTENTS, Capability.WRITE_ZEROES} <= secondary.dev.capabilities
        self._hole_step = settings.chunk * (HOLE_ITEM_CHUNKS if cheap_holes else 1)
        self._throttle = Throttle(settings.rate)
        chunk_bytes = settings.chunk * self._sector_size
        self._pace = Pace(settings.in_flight * chunk_bytes, chunk_bytes, self._sector_size)
        self.foreground_workers = max(1, min(2, FOREGROUND_BYTES // chunk_bytes))
        """Workers that go on copying while foreground I/O uses the primary."""
        self.in_flight = 0
        """Items being copied right now (for statistics)."""
        self._threads = WorkerThreads(settings.in_flight, "blockfuse-copy")
        """The worker threads chunks are copied in (not a device's: a stalled primary
        must not take the threads local files need)."""
        self._flush_behind = FlushBehind(events)
        self._sweeping = False
        self._written_since_plan = IntervalSet()
        """Where foreground writes reached the primary since the planner asked there."""
        self._unflushed = IntervalSet()
        """The chunks foreground writes reached on the primary since the last flush of it
        began: the data plane must not read them before another flush (module text)."""
        self.data_bytes = 0
        """Bytes of data read from the primary and written to the secondary, in all."""
        self.tally = Tally()

    @property
    def rate_limit(self) -> int | None:
        return self._throttle.rate

    def set_rate(self, rate: int | None) -> None:
        """Limit the copy to ``rate`` bytes per second from now on (``None``: no limit)."""
        self._throttle.set_rate(rate)

    def data_left(self, uncopied_bytes: int) -> int:
        return self.tally.data_left(uncopied_bytes)

    async def sweep(self) -> None:
        """One pass over the sectors not yet copied; returns when it is done or stopped."""
        await self._find_secondary_data()
        send, receive = trio.open_memory_channel[Item](0)
        self._sweeping = True
        self.tally = Tally()
        try:
            planned = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._plan, send, planned)
                for index in range(self.settings.in_flight):
                    nursery.start_soon(self._work, receive.clone(), planned, nursery, index)
                await receive.aclose()
        finally:
            self._sweeping = False
            self._written_since_plan = IntervalSet()
            if self._plane is not None:  # the next sweep (after a write) connects anew
                self._plane.close_idle()

    async def verify(self) -> None:
        """Compare every copied range of both sides, chunk by chunk under the range lock,
        and copy again what differs (``verify=full``, before the first sweep: the mirror
        cannot be synced before this ends)."""
        ss, chunk = self._sector_size, self.settings.chunk
        for start, end in self._map.copied_runs():
            for a, b in split(start, end, chunk):
                if not self._events.going_on():
                    return
                async with self._ranges.hold(a, b):
                    if self._map.is_copied(a, b) and not await self._sides_equal(a, b, ss):
                        self._map.uncopy(a, b)
                        self._events.note_error(f"verify: sectors {a}-{b} differ; copying again")

    async def _sides_equal(self, a: int, b: int, ss: int) -> bool:
        one, two = bytearray((b - a) * ss), bytearray((b - a) * ss)
        err = await error_of(self._primary.read(a, [one]))
        err = err or await error_of(self._secondary.read(a, [two]))
        return err is None and one == two

    def primary_written(self, start: int, end: int) -> None:
        """A foreground write to ``[start, end)`` of the primary has ended (called under
        its range lock)."""
        chunks = align_out(start, end, self.settings.chunk)
        self._unflushed.add(*chunks)
        if self._sweeping:
            self._written_since_plan.add(*chunks)

    def primary_flush_begins(self) -> IntervalSet:
        """A flush of the primary begins: what it will make visible on every connection
        (the chunks written until now), taken out of ``_unflushed``."""
        taken, self._unflushed = self._unflushed, IntervalSet()
        return taken

    def primary_flush_failed(self, taken: IntervalSet) -> None:
        """The flush that took ``taken`` failed: those chunks are unflushed still."""
        for a, b in taken:
            self._unflushed.add(a, b)

    async def _find_secondary_data(self) -> None:
        """Where the secondary holds data, asked once: a fresh one has no holes to punch."""
        try:
            await self._secondary.find_data(self._size)
        except BlockError as exc:
            self._events.note_error(f"asking the secondary for extents: {exc}")

    async def _plan(self, send: trio.MemorySendChannel[Item], planned: trio.Event) -> None:
        """Hand out the sweep's items in order; ``planned`` once there are no more."""
        try:
            await self._hand_out(send)
        finally:
            planned.set()

    async def _hand_out(self, send: trio.MemorySendChannel[Item]) -> None:
        span = max(PLAN_SPAN_BYTES // self._sector_size, self.settings.chunk)
        async with send:
            pos = 0
            while self._events.going_on() and (gap := self._map.first_uncopied(pos, self._size)):
                start, end = gap[0], min(gap[1], gap[0] + span)
                self._written_since_plan.discard(start, end)
                data = await self._hint(start, end)
                self.tally.planned += (end - start) * self._sector_size
                self.tally.planned_data += data.total * self._sector_size
                for a, b, is_data in runs(data, start, end):
                    step = self.settings.chunk if is_data else self._hole_step
                    for item_start, item_end in split(a, b, step):
                        if not self._events.going_on():
                            return
                        try:
                            await send.send((item_start, item_end, is_data))
                        except trio.BrokenResourceError:
                            return
                pos = end

    async def _hint(self, start: int, end: int) -> IntervalSet:
        """Where the primary holds data, to plan with (see the module text for when a
        hole item asks again)."""
        try:
            return await self._primary.data_map(start, end)
        except BlockError as exc:
            self._events.note_error(f"asking the primary for extents: {exc}")
            return IntervalSet([(start, end)])

    async def _work(
        self,
        receive: trio.MemoryReceiveChannel[Item],
        planned: trio.Event,
        nursery: trio.Nursery,
        index: int,
    ) -> None:
        buf = bytearray(self.settings.chunk * self._sector_size)  # one per worker, reused
        async with receive:
            while True:
                if index >= self.foreground_workers:
                    await self._wait_for_idle_or_planned(planned)
                try:
                    start, end, is_data = await receive.receive()
                except trio.EndOfChannel:
                    return
                if not self._events.going_on():
                    return
                took = await self._copy_with_retries(start, end, is_data, buf)
                self._flush_behind.maybe_start(nursery)
                if not planned.is_set():  # a next item may come: the foreground first
                    await self._share_with_foreground(took)

    async def _wait_for_idle_or_planned(self, planned: trio.Event) -> None:
        """Until no foreground request uses the primary, or every item has been handed
        out (``planned``): a worker held back takes no item first, which it would keep
        from the workers that go on copying."""
        async with trio.open_nursery() as nursery:

            async def idle() -> None:
                await self._events.wait_foreground_idle()
                nursery.cancel_scope.cancel()

            nursery.start_soon(idle)
            await planned.wait()
            nursery.cancel_scope.cancel()

    async def _share_with_foreground(self, took: float) -> None:
        """After an item that held its ranges for ``took`` seconds: the module text."""
        pause = min(FOREGROUND_PAUSE * took, FOREGROUND_PAUSE_MAX)
        if pause > 0:
            with trio.move_on_after(pause):
                await self._events.wait_foreground_idle()

    async def _copy_with_retries(
        self, start: int, end: int, is_data: bool, buf: bytearray
    ) -> float:
        """Copy the item, trying again as the settings say; the seconds the try that
        succeeded held its ranges (0 where none did)."""
        retries, backoff = self.settings.retries, self.settings.backoff
        tries = retries + 1
        for attempt in range(tries):
            self.in_flight += 1
            held, err = 0.0, None
            try:
                held = await self._copy_item(start, end, is_data, buf)
            except BlockError as exc:
                err = exc
            finally:
                self.in_flight -= 1
            if err is None:
                self._done(start, end, is_data)
                return held
            if not self._events.going_on():
                return 0.0  # another item gave up, or the copy was cancelled: nothing to add
            where = f"copying sectors {start}-{end}: {err}"
            if attempt == retries:
                self._events.note_error(f"{where} (try {tries} of {tries})")
                self._events.fail(f"{where} (gave up after {tries} tries)")
                return 0.0
            pause = backoff * 2**attempt
            self._events.note_error(f"{where} (try {attempt + 1} of {tries}; again in {pause:g} s)")
            await trio.sleep(pause)
            if not self._events.going_on():
                return 0.0
        return 0.0

    def _done(self, start: int, end: int, is_data: bool) -> None:
        nbytes = (end - start) * self._sector_size
        self.tally.swept += nbytes
        if is_data:
            self.tally.swept_data += nbytes
        self._events.copied_more()

    async def _copy_item(self, start: int, end: int, is_data: bool, buf: bytearray) -> float:
        """Copy the item; the seconds it held its ranges (not counting waits for the
        rate limit, the pace or the lock)."""
        if is_data:
            pos, held = start, 0.0
            while pos < end:  # the piece size follows the pace as the item goes on
                stop = min(end, pos + self._pace.piece_bytes // self._sector_size)
                held += await self._copy_piece(pos, stop, buf)
                pos = stop
            return held
        async with self._ranges.hold(start, end):
            locked = trio.current_time()
            if not self._events.going_on():
                return 0.0  # cancelled while this item waited for its range
            for a, b in self._map.uncopied_parts(start, end):
                if self._written_since_plan.intersection(a, b):  # the plan may be old
                    await self._copy_by_extents(a, b, buf)
                else:
                    await self._zero_secondary(a, b)
                self._map.mark_copied(a, b)
            return trio.current_time() - locked

    async def _copy_piece(self, start: int, end: int, buf: bytearray) -> float:
        """Copy ``[start, end)`` of data under its range lock, paced (``pace.py``); the
        seconds it held the lock."""
        nbytes = (end - start) * self._sector_size
        await self._throttle.take(nbytes)  # before the lock: a write must not wait for it
        began = await self._pace.enter(nbytes)
        held = 0.0
        try:
            async with self._ranges.hold(start, end):
                locked = trio.current_time()
                if not self._events.going_on():
                    return 0.0  # cancelled while this piece waited for its range
                for a, b in self._map.uncopied_parts(start, end):
                    await self._copy_data(a, b, buf)
                    self._map.mark_copied(a, b)
                held = trio.current_time() - locked
        finally:
            self._pace.leave(nbytes, began, held)
        return held

    async def _copy_by_extents(self, start: int, end: int, buf: bytearray) -> None:
        """Copy the primary's data and zero its holes, asking its extents now."""
        data = await self._primary.data_map(start, end)
        for a, b, holds_data in runs(data, start, end):
            await (self._copy_data(a, b, buf) if holds_data else self._zero_secondary(a, b))

    async def _copy_data(self, start: int, end: int, buf: bytearray) -> None:
        for a, b in split(start, end, self.settings.chunk):
            view = memoryview(buf)[: (b - a) * self._sector_size]
            if not await self._copy_through_plane(a, view):
                await self._primary.read(a, [view])
                await self._secondary.write(a, [view], exact=True)
                await self._secondary.write_behind(a, b - a)
            self._flush_behind.wrote(len(view))
            self.data_bytes += len(view)

    async def _copy_through_plane(self, sector: int, view: memoryview) -> bool:
        """Copy a chunk through the data plane, if there is one (``transport/blocking.py``):
        read in a worker thread, and written in the same one where the secondary writes
        in threads (``write_filled``).  False if there is none, or it failed: then the
        copy goes on reading as the foreground does (with its reconnects), and the plane
        is not used again."""
        plane = self._plane
        if plane is None:
            return False
        if self._unflushed.intersection(sector, sector + len(view) // self._sector_size):
            await self._events.flush_primary()  # so that the plane's connection sees them
        offset = sector * self._sector_size

        def fill(into: memoryview) -> None:
            try:
                plane.read_into(into, offset)
            except Exception as exc:  # whatever it is, the plane failed
                raise PlaneFailed(exc) from exc

        try:
            await self._secondary.write_filled(sector, view, fill, self._threads)
        except PlaneFailed as failed:
            if self._plane is plane:
                self._plane = None
                plane.close()
                self._events.note_error(f"reading the primary in worker threads: {failed.error}")
            return False
        return True

    def close(self) -> None:
        """Close the data plane's idle connections (once the copier has stopped)."""
        if self._plane is not None:
            self._plane.close()

    async def _zero_secondary(self, start: int, end: int) -> None:
        """Make ``[start, end)`` read as zeroes on the secondary, keeping holes holes."""
        for piece_start, piece_end in self._secondary.may_hold_data(start, end):
            for a, b in await self._secondary.data_map(piece_start, piece_end):
                await self._write_zeroes(a, b)

    async def _write_zeroes(self, start: int, end: int) -> None:
        side = self._secondary
        if Capability.WRITE_ZEROES in side.dev.capabilities:
            await side.dev.write_zeroes(start * side.ratio, (end - start) * side.ratio)
            return
        for a, b in split(start, end, self.settings.chunk):
            buf = bytearray((b - a) * self._sector_size)
            await side.read(a, [buf])
            if buf.count(0) != len(buf):
                await side.write(a, [bytes(len(buf))])


class PlaneFailed(Exception):
    """The data plane could not read a chunk (not a ``BlockError``: no device raised it,
    and the chunk is read again without the plane)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class FlushBehind:
    """Every ``FLUSH_BEHIND_BYTES`` written to the secondary, a flush of it starts, one at
    a time, while the copy goes on (see the module text)."""

    def __init__(self, events: CopyEvents) -> None:
        self._events = events
        self._unflushed = 0
        self._flushing = False

    def wrote(self, nbytes: int) -> None:
        self._unflushed += nbytes

    def maybe_start(self, nursery: trio.Nursery) -> None:
        if self._unflushed >= FLUSH_BEHIND_BYTES and not self._flushing:
            self._flushing, self._unflushed = True, 0
            nursery.start_soon(self._flush)

    async def _flush(self) -> None:
        try:
            await error_of(self._events.flush_secondary())  # a failure fails the copy
        finally:
            self._flushing = False
