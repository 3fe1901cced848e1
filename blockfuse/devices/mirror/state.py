"""A mirror's copy state: where it is in its life, how far the copy got, what went wrong.

The state is one value of ``MirrorState`` plus the device's ``Stage``; both change only
through ``CopyState.apply(event)``, by one table each (h11's ``_state.py`` habit)::

               SYNC                 PIVOT
    COPYING ---------> SYNCED --------------> PIVOTED
       ^   \\  <---------/  \\
       |    \\   UNSYNC      \\ FAIL
       |     \\ FAIL          v
       |      `----------> FAILED
       |
     (a write the secondary missed, while synced, makes it COPYING again)

    Stage:  OPEN --STOP--> STOPPING --CLOSE--> CLOSED

An event a state does not list is a bug (``AssertionError``); events that change nothing
in a state are listed as going to the same state.  Every change wakes ``wait_change``.

The copier reports through ``CopyEvents`` (``copier.py``); this class implements the
part of it that is bookkeeping: errors, failure, progress.  Progress is reported to the
callback on every whole-percent change (0 first), then ``"complete"`` once.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

Progress = int | str
"""What the progress callback gets: a whole percent (0 first), then ``"complete"`` once."""

RATE_WINDOW_SECONDS = 10.0
"""The copy rate is measured over this many seconds."""


class MirrorState(enum.Enum):
    COPYING = "copying"
    SYNCED = "synced"
    FAILED = "failed"
    PIVOTED = "pivoted"


class Stage(enum.Enum):
    OPEN = "open"
    STOPPING = "stopping"
    """``aclose`` began: the copier stops, nobody waits for the copy any more."""
    CLOSED = "closed"


class Event(enum.Enum):
    SYNC = "every sector is copied and durable"
    UNSYNC = "a sector is no longer copied"
    FAIL = "the copy cannot go on"
    PIVOT = "the primary is detached"
    STOP = "closing began"
    CLOSE = "closed"


_S, _E = MirrorState, Event
STATES: dict[MirrorState, dict[Event, MirrorState]] = {
    _S.COPYING: {_E.SYNC: _S.SYNCED, _E.UNSYNC: _S.COPYING, _E.FAIL: _S.FAILED},
    _S.SYNCED: {_E.UNSYNC: _S.COPYING, _E.FAIL: _S.FAILED, _E.PIVOT: _S.PIVOTED},
    _S.FAILED: {_E.UNSYNC: _S.FAILED, _E.FAIL: _S.FAILED},
    _S.PIVOTED: {_E.UNSYNC: _S.PIVOTED, _E.FAIL: _S.PIVOTED},
}
STAGES: dict[Stage, dict[Event, Stage]] = {
    Stage.OPEN: {_E.STOP: Stage.STOPPING},
    Stage.STOPPING: {_E.STOP: Stage.STOPPING, _E.CLOSE: Stage.CLOSED},
    Stage.CLOSED: {_E.STOP: Stage.CLOSED, _E.CLOSE: Stage.CLOSED},
}


@dataclass(frozen=True)
class MirrorStatistics:
    state: MirrorState
    reason: str
    """Why the copy failed (``""`` unless ``state`` is ``FAILED``)."""
    copied_bytes: int
    total_bytes: int
    rate: float
    """Bytes per second over the last few seconds of copying."""
    eta: float | None
    errors: int
    """Copy errors met so far (each retried or fatal)."""
    last_error: str
    chunks_in_flight: int
    notice: str = ""
    """Something the user should know that is not an error (a saved map not used)."""

    @property
    def percent(self) -> int:
        return percent(self.copied_bytes, self.total_bytes)

    @property
    def state_text(self) -> str:
        if self.state is MirrorState.FAILED:
            return f"failed: {self.reason}"
        return str(self.state.value)


def percent(done: int, total: int) -> int:
    return 100 if total == 0 else done * 100 // total


class CopyState:
    """The state machine, the error record and the progress of one mirror."""

    def __init__(self, total_bytes: int, progress: Callable[[Progress], None] | None) -> None:
        self.state = MirrorState.COPYING
        self.stage = Stage.OPEN
        self.reason = ""
        self.errors = 0
        self.last_error = ""
        self.notice = ""
        self._total = total_bytes
        self._progress = progress
        self._reported = -1
        self._samples: deque[tuple[float, int]] = deque(maxlen=64)
        self._changed = trio.Event()

    # --- the state machine -------------------------------------------------------------

    def apply(self, event: Event) -> None:
        """Move by ``event`` (see the module text); wakes ``wait_change``."""
        if event in (Event.STOP, Event.CLOSE):
            self.stage = _next(STAGES, self.stage, event)
        else:
            self.state = _next(STATES, self.state, event)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_change(self) -> None:
        """Return at the next ``apply``."""
        await self._changed.wait()

    @property
    def open(self) -> bool:
        return self.stage is Stage.OPEN

    @property
    def closed(self) -> bool:
        return self.stage is Stage.CLOSED

    @property
    def pivoted(self) -> bool:
        return self.state is MirrorState.PIVOTED

    @property
    def going_on(self) -> bool:
        """Whether the copier should go on copying."""
        return self.stage is Stage.OPEN and self.state is MirrorState.COPYING

    # --- errors ------------------------------------------------------------------------

    def note_error(self, message: str) -> None:
        self.errors += 1
        self.last_error = message

    def fail(self, reason: str) -> None:
        """The copy cannot go on (ignored once pivoted: the primary is gone anyway)."""
        if self.state is not MirrorState.PIVOTED:
            self.reason = reason
        self.apply(Event.FAIL)

    # --- progress ----------------------------------------------------------------------

    def report(self, copied_bytes: int) -> None:
        """The copy reached ``copied_bytes``: sample the rate, tell the callback."""
        self._samples.append((time.monotonic(), copied_bytes))
        done = percent(copied_bytes, self._total)
        while self._reported < done:
            self._reported += 1
            if self._progress is not None:
                self._progress(self._reported)

    def report_complete(self) -> None:
        if self._progress is not None and self._reported <= 100:
            self._reported = 101
            self._progress("complete")

    def rate(self) -> float:
        """Bytes per second over the last ``RATE_WINDOW_SECONDS``, while copying."""
        if self.state is not MirrorState.COPYING:
            return 0.0
        now = time.monotonic()
        recent = [(t, n) for t, n in self._samples if now - t < RATE_WINDOW_SECONDS]
        if len(recent) < 2 or recent[-1][0] <= recent[0][0]:
            return 0.0
        return (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])

    def statistics(self, copied_bytes: int, in_flight: int) -> MirrorStatistics:
        rate = self.rate()
        eta = (self._total - copied_bytes) / rate if rate > 0 else None
        if self.state in (MirrorState.SYNCED, MirrorState.PIVOTED):
            eta = 0.0
        return MirrorStatistics(
            self.state, self.reason, copied_bytes, self._total, rate, eta,
            self.errors, self.last_error, in_flight, self.notice,
        )  # fmt: skip


K = TypeVar("K", MirrorState, Stage)


def _next(table: dict[K, dict[Event, K]], current: K, event: Event) -> K:
    try:
        return table[current][event]
    except KeyError:
        raise AssertionError(f"mirror: {event.name} is not possible in {current}") from None
