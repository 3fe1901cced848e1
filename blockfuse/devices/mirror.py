"""mirror(PRIMARY, SECONDARY): use PRIMARY at once while a background copier fills SECONDARY.

After MirageOS's ``Mirage_block_mirror``, made correct.  Writes go to the primary and,
where the copy has reached, to the secondary; reads come from the primary.  A copier
copies the rest chunk by chunk, several chunks in flight, skipping the ranges the
primary reports as holes.  Once every sector is copied the mirror is *synced*: reads
then come from the secondary (equal by the invariant below, and usually local), writes
still go to both, and ``pivot`` detaches the primary so the secondary serves alone.

The invariant (sectors are mirror sectors, the larger of the two sector sizes)::

    For every sector s that no range-lock holder covers:
        s in copied  =>  secondary[s] == primary[s]

Every change to either side happens under the range lock on the sectors it changes,
and puts the invariant back before it lets go:

- the copier, per item: lock [a, b); read the data and write it on the secondary, or,
  for a run the planner saw as holes, zero it there -- after asking the primary's
  extents again *under the lock* if a foreground write touched it since the planner
  asked; add [a, b) to ``copied``.
- a foreground write of [w, x): lock [w, x) -- the whole range, so a write that starts
  before a chunk in flight and runs into it waits for that chunk too; write the
  primary and, at once, the secondary for ``copied ∩ [w, x)``; unlock.  If the
  secondary part fails, that part leaves ``copied`` and will be copied again.

::

      copier        [====chunk k (locked)====][====chunk k+1 (locked)====]
      write             [~~~~~~~~~~~~ w ~~~~~~~~~~~~~~~]
                        waits for both chunks, then goes to both sides

Holders of overlapping ranges take turns in the order they asked (``RangeQueue`` in
``mirrorparts``), so a stream of writes cannot starve the copier and the copier cannot
starve a write.  A write either ends before a chunk reads the primary (the chunk
copies the new data) or starts after the chunk is in ``copied`` (the write reaches
the secondary): no interleaving leaves old data on the secondary.

Errors are never swallowed: a failed item is retried with backoff a bounded number of
times, then the state becomes ``failed: REASON``, the copier stops, ``wait_synced``
raises ``MirrorFailed``, and foreground I/O goes on against the primary.  The copier
itself (planning, retries, holes) is ``copier.py``; resuming after a crash is
``copymap.py``'s job (its own invariant is at its top).
"""

from __future__ import annotations

import enum
import errno
import math
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from ..block import BlockDevice, Buffer, Capability, Extent, Info, total_length
from ..errors import BlockError, Disconnected, RequestFailed, Unreachable
from .copier import Copier
from .copymap import CopyMap, Geometry
from .mirrorparts import RangeQueue, Side, outcome, run_both, slice_buffers, spread

DEFAULT_CHUNK = 4 << 20
"""Copying 2 GiB from nbdkit (bench_mirror.py, 2 cores), 4 MiB chunks with 4 in flight
had the higher median in 7 of 8 runs against 1 MiB chunks with 16 in flight (the old
default): 0.58x-0.91x nbdcopy against 0.31x-0.71x; 2 MiB x 8 and 8 MiB x 2 or 4 fell
between.  A foreground write that overlaps an item being copied waits for it: a chunk
of data, or a run of holes (quick, unless writes put data there since the planner
looked)."""
MAX_CHUNK = 64 << 20
"""The largest chunk: each chunk in flight is a buffer in memory."""
IN_FLIGHT_BYTES = 16 << 20
"""The copier keeps this many bytes of chunks in flight, in 2 to 16 chunks.  (More
small chunks queue more ahead of foreground requests on a slow link: 64 chunks of
256 KiB behind nbdkit's rate filter at 160 MB/s let the copy end before mkfs did.)"""
RESUME_SAMPLE_BYTES = 64 << 10
"""A resumed copy compares this much of each side, four times, before the disk appears
(whole 4 MiB chunks kept a mount 21 s from appearing behind a 1 MB/s source)."""
DEFAULT_RETRIES = 5
DEFAULT_BACKOFF = 0.2
CHECKPOINT_SECONDS = 2.0
STOP_GRACE_SECONDS = 10.0

T = TypeVar("T")

Progress = int | str
"""What the progress callback gets: a whole percent (0 first), then ``"complete"`` once."""


class MirrorState(enum.Enum):
    COPYING = "copying"
    SYNCED = "synced"
    FAILED = "failed"
    PIVOTED = "pivoted"


class MirrorRefused(ValueError):
    """The two devices cannot form a mirror; nothing was written.  One line, says why."""


class MirrorFailed(BlockError):
    """The copy failed after its retries; the message is the reason."""


@dataclass(frozen=True)
class MirrorStatistics:
    state: MirrorState
    reason: str
    """Why the copy failed (``""`` unless ``state`` is ``FAILED``)."""
    copied_bytes: int
    total_bytes: int
    rate: float
    """Bytes per second over the last few seconds of copying."""
    eta: float | None
    errors: int
    """Copy errors met so far (each retried or fatal)."""
    last_error: str
    chunks_in_flight: int
    notice: str = ""
    """Something the user should know that is not an error (a saved map not used)."""

    @property
    def percent(self) -> int:
        return _percent(self.copied_bytes, self.total_bytes)

    @property
    def state_text(self) -> str:
        if self.state is MirrorState.FAILED:
            return f"failed: {self.reason}"
        return str(self.state.value)


def _percent(done: int, total: int) -> int:
    return 100 if total == 0 else done * 100 // total


class MirrorDevice(BlockDevice):
    """Built by ``start_mirror``/``open_mirror``; do not construct directly."""

    kind = "mirror"

    def __init__(
        self,
        primary: Side,
        secondary: Side,
        info: Info,
        copy_map: CopyMap,
        *,
        chunk: int,
        rate: int | None,
        in_flight: int,
        retries: int,
        backoff: float,
        progress: Callable[[Progress], None] | None,
    ) -> None:
        self._primary, self._secondary = primary, secondary
        self._info = info
        self._map = copy_map
        self._chunk = chunk // info.sector_size
        self._progress = progress
        self._retries, self._backoff = retries, backoff
        self._secondary_flushes = trio.Lock()
        self._lock = RangeQueue()
        self._copier = Copier(
            primary, secondary, self._lock, copy_map, self,
            chunk=self._chunk, rate=rate, in_flight=in_flight, retries=retries, backoff=backoff,
        )  # fmt: skip
        self._state = MirrorState.COPYING
        self._reason = ""
        self._errors, self._last_error = 0, ""
        self._notice = ""
        self._reported = -1
        self._complete_sent = False
        self._samples: deque[tuple[float, int]] = deque(maxlen=64)
        self._wake = trio.Event()
        self._synced = trio.Event()
        self._stopping = False
        self._closed = False
        self._copier_scope = trio.CancelScope()
        self._copier_done = trio.Event()
        self._copier_started = False
        self._primary_users = 0
        self._primary_idle = trio.Event()
        self.capabilities = frozenset(primary.dev.capabilities & {Capability.EXTENTS})

    # --- the block contract ------------------------------------------------------------

    async def get_info(self) -> Info:
        self._check_open()
        return self._info

    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        self._check_open()
        if self._state is MirrorState.PIVOTED:
            return await self._secondary.read(sector, buffers)
        end = sector + total_length(buffers) // self._info.sector_size
        if self._state is MirrorState.SYNCED and self._map.copied.covers(sector, end):
            err = await outcome(self._secondary.read(sector, buffers))  # equal, and local
            if err is None:
                return
            self.note_error(f"reading the secondary: {err}")
            if self._pivoted():  # the primary was closed meanwhile
                raise err
        self._primary_users += 1
        try:
            await self._primary.read(sector, buffers)
        finally:
            self._release_primary()

    async def write(self, sector: int, buffers: Sequence[Buffer]) -> None:
        self._check_open()
        if self._state is MirrorState.PIVOTED:
            return await self._secondary.write(sector, buffers)
        end = sector + total_length(buffers) // self._info.sector_size
        async with self._lock.hold(sector, end):
            if self._pivoted():  # pivoted while we waited
                return await self._secondary.write(sector, buffers)
            await self._write_both(sector, end, buffers)

    async def _write_both(self, sector: int, end: int, buffers: Sequence[Buffer]) -> None:
        both = self._map.copied.intersection(sector, end)
        span = self._map.begin_write(sector, end)
        self._primary_users += 1
        try:
            if both:
                await self._map.mark_dirty(span)
            ss = self._info.sector_size
            primary_err, secondary_err = await run_both(
                self._primary.write(sector, buffers),
                self._write_parts(both, sector, buffers, ss),
            )
        except BaseException:  # cancelled half way: the sides may differ
            if both:
                self._uncopy(sector, end, None)
            raise
        finally:
            self._copier.primary_written(sector, end)  # still under the lock
            self._map.end_write(span)
            self._release_primary()
        if primary_err is not None or secondary_err is not None:
            self._uncopy(sector, end, secondary_err)
        if primary_err is not None:
            raise primary_err

    async def _write_parts(
        self, parts: list[tuple[int, int]], sector: int, buffers: Sequence[Buffer], ss: int
    ) -> None:
        for a, b in parts:
            await self._secondary.write(
                a, slice_buffers(buffers, (a - sector) * ss, (b - sector) * ss)
            )

    def _uncopy(self, start: int, end: int, err: BlockError | None) -> None:
        """The two sides may differ on ``[start, end)``: copy it again."""
        if err is not None:
            self.note_error(f"writing the secondary: {err}")
        self._map.copied.discard(start, end)
        if self._state is MirrorState.SYNCED:
            self._state = MirrorState.COPYING
            self._synced = trio.Event()
        self._wake.set()

    async def flush(self) -> None:
        self._check_open()
        if self._state is MirrorState.PIVOTED:
            return await self._secondary.dev.flush()
        await self._using_primary(self._map.checkpoint(self._flush_both))

    async def _using_primary(self, call: Awaitable[T]) -> T:
        """``call``, counted as a user of the primary (a pivot waits for it to end).

        The caller checks that the mirror is not pivoted just before, with no await
        in between."""
        self._primary_users += 1
        try:
            return await call
        finally:
            self._release_primary()

    async def _flush_both(self) -> None:
        """Flush both sides; a failure of either means the map can no longer vouch for
        what was written since the last checkpoint (copymap.py, rule 4): the copy fails.
        A flush that could not reach its device (``Unreachable``) lost nothing by itself:
        it only fails the checkpoint (a reconnect that finds writes lost says so)."""
        primary_err, _ = await run_both(self._primary.dev.flush(), self.flush_secondary())
        if primary_err is not None:  # the user's fsync fails; a secondary's only the copy
            if not isinstance(primary_err, Unreachable):
                self._flush_failed("primary", primary_err)
            raise primary_err

    async def flush_secondary(self) -> None:
        """Flush the secondary, one flush at a time, its failure reported before the next
        starts (so a checkpoint after a failed flush-behind sees the failure)."""
        async with self._secondary_flushes:
            err = await outcome(self._secondary.dev.flush())
            if err is not None:
                if isinstance(err, Unreachable):
                    self.note_error(f"flushing the secondary: {err}")
                else:
                    self._flush_failed("secondary", err)
                raise err

    async def extents(self, sector: int, count: int) -> list[Extent]:
        self._check_open()
        if self._state is MirrorState.PIVOTED:
            data = await self._secondary.data_map(sector, sector + count)
        else:
            data = await self._using_primary(self._primary.data_map(sector, sector + count))
        pieces = [Extent(a, b - a, True) for a, b in data]
        pieces += [Extent(a, b - a, False) for a, b in data.gaps(sector, sector + count)]
        return sorted(pieces, key=lambda e: e.sector)

    async def aclose(self) -> None:
        """Stop the copier at a chunk edge, flush both sides, save the map, close both."""
        if self._closed:
            return
        with trio.CancelScope(shield=True):
            await self._stop_copier()
            if self._state is MirrorState.PIVOTED:
                err = await outcome(self._secondary.dev.flush())
            else:
                err = await outcome(self._map.checkpoint(self._flush_both))
            if err is not None:
                self.note_error(f"flushing at close: {err}")
            self._closed = True
            await self._primary.dev.aclose()
            await self._secondary.dev.aclose()

    def status(self) -> dict[str, str]:
        st = self.statistics()
        out = {
            "state": st.state_text,
            "progress": str(st.percent),
            "copied": str(st.copied_bytes),
            "total": str(st.total_bytes),
            "rate": str(int(st.rate)),
            "eta": "" if st.eta is None else str(math.ceil(st.eta)),
            "errors": str(st.errors),
        }
        if st.last_error:
            out["last_error"] = st.last_error
        if st.notice:
            out["notice"] = st.notice
        return out

    async def control(self, key: str, value: bytes) -> bool:
        if key != "pivot":
            return False
        await self.pivot()
        return True

    def _pivoted(self) -> bool:
        return self._state is MirrorState.PIVOTED

    def _check_open(self) -> None:
        if self._closed:
            raise Disconnected("the mirror is closed")

    def _release_primary(self) -> None:
        self._primary_users -= 1
        if self._primary_users == 0:
            self._wake_idle_waiters()

    def _wake_idle_waiters(self) -> None:
        """Wake whoever waits for the primary to be idle; each one checks again why."""
        self._primary_idle.set()
        self._primary_idle = trio.Event()

    # --- what users of the mirror see ----------------------------------------------------

    def statistics(self) -> MirrorStatistics:
        copied = self._map.copied.total * self._info.sector_size
        total = self._info.size_bytes
        rate = self._rate() if self._state is MirrorState.COPYING else 0.0
        eta = (total - copied) / rate if rate > 0 else None
        if self._state in (MirrorState.SYNCED, MirrorState.PIVOTED):
            eta = 0.0
        return MirrorStatistics(
            self._state, self._reason, copied, total, rate, eta,
            self._errors, self._last_error, self._copier.in_flight, self._notice,
        )  # fmt: skip

    def _rate(self) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in self._samples if now - t < 10]
        if len(recent) < 2 or recent[-1][0] <= recent[0][0]:
            return 0.0
        return (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])

    async def wait_synced(self) -> None:
        """Return once synced (or pivoted); raise ``MirrorFailed`` if the copy failed."""
        while True:
            if self._state in (MirrorState.SYNCED, MirrorState.PIVOTED):
                return
            if self._state is MirrorState.FAILED:
                raise MirrorFailed(self._reason)
            if self._stopping:
                raise Disconnected("the mirror was closed before it synced")
            await self._synced.wait()

    async def pivot(self) -> None:
        """Detach the primary: from now on the secondary alone serves all I/O.

        Refused (``RequestFailed(EBUSY)``) unless synced.  Waits for writes and reads in
        flight, flushes both sides, saves the map, then closes the primary.
        """
        self._check_open()
        if self._state is MirrorState.PIVOTED:
            return
        self._check_pivotable()
        async with self._lock.hold(0, self._info.size_sectors):
            self._check_pivotable()
            await self._using_primary(self._map.checkpoint(self._flush_both))
            self._check_pivotable()
            await self._map.save_pivoted()  # a remount must not copy the old primary back
            self._state = MirrorState.PIVOTED
        self._wake.set()
        self._synced.set()
        while self._primary_users:
            await self._primary_idle.wait()
        await self._primary.dev.aclose()

    def _check_pivotable(self) -> None:
        if self._state is not MirrorState.SYNCED:
            st = self.statistics()
            raise RequestFailed(
                errno.EBUSY,
                f"cannot pivot: the mirror is {st.state_text} ({st.percent}% copied); "
                "pivot once it is synced",
            )

    async def check_resumed_copy(self, samples: int = 4) -> None:
        """Compare a few samples of what a saved map says is copied; on a difference,
        start over.  Samples are small: this runs before the disk appears.

        Catches a map kept while its secondary was replaced by another file that the
        file identity cannot tell apart (a new file may reuse the old inode number).
        """
        ss = self._info.sector_size
        sample = min(self._chunk, RESUME_SAMPLE_BYTES // ss)
        for a, b in spread(self._map.copied, samples, sample):
            n = b - a
            one, two = bytearray(n * ss), bytearray(n * ss)
            await self._primary.read(a, [one])
            await self._secondary.read(a, [two])
            if one != two:
                self._map.forget(f"sectors {a}-{a + n} differ from the saved map; copying anew")
                break
        if self._map.forgotten:
            self._notice = self._map.forgotten
            await self._map.save_now()  # a crash from now on must not trust the old map

    # --- the copier ----------------------------------------------------------------------

    async def run_copier(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Copy until synced, keep the copy whole until pivot or ``aclose``.

        Runs in a nursery its owner can see (``start_mirror``/``open_mirror``).  Copy
        errors end in the ``failed`` state, not in an exception; a bug raises.
        """
        self._copier_started = True
        try:
            with self._copier_scope:
                task_status.started()
                self._report_progress()
                async with trio.open_nursery() as nursery:
                    if self._map.persistent:
                        nursery.start_soon(self._checkpoint_loop)
                    await self._copy_until_stopped()
                    nursery.cancel_scope.cancel()
        finally:
            self._copier_done.set()

    async def _copy_until_stopped(self) -> None:
        while not self._stopping and self._state is not MirrorState.PIVOTED:
            if self._state is MirrorState.FAILED:
                return
            if self._map.copied.covers(0, self._info.size_sectors):
                await self._become_synced()
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            await self._copier.sweep()

    async def _become_synced(self) -> None:
        if self._state is MirrorState.COPYING:
            await self._checkpoint_with_retries()
        if self._state is not MirrorState.COPYING or not self._map.copied.covers(
            0, self._info.size_sectors
        ):
            return
        self._state = MirrorState.SYNCED
        self._synced.set()
        self._report_progress()
        if not self._complete_sent and self._progress is not None:
            self._complete_sent = True
            self._progress("complete")

    async def _checkpoint_with_retries(self) -> None:
        """Flush both sides and save the map at the end of the copy, as a copy item is
        retried: with backoff, ``retries`` times, then the copy fails."""
        for attempt in range(self._retries + 1):
            err = await outcome(self._map.checkpoint(self._flush_both))
            if err is None or self._state is not MirrorState.COPYING:
                return
            where = f"making the copy durable: {err}"
            self.note_error(where)
            if attempt == self._retries:
                return self.fail(
                    f"{where} (the copy gave up after {self._retries} retries of its own)"
                )
            await trio.sleep(self._backoff * 2**attempt)

    async def _checkpoint_loop(self) -> None:
        while True:
            await trio.sleep(CHECKPOINT_SECONDS)
            if not self._pivoted():
                err = await outcome(self._using_primary(self._map.checkpoint(self._flush_both)))
                if err is not None:
                    self.note_error(f"checkpoint: {err}")

    async def _stop_copier(self) -> None:
        self._stopping = True
        self._wake.set()
        self._synced.set()
        self._wake_idle_waiters()
        if not self._copier_started:
            return
        with trio.move_on_after(STOP_GRACE_SECONDS):
            await self._copier_done.wait()
        self._copier_scope.cancel()
        await self._copier_done.wait()

    # --- state and progress (``CopyEvents`` for the copier) -------------------------------

    def going_on(self) -> bool:
        return not self._stopping and self._state is MirrorState.COPYING

    def note_error(self, message: str) -> None:
        self._errors += 1
        self._last_error = message

    def fail(self, reason: str) -> None:
        if self._state is MirrorState.PIVOTED:
            return
        self._state, self._reason = MirrorState.FAILED, reason
        self._synced.set()
        self._wake.set()
        self._wake_idle_waiters()

    def _flush_failed(self, side: str, err: BaseException) -> None:
        """What ``side`` got since the last checkpoint may be lost: fail the copy."""
        self._map.distrust_flushes()
        self.fail(f"flushing the {side}: {err}")

    def copied_more(self) -> None:
        self._report_progress()

    async def wait_foreground_idle(self) -> None:
        while self._primary_users and self.going_on():
            await self._primary_idle.wait()

    def _report_progress(self) -> None:
        copied = self._map.copied.total * self._info.sector_size
        self._samples.append((time.monotonic(), copied))
        percent = _percent(copied, self._info.size_bytes)
        while self._reported < percent:
            self._reported += 1
            if self._progress is not None:
                self._progress(self._reported)


# --- opening -------------------------------------------------------------------------------


def _identity(dev: BlockDevice) -> str | None:
    """``DEV:INO`` of the file under ``dev``, if it stands on one."""
    layer: BlockDevice | None = dev
    while layer is not None:
        path = getattr(layer, "path", None)
        if isinstance(path, str):
            try:
                st = os.stat(path)
            except OSError:
                return None
            return f"{st.st_dev}:{st.st_ino}"
        layer = layer.inner
    return None


async def check_pair(primary: BlockDevice, secondary: BlockDevice, chunk: int) -> Info:
    """The mirror's geometry, or ``MirrorRefused`` saying why these two cannot mirror."""
    p, s = await primary.get_info(), await secondary.get_info()
    if primary is secondary or (_identity(primary) or 0) == (_identity(secondary) or 1):
        raise MirrorRefused("the secondary is the primary itself; mirror onto another device")
    if not s.read_write:
        raise MirrorRefused("the secondary is read-only; the mirror must write to it")
    big, small = max(p.sector_size, s.sector_size), min(p.sector_size, s.sector_size)
    if big % small:
        raise MirrorRefused(
            f"sector sizes {p.sector_size} (primary) and {s.sector_size} (secondary) "
            "are not multiples of each other"
        )
    if p.size_bytes != s.size_bytes:
        raise MirrorRefused(
            f"the primary is {p.size_bytes} bytes and the secondary {s.size_bytes}; "
            "they must be the same size"
        )
    if chunk <= 0 or chunk % big:
        raise MirrorRefused(f"chunk {chunk} is not a whole number of {big}-byte sectors")
    if chunk > MAX_CHUNK:
        raise MirrorRefused(too_big_chunk(chunk))
    return Info(p.read_write, big, p.size_bytes // big)


async def prepare_mirror(
    primary: BlockDevice,
    secondary: BlockDevice,
    *,
    state: str | None = None,
    chunk: int = DEFAULT_CHUNK,
    rate: int | None = None,
    in_flight: int | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    progress: Callable[[Progress], None] | None = None,
) -> MirrorDevice:
    """Check the pair and load the map at ``state``; the copier is not running yet.

    Raises ``MirrorRefused`` or ``CopyMapError`` (both ``ValueError``) before anything is
    written; the caller then still owns both devices.  Otherwise the mirror owns them
    (its ``aclose`` closes them) and the caller runs ``mirror.run_copier`` in a nursery
    (``start_mirror`` and ``open_mirror`` do).
    """
    info = await check_pair(primary, secondary, chunk)
    geometry = Geometry(info.size_sectors, info.sector_size, chunk // info.sector_size)
    copy_map = CopyMap.open(geometry, state, _identity(secondary) or "")
    p_info, s_info = await primary.get_info(), await secondary.get_info()
    mirror = MirrorDevice(
        Side(primary, p_info, info.sector_size),
        Side(secondary, s_info, info.sector_size, chunk // info.sector_size),
        info, copy_map, chunk=chunk, rate=rate, in_flight=in_flight or default_in_flight(chunk),
        retries=retries, backoff=backoff, progress=progress,
    )  # fmt: skip
    await mirror.check_resumed_copy()
    return mirror


def too_big_chunk(chunk: int) -> str:
    return (
        f"mirror chunk {chunk} bytes is more than {MAX_CHUNK >> 20} MiB: each chunk in "
        "flight is held in memory (leave it out for 4M)"
    )


def default_in_flight(chunk: int) -> int:
    """How many chunks of ``chunk`` bytes the copier copies at once."""
    return max(2, min(16, IN_FLIGHT_BYTES // chunk))


async def start_mirror(
    nursery: trio.Nursery, primary: BlockDevice, secondary: BlockDevice, **options: Any
) -> MirrorDevice:
    """``prepare_mirror``, then start its copier in ``nursery``; options as there."""
    mirror = await prepare_mirror(primary, secondary, **options)
    await nursery.start(mirror.run_copier)
    return mirror


@asynccontextmanager
async def open_mirror(
    primary: BlockDevice, secondary: BlockDevice, **options: Any
) -> AsyncIterator[MirrorDevice]:
    """``async with open_mirror(p, s) as m: ... await m.wait_synced()``; closes ``m`` at the end.

    The copier runs in a nursery of its own for the body of the block.  An ordinary
    exception from the body leaves the block as itself, not wrapped in an exception
    group, so a caller that enters this through an ``AsyncExitStack`` can still catch
    its own errors; a bug in the copier ends the block with an exception group.
    """
    mirror = await prepare_mirror(primary, secondary, **options)
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(mirror.run_copier)
        try:
            yield mirror
        except Exception as exc:
            failure = exc
        finally:
            await mirror.aclose()
    if failure is not None:
        raise failure
