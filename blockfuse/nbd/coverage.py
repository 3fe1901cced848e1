"""Which bytes of a READ the server's chunks have covered, refusing overlaps."""

from __future__ import annotations

import bisect

from ..errors import ProtocolError


class Coverage:
    """Disjoint half-open ranges, merged when they touch; ``total`` bytes covered."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.total = 0

    def add(self, start: int, end: int) -> None:
        """Record ``[start, end)``; raises ``ProtocolError`` if it overlaps what is there."""
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
