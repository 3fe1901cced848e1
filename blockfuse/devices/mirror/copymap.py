"""The mirror's copy map: which sectors the secondary holds, kept on disk to resume a copy.

Two interval sets of mirror sectors:

- ``copied``: the secondary holds what the primary holds here (in memory, exact).  It is
  private to this class: the copier adds to it with ``mark_copied`` (only while it
  holds the range lock on those sectors, see ``device.py``), and whoever finds that the
  two sides may differ takes sectors out with ``uncopy``.
- ``dirty``: a write here may have reached one side and not the other; whole chunks.

The file (``state=PATH``) holds ``durable`` (a past ``copied`` whose data both sides
have flushed) and ``dirty``; on resume the copy is ``durable - dirty``.  The rule that
makes a crash at any instant safe:

    every sector in (file.durable - file.dirty) is equal and durable on both sides.

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
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from ...errors import map_os_errors
from ...extents import Interval, IntervalSet, align_out
from ...opening import OpenContext

MAGIC = "blockfuse-mirror-map 1"
PIVOTED = "pivoted"


class CopyMapError(ValueError):
    """The state file cannot be used with this mirror; the message says why."""


@dataclass(frozen=True)
class Geometry:
    size_sectors: int
    sector_size: int
    chunk_sectors: int

    def header(self) -> str:
        return f"size={self.size_sectors * self.sector_size} sector={self.sector_size}"


class CopyMap:
    def __init__(self, geometry: Geometry, path: str | None = None) -> None:
        self.geometry = geometry
        self.path = path
        self._copied = IntervalSet()
        self.dirty = IntervalSet()
        self._durable = IntervalSet()
        self._saved_dirty = IntervalSet()
        self._active: list[Interval] = []
        self._written_since_checkpoint = IntervalSet()
        self._generation = 0
        self._saved_generation = 0
        self._save_lock = trio.Lock()
        self._checkpoint_lock = trio.Lock()
        self._flush_failed = False
        self._pivoted = False

    @property
    def persistent(self) -> bool:
        return self.path is not None

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
        path: str | None,
        secondary: str = "",
        ctx: OpenContext | None = None,
    ) -> CopyMap:
        """A fresh map, or the one saved at ``path``; raises ``CopyMapError`` on a mismatch.

        ``secondary`` names the secondary's file (``DEV:INO``) where it has one: a map
        saved for another file (the image was deleted and made anew) is set aside, and
        ``forgotten`` says why.  A new file is noted in ``ctx`` (removed again if the
        opening fails).
        """
        cmap = cls(geometry, path)
        cmap.secondary = secondary
        if path is not None and os.path.exists(path):
            cmap._load(path)
        elif path is not None and ctx is not None:
            ctx.note_created(path)  # by its first save; gone again if the opening fails
        return cmap

    secondary = ""
    forgotten = ""
    """Why a saved map was not used (empty if it was, or if there was none)."""

    def _header(self) -> str:
        return f"{self.geometry.header()} secondary={self.secondary}"

    def _load(self, path: str) -> None:
        saved = read_saved_map(path)
        if saved.pivoted:
            raise CopyMapError(
                f"{path} says this mirror was pivoted: the secondary holds the newer data "
                f"and the primary is stale; use the secondary alone as the device, or "
                f"remove {path} to copy the primary onto it anew"
            )
        if saved.geometry != self.geometry.header():
            raise CopyMapError(
                f"{path} belongs to another mirror ({saved.geometry}, this one has "
                f"{self.geometry.header()}); remove it to copy from the start"
            )
        if saved.secondary != self.secondary:
            return self.forget(f"{path} was saved for another secondary file; copying anew")
        durable = saved.copied.copy()
        for a, b in saved.dirty:
            durable.discard(a, b)
        self._copied, self._durable = durable, durable.copy()
        self.dirty, self._saved_dirty = saved.dirty.copy(), saved.dirty.copy()

    async def save_now(self) -> None:
        """Write the file now (if there is one)."""
        if self.path is not None:
            self._generation += 1
            await self._save(self._generation)

    async def save_pivoted(self) -> None:
        """Record, durably, that the mirror is pivoted (rule 5)."""
        self._pivoted = True
        try:
            await self.save_now()
        except BaseException:
            self._pivoted = False
            raise

    def forget(self, reason: str) -> None:
        """Start over: nothing is copied (the next save overwrites the file)."""
        self.forgotten = reason
        self._copied, self._durable = IntervalSet(), IntervalSet()

    def _render(self) -> str:
        return "\n".join(
            [
                MAGIC,
                self._header(),
                "copied " + _format_intervals(self._durable),
                "dirty " + _format_intervals(self.dirty),
                *([PIVOTED] if self._pivoted else []),
                "",
            ]
        )

    async def _save(self, wanted: int) -> None:
        """Make the file reflect at least change number ``wanted``."""
        assert self.path is not None
        async with self._save_lock:
            if self._saved_generation >= wanted:
                return
            generation, dirty, text = self._generation, self.dirty.copy(), self._render()
            with map_os_errors(f"saving the mirror map {self.path}"):
                await trio.to_thread.run_sync(_write_atomically, self.path, text)
            self._saved_generation, self._saved_dirty = generation, dirty

    # --- the write path ------------------------------------------------------------

    def begin_write(self, start: int, end: int) -> Interval:
        """Note a write in progress; hand the result to ``end_write``."""
        span = align_out(start, end, self.geometry.chunk_sectors)
        if self.path is not None:
            self._active.append(span)
            self._written_since_checkpoint.add(*span)
        return span

    def end_write(self, span: Interval) -> None:
        if self.path is not None:
            self._active.remove(span)

    async def mark_dirty(self, span: Interval) -> None:
        """Return once ``span`` (from ``begin_write``) is dirty in the file.

        Raises ``RequestFailed`` if the file cannot be saved: the write must not go on.
        """
        if self.path is None:
            return
        if self.dirty.covers(*span) and self._saved_dirty.covers(*span):
            return  # dirty in the file, and no checkpoint can clean it while we write
        self.dirty.add(*span)
        await self.save_now()

    # --- checkpoints ----------------------------------------------------------------

    def distrust_flushes(self) -> None:
        """A side failed a flush: keep as copied only what a checkpoint made durable
        before, and make no further checkpoint of this session count (rule 4)."""
        self._flush_failed = True
        for a, b in self._durable.gaps(0, self.geometry.size_sectors):
            self._copied.discard(a, b)

    async def checkpoint(self, flush_both: Callable[[], Awaitable[None]]) -> None:
        """Flush both sides, then save what is now known to be equal on both."""
        if self.path is None:
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
        self._generation += 1
        try:
            await self._save(self._generation)
        except BaseException:  # the file still says what it said: so must memory
            self._durable = previous
            for a, b in candidates:
                self.dirty.add(a, b)
            raise


@dataclass(frozen=True)
class SavedMap:
    """What a map file says, as saved (``read_saved_map``)."""

    geometry: str
    """``size=BYTES sector=BYTES``."""
    secondary: str
    """What identifies the secondary's file (``DEV:INO``), or ``""``."""
    copied: IntervalSet
    """``durable``: copied, and flushed on both sides, when it was saved."""
    dirty: IntervalSet
    """Chunks where the two sides may differ (whatever ``copied`` says)."""
    pivoted: bool

    def vouched(self) -> IntervalSet:
        """The sectors the file says are equal on both sides: ``copied - dirty``."""
        out = self.copied.copy()
        for a, b in self.dirty:
            out.discard(a, b)
        return out


def read_saved_map(path: str) -> SavedMap:
    """The map file at ``path``; raises ``CopyMapError`` if it is not one or is damaged."""
    with open(path) as f:
        lines = f.read().splitlines()
    if len(lines) not in (4, 5) or lines[0] != MAGIC or lines[4:] not in ([], [PIVOTED]):
        raise CopyMapError(f"{path} is not a blockfuse mirror map")
    geometry, _, secondary = lines[1].partition(" secondary=")
    copied, dirty = (_parse_intervals(path, line) for line in lines[2:4])
    return SavedMap(geometry, secondary, copied, dirty, lines[4:] == [PIVOTED])


def _format_intervals(s: IntervalSet) -> str:
    return " ".join(f"{a}-{b}" for a, b in s)


def _parse_intervals(path: str, line: str) -> IntervalSet:
    _, _, rest = line.partition(" ")
    out = IntervalSet()
    try:
        for item in rest.split():
            a, b = item.split("-")
            out.add(int(a), int(b))
    except ValueError:
        raise CopyMapError(f"{path} is damaged ({line[:40]!r}...)") from None
    return out


def _write_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
