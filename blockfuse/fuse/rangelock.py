"""A lock on ranges of sectors: holders of overlapping ranges take turns.

Invariant: no two holders' ranges overlap.  Writes through the FUSE file hold the
sectors they touch, so a read-modify-write of a partial sector never interleaves with
another write to that sector.  Holders are few (at most one per FUSE handler), so a
list scan is the smallest structure that keeps the invariant.

Every FUSE write takes it, so the uncontended path is kept cheap: ``acquire`` and
``release`` rather than a generator-based context manager, and a hold makes its
``trio.Event`` only when someone has to wait for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class Hold:
    """One holder's range; ``released`` exists once another holder waits for it."""

    __slots__ = ("end", "released", "start")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.released: trio.Event | None = None

    def wait_event(self) -> trio.Event:
        if self.released is None:
            self.released = trio.Event()
        return self.released


class RangeLock:
    def __init__(self) -> None:
        self._held: list[Hold] = []

    def _overlapping(self, start: int, end: int) -> Hold | None:
        for hold in self._held:
            if hold.start < end and start < hold.end:
                return hold
        return None

    async def acquire(self, start: int, end: int) -> Hold:
        """Hold ``[start, end)``, waiting while another holder overlaps it.

        The caller must ``release`` the answer (in a ``finally``).  Cancelled while
        waiting, it holds nothing."""
        while (other := self._overlapping(start, end)) is not None:
            await other.wait_event().wait()
        hold = Hold(start, end)
        self._held.append(hold)
        return hold

    def release(self, hold: Hold) -> None:
        self._held.remove(hold)
        if hold.released is not None:
            hold.released.set()

    @asynccontextmanager
    async def hold(self, start: int, end: int) -> AsyncIterator[None]:
        """Hold ``[start, end)`` for the body, waiting while another holder overlaps it."""
        hold = await self.acquire(start, end)
        try:
            yield
        finally:
            self.release(hold)
