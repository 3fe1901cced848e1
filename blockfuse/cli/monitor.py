"""Watching devices: ``blockfuse status``, ``blockfuse pivot``, the progress bar.

``status`` and ``pivot`` work on a running mount through the flat files' extended
attributes only (``user.blockfuse.*``), the same ones ``getfattr -d`` shows, so they
need nothing but the path.  The progress bar runs inside ``blockfuse mount`` and reads
the devices' ``status()`` directly.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TextIO

import trio

from ..fuse.flatfile import FlatFile
from ..fuse.mountpoint import is_ours
from ..units import format_size
from .common import EXIT_OK, CommandError, check_live_mount

PREFIX = "user.blockfuse."
BAR_WIDTH = 30
BAR_SECONDS = 0.5


class MonitorError(Exception):
    """A status or pivot request that failed; the message is one line for the user."""


def read_status(path: str) -> dict[str, str]:
    """Every ``user.blockfuse.*`` attribute of ``path``, without the prefix."""
    out = {}
    for name in os.listxattr(path):
        if name.startswith(PREFIX):
            out[name[len(PREFIX) :]] = os.getxattr(path, name).decode(errors="replace")
    return out


def format_seconds(seconds: int) -> str:
    minutes, s = divmod(seconds, 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}:{m:02}:{s:02}" if hours else f"{m}:{s:02}"


def describe_copy(values: Mapping[str, str]) -> str:
    """``copying 42% (420 MiB of 1 GiB) at 12.5 MiB/s, ETA 0:48, 0 errors``; a failed
    copy ends with its reason: ``failed at 8% (...), 17 errors: REASON``."""
    total = int(values.get("total", "0"))
    copied = int(values.get("copied", "0"))
    state, _, reason = values["state"].partition(": ")
    at = "at " if reason else ""
    text = f"{state} {at}{values['progress']}% ({format_size(copied)} of {format_size(total)})"
    rate = int(values.get("rate", "0") or 0)
    if rate:
        text += f" at {format_size(rate)}/s"
    if values.get("eta") and values["state"] == "copying":
        text += f", ETA {format_seconds(int(values['eta']))}"
    errors = int(values.get("errors", "0") or 0)
    text += f", {errors} error{'' if errors == 1 else 's'}"
    return f"{text}: {reason}" if reason else text


def status_report(mountpoint: str) -> str:
    """A few lines per device under ``mountpoint``."""
    lines = []
    for name in sorted(os.listdir(mountpoint)):
        path = os.path.join(mountpoint, name)
        if os.path.isdir(path):
            lines.append(describe_scratch(name, path))
            continue
        values = read_status(path)
        size = format_size(int(values.get("size", "0")))
        ro = ", read-only" if values.get("read_only") == "yes" else ""
        lines.append(f"{name}: {values.get('kind', '?')}, {size}{ro}  {values.get('spec', '')}")
        if "connection" in values:
            lines.append(f"  {values['connection']} ({values.get('remote', '')})")
        if "progress" in values:
            lines.append(f"  {describe_copy(values)}")
        for key, label in (("notice", "note"), ("last_error", "last error")):
            if values.get(key):
                lines.append(f"  {label}: {values[key]}")
    return "\n".join(lines) if lines else f"{mountpoint}: no devices"


def describe_scratch(name: str, path: str) -> str:
    """``tmp/: scratch directory, 3 files, 12 MiB``."""
    sizes = [os.stat(os.path.join(path, entry)).st_size for entry in os.listdir(path)]
    count = f"{len(sizes)} file{'' if len(sizes) == 1 else 's'}"
    return f"{name}/: scratch directory, {count}, {format_size(sum(sizes))}"


def pivot(path: str) -> str:
    """Ask the mirror at ``path`` to pivot; its new state, or ``MonitorError``."""
    try:
        os.setxattr(path, PREFIX + "pivot", b"1")
    except OSError as exc:
        raise MonitorError(_pivot_problem(path, exc)) from exc
    return read_status(path).get("state", "?")


def _pivot_problem(path: str, exc: OSError) -> str:
    if exc.errno == errno.EBUSY:
        values = read_status(path)
        return (
            f"cannot pivot {path}: the mirror is {values.get('state')} "
            f"({values.get('progress')}% copied); pivot once it is synced"
        )
    if exc.errno in (errno.EPERM, errno.ENOTSUP):
        return f"cannot pivot {path}: it is not a mirror"
    return f"cannot pivot {path}: {exc.strerror}"


# --- the progress bar ------------------------------------------------------------------


def progress_line(files: Sequence[FlatFile]) -> str:
    parts = []
    for f in files:
        values = f.status()
        if "progress" not in values:
            continue
        percent = int(values["progress"])
        filled = BAR_WIDTH * percent // 100
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        parts.append(f"{f.name} [{bar}] {describe_copy(values)}")
    return "  ".join(parts)


async def _draw(files: Sequence[FlatFile], out: TextIO) -> None:
    shown = ""
    while True:
        await trio.sleep(BAR_SECONDS)  # first after the mount's banner
        line = progress_line(files)
        if line and line != shown:
            out.write("\r" + line + "\x1b[K")
            out.flush()
            shown = line


@asynccontextmanager
async def progress_bar(files: Sequence[FlatFile], out: TextIO) -> AsyncIterator[None]:
    """Redraw the copy progress of ``files`` on ``out`` (a terminal) during the body."""
    if not out.isatty() or not any("progress" in f.status() for f in files):
        yield
        return
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_draw, files, out)
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()
            out.write("\n")


# --- the subcommands ---------------------------------------------------------------------


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    status = sub.add_parser(
        "status",
        help="show every device's status (a mirror's copy)",
        description=(
            "Print each device of a live mount: kind, size, spec, and a mirror's copy "
            "state, progress, rate, ETA and errors."
        ),
    )
    status.add_argument("mountpoint")
    pivot_ = sub.add_parser(
        "pivot",
        help="detach a synced mirror's primary; the secondary serves alone from then on",
        description=(
            "Once a mirror is synced: flush both sides, close the primary, and serve all "
            "I/O from the secondary. Refused (nothing changes) while the copy runs."
        ),
    )
    pivot_.add_argument("file", metavar="MOUNTPOINT/NAME")


def cmd_status(args: argparse.Namespace) -> int:
    check_live_mount(args.mountpoint)
    try:
        print(status_report(args.mountpoint))
    except OSError as exc:
        raise CommandError(f"cannot read the status under {args.mountpoint}: {exc}") from exc
    return EXIT_OK


def cmd_pivot(args: argparse.Namespace) -> int:
    # The mount table first, then a bounded probe: a stopped blockfuse never answers.
    mountpoint = os.path.dirname(os.path.abspath(args.file))
    if not is_ours(mountpoint):
        if is_ours(args.file):
            raise CommandError(f"{args.file} is a mountpoint; name the device: {args.file}/NAME")
        raise CommandError(f"{args.file} is not a device in a blockfuse mount")
    check_live_mount(mountpoint)
    try:
        state = pivot(args.file)
    except MonitorError as exc:
        raise CommandError(str(exc)) from exc
    print(f"blockfuse: {args.file} is {state}; the primary is detached", file=sys.stderr)
    return EXIT_OK
