"""The progress bar of ``blockfuse mount``: one line per mirror, fitted to the terminal.

::

    disk [##########--------------------] copying 42%, 430.5 MiB of 1 GiB, 16 MiB/s, ETA 0:37
    vm2  [##############################] synced 100%, 8 GiB of 8 GiB
    old  [#-------] failed at 12%, 28 errors: copying sectors 0-8192: unix:/run/n...

A line never reaches the terminal's last column, so it never wraps (a wrapped line
would scroll the screen at every redraw).  What does not fit is left out, the least
useful first: the sizes, then the rate, then the ETA, then the error count; then the
bar narrows (to ``MIN_BAR``) and goes; then the line is cut with ``...``.  The lines are
the console's live area (``blockfuse/log.py``): redrawn in place every ``BAR_SECONDS``,
below the log lines.  Without a terminal there is no bar (the log says what changes).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TextIO

import trio

from ..fuse.flatfile import FlatFile
from ..log import Console
from ..units import format_size

BAR_WIDTH = 30
MIN_BAR = 8
BAR_SECONDS = 0.5
MAX_NAME = 16
DEFAULT_COLUMNS = 80
CUT = "..."


def format_seconds(seconds: int) -> str:
    minutes, s = divmod(seconds, 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}:{m:02}:{s:02}" if hours else f"{m}:{s:02}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def copy_parts(values: Mapping[str, str]) -> list[tuple[str, int]]:
    """The pieces of a mirror's line, in order, each with how long it is kept when the
    line is too long (higher: kept longer; the first piece always stays)."""
    state = values.get("state", "?")
    total, copied = int(values.get("total") or 0), int(values.get("copied") or 0)
    at = " at" if state in ("failed", "cancelled") else ""
    parts = [(f"{state}{at} {values.get('progress', '?')}%", 9)]
    parts.append((f"{format_size(copied)} of {format_size(total)}", 1))
    rate = int(values.get("rate") or 0)
    if rate and state == "copying":
        parts.append((f"{format_size(rate)}/s", 2))
    if values.get("eta") and state == "copying":
        parts.append((f"ETA {format_seconds(int(values['eta']))}", 3))
    errors = int(values.get("errors") or 0)
    if errors:
        parts.append((plural(errors, "error"), 4))
    return parts


def fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, ending in ``...`` if it was cut."""
    if len(text) <= width:
        return text
    return text[: max(0, width - len(CUT))] + CUT if width > len(CUT) else text[:width]


def bar_line(name: str, values: Mapping[str, str], columns: int) -> str:
    """One mirror's line, at most ``columns - 1`` characters (see the module text).  A
    failed copy's line has a narrow bar and ends with the reason, cut to fit."""
    usable = max(1, columns - 1)
    name = fit(name, MAX_NAME)
    percent = min(100, max(0, int(values.get("progress") or 0)))
    failed = values.get("state") == "failed"
    parts = copy_parts(values)
    while True:
        text = ", ".join(p for p, _ in parts)
        room = usable - len(name) - len(" [] ") - len(text)
        if room >= MIN_BAR:
            width = MIN_BAR if failed else min(BAR_WIDTH, room)
            filled = width * percent // 100
            line = f"{name} [{'#' * filled}{'-' * (width - filled)}] {text}"
            break
        if len(parts) == 1:
            line = f"{name} {text}"
            break
        parts.remove(min(parts[1:], key=lambda p: p[1]))
    if failed and values.get("last_error"):
        line += f": {values['last_error']}"
    return fit(line, usable)


def mirror_lines(files: Sequence[FlatFile], columns: int) -> list[str]:
    """A line for every mirror among ``files``."""
    lines = []
    width = max(len(fit(f.name, MAX_NAME)) for f in files) if files else 0
    for f in files:
        values = f.status()
        if "progress" in values:
            lines.append(bar_line(f.name.ljust(width), values, columns))
    return lines


def terminal_columns(out: TextIO) -> int:
    try:
        return os.get_terminal_size(out.fileno()).columns or DEFAULT_COLUMNS
    except (OSError, ValueError, AttributeError):
        return DEFAULT_COLUMNS


async def _draw(files: Sequence[FlatFile], console: Console) -> None:
    shown: list[str] = []
    while True:
        await trio.sleep(BAR_SECONDS)  # first after the mount's banner
        lines = mirror_lines(files, terminal_columns(console.out))
        if lines != shown:
            console.show(lines)
            shown = lines


@asynccontextmanager
async def progress_bar(files: Sequence[FlatFile], console: Console) -> AsyncIterator[None]:
    """Redraw the copy progress of ``files`` on ``console`` (if it is a terminal) during
    the body; the last lines drawn stay on the screen."""
    if not console.is_terminal() or not any("progress" in f.status() for f in files):
        yield
        return
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_draw, files, console)
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()
            console.keep()
