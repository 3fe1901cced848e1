"""Sets of integer intervals on ``sortedcontainers``: copied regions, dirty regions.

An ``IntervalSet`` holds half-open ranges ``[start, end)`` of ints (sectors, chunks)
and keeps them disjoint and coalesced: ``add(0, 4)`` then ``add(4, 8)`` is one interval
``[0, 8)``.  It is a ``SortedDict`` from start to end, so every operation costs
``O(log n + k)`` for ``n`` intervals and ``k`` intervals touched, and the memory grows
with the number of separate runs, not with their length: a 1 TiB device copied in
order is one or a few intervals however many sectors it holds.

Invariant: for consecutive keys ``a < b``, ``self._ends[a] < b`` (disjoint and not
touching), every stored interval is non-empty, and ``self._total`` is the sum of their
lengths.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from sortedcontainers import SortedDict

from .units import round_down, round_up

Interval = tuple[int, int]


class IntervalSet:
    """A set of ints stored as disjoint, coalesced half-open intervals."""

    def __init__(self, intervals: Iterable[Interval] = ()) -> None:
        self._ends: SortedDict = SortedDict()
        self._total = 0
        for start, end in intervals:
            self.add(start, end)

    def __iter__(self) -> Iterator[Interval]:
        return iter(list(self._ends.items()))

    def __len__(self) -> int:
        """The number of separate intervals (not of ints)."""
        return len(self._ends)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IntervalSet) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"IntervalSet({list(self)!r})"

    def __contains__(self, point: int) -> bool:
        return self.covers(point, point + 1)

    @property
    def total(self) -> int:
        """How many ints the set holds."""
        return self._total

    def copy(self) -> IntervalSet:
        out = IntervalSet()
        out._ends = self._ends.copy()
        out._total = self._total
        return out

    def add(self, start: int, end: int) -> None:
        """Add ``[start, end)``, merging with the intervals it overlaps or touches."""
        if start >= end:
            return
        i = self._ends.bisect_right(start) - 1
        if i >= 0 and self._ends.peekitem(i)[1] >= start:
            start = self._ends.peekitem(i)[0]
        else:
            i += 1
        while i < len(self._ends):
            key, value = self._ends.peekitem(i)
            if key > end:
                break
            end = max(end, value)
            self._total -= value - key
            del self._ends[key]
        self._ends[start] = end
        self._total += end - start

    def discard(self, start: int, end: int) -> None:
        """Remove ``[start, end)``, splitting the intervals it cuts."""
        for key, value in self._overlapping(start, end):
            del self._ends[key]
            self._total -= value - key
            if key < start:
                self._ends[key] = start
                self._total += start - key
            if value > end:
                self._ends[end] = value
                self._total += value - end

    def _overlapping(self, start: int, end: int) -> list[Interval]:
        if start >= end:
            return []
        i = max(self._ends.bisect_right(start) - 1, 0)
        out = []
        while i < len(self._ends):
            key, value = self._ends.peekitem(i)
            if key >= end:
                break
            if value > start:
                out.append((key, value))
            i += 1
        return out

    def overlaps(self, start: int, end: int) -> bool:
        return bool(self._overlapping(start, end))

    def covers(self, start: int, end: int) -> bool:
        """Whether every int of ``[start, end)`` is in the set (true for an empty range)."""
        if start >= end:
            return True
        i = self._ends.bisect_right(start) - 1
        return i >= 0 and int(self._ends.peekitem(i)[1]) >= end

    def intersection(self, start: int, end: int) -> list[Interval]:
        """The parts of ``[start, end)`` in the set, in order."""
        return [(max(k, start), min(v, end)) for k, v in self._overlapping(start, end)]

    def gaps(self, start: int, end: int) -> list[Interval]:
        """The parts of ``[start, end)`` not in the set, in order."""
        out = []
        pos = start
        for key, value in self._overlapping(start, end):
            if key > pos:
                out.append((pos, key))
            pos = max(pos, value)
        if pos < end:
            out.append((pos, end))
        return out

    def first_gap(self, start: int, end: int) -> Interval | None:
        """The first part of ``[start, end)`` not in the set, or ``None``."""
        pos = start
        i = max(self._ends.bisect_right(start) - 1, 0)
        while pos < end and i < len(self._ends):
            key, value = self._ends.peekitem(i)
            if key > pos:
                return pos, min(key, end)
            pos = max(pos, value)
            i += 1
        return (pos, end) if pos < end else None

    def to_list(self) -> list[Interval]:
        return list(self._ends.items())


def align_out(start: int, end: int, unit: int) -> Interval:
    """``[start, end)`` grown to whole multiples of ``unit``."""
    return round_down(start, unit), round_up(end, unit)
