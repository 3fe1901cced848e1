"""blockfuse's own log: one line per event, each with a timestamp, on stderr.

::

    2025-05-01 12:00:03.412 blockfuse: disk: synced: all 1 GiB copied (310 MiB of data read)
    2025-05-01 12:00:09.020 blockfuse: warning: nbd://10.0.0.5/vm1: connection lost: ...

The events are blockfuse's own (a mount ready, a mirror's state changes, a pivot, copy
errors and retries, NBD disconnects and reconnects, I/O errors returned to users, map
saves that fail); every module logs them through ``logging.getLogger(__name__)``, under
the ``blockfuse`` logger.  ``setup(level)`` (``--log-level``) decides what is shown:
``error``, ``warning``, ``info`` (the default) or ``debug``.  Other libraries' loggers
(pyfuse3, trio) show only warnings unless the level is ``debug``.

The console: when stderr is a terminal, a *live area* (the progress bar, one line per
mirror) stays below the log lines.  A log line is written above it: the area is erased,
the line written, the area drawn again, all under one lock (log lines may come from
worker threads), so lines and bar never mix.  Without a terminal there is no live area:
the same log lines, nothing else.

``Repeats`` keeps a storm of one kind of event (a failing disk under fio) to a few lines:
at most ``burst`` lines per ``period`` seconds per key, the next one allowed saying how
many were left out.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TextIO

LEVELS = {
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}
DEFAULT_LEVEL = "info"
QUIET_LIBRARIES = ("pyfuse3", "trio")
"""Loggers kept to warnings unless the level is ``debug``."""
MARKS = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}

ERASE_LINE = "\r\x1b[K"
LINE_UP = "\x1b[1A"


class Console:
    """stderr as log lines above a live area (see the module text).  ``out`` is looked
    up at each write when not given, so that a replaced ``sys.stderr`` is used."""

    def __init__(self, out: TextIO | None = None) -> None:
        self._out = out
        self._live: list[str] = []
        self._lock = threading.Lock()

    @property
    def out(self) -> TextIO:
        return self._out if self._out is not None else sys.stderr

    def is_terminal(self) -> bool:
        try:
            return self.out.isatty()
        except (AttributeError, ValueError):  # closed, or not a real file
            return False

    def write_line(self, line: str) -> None:
        """One line above the live area."""
        with self._lock:
            out = self.out
            self._erase(out)
            out.write(line + "\n")
            self._draw(out)
            out.flush()

    def show(self, lines: Sequence[str]) -> None:
        """Replace the live area with ``lines`` (each must fit the terminal's width)."""
        with self._lock:
            out = self.out
            self._erase(out)
            self._live = list(lines)
            self._draw(out)
            out.flush()

    def keep(self) -> None:
        """Leave the live area on the screen as ordinary lines, and have none."""
        with self._lock:
            if self._live:
                self.out.write("\n")
                self.out.flush()
            self._live = []

    def _erase(self, out: TextIO) -> None:
        if self._live:
            out.write(ERASE_LINE + (LINE_UP + ERASE_LINE) * (len(self._live) - 1))

    def _draw(self, out: TextIO) -> None:
        if self._live:
            out.write("\n".join(self._live))


_console = Console()


def console() -> Console:
    """The process's console (stderr)."""
    return _console


class ConsoleHandler(logging.Handler):
    """Log records as lines on the console: ``TIME blockfuse: [warning: ]MESSAGE``."""

    def __init__(self, target: Console) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.target.write_line(format_line(record))
        except Exception:
            self.handleError(record)


def format_line(record: logging.LogRecord) -> str:
    """One line: newlines in the message (an exception's traceback) become `` | ``."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
    millis = int(record.msecs)
    text = record.getMessage()
    if record.exc_info:
        text += "\n" + logging.Formatter().formatException(record.exc_info)
    text = " | ".join(part for part in text.splitlines() if part.strip())
    return f"{stamp}.{millis:03} blockfuse: {MARKS.get(record.levelno, '')}{text}"


def parse_level(text: str) -> int:
    """``'info'`` -> ``logging.INFO``; ``ValueError`` naming the levels otherwise."""
    try:
        return LEVELS[text.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown log level {text!r} (use one of {', '.join(LEVELS)})") from None


def setup(level: str = DEFAULT_LEVEL, target: Console | None = None) -> Console:
    """Send every log record at ``level`` or above to the console (replacing what an
    earlier call set up); the console."""
    global _console
    if target is not None:
        _console = target
    number = parse_level(level)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, ConsoleHandler)]:
        root.removeHandler(handler)
    root.addHandler(ConsoleHandler(_console))
    root.setLevel(number)
    logging.getLogger("blockfuse").setLevel(number)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(number if number <= logging.DEBUG else logging.WARNING)
    return _console


class Repeats:
    """At most ``burst`` lines per ``period`` seconds for each key (see the module text)."""

    def __init__(
        self, burst: int = 5, period: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst = burst
        self.period = period
        self._clock = clock
        self._seen: dict[object, tuple[float, int, int]] = {}
        """key -> (start of its period, lines shown in it, lines left out since)."""

    def allow(self, key: object) -> int | None:
        """``None``: leave this line out; else how many lines of ``key`` were left out
        since the last one shown (to say so in this one)."""
        now = self._clock()
        start, shown, left_out = self._seen.get(key, (now, 0, 0))
        if now - start >= self.period:
            start, shown = now, 0
        if shown >= self.burst:
            self._seen[key] = (start, shown, left_out + 1)
            return None
        self._seen[key] = (start, shown + 1, 0)
        return left_out


def left_out(count: int) -> str:
    """`` (12 more like it were left out)``, or ``""``."""
    return f" ({count} more like it were left out)" if count else ""
