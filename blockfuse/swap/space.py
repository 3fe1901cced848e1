"""The free-space map and layout arithmetic of swapfs (see ``blockfuse.swap``).

Units are numbered from 0; a ``UnitRun`` is a stretch of consecutive units.  ``FreeSpace``
keeps the free ones as coalesced runs on a ``SortedDict`` and hands them out first-fit,
contiguous where it can.  The rest are pure functions from a handle's runs to device
byte ranges, tested without a device.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sortedcontainers import SortedDict

from ..errors import NoSpace


@dataclass(frozen=True)
class UnitRun:
    """``count`` units from unit ``start``."""

    start: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count


# --- the free-space map --------------------------------------------------------------


class FreeSpace:
    """The free units as disjoint runs, coalesced: no two free runs touch."""

    def __init__(self, total_units: int) -> None:
        self.total_units = total_units
        self.free_units = 0
        self._runs: SortedDict = SortedDict()  # start -> count
        self.give([UnitRun(0, total_units)])

    def runs(self) -> list[UnitRun]:
        return [UnitRun(start, count) for start, count in self._runs.items()]

    def take(self, count: int, after: int | None = None) -> list[UnitRun]:
        """``count`` units, as few runs as first-fit allows; ``NoSpace`` takes nothing.

        ``after`` is the unit just past the caller's last run: growing there comes first.
        """
        if count > self.free_units:
            raise NoSpace(f"{count} units needed, {self.free_units} free")
        taken: list[UnitRun] = []
        if count and after is not None and after in self._runs:
            taken.append(self._cut(after, count))
            count -= taken[-1].count
        if count and (start := self._first_fit(count)) is not None:
            taken.append(self._cut(start, count))
            count = 0
        while count:
            taken.append(self._cut(self._runs.keys()[0], count))
            count -= taken[-1].count
        return taken

    def give(self, runs: Iterable[UnitRun]) -> None:
        """Return ``runs`` to the map, merging each with the free runs it touches."""
        for run in runs:
            if run.count:
                self._check_owned(run)
                self._insert(run)

    def _first_fit(self, count: int) -> int | None:
        for start, n in self._runs.items():
            if n >= count:
                return int(start)
        return None

    def _cut(self, start: int, want: int) -> UnitRun:
        """Up to ``want`` units from the front of the free run at ``start``."""
        n = self._runs.pop(start)
        got = min(n, want)
        if got < n:
            self._runs[start + got] = n - got
        self.free_units -= got
        return UnitRun(start, got)

    def _insert(self, run: UnitRun) -> None:
        start, count = run.start, run.count
        i = self._runs.bisect_left(start)
        if i:
            before, before_count = self._runs.peekitem(i - 1)
            if before + before_count == start:
                del self._runs[before]
                start, count = before, before_count + count
        if run.end in self._runs:
            count += self._runs.pop(run.end)
        self._runs[start] = count
        self.free_units += run.count

    def _check_owned(self, run: UnitRun) -> None:
        """A run given back must lie on the device and overlap no free run."""
        if run.start < 0 or run.end > self.total_units:
            raise AssertionError(f"{run} lies outside {self.total_units} units")
        i = self._runs.bisect_right(run.start)
        if i and sum(self._runs.peekitem(i - 1)) > run.start:
            raise AssertionError(f"{run} is already free in part")
        if i < len(self._runs) and self._runs.keys()[i] < run.end:
            raise AssertionError(f"{run} is already free in part")


# --- pure layout arithmetic ----------------------------------------------------------


def merge_runs(runs: Sequence[UnitRun], more: Iterable[UnitRun]) -> list[UnitRun]:
    """``runs + more``, joining neighbours that continue one another on the device."""
    out = list(runs)
    for run in more:
        if out and out[-1].end == run.start:
            out[-1] = UnitRun(out[-1].start, out[-1].count + run.count)
        else:
            out.append(run)
    return out


def split_runs(runs: Sequence[UnitRun], keep: int) -> tuple[list[UnitRun], list[UnitRun]]:
    """The first ``keep`` units of ``runs``, and the rest."""
    head: list[UnitRun] = []
    tail: list[UnitRun] = []
    for run in runs:
        n = max(0, min(run.count, keep))
        keep -= n
        if n:
            head.append(UnitRun(run.start, n))
        if n < run.count:
            tail.append(UnitRun(run.start + n, run.count - n))
    return head, tail


def map_range(
    runs: Sequence[UnitRun], unit: int, offset: int, length: int
) -> list[tuple[int, int]]:
    """The device byte ranges ``(offset, length)`` that hold a handle's bytes, in order."""
    out: list[tuple[int, int]] = []
    stop, pos = offset + length, 0
    for run in runs:
        lo, hi = max(offset, pos), min(stop, pos + run.count * unit)
        if lo < hi:
            out.append((run.start * unit + lo - pos, hi - lo))
        pos += run.count * unit
        if pos >= stop:
            break
    if sum(n for _, n in out) != length:
        raise AssertionError(f"bytes {offset}..{stop} run past the handle's units")
    return out
