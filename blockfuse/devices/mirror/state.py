"""A mirror's copy state: where it is in its life, how far the copy got, what went wrong.

The state is one value of ``MirrorState`` plus the device's ``Stage``; both change only
through ``CopyState.apply(event)``, by one table each (h11's ``_state.py`` habit)::

               SYNC                 PIVOT
    COPYING ---------> SYNCED --------------> PIVOTED
     ^  ^  \\  <---------/  \\
     |  |   \\   UNSYNC      \\ FAIL
     |  |    \\ FAIL          v
     |  |     `----------> FAILED
     |  |  RETRY             /
     |  `-------------------'
     |                          CANCEL (from COPYING, SYNCED or FAILED)
     `------ RETRY ------- CANCELLED <----
     (a write the secondary missed, while synced, makes it COPYING again)

    Stage:  OPEN --STOP--> STOPPING --CLOSE--> CLOSED

FAILED and CANCELLED both leave the copier idle; RETRY starts it again from what is
copied.  CANCELLED also stops writing the secondary: the primary serves alone, and the
copy map goes on recording what the secondary misses (``device.py``).  An event a state
does not list is a bug (``AssertionError``); events that change nothing in a state are
listed as going to the same state.  Every change wakes ``wait_change``; ``can(event)``
says whether a state takes an event (a control that does not apply is refused).

The copier reports through ``CopyEvents`` (``copier.py``); this class implements the
part of it that is bookkeeping: errors, failure, progress.  Progress is reported to the
callback on every whole-percent change (0 first), then ``"complete"`` once.  The rate
counts the data copied (bytes read from the primary and written), not the holes the
copier skips: a run of holes is "copied" in no time, and would make the rate, and the
ETA from it, meaningless.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

Progress = int | str
"""What the progress callback gets: a whole percent (0 first), then ``"complete"`` once."""

RATE_WINDOW_SECONDS = 10.0
"""The copy rate is measured over this many seconds."""

log = logging.getLogger(__name__)


class MirrorState(enum.Enum):
    COPYING = "copying"
    SYNCED = "synced"
    FAILED = "failed"
    PIVOTED = "pivoted"
    CANCELLED = "cancelled"


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
    RETRY = "the copy is tried again"
    CANCEL = "the copy is given up: the primary serves alone"
    STOP = "closing began"
    CLOSE = "closed"


_S, _E = MirrorState, Event
STATES: dict[MirrorState, dict[Event, MirrorState]] = {
    _S.COPYING: {
        _E.SYNC: _S.SYNCED, _E.UNSYNC: _S.COPYING, _E.FAIL: _S.FAILED, _E.CANCEL: _S.CANCELLED,
    },
    _S.SYNCED: {
        _E.UNSYNC: _S.COPYING, _E.FAIL: _S.FAILED, _E.PIVOT: _S.PIVOTED, _E.CANCEL: _S.CANCELLED,
    },
    _S.FAILED: {
        _E.UNSYNC: _S.FAILED, _E.FAIL: _S.FAILED, _E.RETRY: _S.COPYING, _E.CANCEL: _S.CANCELLED,
    },
    _S.PIVOTED: {_E.UNSYNC: _S.PIVOTED, _E.FAIL: _S.PIVOTED},
    _S.CANCELLED: {_E.UNSYNC: _S.CANCELLED, _E.FAIL: _S.CANCELLED, _E.RETRY: _S.COPYING},
}  # fmt: skip
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
    """What the copy map calls copied: data and holes."""
    total_bytes: int
    rate: float
    """Bytes of data copied per second over the last few seconds of copying (holes,
    skipped, do not count)."""
    eta: float | None
    """Seconds until synced at ``rate``, for the data estimated to remain (``None``:
    unknown)."""
    errors: int
    """Copy errors met so far: every failed try of every piece (several are copied at
    once, each tried ``retries + 1`` times), and every failed checkpoint."""
    last_error: str
    """The reason the copy failed, once it failed; until then the latest error."""
    chunks_in_flight: int
    notice: str = ""
    """Something the user should know that is not an error (a saved map not used)."""
    data_bytes: int = 0
    """Bytes of data copied in this session (read from the primary and written)."""
    rate_limit: int | None = None
    """The copier's limit in bytes per second (``None``: none)."""

    @property
    def percent(self) -> int:
        return percent(self.copied_bytes, self.total_bytes)

    @property
    def state_text(self) -> str:
        return str(self.state.value)


def percent(done: int, total: int) -> int:
    return 100 if total == 0 else done * 100 // total


def now() -> float | None:
    """The trio clock (the copier's), or ``None`` outside a trio run."""
    try:
        return trio.current_time()
    except RuntimeError:
        return None


class CopyState:
    """The state machine, the error record and the progress of one mirror.

    ``label`` names the mirror in log lines (the front end's name for it)."""

    def __init__(self, total_bytes: int, progress: Callable[[Progress], None] | None) -> None:
        self.state = MirrorState.COPYING
        self.stage = Stage.OPEN
        self.label = "mirror"
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

    def can(self, event: Event) -> bool:
        """Whether the current state takes ``event`` (see the module text)."""
        if event in (Event.STOP, Event.CLOSE):
            return event in STAGES[self.stage]
        return event in STATES[self.state]

    def apply(self, event: Event, detail: str = "") -> None:
        """Move by ``event`` (see the module text); wakes ``wait_change``.  A change of
        state is logged, one line, with ``detail`` after it."""
        if event in (Event.STOP, Event.CLOSE):
            self.stage = _next(STAGES, self.stage, event)
        else:
            before, self.state = self.state, _next(STATES, self.state, event)
            if self.state is not before:
                self._log_change(detail)
        self._changed.set()
        self._changed = trio.Event()

    def _log_change(self, detail: str) -> None:
        level = logging.ERROR if self.state is MirrorState.FAILED else logging.INFO
        log.log(level, "%s: %s%s", self.label, self.state.value, f": {detail}" if detail else "")

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
    def cancelled(self) -> bool:
        return self.state is MirrorState.CANCELLED

    @property
    def copying(self) -> bool:
        """Whether the copier works (or keeps the copy whole): COPYING or SYNCED."""
        return self.state in (MirrorState.COPYING, MirrorState.SYNCED)

    @property
    def going_on(self) -> bool:
        """Whether the copier should go on copying."""
        return self.stage is Stage.OPEN and self.state is MirrorState.COPYING

    # --- errors ------------------------------------------------------------------------

    def note_error(self, message: str) -> None:
        self.errors += 1
        self.last_error = message

    def fail(self, reason: str) -> None:
        """The copy cannot go on.  The first reason stays the reason (``last_error`` too);
        a later one, once failed or cancelled, is logged only.  Once pivoted this changes
        nothing (the primary is gone anyway)."""
        if self.state in (MirrorState.FAILED, MirrorState.CANCELLED):
            log.warning("%s: also: %s", self.label, reason)
        elif self.state is not MirrorState.PIVOTED:
            self.reason = self.last_error = reason
        self.apply(Event.FAIL, f"{reason}; the disk goes on using the primary")

    def retry(self, detail: str) -> None:
        """Copy again (from FAILED or CANCELLED)."""
        self.reason = ""
        self.apply(Event.RETRY, detail)

    # --- progress ----------------------------------------------------------------------

    def report(self, copied_bytes: int, data_bytes: int) -> None:
        """The copy reached ``copied_bytes`` (``data_bytes`` of them read from the
        primary, so far in all): sample the rate, tell the callback."""
        t = now()
        if t is not None:
            self._samples.append((t, data_bytes))
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
        """Bytes of data per second over the last ``RATE_WINDOW_SECONDS``, while copying:
        from the first sample in the window to now, so that a copy that stalls shows its
        rate falling."""
        t = now()
        if self.state is not MirrorState.COPYING or t is None:
            return 0.0
        recent = [(s, n) for s, n in self._samples if t - s < RATE_WINDOW_SECONDS]
        if len(recent) < 2 or t <= recent[0][0]:
            return 0.0
        return (recent[-1][1] - recent[0][1]) / (t - recent[0][0])

    def statistics(
        self, copied_bytes: int, in_flight: int, *, data_bytes: int = 0,
        data_left: int | None = None, rate_limit: int | None = None,
    ) -> MirrorStatistics:  # fmt: skip
        """``data_left``: the bytes of data estimated to remain to be copied (``None``:
        all that is not copied yet)."""
        rate = self.rate()
        left = self._total - copied_bytes if data_left is None else data_left
        eta = left / rate if rate > 0 else (0.0 if left == 0 else None)
        if self.state in (MirrorState.SYNCED, MirrorState.PIVOTED):
            eta = 0.0
        elif self.state is not MirrorState.COPYING:
            eta = None
        return MirrorStatistics(
            self.state, self.reason, copied_bytes, self._total, rate, eta,
            self.errors, self.last_error, in_flight, self.notice, data_bytes, rate_limit,
        )  # fmt: skip


CONTROLS = {
    "pivot": "pivot once it is synced",
    "retry": "only a failed or cancelled copy can be retried",
    "cancel": "",
    "rate": "",
}
"""The controls of a mirror, and what each needs (the end of its refusal)."""


def refusal(action: str, state: MirrorState, percent: int) -> str:
    """Why ``action`` (a key of ``CONTROLS``) does not apply in ``state``, in words
    for ``cannot ACTION WHAT: ...``."""
    if state is MirrorState.PIVOTED:
        return "the mirror is pivoted: its copy is over"
    now = f"the mirror is {state.value} ({percent}% copied)"
    if action == "pivot" and state is MirrorState.CANCELLED:
        return f"{now}; retry the copy, then pivot once it is synced"
    need = CONTROLS.get(action, "")
    return f"{now}; {need}" if need else now


K = TypeVar("K", MirrorState, Stage)


def _next(table: dict[K, dict[Event, K]], current: K, event: Event) -> K:
    try:
        return table[current][event]
    except KeyError:
        raise AssertionError(f"mirror: {event.name} is not possible in {current}") from None
