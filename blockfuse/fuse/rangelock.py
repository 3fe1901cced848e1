"""A lock on ranges of sectors: holders of overlapping ranges take turns.

Invariant: no two holders' ranges overlap.  Writes through the FUSE file hold the
sectors they touch, so a read-modify-write of a partial sector never interleaves with
another write to that sector.  Holders are few (at most one per FUSE handler), so a
list scan is the smallest structure that keeps the invariant.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class RangeLock:
    def __init__(self) -> None:
        self._held: list[tuple[int, int, trio.Event]] = []

    def _overlapping(self, start: int, end: int) -> trio.Event | None:
        for s, e, released in self._held:
            if s < end and start < e:
                return released
        return None

    @asynccontextmanager
    async def hold(self, start: int, end: int) -> AsyncIterator[None]:
        """Hold ``[start, end)`` for the body, waiting while another holder overlaps it."""
        while (released := self._overlapping(start, end)) is not None:
            await released.wait()
        entry = (start, end, trio.Event())
        self._held.append(entry)
        try:
            yield
        finally:
            self._held.remove(entry)
            entry[2].set()
