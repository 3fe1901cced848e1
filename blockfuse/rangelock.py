"""A lock on ranges of sectors: holders of overlapping ranges take turns, in arrival order.

Invariant: no two holders' ranges overlap.  Every entry (holding or waiting) sits in
one list in the order it asked, and waits only for the overlapping entries before it,
so the waits form no cycle and nobody starves: a stream of writes cannot starve a
mirror's chunk, nor a chunk a write.  Entries that do not overlap never wait for each
other.  Holders are few (one per request or chunk in flight), so a list scan is the
smallest structure that keeps this.

Every FUSE write and every mirror write takes it, so the uncontended path is cheap:
``acquire``/``release`` rather than a generator-based context manager, and an entry
makes its ``trio.Event`` only when somebody has to wait for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class Hold:
    """One entry's range; ``_released`` exists once another entry waits for it."""

    __slots__ = ("_released", "done", "end", "start")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.done = False
        self._released: trio.Event | None = None

    async def wait_released(self) -> None:
        if not self.done:
            if self._released is None:
                self._released = trio.Event()
            await self._released.wait()

    def mark_released(self) -> None:
        self.done = True
        if self._released is not None:
            self._released.set()


class RangeLock:
    def __init__(self) -> None:
        self._entries: list[Hold] = []

    def __len__(self) -> int:
        """How many entries hold or wait."""
        return len(self._entries)

    async def acquire(self, start: int, end: int) -> Hold:
        """Hold ``[start, end)`` once every overlapping entry that asked before is gone.

        The caller must ``release`` the answer (in a ``finally``).  Cancelled while
        waiting, it holds nothing."""
        ahead = [h for h in self._entries if h.start < end and start < h.end]
        hold = Hold(start, end)
        self._entries.append(hold)
        try:
            for other in ahead:
                await other.wait_released()
        except BaseException:
            self.release(hold)
            raise
        return hold

    def acquire_now(self, start: int, end: int) -> Hold | None:
        """Hold ``[start, end)`` at once if no entry overlaps it (none holds or waits for
        any of it), else ``None``: it then takes no turn from anybody."""
        for h in self._entries:
            if h.start < end and start < h.end:
                return None
        hold = Hold(start, end)
        self._entries.append(hold)
        return hold

    def release(self, hold: Hold) -> None:
        self._entries.remove(hold)
        hold.mark_released()

    @asynccontextmanager
    async def hold(self, start: int, end: int) -> AsyncIterator[None]:
        """Hold ``[start, end)`` for the body (see ``acquire``)."""
        hold = await self.acquire(start, end)
        try:
            yield
        finally:
            self.release(hold)
