"""Request deadlines for the reader of one NBD connection.

Every call in flight has a deadline.  The reader waits for data inside ``waiting()``, a
cancel scope that ends at the earliest deadline the watchdog knows of; a new call with
an earlier deadline moves the wait's end up (``watch``).  When a wait ends, or before the
next one, ``overdue(calls)`` names the calls past their deadline, so the reader can drop
the connection.  Finished calls are not reported to the watchdog: its bound may be too
early, which costs a wake-up that finds nothing overdue and re-arms at the next deadline
(``O(calls in flight)``, once per deadline, not once per reply).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol, TypeVar

import trio


class Timed(Protocol):
    deadline: float


T = TypeVar("T", bound=Timed)


class Watchdog:
    def __init__(self) -> None:
        self._next = math.inf
        """No call's deadline is earlier than this."""
        self._wait: trio.CancelScope | None = None

    def watch(self, deadline: float) -> None:
        """A call with ``deadline`` is in flight: the reader's wait must end by then."""
        if deadline < self._next:
            self._next = deadline
            if self._wait is not None:
                self._wait.deadline = deadline

    @contextmanager
    def waiting(self) -> Iterator[trio.CancelScope]:
        """A cancel scope for one wait of the reader's, ending at the earliest deadline."""
        with trio.move_on_at(self._next) as scope:
            self._wait = scope
            try:
                yield scope
            finally:
                self._wait = None

    def overdue(self, calls: Iterable[T]) -> list[T]:
        """The calls past their deadline (none until the earliest one is reached)."""
        now = trio.current_time()
        if now < self._next:
            return []
        pending = list(calls)
        late = [call for call in pending if call.deadline <= now]
        if not late:
            self._next = min((call.deadline for call in pending), default=math.inf)
        return late
