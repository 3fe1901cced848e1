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
  asked; ``mark_copied(a, b)``.
- a foreground write of [w, x): lock [w, x) -- the whole range, so a write that starts
  before a chunk in flight and runs into it waits for that chunk too; write the
  primary and, at once, the secondary for ``copied ∩ [w, x)``; unlock.  If the
  secondary part fails, that part is ``uncopy``-ed and will be copied again.

::

      copier        [====chunk k (locked)====][====chunk k+1 (locked)====]
      write             [~~~~~~~~~~~~ w ~~~~~~~~~~~~~~~]
                        waits for both chunks, then goes to both sides

Holders of overlapping ranges take turns in the order they asked (``RangeLock``), so a
stream of writes cannot starve the copier and the copier cannot starve a write.  A
write either ends before a chunk reads the primary (the chunk copies the new data) or
starts after the chunk is in ``copied`` (the write reaches the secondary): no
interleaving leaves old data on the secondary.

Only two parties change ``copied`` (it is private to the copy map): the copier adds
what it copied, under the lock, and whoever finds the two sides may differ (a write
whose secondary part failed, a failed flush) takes it out.

Reads take no range lock.  Before the mirror is synced they go to the primary, which
always holds the newest data; once synced, to the secondary for ranges that are copied
(equal by the invariant), with the primary as the fallback when the secondary fails.
A read racing a write may see either version, as on any disk.

Errors are never swallowed: a failed item is retried with backoff a bounded number of
times, then the state becomes ``failed`` (the reason in ``last_error``), the copier
stops, ``wait_synced`` raises ``MirrorFailed``, and foreground I/O goes on against the
primary.

Controls, while the mirror runs (``control``: the ``user.blockfuse.*`` writes):
``retry`` starts a failed (or cancelled) copy again from what is copied; ``rate_limit``
changes the copier's limit at once; ``cancel`` gives the copy up: the primary serves
alone and the secondary is not written again.  A cancel holds the range lock on the
whole device while it stops the copier and flushes both sides with a checkpoint (like
a pivot), so no write and no copy item straddles it.  After it, a write does not reach
the secondary, so the invariant is kept by taking its range out of ``copied`` first
(after ``mark_dirty``, as for any write to copied data): the map keeps vouching only
for what the secondary holds, and a remount (or a retry) copies the rest.  Nothing new
is copied while cancelled, so ``flush`` flushes the primary alone: a slow or broken
secondary, often the reason for a cancel, no longer holds anybody's ``fsync``.  The state
machine and the progress are ``state.py``; the copier (planning, retries, holes) is
``copier.py``; resuming after a crash is ``copymap.py``'s job (its own invariant is at
its top); opening and checking a pair is ``opening.py``.  What stays here is the
device's I/O routing and its copier's life, which the invariant above ties together
(hence the module's length, this essay included).
"""

from __future__ import annotations

import errno
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import NoReturn, TypeVar

import trio

from ...block import (
    BlockDevice,
    Buffer,
    Capability,
    Extent,
    FlushCursor,
    Info,
    merged_status,
    total_length,
)
from ...buffers import slice_views
from ...errors import BlockError, Disconnected, RequestFailed, Unreachable
from ...filerange import FileRange
from ...log import Repeats, left_out
from ...rangelock import RangeLock
from ...transport.blocking import Plane
from ...units import format_size, parse_bytes
from .copier import Copier, Settings
from .copymap import CopyMap
from .parts import Side, Task, Users, error_of, run_both, signature
from .state import CopyState, Event, MirrorState, MirrorStatistics, Progress, refusal

CHECKPOINT_SECONDS = 2.0
STOP_GRACE_SECONDS = 10.0
NO_LIMIT = ("none", "off", "unlimited")
"""What a ``rate_limit`` write may say for no limit at all."""

log = logging.getLogger(__name__)

T = TypeVar("T")


class MirrorFailed(BlockError):
    """The copy failed after its retries; the message is the reason."""


class MirrorDevice(BlockDevice):
    """Built by ``prepare_mirror``/``start_mirror``/``open_mirror``; do not construct directly."""

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
        notice: str = "",
        verify_first: bool = False,
        plane: Plane | None = None,
    ) -> None:
        self._primary, self._secondary = primary, secondary
        self._info = info
        self._map = copy_map
        self._ranges = RangeLock()
        self._copy = CopyState(info.size_bytes, progress)
        self._copy.notice = notice
        self._verify_first = verify_first
        copy_map.watch_store(on_failure=self.fail)
        settings = Settings(chunk // info.sector_size, rate, in_flight, retries, backoff)
        self._copier = Copier(primary, secondary, self._ranges, copy_map, self, settings, plane)
        self._copier_task = Task()
        self._primary_flushes = FlushCursor(primary.dev)
        self._secondary_flushes = FlushCursor(secondary.dev)
        self._secondary_flush_lock = trio.Lock()
        self._primary_users = Users()
        self._error_lines = Repeats()
        self.capabilities = frozenset(primary.dev.capabilities & {Capability.EXTENTS})

    @property
    def label(self) -> str:
        """The name the mirror goes by in log lines (its front end sets it)."""
        return self._copy.label

    @label.setter
    def label(self, name: str) -> None:
        self._copy.label = name

    # --- the block contract ------------------------------------------------------------

    async def get_info(self) -> Info:
        self._check_open()
        return self._info

    async def read(self, sector: int, buffers: Sequence[Buffer]) -> None:
        self._check_open()
        if self._copy.pivoted:
            return await self._secondary.read(sector, buffers)
        end = sector + total_length(buffers) // self._info.sector_size
        if self._copy.state is MirrorState.SYNCED and self._map.is_copied(sector, end):
            err = await error_of(self._secondary.read(sector, buffers))  # equal, and local
            if err is None:
                return
            self.note_error(f"reading the secondary: {err}")
            if self._copy.pivoted:  # the primary was closed meanwhile
                raise err
        await self._using_primary(self._primary.read(sector, buffers))

    def lend(self, sector: int, count: int) -> FileRange | None:
        """The secondary's range where ``read`` would read the sectors from it (pivoted,
        or synced with them copied) and it lends; ``None`` otherwise.  A send from it
        that fails leaves the secondary lending no more, so the client's retry is a
        ``read``, which falls back to the primary."""
        if self._copy.closed:
            return None
        synced = self._copy.state is MirrorState.SYNCED
        if self._copy.pivoted or (synced and self._map.is_copied(sector, sector + count)):
            return self._secondary.lend(sector, count)
        return None

    async def write(self, sector: int, buffers: Sequence[Buffer]) -> None:
        self._check_open()
        if self._copy.pivoted:
            return await self._secondary.write(sector, buffers)
        end = sector + total_length(buffers) // self._info.sector_size
        async with self._ranges.hold(sector, end):
            if self._copy.pivoted:  # pivoted while we waited
                return await self._secondary.write(sector, buffers)
            if self._copy.cancelled:
                return await self._write_primary_alone(sector, end, buffers)
            await self._write_both(sector, end, buffers)

    async def _write_primary_alone(self, sector: int, end: int, buffers: Sequence[Buffer]) -> None:
        """Cancelled: only the primary is written, and what was copied of the range is
        not any more (marked dirty in the map first, as for any write to copied data)."""
        self._map.refuse_if_frozen((sector, end))
        span = self._map.begin_write(sector, end)
        self._primary_users.enter()
        try:
            if self._map.copied_parts(sector, end):
                await self._map.mark_dirty(span)
                self._map.uncopy(sector, end)
            await self._primary.write(sector, buffers)
        finally:
            self._copier.primary_written(sector, end)
            self._map.end_write(span)
            self._primary_users.leave()

    async def _write_both(self, sector: int, end: int, buffers: Sequence[Buffer]) -> None:
        both = self._map.copied_parts(sector, end)
        self._map.refuse_if_frozen((sector, end))
        span = self._map.begin_write(sector, end)
        self._primary_users.enter()
        touching = False
        try:
            if both:  # refused, or cancelled, here: neither side was touched
                await self._map.mark_dirty(span)
            touching = True
            ss = self._info.sector_size
            primary_err, secondary_err = await run_both(
                self._primary.write(sector, buffers),
                self._write_parts(both, sector, buffers, ss),
            )
        except BaseException:  # cancelled half way: the sides may differ
            if both and touching:
                self._uncopy(sector, end, None)
            raise
        finally:
            self._copier.primary_written(sector, end)  # still under the lock
            self._map.end_write(span)
            self._primary_users.leave()
        if primary_err is not None or secondary_err is not None:
            self._uncopy(sector, end, secondary_err)
        if primary_err is not None:
            raise primary_err

    async def _write_parts(
        self, parts: list[tuple[int, int]], sector: int, buffers: Sequence[Buffer], ss: int
    ) -> None:
        for a, b in parts:
            await self._secondary.write(
                a, slice_views(buffers, (a - sector) * ss, (b - sector) * ss)
            )

    def _uncopy(self, start: int, end: int, err: BlockError | None) -> None:
        """The two sides may differ on ``[start, end)``: copy it again."""
        if err is not None:
            self.note_error(f"writing the secondary: {err}")
        self._map.uncopy(start, end)
        self._copy.apply(Event.UNSYNC, "a write may have missed the secondary: copying it again")

    async def flush(self) -> None:
        self._check_open()
        if self._copy.pivoted:
            return await self.flush_secondary()
        if self._copy.cancelled:
            return await self._using_primary(self._flush_primary_alone())
        await self._using_primary(self._map.checkpoint(self._flush_both))

    async def _flush_primary_alone(self) -> None:
        """Cancelled: the primary alone holds what was written since the cancel's
        checkpoint; its failure is every flush caller's, as in ``_flush_both``."""
        try:
            await self._primary_flushes.flush()
        except Unreachable:
            raise
        except BlockError as err:
            self.write_errors.record(err)
            self._map.distrust_flushes()
            self.note_error(f"flushing the primary: {err}")
            raise

    async def _using_primary(self, call: Awaitable[T]) -> T:
        """``call``, counted as a user of the primary (a pivot waits for it to end).

        The caller checks that the mirror is not pivoted just before, with no await
        in between."""
        self._primary_users.enter()
        try:
            return await call
        finally:
            self._primary_users.leave()

    async def _flush_both(self) -> None:
        """Flush both sides; a failure of either means the map can no longer vouch for
        what was written since the last checkpoint (copymap.py, rule 4): the copy fails.
        A flush that could not reach its device (``Unreachable``) lost nothing by itself:
        it only fails the checkpoint (a reconnect that finds writes lost says so).

        Each side is flushed through the mirror's own cursor (``FlushCursor``), so that
        an error the side recorded since the last checkpoint is seen here even if some
        other caller's flush met it first; and a primary's error is recorded in the
        mirror's own ``write_errors``, so that every flush caller of the mirror sees it
        too, not only whichever flush ran into it (the user's fsync included).

        That holds even if this call is cancelled (a checkpoint at close, or a hurried
        one) after the primary's flush failed and while the secondary's goes on:
        ``flush_primary`` records the error as its own flush ends, not when both do."""
        primary_err, _ = await run_both(self.flush_primary(), self.flush_secondary())
        if primary_err is not None:  # the user's fsync fails; a secondary's only the copy
            raise primary_err

    async def flush_primary(self) -> None:
        """Flush the primary through the mirror's cursor (see ``_flush_both``); the copier
        learns what the flush covers (``Copier.primary_flush_begins``)."""
        covered = self._copier.primary_flush_begins()
        try:
            await self._primary_flushes.flush()
        except BaseException as exc:
            self._copier.primary_flush_failed(covered)
            if isinstance(exc, BlockError) and not isinstance(exc, Unreachable):
                self.write_errors.record(exc)
                self._flush_failed("primary", exc)
            raise

    async def flush_secondary(self) -> None:
        """Flush the secondary, one flush at a time, its failure reported before the next
        starts (so a checkpoint after a failed flush-behind sees the failure).  Once
        pivoted the secondary holds the data: its errors are recorded for every caller."""
        async with self._secondary_flush_lock:
            err = await error_of(self._secondary_flushes.flush())
            if err is not None:
                if isinstance(err, Unreachable):
                    self.note_error(f"flushing the secondary: {err}")
                else:
                    if self._copy.pivoted:
                        self.write_errors.record(err)
                    self._flush_failed("secondary", err)
                raise err

    def _flush_failed(self, side: str, err: BaseException) -> None:
        """What ``side`` got since the last checkpoint may be lost: fail the copy."""
        self._map.distrust_flushes()
        self.fail(f"flushing the {side}: {err}")

    async def extents(self, sector: int, count: int) -> list[Extent]:
        self._check_open()
        if self._copy.pivoted:
            data = await self._secondary.data_map(sector, sector + count)
        else:
            data = await self._using_primary(self._primary.data_map(sector, sector + count))
        pieces = [Extent(a, b - a, True) for a, b in data]
        pieces += [Extent(a, b - a, False) for a, b in data.gaps(sector, sector + count)]
        return sorted(pieces, key=lambda e: e.sector)

    async def aclose(self) -> None:
        """Stop the copier at a chunk edge, flush both sides, save the map, close both."""
        if not self._copy.open:
            return
        with trio.CancelScope(shield=True):
            await self._stop_copier()
            if self._copy.pivoted:
                err = await error_of(self.flush_secondary())
            elif self._copy.cancelled:  # the secondary was flushed by the cancel
                err = await error_of(self._flush_primary_alone())
                if err is None:
                    err = await error_of(self._end_session())
            else:
                err = await error_of(self._map.checkpoint(self._flush_both))
                if err is None:
                    err = await error_of(self._end_session())
            if err is not None:
                self.note_error(f"flushing at close: {err}")
            self._copy.apply(Event.CLOSE)
            self._copier.close()
            await self._primary.dev.aclose()
            await self._secondary.dev.aclose()

    async def _end_session(self) -> None:
        """Record a clean close with what identifies both files now (after the flush)."""
        await self._map.end_session(signature(self._primary.dev), signature(self._secondary.dev))

    def hurry_close(self) -> None:
        """Stop the copier now rather than at the next chunk edge (its items are
        cancelled; what was copied stays copied)."""
        self._copier_task.scope.cancel()
        self._primary.dev.hurry_close()
        self._secondary.dev.hurry_close()

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
            "rate_limit": "" if st.rate_limit is None else str(st.rate_limit),
        }
        if st.last_error:
            out["last_error"] = st.last_error
        if st.notice:
            out["notice"] = st.notice
        for name, side in (("primary", self._primary), ("secondary", self._secondary)):
            side_status = merged_status(side.dev)
            if "connection" in side_status:  # an NBD export: how its connection is doing
                out[f"{name}_connection"] = side_status["connection"]
                out[f"{name}_reconnects"] = side_status.get("reconnects", "0")
        return out

    async def control(self, key: str, value: bytes) -> bool:
        """``pivot``, ``retry``, ``cancel`` (any value), ``rate_limit`` (or ``rate``, the
        spec's name for it: bytes per second like ``64M``, or ``none``)."""
        if key == "pivot":
            await self.pivot()
        elif key == "retry":
            self.retry()
        elif key == "cancel":
            await self.cancel()
        elif key in ("rate_limit", "rate"):
            self.set_rate(parse_rate(value.decode(errors="replace")))
        else:
            return False
        return True

    def _check_open(self) -> None:
        if self._copy.closed:
            raise Disconnected("the mirror is closed")

    # --- what users of the mirror see ----------------------------------------------------

    def statistics(self) -> MirrorStatistics:
        copied = self._copied_bytes()
        return self._copy.statistics(
            copied,
            self._copier.in_flight,
            data_bytes=self._copier.data_bytes,
            data_left=self._copier.data_left(self._info.size_bytes - copied),
            rate_limit=self._copier.rate_limit,
        )

    def _copied_bytes(self) -> int:
        return self._map.copied_sectors * self._info.sector_size

    async def wait_synced(self) -> None:
        """Return once synced (or pivoted); raise ``MirrorFailed`` if the copy failed or
        was cancelled."""
        while True:
            if self._copy.state in (MirrorState.SYNCED, MirrorState.PIVOTED):
                return
            if self._copy.state is MirrorState.FAILED:
                raise MirrorFailed(self._copy.reason)
            if self._copy.state is MirrorState.CANCELLED:
                raise MirrorFailed("the copy was cancelled")
            if not self._copy.open:
                raise Disconnected("the mirror was closed before it synced")
            await self._copy.wait_change()

    async def pivot(self) -> None:
        """Detach the primary: from now on the secondary alone serves all I/O.

        Refused (``RequestFailed(EBUSY)``) unless synced.  Waits for writes and reads in
        flight, flushes both sides, saves the map, then closes the primary.
        """
        self._check_open()
        if self._copy.pivoted:
            return
        self._check_pivotable()
        async with self._ranges.hold(0, self._info.size_sectors):
            self._check_pivotable()
            await self._using_primary(self._map.checkpoint(self._flush_both))
            self._check_pivotable()
            await self._map.save_pivoted()  # a remount must not copy the old primary back
            self._copy.apply(Event.PIVOT, "the primary is detached; the secondary serves alone")
        while self._primary_users.count:
            await self._primary_users.wait()
        await self._primary.dev.aclose()

    def _check_pivotable(self) -> None:
        if self._copy.state is not MirrorState.SYNCED:
            self._refuse("pivot")

    def _refuse(self, action: str) -> NoReturn:
        """``RequestFailed(EBUSY)``: ``action`` does not apply in this state."""
        reason = refusal(action, self._copy.state, self.statistics().percent)
        raise RequestFailed(errno.EBUSY, f"cannot {action}: {reason}")

    def retry(self) -> None:
        """Start a failed or cancelled copy again from what is copied (``EBUSY`` in any
        other state).  The errors counted so far stay counted."""
        self._check_open()
        if not self._copy.can(Event.RETRY):
            self._refuse("retry")
        self._copy.retry(f"retried at {self.statistics().percent}%")

    async def cancel(self) -> None:
        """Give the copy up: from now on the primary serves alone, and the secondary is
        not written again; the map keeps what was copied (see the module text).  Done
        at once if already cancelled; ``EBUSY`` once pivoted."""
        self._check_open()
        if self._copy.cancelled:
            return
        if not self._copy.can(Event.CANCEL):
            self._refuse("cancel")
        async with self._ranges.hold(0, self._info.size_sectors):
            if self._copy.cancelled:
                return
            if not self._copy.can(Event.CANCEL):
                self._refuse("cancel")
            self._copy.apply(
                Event.CANCEL,
                f"at {self.statistics().percent}%: the primary serves alone; the copy map "
                "keeps what was copied",
            )
            self._primary_users.wake()  # copier workers waiting for an idle primary
            err = await error_of(self._using_primary(self._map.checkpoint(self._flush_both)))
            if err is not None:
                self.note_error(f"flushing at the cancel: {err}")

    def set_rate(self, rate: int | None) -> None:
        """Limit the copier to ``rate`` bytes per second from now on (``None``: none);
        ``EBUSY`` once pivoted (the copy is over)."""
        self._check_open()
        if self._copy.pivoted:
            self._refuse("rate")
        before = self._copier.rate_limit
        self._copier.set_rate(rate)
        log.info("%s: copy rate limit %s (was %s)", self.label, rate_text(rate), rate_text(before))

    # --- the copier ----------------------------------------------------------------------

    async def run_copier(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Copy until synced, keep the copy whole until pivot or ``aclose``; while the
        copy is failed or cancelled, wait for a retry.

        Runs in a nursery its owner can see (``start_mirror``/``open_mirror``).  Copy
        errors end in the ``failed`` state, not in an exception; a bug raises.
        """
        done = self._copier_task.begin()
        try:
            with self._copier_task.scope:
                task_status.started()
                self.copied_more()
                verify = self._verify_first
                while self._copy.open and not self._copy.pivoted:
                    if self._copy.copying:
                        await self._copy_with_checkpoints(verify=verify)
                        verify = False
                    else:
                        await self._copy.wait_change()
        finally:
            done.set()

    async def _copy_with_checkpoints(self, *, verify: bool) -> None:
        async with trio.open_nursery() as nursery:
            if self._map.persistent:
                nursery.start_soon(self._checkpoint_loop)
            if verify:
                await self._copier.verify()
            await self._copy_until_stopped()
            nursery.cancel_scope.cancel()

    async def _copy_until_stopped(self) -> None:
        while self._copy.open and self._copy.copying:
            if self._map.all_copied:
                await self._become_synced()
                if self._copy.state is MirrorState.SYNCED:
                    await self._copy.wait_change()
            else:
                await self._copier.sweep()

    async def _become_synced(self) -> None:
        if self._copy.state is MirrorState.COPYING:
            await self._checkpoint_with_retries()
        if self._copy.state is not MirrorState.COPYING or not self._map.all_copied:
            return
        data = format_size(self._copier.data_bytes)
        self._copy.apply(
            Event.SYNC, f"all {format_size(self._info.size_bytes)} copied ({data} of data read)"
        )
        self.copied_more()
        self._copy.report_complete()

    async def _checkpoint_with_retries(self) -> None:
        """Flush both sides and save the map at the end of the copy, as a copy item is
        retried: with backoff, ``retries`` times, then the copy fails."""
        retries, backoff = self._copier.settings.retries, self._copier.settings.backoff
        tries = retries + 1
        for attempt in range(tries):
            err = await error_of(self._map.checkpoint(self._flush_both))
            if err is None or self._copy.state is not MirrorState.COPYING:
                return
            where = f"making the copy durable: {err}"
            if attempt == retries:
                self.note_error(f"{where} (try {tries} of {tries})")
                return self.fail(f"{where} (gave up after {tries} tries)")
            pause = backoff * 2**attempt
            self.note_error(f"{where} (try {attempt + 1} of {tries}; again in {pause:g} s)")
            await trio.sleep(pause)

    async def _checkpoint_loop(self) -> None:
        while True:
            await trio.sleep(CHECKPOINT_SECONDS)
            if not self._copy.pivoted:
                err = await error_of(self._using_primary(self._map.checkpoint(self._flush_both)))
                if err is not None:
                    self.note_error(f"checkpoint: {err}")

    async def _stop_copier(self) -> None:
        self._copy.apply(Event.STOP)
        self._primary_users.wake()
        await self._copier_task.stop(STOP_GRACE_SECONDS)

    # --- ``CopyEvents`` for the copier ---------------------------------------------------

    def going_on(self) -> bool:
        return self._copy.going_on

    def note_error(self, message: str) -> None:
        self._copy.note_error(message)
        skipped = self._error_lines.allow("error")
        if skipped is not None:
            log.warning("%s: %s%s", self.label, message, left_out(skipped))

    def fail(self, reason: str) -> None:
        self._copy.fail(reason)
        self._primary_users.wake()

    def copied_more(self) -> None:
        self._copy.report(self._copied_bytes(), self._copier.data_bytes)

    async def wait_foreground_idle(self) -> None:
        while self._primary_users.count and self.going_on():
            await self._primary_users.wait()


def parse_rate(text: str) -> int | None:
    """A ``rate_limit`` value: bytes per second (``64M``), or ``none``; ``EINVAL`` else."""
    if text.strip().lower() in NO_LIMIT:
        return None
    try:
        rate = parse_bytes(text)
    except ValueError:
        rate = 0
    if rate <= 0:
        raise RequestFailed(
            errno.EINVAL,
            f"bad rate limit {text.strip()!r}: bytes per second like 64M (binary units), or none",
        )
    return rate


def rate_text(rate: int | None) -> str:
    return "none" if rate is None else f"{format_size(rate)}/s"
