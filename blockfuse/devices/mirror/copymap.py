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

import enum
import errno
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from ...errors import RequestFailed
from ...extents import Interval, IntervalSet, align_out
from ...opening import OpenContext

MAGIC = "blockfuse-mirror-map 2"
VERSION_OFFSET = len(MAGIC) - 1
"""The byte that says the version; ``invalidate`` overwrites it with ``0`` in place."""
INVALID_MAGIC = MAGIC[:VERSION_OFFSET] + "0"
OLD_MAGIC = "blockfuse-mirror-map 1"
PIVOTED = "pivoted"
STALE_MARK = "user.blockfuse.stale-map"
"""The xattr on the secondary's file that says which map session may not be trusted."""


class CopyMapError(ValueError):
    """The state file cannot be used with this mirror; the message says why."""


@dataclass(frozen=True)
class Geometry:
    size_sectors: int
    sector_size: int
    chunk_sectors: int

    def header(self) -> str:
        return f"size={self.size_sectors * self.sector_size} sector={self.sector_size}"


# --- where the map lives --------------------------------------------------------------------


class MapStore(Protocol):
    """Where a map is saved: atomically and durably, or not at all."""

    name: str
    """For messages (the file's path)."""

    def load(self) -> str | None:
        """The saved text, or ``None`` if nothing was saved; raises ``OSError``."""

    async def save(self, text: str) -> None:
        """Replace the saved text, durably and atomically; raises ``OSError``."""

    async def invalidate(self) -> None:
        """Make what was saved vouch for nothing, durably; raises ``OSError``."""


class FileStore:
    """A map file: saved by write, fsync, rename, fsync of the directory."""

    def __init__(self, path: str) -> None:
        self.name = path

    def load(self) -> str | None:
        try:
            with open(self.name) as f:
                return f.read()
        except FileNotFoundError:
            return None

    async def save(self, text: str) -> None:
        await trio.to_thread.run_sync(_write_atomically, self.name, text)

    async def invalidate(self) -> None:
        await trio.to_thread.run_sync(_invalidate_file, self.name)


def _write_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _sync_directory(path)


def _invalidate_file(path: str) -> None:
    """Overwrite the version byte in place (needs no new space), else remove the file."""
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, INVALID_MAGIC[VERSION_OFFSET:].encode(), VERSION_OFFSET)
            os.fsync(fd)
        finally:
            os.close(fd)
    except FileNotFoundError:
        return
    except OSError:
        os.unlink(path)
        _sync_directory(path)


def _sync_directory(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Vouching(enum.Enum):
    """Where the map file stands once a save may have failed (rule 6)."""

    SAVING = "saved as the copy goes"
    STOPPING = "a save failed: the file is being made to vouch for nothing"
    OFF = "the file vouches for nothing; nothing more is saved this session"
    FROZEN = "the file vouches for what it said and cannot be changed: writes there refused"


MarkStale = Callable[[str], Awaitable[None]]
"""Puts a mark on the secondary's file naming a map session that must not be trusted."""


# --- what a saved map says -------------------------------------------------------------------


@dataclass(frozen=True)
class SavedMap:
    """What a map file says, as saved (``parse_map``)."""

    geometry: str
    """``size=BYTES sector=BYTES``."""
    secondary: str
    """What identifies the secondary's file (``DEV:INO``), or ``""``."""
    copied: IntervalSet
    """``durable``: copied, and flushed on both sides, when it was saved."""
    dirty: IntervalSet
    """Chunks where the two sides may differ (whatever ``copied`` says)."""
    pivoted: bool = False
    session: str = ""
    closed: tuple[str, str] | None = None
    """``(primary, secondary)`` file signatures of a clean close; ``None`` if open."""
    invalidated: bool = False

    def vouched(self) -> IntervalSet:
        """The sectors the file says are equal on both sides: ``copied - dirty``."""
        out = self.copied.copy()
        for a, b in self.dirty:
            out.discard(a, b)
        return out


def read_saved_map(path: str) -> SavedMap:
    """The map file at ``path``; raises ``CopyMapError`` if it is not one or is damaged."""
    text = FileStore(path).load()
    if text is None:
        raise CopyMapError(f"{path} does not exist")
    return parse_map(text, path)


def parse_map(text: str, name: str) -> SavedMap:
    lines = text.splitlines()
    if lines[:1] == [INVALID_MAGIC]:
        return SavedMap("", "", IntervalSet(), IntervalSet(), invalidated=True)
    if lines[:1] == [OLD_MAGIC] and len(lines) in (4, 5) and lines[4:] in ([], [PIVOTED]):
        lines = [MAGIC, *lines[1:4], lines[4] if lines[4:] else "open"]
    if len(lines) != 5 or lines[0] != MAGIC:
        raise CopyMapError(f"{name} is not a blockfuse mirror map")
    geometry, _, secondary = lines[1].partition(" secondary=")
    copied, dirty = (_parse_intervals(name, line) for line in lines[2:4])
    words = dict(w.partition("=")[::2] for w in lines[4].split()[1:])
    kind = lines[4].split()[0] if lines[4].split() else ""
    if kind not in ("open", "closed", PIVOTED):
        raise CopyMapError(f"{name} is damaged ({lines[4][:40]!r}...)")
    closed = (words.get("primary", "-"), words.get("secondary", "-")) if kind == "closed" else None
    return SavedMap(
        geometry, secondary, copied, dirty, kind == PIVOTED, words.get("session", ""), closed
    )


def _format_intervals(s: IntervalSet) -> str:
    return " ".join(f"{a}-{b}" for a, b in s)


def _parse_intervals(name: str, line: str) -> IntervalSet:
    _, _, rest = line.partition(" ")
    out = IntervalSet()
    try:
        for item in rest.split():
            a, b = item.split("-")
            out.add(int(a), int(b))
    except ValueError:
        raise CopyMapError(f"{name} is damaged ({line[:40]!r}...)") from None
    return out


# --- the map ------------------------------------------------------------------------------------


class CopyMap:
    def __init__(self, geometry: Geometry, store: MapStore | None = None) -> None:
        self.geometry = geometry
        self._store = store
        self._copied = IntervalSet()
        self.dirty = IntervalSet()
        self._durable = IntervalSet()
        """``copied`` as the file has it."""
        self._saved_dirty = IntervalSet()
        self._active: list[Interval] = []
        self._written_since_checkpoint = IntervalSet()
        self._generation = 0
        self._saved_generation = 0
        self._save_lock = trio.Lock()
        self._checkpoint_lock = trio.Lock()
        self._flush_failed = False
        self._ending = ""
        """The last line of the file: ``open ...``, ``closed ...`` or ``pivoted``."""
        self.session = secrets.token_hex(8)
        self.secondary = ""
        self.saved: SavedMap | None = None
        """What the file said when the mirror opened (``None``: there was none)."""
        self.forgotten = ""
        """Why a saved map was not used (empty if it was, or if there was none)."""
        self.store_failure = ""
        """Why the map could not be saved, once it could not."""
        self._vouching = Vouching.SAVING
        self._vouching_settled = trio.Event()
        self._frozen = IntervalSet()
        """What the file vouches for and can no longer be changed (``FROZEN``)."""
        self.mark_stale: MarkStale | None = None
        self.on_store_failure: Callable[[str], None] = lambda reason: None

    @property
    def persistent(self) -> bool:
        """Whether the map is saved as the copy goes (not once it failed, rule 6)."""
        return self._store is not None and self._vouching is Vouching.SAVING

    @property
    def name(self) -> str:
        return self._store.name if self._store is not None else "(no map)"

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

    def _header(self) -> str:
        return f"{self.geometry.header()} secondary={self.secondary}"

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

    async def begin_session(self) -> None:
        """Save the map as open, before anything is written (a crash then leaves it open).

        Raises ``CopyMapError`` if the file cannot be written: the mirror cannot start."""
        self._ending = f"open session={self.session}"
        try:
            await self.save_now()
        except RequestFailed as exc:
            raise CopyMapError(str(exc)) from None

    async def end_session(self, primary: str, secondary: str) -> None:
        """Save the map as closed cleanly, with the files' signatures (``-``: none).

        Only a trusted map closes: after a failed flush, or with the map off, the file
        stays open, so that the next mount checks the copy."""
        if not self.persistent or self._flush_failed:
            return
        ending = f"closed session={self.session} primary={primary} secondary={secondary}"
        if self._ending.startswith("open"):
            self._ending = ending
            await self.save_now()

    async def save_now(self) -> None:
        """Write the file now (if there is one); ``RequestFailed`` if it cannot be saved
        (also once an earlier save failed: nothing is saved then, rule 6)."""
        if self._store is not None:
            self._generation += 1
            await self._save(self._generation)

    async def save_pivoted(self) -> None:
        """Record, durably, that the mirror is pivoted (rule 5)."""
        before, self._ending = self._ending, PIVOTED
        try:
            await self.save_now()
        except BaseException:
            self._ending = before
            raise

    def _render(self) -> str:
        return "\n".join(
            [
                MAGIC,
                self._header(),
                "copied " + _format_intervals(self._durable),
                "dirty " + _format_intervals(self.dirty),
                self._ending or f"open session={self.session}",
                "",
            ]
        )

    async def _save(self, wanted: int) -> None:
        """Make the file reflect at least change number ``wanted``."""
        async with self._save_lock:
            if self._store is None or self._saved_generation >= wanted:
                return
            if self._vouching is not Vouching.SAVING:
                raise RequestFailed(errno.EIO, self.store_failure)
            generation, dirty, text = self._generation, self.dirty.copy(), self._render()
            try:
                await self._store.save(text)
            except OSError as exc:
                err = exc.errno or errno.EIO
                reason = f"cannot save the copy map {self.name}: {os.strerror(err)}"
                self._note_store_failure(reason)
                raise RequestFailed(err, reason) from exc
            self._saved_generation, self._saved_dirty = generation, dirty

    def _note_store_failure(self, reason: str) -> None:
        if not self.store_failure:
            self.store_failure = reason
        self.on_store_failure(reason)

    # --- the write path ------------------------------------------------------------

    def begin_write(self, start: int, end: int) -> Interval:
        """Note a write in progress; hand the result to ``end_write``."""
        span = align_out(start, end, self.geometry.chunk_sectors)
        self._active.append(span)
        self._written_since_checkpoint.add(*span)
        return span

    def end_write(self, span: Interval) -> None:
        self._active.remove(span)

    async def mark_dirty(self, span: Interval) -> None:
        """Return once ``span`` (from ``begin_write``) is dirty in the file, or once the
        file vouches for nothing (rule 6).

        Raises ``RequestFailed(EIO)`` only when neither can be done and the file vouches
        for part of ``span``: the write must not go on.  Every writer waits while another
        one is making the file vouch for nothing, and looks again at what came of it.
        """
        while True:
            if self._vouching is Vouching.STOPPING:
                await self._vouching_settled.wait()
            elif self._vouching is Vouching.FROZEN:
                return self.refuse_if_frozen(span)
            elif self._store is None or self._vouching is Vouching.OFF:
                return
            elif self.dirty.covers(*span) and self._saved_dirty.covers(*span):
                return  # dirty in the file, and no checkpoint can clean it while we write
            else:
                self.dirty.add(*span)
                try:
                    return await self.save_now()
                except RequestFailed:
                    await self._stop_vouching()

    async def _stop_vouching(self) -> None:
        """A save failed: make the file vouch for nothing, then stop saving; failing that,
        freeze what it vouches for."""
        if self._vouching is not Vouching.SAVING or self._store is None:
            return
        self._vouching = Vouching.STOPPING
        if await self._invalidated(self._store):
            self._vouching = Vouching.OFF
        else:
            self._frozen = self._durable.copy()
            for a, b in self._saved_dirty:
                self._frozen.discard(a, b)
            self._vouching = Vouching.FROZEN
        self._vouching_settled.set()

    async def _invalidated(self, store: MapStore) -> bool:
        try:
            await store.invalidate()
            return True
        except OSError:
            pass
        if self.mark_stale is not None:
            try:
                await self.mark_stale(f"{store.name} {self.session}")
                return True
            except OSError:
                pass
        return False

    def refuse_if_frozen(self, span: Interval) -> None:
        if self._vouching is Vouching.FROZEN and self._frozen.overlaps(*span):
            raise RequestFailed(
                errno.EIO,
                f"{self.store_failure}, and it cannot be marked stale either; writes to "
                f"copied data are refused until the mirror is remounted with {self.name} "
                "writable (anything else could leave the map vouching for old data)",
            )

    # --- checkpoints ----------------------------------------------------------------

    def distrust_flushes(self) -> None:
        """A side failed a flush: keep as copied only what a checkpoint made durable
        before, and make no further checkpoint of this session count (rule 4)."""
        self._flush_failed = True
        for a, b in self._durable.gaps(0, self.geometry.size_sectors):
            self._copied.discard(a, b)

    async def checkpoint(self, flush_both: Callable[[], Awaitable[None]]) -> None:
        """Flush both sides, then save what is now known to be equal on both.

        A flush's error is raised; a save that fails is reported to
        ``on_store_failure`` and not raised (the flush itself succeeded)."""
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
        self._generation += 1
        try:
            await self._save(self._generation)
        except BaseException as exc:  # the file still says what it said: so must memory
            self._durable = previous
            for a, b in candidates:
                self.dirty.add(a, b)
            if not isinstance(exc, RequestFailed):
                raise
