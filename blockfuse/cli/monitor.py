"""Watching devices: ``blockfuse status``, ``blockfuse pivot``, the progress bar.

``status`` and ``pivot`` work on a running mount through the flat files' extended
attributes only (``user.blockfuse.*``, the same ones ``getfattr -d`` shows), and on a
running server through its control socket, which answers with the same keys and
values.  So both become one ``Report`` and print the same lines, or (``--json``) the
same JSON: numbers as numbers, ``read_only`` as a boolean.  The progress bar runs
inside ``blockfuse mount`` and reads the devices' ``status()`` directly.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

import trio

from ..fuse.flatfile import FlatFile
from ..fuse.mountpoint import is_ours
from ..serve.control import PIVOT_TIMEOUT, ControlError, ask
from ..units import format_size, printable
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


INT_KEYS = frozenset(
    {"size", "sector_size", "progress", "copied", "total", "rate", "eta", "errors"}
    | {"allocated", "backing_length", "reconnects"}
)
"""The status keys whose values are numbers (in ``--json``; ``""`` becomes null)."""


@dataclass
class Report:
    """What ``status`` knows of a mount or a server: each device's status (``name`` and
    the ``user.blockfuse.*`` keys), a mount's scratch directories, a server's own facts."""

    source: str
    path: str
    devices: list[dict[str, str]]
    scratch: list[dict[str, Any]] = field(default_factory=list)
    server: dict[str, Any] | None = None


def mount_report(mountpoint: str) -> Report:
    report = Report("mount", mountpoint, [])
    for name in sorted(os.listdir(mountpoint)):
        path = os.path.join(mountpoint, name)
        if os.path.isdir(path):
            report.scratch.append(scratch_facts(name, path))
        else:
            report.devices.append({"name": name, **read_status(path)})
    return report


def server_report(path: str) -> Report:
    reply = ask(path, {"op": "status"})
    if not reply.get("ok"):
        raise ControlError(f"{path}: {reply.get('error', 'refused')}")
    devices = [{str(k): str(v) for k, v in d.items()} for d in reply.get("devices", [])]
    return Report("server", path, devices, server=reply.get("server") or {})


def status_report(mountpoint: str) -> str:
    """A few lines per device under ``mountpoint``."""
    return report_lines(mount_report(mountpoint))


def report_lines(report: Report) -> str:
    lines: list[str] = []
    for values in report.devices:
        lines += device_lines(values)
    for scratch in report.scratch:
        lines.append(describe_scratch(scratch))
    if report.server is not None:
        lines.append(describe_server(report.server))
    return "\n".join(lines) if lines else f"{report.path}: no devices"


def device_lines(values: Mapping[str, str]) -> list[str]:
    size = format_size(int(values.get("size", "0")))
    ro = ", read-only" if values.get("read_only") == "yes" else ""
    lines = [f"{values['name']}: {values.get('kind', '?')}, {size}{ro}  {values.get('spec', '')}"]
    if "connection" in values:
        lines.append(f"  {values['connection']} ({values.get('remote', '')})")
    if "progress" in values:
        lines.append(f"  {describe_copy(values)}")
    for key, label in (("notice", "note"), ("last_error", "last error")):
        if values.get(key):
            lines.append(f"  {label}: {values[key]}")
    return lines


def describe_server(server: Mapping[str, Any]) -> str:
    """``serving nbd+unix:///?socket=/run/vm1.sock; 2 connections``, with ``; tls
    require`` when TLS is on, then a line per connection."""
    where = ", ".join(str(uri) for uri in server.get("listening", [])) or "nowhere"
    n = int(server.get("connections", 0))
    tls = server.get("tls", "off")
    note = f"; tls {tls}" if tls != "off" else ""
    lines = [f"serving {where}{note}; {n} connection{'' if n == 1 else 's'}"]
    lines += [f"  {describe_client(client)}" for client in server.get("clients", [])]
    return "\n".join(lines)


def describe_client(client: Mapping[str, Any]) -> str:
    """``unix client #3: disk, tls TLSv1.3, client CN=name`` (or ``plaintext``)."""
    export = client.get("export")
    what = f"export {printable(str(export))!r}" if export is not None else "in the handshake"
    tls = f"tls {client['tls']}" if client.get("tls") else "plaintext"
    if client.get("client_certificate"):
        tls += f", client {printable(str(client['client_certificate']))}"
    return f"{printable(str(client.get('peer', '?')))}: {what}, {tls}"


def report_json(report: Report) -> dict[str, Any]:
    out: dict[str, Any] = {
        "source": report.source,
        "path": report.path,
        "devices": [typed(values) for values in report.devices],
    }
    if report.source == "mount":
        out["scratch"] = report.scratch
    if report.server is not None:
        out["server"] = report.server
    return out


def typed(values: Mapping[str, str]) -> dict[str, Any]:
    """One device's status with numbers as numbers and ``read_only`` a boolean."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in INT_KEYS:
            out[key] = int(value) if value.lstrip("-").isdigit() else None
        elif key == "read_only":
            out[key] = value == "yes"
        else:
            out[key] = value
    return out


def scratch_facts(name: str, path: str) -> dict[str, Any]:
    sizes = [os.stat(os.path.join(path, entry)).st_size for entry in os.listdir(path)]
    return {"name": name, "files": len(sizes), "bytes": sum(sizes)}


def describe_scratch(scratch: Mapping[str, Any]) -> str:
    """``tmp/: scratch directory, 3 files, 12 MiB``."""
    n = scratch["files"]
    count = f"{n} file{'' if n == 1 else 's'}"
    return f"{scratch['name']}/: scratch directory, {count}, {format_size(scratch['bytes'])}"


def pivot(path: str) -> str:
    """Ask the mirror at ``path`` to pivot; its new state, or ``MonitorError``."""
    try:
        os.setxattr(path, PREFIX + "pivot", b"1")
    except OSError as exc:
        raise MonitorError(_pivot_problem(path, exc)) from exc
    return read_status(path).get("state", "?")


def _pivot_problem(path: str, exc: OSError) -> str:
    values = read_status(path) if exc.errno == errno.EBUSY else {}
    return pivot_problem(path, exc.errno or errno.EIO, exc.strerror or str(exc), values)


def pivot_problem(what: str, err: int, text: str, values: Mapping[str, str]) -> str:
    """Why ``what`` cannot pivot, in one line (``values``: its status, for EBUSY)."""
    if err == errno.EBUSY:
        return (
            f"cannot pivot {what}: the mirror is {values.get('state')} "
            f"({values.get('progress')}% copied); pivot once it is synced"
        )
    if err in (errno.EPERM, errno.ENOTSUP):
        return f"cannot pivot {what}: it is not a mirror"
    return f"cannot pivot {what}: {text}"


def pivot_served(control: str, name: str | None) -> tuple[str, str]:
    """Ask the server at ``control`` to pivot device ``name`` (the only one if ``None``);
    ``(name, new state)``, or ``MonitorError``."""
    if name is None:
        devices = [d["name"] for d in server_report(control).devices]
        if len(devices) != 1:
            raise MonitorError(
                f"{control} serves {len(devices)} devices; name one: "
                f"blockfuse pivot {control} NAME ({', '.join(devices)})"
            )
        name = devices[0]
    reply = ask(control, {"op": "pivot", "device": name}, timeout=PIVOT_TIMEOUT)
    if not reply.get("ok"):
        values = {str(k): str(v) for k, v in (reply.get("device") or {}).items()}
        err = int(reply.get("errno", errno.EIO))
        raise MonitorError(pivot_problem(name, err, str(reply.get("error")), values))
    return name, str(reply.get("state", "?"))


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
        help="show every device's status (a mirror's copy), of a mount or a server",
        description=(
            "Print each device of a live mount, or of a `blockfuse serve` given its "
            "control socket: kind, size, spec, and a mirror's copy state, progress, rate, "
            "ETA and errors."
        ),
    )
    status.add_argument("target", metavar="MOUNTPOINT|CONTROL_SOCKET")
    status.add_argument("--json", action="store_true", help="print the same facts as JSON")
    pivot_ = sub.add_parser(
        "pivot",
        help="detach a synced mirror's primary; the secondary serves alone from then on",
        description=(
            "Once a mirror is synced: flush both sides, close the primary, and serve all "
            "I/O from the secondary. Refused (nothing changes) while the copy runs. "
            "Name the device as MOUNTPOINT/NAME, or as CONTROL_SOCKET NAME for a server."
        ),
    )
    pivot_.add_argument("target", metavar="MOUNTPOINT/NAME|CONTROL_SOCKET")
    pivot_.add_argument("name", nargs="?", metavar="NAME")


def is_control_socket(path: str) -> bool:
    """Whether ``path`` is a socket (a server's control socket).  The mount table first:
    a path on a blockfuse mount is never stat'ed here (a stopped one never answers)."""
    if is_ours(path) or is_ours(os.path.dirname(os.path.abspath(path))):
        return False
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def cmd_status(args: argparse.Namespace) -> int:
    try:
        if is_control_socket(args.target):
            report = server_report(args.target)
        else:
            check_live_mount(args.target)
            report = mount_report(args.target)
    except ControlError as exc:
        raise CommandError(str(exc)) from exc
    except OSError as exc:
        raise CommandError(f"cannot read the status under {args.target}: {exc}") from exc
    if args.json:
        print(json.dumps(report_json(report), indent=2))
    else:
        print(report_lines(report))
    return EXIT_OK


def cmd_pivot(args: argparse.Namespace) -> int:
    if is_control_socket(args.target):
        try:
            name, state = pivot_served(args.target, args.name)
        except (MonitorError, ControlError) as exc:
            raise CommandError(str(exc)) from exc
        print(f"blockfuse: {name} is {state}; the primary is detached", file=sys.stderr)
        return EXIT_OK
    path = os.path.join(args.target, args.name) if args.name else args.target
    # The mount table first, then a bounded probe: a stopped blockfuse never answers.
    mountpoint = os.path.dirname(os.path.abspath(path))
    if not is_ours(mountpoint):
        if is_ours(path):
            raise CommandError(f"{path} is a mountpoint; name the device: {path}/NAME")
        raise CommandError(f"{path} is not a device in a blockfuse mount")
    check_live_mount(mountpoint)
    try:
        state = pivot(path)
    except MonitorError as exc:
        raise CommandError(str(exc)) from exc
    print(f"blockfuse: {path} is {state}; the primary is detached", file=sys.stderr)
    return EXIT_OK
