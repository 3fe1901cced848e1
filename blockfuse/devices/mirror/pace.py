"""How much the copier keeps in flight: as much as the primary answers quickly.

A foreground write that overlaps a piece being copied waits for it (the range lock),
and every request shares the way to the primary with the pieces in flight ahead of it.
On a fast primary (a local file, nbdkit over a Unix socket) a piece is done in
milliseconds, and the copier keeps up to ``max_bytes`` in flight in whole chunks; on a
slow one, 16 MiB in flight held writes for seconds (4 MiB chunks from a 30 Mbit/s
primary: single writes took up to 20 s).  So the copier measures how long each piece
holds its range (lock taken to copied) and adapts the bytes it keeps in flight::

    held > TARGET_HOLD            halve the budget (once per piece time: pieces that
                                  began before a cut do not cut again)
    held < TARGET_HOLD / 4        double it, up to max_bytes, at most once per
                                  GROW_SECONDS

A piece is at most half the budget (and at least ``MIN_PIECE``, at most a chunk), so two
are in flight even at the smallest budget.  On a 30 Mbit/s link the budget settles near
a few times TARGET_HOLD's worth of bytes (0.5-1 MiB): a write waits for at most a piece
and the queue ahead of it.  The budget starts at ``START_BYTES``.  Growth is paced in
time, not per piece, because a server may answer a burst at once before it slows down
(nbdkit's rate filter lets 2 seconds' worth through first): doubling on every quick
piece of such a burst reached 8 MiB in flight, which then held writes for 2-3 s.  On a
fast primary the budget still reaches 16 MiB within about 0.1 s.
"""

from __future__ import annotations

import trio

TARGET_HOLD = 0.25
"""Seconds a piece may hold its range before the copier keeps less in flight."""
GROW_SECONDS = TARGET_HOLD / 8
"""The budget doubles at most once in this many seconds."""
MIN_PIECE = 64 << 10
START_BYTES = 1 << 20


class Pace:
    """The copier's budget of bytes in flight, and the waits to stay within it."""

    def __init__(self, max_bytes: int, chunk_bytes: int, sector_size: int) -> None:
        self.max_bytes = max(max_bytes, 2 * MIN_PIECE)
        self.budget = min(self.max_bytes, START_BYTES)
        self._chunk_bytes = chunk_bytes
        self._sector_size = sector_size
        self.in_flight = 0
        self._cut_at = float("-inf")
        self._grown_at = float("-inf")
        self._changed = trio.Event()

    @property
    def piece_bytes(self) -> int:
        """How big the next piece is: half the budget, within ``[MIN_PIECE, chunk]``."""
        piece = max(MIN_PIECE, min(self._chunk_bytes, self.budget // 2))
        return max(self._sector_size, piece - piece % self._sector_size)

    async def enter(self, nbytes: int) -> float:
        """Wait until ``nbytes`` more fit the budget (or nothing is in flight); the time
        the piece began, for ``leave``."""
        while self.in_flight and self.in_flight + nbytes > self.budget:
            await self._changed.wait()
        self.in_flight += nbytes
        return trio.current_time()

    def leave(self, nbytes: int, began: float, held: float) -> None:
        """A piece of ``nbytes`` that began at ``began`` held its range ``held`` seconds."""
        self.in_flight -= nbytes
        if held > TARGET_HOLD and began >= self._cut_at:
            self.budget = max(2 * MIN_PIECE, self.budget // 2)
            self._cut_at = trio.current_time()
        elif held < TARGET_HOLD / 4 and trio.current_time() - self._grown_at >= GROW_SECONDS:
            self.budget = min(self.max_bytes, self.budget * 2)
            self._grown_at = trio.current_time()
        self._changed.set()
        self._changed = trio.Event()
