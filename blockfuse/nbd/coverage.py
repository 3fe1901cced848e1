"""Which bytes of a READ the server's chunks have covered, refusing overlaps.

The covered pieces are kept as two sorted lists (starts, ends), merged whenever chunks
touch, so a reply that arrives in order, or in reverse, is one piece however many chunks
it has.  Chunks may come in any order, so pieces can also stay apart; at most
``MAX_READ_PIECES`` may (a ``ProtocolError`` beyond), which bounds both the memory and
the cost of each ``add`` (a bisection and a list insert of at most that many items).
"""

from __future__ import annotations

import bisect

from ..errors import ProtocolError
from .constants import MAX_READ_PIECES


class Coverage:
    """Disjoint half-open ranges, merged when they touch; ``total`` bytes covered."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.total = 0

    def add(self, start: int, end: int) -> None:
        """Record ``[start, end)``; raises ``ProtocolError`` if it overlaps what is there
        or leaves more than ``MAX_READ_PIECES`` pieces apart."""
        i = bisect.bisect_right(self._starts, start)
        if (i and self._ends[i - 1] > start) or (i < len(self._starts) and self._starts[i] < end):
            raise ProtocolError(f"chunk [{start}, {end}) overlaps an earlier chunk")
        self.total += end - start
        if i and self._ends[i - 1] == start:
            i -= 1
            self._ends[i] = end
        else:
            self._starts.insert(i, start)
            self._ends.insert(i, end)
        if i + 1 < len(self._starts) and self._starts[i + 1] == self._ends[i]:
            self._ends[i] = self._ends.pop(i + 1)
            del self._starts[i + 1]
        if len(self._starts) > MAX_READ_PIECES:
            raise ProtocolError(
                f"a READ reply scattered into more than {MAX_READ_PIECES} separate pieces"
            )
