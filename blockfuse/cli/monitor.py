"""Watching and steering devices: ``blockfuse status``, ``pivot`` and ``mirror``.

Each takes a device as ``MOUNTPOINT/NAME`` (a flat file of a live mount: its
``user.blockfuse.*`` attributes are read, and written to act) or as ``CONTROL_SOCKET
[NAME]`` (a ``blockfuse serve``: the same keys and values over its control socket; NAME
may be left out when it serves one device).  ``status`` takes a mountpoint or a control
socket, or nothing: then every blockfuse mount and server on the host (``registry.py``).
What the reports look like is ``report.py``; the progress bar is ``progress.py``.

The mirror controls (``mirror retry|cancel|rate|pivot``) are the mirror's own
(``devices/mirror/device.py``): a control that does not apply in the mirror's state is
refused (EBUSY) and the message says why, from the mirror's state, with the same words
whichever way it was asked.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from ..devices.mirror.state import MirrorState, refusal
from ..fuse.mountpoint import answers, is_ours, mount_pid
from ..serve.control import PIVOT_TIMEOUT, STATUS_TIMEOUT, ControlError, ask
from ..spec import SpecError, parse_size
from ..units import format_size
from . import registry
from .common import EXIT_OK, CommandError, check_live_mount
from .report import (
    PREFIX,
    Report,
    listing_lines,
    mount_report,
    read_status,
    report_json,
    report_lines,
    server_report,
)

ACTIONS = {
    "pivot": ("pivot", "pivot"),
    "retry": ("retry", "retry the copy of"),
    "cancel": ("cancel", "cancel the copy of"),
    "rate": ("rate_limit", "change the copy rate limit of"),
}
"""Each mirror control: the attribute written (``user.blockfuse.KEY``), and the words
of its refusal (``cannot WORDS WHAT: ...``)."""


class MonitorError(Exception):
    """A status or control request that failed; the message is one line for the user."""


def status_report(mountpoint: str) -> str:
    """A few lines per device under ``mountpoint``."""
    return report_lines(mount_report(mountpoint))


# --- naming a device ------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A device named on the command line: a flat file (``path``) or a server's device
    (``control``, ``name``)."""

    what: str
    path: str = ""
    control: str = ""
    name: str = ""


def is_control_socket(path: str) -> bool:
    """Whether ``path`` is a socket (a server's control socket).  The mount table first:
    a path on a blockfuse mount is never stat'ed here (a stopped one never answers)."""
    if is_ours(path) or is_ours(os.path.dirname(os.path.abspath(path))):
        return False
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def resolve(target: str, name: str | None, command: str) -> Target:
    """``MOUNTPOINT/NAME``, ``MOUNTPOINT NAME`` or ``CONTROL_SOCKET [NAME]`` as a
    ``Target``; ``CommandError`` if it names no live device."""
    if is_control_socket(target):
        return Target(name or "", control=target, name=name or only_device(target, command))
    path = os.path.join(target, name) if name else target
    # The mount table first, then a bounded probe: a stopped blockfuse never answers.
    mountpoint = os.path.dirname(os.path.abspath(path))
    if not is_ours(mountpoint):
        if is_ours(path):
            raise CommandError(f"{path} is a mountpoint; name the device: {path}/NAME")
        raise CommandError(f"{path} is not a device in a blockfuse mount")
    check_live_mount(mountpoint)
    return Target(path, path=path)


def only_device(control: str, command: str) -> str:
    try:
        devices = [d["name"] for d in server_report(control).devices]
    except ControlError as exc:
        raise CommandError(str(exc)) from exc
    if len(devices) != 1:
        raise CommandError(
            f"{control} serves {len(devices)} devices; name one: "
            f"blockfuse {command} {control} NAME ({', '.join(devices)})"
        )
    return devices[0]


# --- the mirror controls --------------------------------------------------------------------


def control(target: Target, action: str, value: str = "1") -> dict[str, str]:
    """Ask the mirror at ``target`` to act; its status then, or ``MonitorError``."""
    if target.path:
        return _control_file(target.path, action, value)
    timeout = PIVOT_TIMEOUT if action in ("pivot", "cancel") else STATUS_TIMEOUT
    request = {"op": action, "device": target.name, "value": value}
    try:
        reply = ask(target.control, request, timeout=timeout)
    except ControlError as exc:
        raise MonitorError(str(exc)) from exc
    device = {str(k): str(v) for k, v in (reply.get("device") or {}).items()}
    if not reply.get("ok"):
        err = int(reply.get("errno", errno.EIO))
        raise MonitorError(problem(target.what, action, err, str(reply.get("error")), device))
    return device


def _control_file(path: str, action: str, value: str) -> dict[str, str]:
    key = ACTIONS[action][0]
    try:
        os.setxattr(path, PREFIX + key, value.encode())
    except OSError as exc:
        err = exc.errno or errno.EIO
        values = read_status(path) if err == errno.EBUSY else {}
        raise MonitorError(problem(path, action, err, exc.strerror or str(exc), values)) from exc
    return read_status(path)


def problem(what: str, action: str, err: int, text: str, values: Mapping[str, str]) -> str:
    """Why ``action`` on ``what`` was refused, in one line (``values``: its status, for
    EBUSY, which means the action does not apply in the mirror's state)."""
    words = f"cannot {ACTIONS[action][1]} {what}"
    if err == errno.EBUSY and values.get("state") in {s.value for s in MirrorState}:
        state = MirrorState(values["state"])
        return f"{words}: {refusal(action, state, int(values.get('progress') or 0))}"
    if err in (errno.EPERM, errno.ENOTSUP):
        return f"{words}: it is not a mirror"
    return f"{words}: {text}"


def done_line(what: str, action: str, values: Mapping[str, str]) -> str:
    """What a control did, in one line."""
    state, percent = values.get("state", "?"), values.get("progress", "?")
    if action == "pivot":
        return f"{what} is {state}; the primary is detached"
    if action == "retry":
        return f"{what} is {state} again, from {percent}%"
    if action == "cancel":
        return (
            f"{what}: the copy is {state} at {percent}%; the primary serves alone "
            f"(blockfuse mirror retry, or a remount, copies again)"
        )
    limit = values.get("rate_limit")
    return f"{what}: copy rate limit {format_size(int(limit)) + '/s' if limit else 'none'}"


def rate_option(text: str) -> str:
    """argparse type for a rate limit: bytes per second as a number, or ``none``."""
    if text.strip().lower() == "none":
        return "none"
    try:
        rate = parse_size(text)
    except SpecError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or none: no limit)") from None
    if rate <= 0:
        raise argparse.ArgumentTypeError("a rate limit must be more than 0 (or none: no limit)")
    return str(rate)


# --- the subcommands ------------------------------------------------------------------------

DEVICE_HELP = "MOUNTPOINT/NAME (a flat file), or a server's CONTROL_SOCKET [NAME]"


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    status = sub.add_parser(
        "status",
        help="show every device's status (a mirror's copy), of a mount or a server",
        description=(
            "Print each device of a live mount, or of a `blockfuse serve` given its "
            "control socket: kind, size, spec, and a mirror's copy state, progress, rate, "
            "ETA and errors. With no argument: every blockfuse mount and server on this "
            "host."
        ),
    )
    status.add_argument("target", nargs="?", metavar="MOUNTPOINT|CONTROL_SOCKET")
    status.add_argument("--json", action="store_true", help="print the same facts as JSON")
    pivot = sub.add_parser(
        "pivot",
        help="detach a synced mirror's primary; the secondary serves alone from then on",
        description=(
            "Once a mirror is synced: flush both sides, close the primary, and serve all "
            "I/O from the secondary. Refused (nothing changes) while the copy runs. "
            "Name the device as MOUNTPOINT/NAME, or as CONTROL_SOCKET NAME for a server. "
            "The same as `blockfuse mirror pivot`."
        ),
    )
    add_device_arguments(pivot)
    mirror = sub.add_parser(
        "mirror",
        help="steer a running mirror: retry a failed copy, change its rate, cancel it",
        description=(
            "Steer the copy of a mirror without remounting: retry a failed (or cancelled) "
            "copy, change the copier's rate limit, cancel the copy (the primary serves "
            "alone; the copy map keeps what was copied), or pivot. Each is refused, "
            "changing nothing, where it does not apply. The same as writing "
            "user.blockfuse.retry, rate_limit, cancel or pivot with setfattr."
        ),
    )
    actions = mirror.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (
        ("retry", "copy again after a failure or a cancel, from what is copied"),
        ("cancel", "give the copy up: the primary serves alone, the map is kept"),
        ("pivot", "detach a synced mirror's primary (as `blockfuse pivot`)"),
    ):
        add_device_arguments(actions.add_parser(action, help=text, description=text))
    rate = actions.add_parser(
        "rate",
        help="change the copier's rate limit at once",
        description="Change the copier's rate limit at once (bytes per second, or none).",
    )
    add_device_arguments(rate)
    rate.add_argument(
        "rate", type=rate_option, metavar="RATE",
        help="bytes per second (binary units: 64M is 64 MiB/s), or none",
    )  # fmt: skip


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="MOUNTPOINT/NAME|CONTROL_SOCKET", help=DEVICE_HELP)
    parser.add_argument("name", nargs="?", metavar="NAME")


def cmd_status(args: argparse.Namespace) -> int:
    if args.target is None:
        return print_listing(every_report(), as_json=args.json)
    try:
        if is_control_socket(args.target):
            report = server_report(args.target)
        else:
            check_live_mount(args.target)
            report = mount_report(args.target, mount_pid(args.target))
    except ControlError as exc:
        raise CommandError(str(exc)) from exc
    except OSError as exc:
        raise CommandError(f"cannot read the status under {args.target}: {exc}") from exc
    if args.json:
        print(json.dumps(report_json(report), indent=2))
    else:
        print(report_lines(report))
    return EXIT_OK


def every_report() -> list[Report]:
    """Every blockfuse mount and server on the host, each asked (one that cannot be
    asked says why in its ``error``)."""
    reports = []
    for found in registry.mounts() + registry.servers():
        try:
            if found.source == "mount":
                reports.append(live_mount_report(found.path, found.pid))
            elif not found.path:
                reports.append(Report("server", "", [], pid=found.pid, error="no control socket"))
            else:
                report = server_report(found.path)
                report.pid = report.pid or found.pid
                reports.append(report)
        except (ControlError, CommandError, OSError) as exc:
            reports.append(Report(found.source, found.path, [], pid=found.pid, error=str(exc)))
    return reports


def live_mount_report(mountpoint: str, pid: int | None) -> Report:
    state = answers(mountpoint)
    if state is not True:
        why = "its blockfuse died (stale)" if state is False else "it does not answer"
        return Report("mount", mountpoint, [], pid=pid, error=why)
    return mount_report(mountpoint, pid)


def print_listing(reports: list[Report], *, as_json: bool) -> int:
    if as_json:
        print(json.dumps([report_json(r) for r in reports], indent=2))
    else:
        print(listing_lines(reports))
    return EXIT_OK


def cmd_pivot(args: argparse.Namespace) -> int:
    return run_control(args, "pivot", "pivot")


def cmd_mirror(args: argparse.Namespace) -> int:
    value = args.rate if args.action == "rate" else "1"
    return run_control(args, args.action, f"mirror {args.action}", value)


def run_control(args: argparse.Namespace, action: str, command: str, value: str = "1") -> int:
    target = resolve(args.target, args.name, command)
    try:
        values = control(target, action, value)
    except MonitorError as exc:
        raise CommandError(str(exc)) from exc
    print(f"blockfuse: {done_line(target.what, action, values)}", file=sys.stderr)
    return EXIT_OK
