"""Saving the copy map: one save at a time, the session's last line, and what becomes of
the file once a save fails (copymap.py, rule 6).

``MapSaver`` owns the file side of a ``CopyMap``: the store, the change numbers (a save
covers every change made before it began, so writers waiting on one save share it), the
session's ending line (``open``, ``closed ...``, ``pivoted``), and the file's state::

    SAVING --a save fails--> STOPPING --invalidated (or marked stale)--> OFF
                                      \\--neither works------------------> FROZEN

While STOPPING, every writer waits to learn which: OFF means the file vouches for
nothing and nothing more is saved this session; FROZEN means it vouches for what it said
and cannot be changed, so writes there are refused.
"""

from __future__ import annotations

import enum
import errno
import os
import secrets
from collections.abc import Awaitable, Callable

import trio

from ...errors import RequestFailed
from ...extents import Interval, IntervalSet
from .mapfile import PIVOTED, MapStore

MarkStale = Callable[[str], Awaitable[None]]
"""Puts a mark on the secondary's file naming a map session that must not be trusted."""
Render = Callable[[str], tuple[str, Callable[[], None]]]
"""Given the ending line, the map's text and what to do once it is saved."""


class Vouching(enum.Enum):
    """Where the map file stands once a save may have failed."""

    SAVING = "saved as the copy goes"
    STOPPING = "a save failed: the file is being made to vouch for nothing"
    OFF = "the file vouches for nothing; nothing more is saved this session"
    FROZEN = "the file vouches for what it said and cannot be changed: writes there refused"


class MapSaver:
    def __init__(self, store: MapStore) -> None:
        self.store = store
        self.session = secrets.token_hex(8)
        self.ending = f"open session={self.session}"
        self.vouching = Vouching.SAVING
        self.failure = ""
        """Why the map could not be saved, once it could not."""
        self.frozen = IntervalSet()
        """What the file vouches for and can no longer be changed (``FROZEN``)."""
        self.mark_stale: MarkStale | None = None
        self.on_failure: Callable[[str], None] = lambda reason: None
        self._changes = 0
        self._saved = 0
        self._lock = trio.Lock()
        self._settled = trio.Event()

    async def save(self, render: Render) -> None:
        """Make the file reflect every change made before this call; ``RequestFailed`` if
        it cannot (also once an earlier save failed: nothing is saved then)."""
        self._changes += 1
        wanted = self._changes
        async with self._lock:
            if self._saved >= wanted:
                return
            if self.vouching is not Vouching.SAVING:
                raise RequestFailed(errno.EIO, self.failure)
            changes = self._changes
            text, saved = render(self.ending)
            try:
                await self.store.save(text)
            except OSError as exc:
                err = exc.errno or errno.EIO
                reason = f"cannot save the copy map {self.store.name}: {os.strerror(err)}"
                self.failure = self.failure or reason
                self.on_failure(reason)
                raise RequestFailed(err, reason) from exc
            self._saved = changes
            saved()

    async def save_ending(self, ending: str, render: Render) -> None:
        """Save with another last line; it stays as it was if the save fails."""
        before, self.ending = self.ending, ending
        try:
            await self.save(render)
        except BaseException:
            self.ending = before
            raise

    async def save_pivoted(self, render: Render) -> None:
        await self.save_ending(PIVOTED, render)

    async def settled(self) -> Vouching:
        """The file's state once no writer is making it vouch for nothing."""
        while self.vouching is Vouching.STOPPING:
            await self._settled.wait()
        return self.vouching

    async def stop_vouching(self, vouched: IntervalSet) -> None:
        """A save failed: make the file vouch for nothing, then stop saving; failing that,
        freeze ``vouched``, what it vouches for."""
        if self.vouching is not Vouching.SAVING:
            return
        self.vouching = Vouching.STOPPING
        if await self._invalidated():
            self.vouching = Vouching.OFF
        else:
            self.frozen = vouched
            self.vouching = Vouching.FROZEN
        self._settled.set()

    async def _invalidated(self) -> bool:
        try:
            await self.store.invalidate()
            return True
        except OSError:
            pass
        if self.mark_stale is not None:
            try:
                await self.mark_stale(f"{self.store.name} {self.session}")
                return True
            except OSError:
                pass
        return False

    def refuse_if_frozen(self, span: Interval) -> None:
        if self.vouching is Vouching.FROZEN and self.frozen.overlaps(*span):
            raise RequestFailed(
                errno.EIO,
                f"{self.failure}, and it cannot be marked stale either; writes to copied "
                f"data are refused until the mirror is remounted with {self.store.name} "
                "writable (anything else could leave the map vouching for old data)",
            )
