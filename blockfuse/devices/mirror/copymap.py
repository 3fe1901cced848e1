"""The mirror's copy map: which sectors the secondary holds, kept on disk to resume a copy.

Two interval sets of mirror sectors:

- ``copied``: the secondary holds what the primary holds here (in memory, exact).  It is
  private to this class: the copier adds to it with ``mark_copied`` (only while it
  holds the range lock on those sectors, see ``device.py``), and whoever finds that the
  two sides may differ takes sectors out with ``uncopy``.
- ``dirty``: a write here may have reached one side and not the other; whole chunks.

The file (``state=PATH``, through a ``MapStore``) holds ``durable`` (a past ``copied``
whose data both sides have flushed) and ``dirty``; on resume the copy is ``durable -
dirty``, the sectors the file *vouches for*.  The rule that makes a crash at any instant
safe:

    every sector the file vouches for is equal and durable on both sides.

It holds because:

1. ``mark_dirty`` runs before any write to a copied sector, and returns only when the
   chunk is dirty *in the file* (one fsync'd save covers every writer waiting on it).
   A chunk dirty both in the file and in memory costs nothing; dirty in the file but
   no longer in memory means a checkpoint is about to save it clean, so the writer
   marks it again and waits for that save.
2. ``checkpoint`` (one at a time) cleans a chunk only if no write to it was running
   when it began and none touched it since, and it flushes both sides before it
   saves; ``durable`` is the ``copied`` of the moment the checkpoint began, so
   everything in it was flushed.
3. Saves are atomic (write a temporary file, fsync, rename, fsync the directory).
4. A failed flush of either side may have lost anything written to it since the last
   checkpoint, and a later flush that succeeds proves nothing (Linux reports a
   writeback error to one fsync, then forgets it).  So after one, ``copied`` falls back
   to ``durable`` and no checkpoint of this session cleans or advances anything again
   (``distrust_flushes``); marking dirty goes on.
5. After a pivot the secondary alone is written: the file says ``pivoted`` before that
   happens, and a map that says so is refused, so that a remount with the same spec
   cannot copy the stale primary over what was written since.
6. A map that cannot be saved must still never vouch for a write it did not record.
   When ``mark_dirty``'s save fails, the file is first made to vouch for nothing
   (``MapStore.invalidate``: its version byte overwritten in place, or the file
   removed; failing both, a mark on the secondary's file that the next load obeys),
   and the map is off for the rest of the session; only then does the write go on.
   If none of that works, writes to what the file vouches for are refused (EIO): the
   one case where a broken map costs foreground writes.  A save that fails in a
   checkpoint leaves the file as it was, which is still true.

Every save also says whether the session is *open* (saved as the mirror starts, so a
crash leaves it open) or *closed* cleanly, with what identified both sides' files then
(size, mtime, ctime).  A resume checks a closed map against the files as they are now:
a file changed while the mirror was not mounted makes the map useless.  An open map
(after a crash) is checked with samples where the primary holds data, or, with
``verify=full``, everywhere (``opening.py``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from ...errors import RequestFailed
from ...extents import Interval, IntervalSet, align_out
from ...opening import OpenContext
from .mapfile import CopyMapError, FileStore, MapStore, SavedMap, parse_map, render_map
from .mapsaver import MapSaver, MarkStale, Vouching


@dataclass(frozen=True)
class Geometry:
    size_sectors: int
    sector_size: int
    chunk_sectors: int

    def header(self) -> str:
        return f"size={self.size_sectors * self.sector_size} sector={self.sector_size}"


class CopyMap:
    def __init__(self, geometry: Geometry, store: MapStore | None = None) -> None:
        self.geometry = geometry
        self._saver = MapSaver(store) if store is not None else None
        self._copied = IntervalSet()
        self.dirty = IntervalSet()
        self._durable = IntervalSet()
        """``copied`` as the file has it."""
        self._saved_dirty = IntervalSet()
        self._active: list[Interval] = []
        self._written_since_checkpoint = IntervalSet()
        self._checkpoint_lock = trio.Lock()
        self._flush_failed = False
        self.secondary = ""
        self.saved: SavedMap | None = None
        """What the file said when the mirror opened (``None``: there was none)."""
        self.forgotten = ""
        """Why a saved map was not used (empty if it was, or if there was none)."""

    @property
    def persistent(self) -> bool:
        """Whether the map is saved as the copy goes (not once it failed, rule 6)."""
        return self._saver is not None and self._saver.vouching is Vouching.SAVING

    @property
    def name(self) -> str:
        return self._saver.store.name if self._saver is not None else "(no map)"

    @property
    def session(self) -> str:
        return self._saver.session if self._saver is not None else ""

    @property
    def store_failure(self) -> str:
        return self._saver.failure if self._saver is not None else ""

    def watch_store(
        self,
        *,
        on_failure: Callable[[str], None] | None = None,
        mark_stale: MarkStale | None = None,
    ) -> None:
        """Who to tell when a save fails, and how to mark the secondary (rule 6)."""
        if self._saver is not None:
            if on_failure is not None:
                self._saver.on_failure = on_failure
            if mark_stale is not None:
                self._saver.mark_stale = mark_stale

    # --- what is copied ------------------------------------------------------------

    def mark_copied(self, start: int, end: int) -> None:
        """``[start, end)`` is now equal on both sides.  Only the copier calls this, and
        only while it holds the range lock on those sectors."""
        self._copied.add(start, end)

    def uncopy(self, start: int, end: int) -> None:
        """The two sides may differ on ``[start, end)``: it must be copied again."""
        self._copied.discard(start, end)

    def is_copied(self, start: int, end: int) -> bool:
        return self._copied.covers(start, end)

    @property
    def all_copied(self) -> bool:
        return self._copied.covers(0, self.geometry.size_sectors)

    @property
    def copied_sectors(self) -> int:
        return self._copied.total

    def copied_parts(self, start: int, end: int) -> list[Interval]:
        """The parts of ``[start, end)`` that are copied, in order."""
        return self._copied.intersection(start, end)

    def uncopied_parts(self, start: int, end: int) -> list[Interval]:
        """The parts of ``[start, end)`` that are not copied, in order."""
        return self._copied.gaps(start, end)

    def first_uncopied(self, start: int, end: int) -> Interval | None:
        return self._copied.first_gap(start, end)

    def copied_runs(self) -> list[Interval]:
        return self._copied.to_list()

    # --- loading and saving --------------------------------------------------------

    @classmethod
    def open(
        cls,
        geometry: Geometry,
        store: MapStore | str | None,
        secondary: str = "",
        ctx: OpenContext | None = None,
    ) -> CopyMap:
        """A fresh map, or the one saved in ``store`` (a path: a ``FileStore``); raises
        ``CopyMapError`` when it belongs to another mirror or says it was pivoted.

        ``secondary`` names the secondary's file (``DEV:INO``) where it has one: a map
        saved for another file (the image was deleted and made anew), or invalidated,
        is set aside, and ``forgotten`` says why.  A new file is noted in ``ctx``
        (removed again if the opening fails).  What it said stays in ``saved``, for the
        checks of the resumed copy (``opening.py``).
        """
        if isinstance(store, str):
            store = FileStore(store)
        cmap = cls(geometry, store)
        cmap.secondary = secondary
        text = store.load() if store is not None else None
        if text is not None:
            cmap._load(parse_map(text, cmap.name))
        elif isinstance(store, FileStore) and ctx is not None:
            ctx.note_created(store.name)  # by its first save; gone again if the opening fails
        return cmap

    def _load(self, saved: SavedMap) -> None:
        self.saved = saved
        if saved.invalidated:
            return self.forget(f"{self.name} could not be saved last time; copying anew")
        if saved.pivoted:
            raise CopyMapError(
                f"{self.name} says this mirror was pivoted: the secondary holds the newer "
                f"data and the primary is stale; use the secondary alone as the device, or "
                f"remove {self.name} to copy the primary onto it anew"
            )
        if saved.geometry != self.geometry.header():
            raise CopyMapError(
                f"{self.name} belongs to another mirror ({saved.geometry}, this one has "
                f"{self.geometry.header()}); remove it to copy from the start"
            )
        if saved.secondary != self.secondary:
            return self.forget(f"{self.name} was saved for another secondary file; copying anew")
        durable = saved.vouched()
        self._copied, self._durable = durable, durable.copy()
        self.dirty, self._saved_dirty = saved.dirty.copy(), saved.dirty.copy()

    def forget(self, reason: str) -> None:
        """Start over: nothing is copied (the next save overwrites the file)."""
        self.forgotten = reason
        self._copied, self._durable = IntervalSet(), IntervalSet()
        self.dirty, self._saved_dirty = IntervalSet(), IntervalSet()

    def _render(self, ending: str) -> tuple[str, Callable[[], None]]:
        dirty = self.dirty.copy()

        def saved() -> None:
            self._saved_dirty = dirty

        header = f"{self.geometry.header()} secondary={self.secondary}"
        return render_map(header, self._durable, dirty, ending), saved

    async def begin_session(self) -> None:
        """Save the map as open, before anything is written (a crash then leaves it open).

        Raises ``CopyMapError`` if the file cannot be written: the mirror cannot start."""
        try:
            await self.save_now()
        except RequestFailed as exc:
            raise CopyMapError(str(exc)) from None

    async def end_session(self, primary: str, secondary: str) -> None:
        """Save the map as closed cleanly, with the files' signatures (``-``: none).

        Only a trusted map closes: after a failed flush, or with the map off, the file
        stays open, so that the next mount checks the copy."""
        if self._saver is None or not self.persistent or self._flush_failed:
            return
        ending = f"closed session={self.session} primary={primary} secondary={secondary}"
        await self._saver.save_ending(ending, self._render)

    async def save_now(self) -> None:
        """Write the file now (if there is one); ``RequestFailed`` if it cannot be saved
        (also once an earlier save failed: nothing is saved then, rule 6)."""
        if self._saver is not None:
            await self._saver.save(self._render)

    async def save_pivoted(self) -> None:
        """Record, durably, that the mirror is pivoted (rule 5)."""
        if self._saver is not None:
            await self._saver.save_pivoted(self._render)

    # --- the write path ------------------------------------------------------------

    def begin_write(self, start: int, end: int) -> Interval:
        """Note a write in progress; hand the result to ``end_write``."""
        span = align_out(start, end, self.geometry.chunk_sectors)
        self._active.append(span)
        self._written_since_checkpoint.add(*span)
        return span

    def end_write(self, span: Interval) -> None:
        self._active.remove(span)

    def refuse_if_frozen(self, span: Interval) -> None:
        """``RequestFailed(EIO)`` if the file vouches for part of ``span`` and can no
        longer change (rule 6, the last resort)."""
        if self._saver is not None:
            self._saver.refuse_if_frozen(span)

    async def mark_dirty(self, span: Interval) -> None:
        """Return once ``span`` (from ``begin_write``) is dirty in the file, or once the
        file vouches for nothing (rule 6).

        Raises ``RequestFailed(EIO)`` only when neither can be done and the file vouches
        for part of ``span``: the write must not go on.  Every writer waits while another
        one is making the file vouch for nothing, and looks again at what came of it.
        """
        saver = self._saver
        if saver is None:
            return
        while True:
            state = await saver.settled()
            if state is Vouching.FROZEN:
                return saver.refuse_if_frozen(span)
            if state is Vouching.OFF:
                return
            if self.dirty.covers(*span) and self._saved_dirty.covers(*span):
                return  # dirty in the file, and no checkpoint can clean it while we write
            self.dirty.add(*span)
            try:
                return await saver.save(self._render)
            except RequestFailed:
                await saver.stop_vouching(self._vouched())

    def _vouched(self) -> IntervalSet:
        """What the file vouches for: ``durable - dirty`` as saved."""
        out = self._durable.copy()
        for a, b in self._saved_dirty:
            out.discard(a, b)
        return out

    # --- checkpoints ----------------------------------------------------------------

    def distrust_flushes(self) -> None:
        """A side failed a flush: keep as copied only what a checkpoint made durable
        before, and make no further checkpoint of this session count (rule 4)."""
        self._flush_failed = True
        for a, b in self._durable.gaps(0, self.geometry.size_sectors):
            self._copied.discard(a, b)

    async def checkpoint(self, flush_both: Callable[[], Awaitable[None]]) -> None:
        """Flush both sides, then save what is now known to be equal on both.

        A flush's error is raised; a save that fails is reported to the store's watcher
        (``watch_store``) and not raised (the flush itself succeeded)."""
        if not self.persistent:
            await flush_both()
            return
        async with self._checkpoint_lock:
            await self._checkpoint(flush_both)

    async def _checkpoint(self, flush_both: Callable[[], Awaitable[None]]) -> None:
        candidates = self.dirty.copy()
        for a, b in self._active:
            candidates.discard(a, b)
        copied = self._copied.copy()
        self._written_since_checkpoint = IntervalSet()
        await flush_both()
        if self._flush_failed:
            return  # rule 4: this flush may have "succeeded" over lost writes
        for a, b in list(self._written_since_checkpoint) + self._active:
            candidates.discard(a, b)
        if not candidates.total and copied == self._durable:
            return  # nothing to save: a flush of a quiet mirror costs no map write
        previous = self._durable
        for a, b in candidates:
            self.dirty.discard(a, b)
        self._durable = copied
        try:
            await self.save_now()
        except BaseException as exc:  # the file still says what it said: so must memory
            self._durable = previous
            for a, b in candidates:
                self.dirty.add(a, b)
            if not isinstance(exc, RequestFailed):
                raise
