"""What ``blockfuse status`` knows of a mount or a server, as lines or as JSON.

A mount is read through its flat files' extended attributes only (``user.blockfuse.*``,
the same ones ``getfattr -d`` shows); a server through its control socket, which answers
with the same keys and values.  Both become one ``Report``, printed as the same lines,
or (``--json``) the same JSON with the keys of ``KEYS``, every one of them present for a
device of that kind (``null`` when there is nothing to say): numbers as numbers,
``read_only`` a boolean.  The README lists them; they are stable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..serve.control import ControlError, ask
from ..units import format_size, printable
from .progress import format_seconds, plural

PREFIX = "user.blockfuse."

KEYS: dict[str, tuple[str, ...]] = {
    "device": ("name", "kind", "spec", "size", "sector_size", "read_only", "io_errors"),
    "mirror": (
        "state", "progress", "copied", "total", "rate", "eta", "errors", "rate_limit",
        "last_error", "notice",
    ),
    "nbd": ("remote", "connection", "reconnects"),
    "sparse": ("backing_length", "allocated"),
}  # fmt: skip
"""The keys of a device's entry: every device has ``device``'s; a mirror, an NBD export
and a sparse image (at any depth of ``safe(...)``) add their own."""
MARKS = {"mirror": "progress", "nbd": "connection", "sparse": "allocated"}
"""The key that says a device's status includes a group's keys."""
INT_KEYS = frozenset(
    {"size", "sector_size", "progress", "copied", "total", "rate", "eta", "errors"}
    | {"rate_limit", "allocated", "backing_length", "reconnects", "io_errors"}
    | {"primary_reconnects", "secondary_reconnects"}
)
"""The keys whose values are numbers (in JSON; ``""`` becomes null)."""
BOOL_KEYS = frozenset({"read_only"})


@dataclass
class Report:
    """What ``status`` knows of a mount or a server: each device's status (``name`` and
    the ``user.blockfuse.*`` keys), a mount's scratch directories, a server's own facts.
    ``error`` says why a mount or server found by the listing could not be asked."""

    source: str
    path: str
    devices: list[dict[str, str]]
    scratch: list[dict[str, Any]] = field(default_factory=list)
    server: dict[str, Any] | None = None
    pid: int | None = None
    error: str = ""


def read_status(path: str) -> dict[str, str]:
    """Every ``user.blockfuse.*`` attribute of ``path``, without the prefix."""
    out = {}
    for name in os.listxattr(path):
        if name.startswith(PREFIX):
            out[name[len(PREFIX) :]] = os.getxattr(path, name).decode(errors="replace")
    return out


def mount_report(mountpoint: str, pid: int | None = None) -> Report:
    report = Report("mount", mountpoint, [], pid=pid)
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
    pid = reply.get("pid")
    return Report(
        "server", path, devices, server=reply.get("server") or {},
        pid=pid if isinstance(pid, int) else None,
    )  # fmt: skip


def scratch_facts(name: str, path: str) -> dict[str, Any]:
    sizes = [os.stat(os.path.join(path, entry)).st_size for entry in os.listdir(path)]
    return {"name": name, "files": len(sizes), "bytes": sum(sizes)}


# --- as lines ------------------------------------------------------------------------------


def describe_copy(values: Mapping[str, str]) -> str:
    """``copying 42% (420 MiB of 1 GiB) at 12.5 MiB/s, ETA 0:48, 0 errors``; a failed
    copy: ``failed at 8% (80 MiB of 1 GiB), 28 errors`` (the reason is ``last_error``,
    on a line of its own)."""
    state = values.get("state", "?")
    total, copied = int(values.get("total") or 0), int(values.get("copied") or 0)
    at = "at " if state in ("failed", "cancelled") else ""
    text = f"{state} {at}{values.get('progress', '?')}% "
    text += f"({format_size(copied)} of {format_size(total)})"
    rate, limit = int(values.get("rate") or 0), int(values.get("rate_limit") or 0)
    if rate and state == "copying":
        text += f" at {format_size(rate)}/s"
    if limit and state in ("copying", "failed", "cancelled"):
        text += f", limit {format_size(limit)}/s"
    if values.get("eta") and state == "copying":
        text += f", ETA {format_seconds(int(values['eta']))}"
    return text + f", {plural(int(values.get('errors') or 0), 'error')}"


def device_lines(values: Mapping[str, str]) -> list[str]:
    size = format_size(int(values.get("size") or 0))
    ro = ", read-only" if values.get("read_only") == "yes" else ""
    lines = [f"{values['name']}: {values.get('kind', '?')}, {size}{ro}  {values.get('spec', '')}"]
    if "connection" in values:
        lines.append(f"  {values['connection']} ({values.get('remote', '')})")
    if "progress" in values:
        lines.append(f"  {describe_copy(values)}")
    for side in ("primary", "secondary"):
        if values.get(f"{side}_connection"):
            lines.append(f"  {side}: {values[f'{side}_connection']}")
    if int(values.get("io_errors") or 0):
        lines.append(f"  {plural(int(values['io_errors']), 'I/O error')} returned to users")
    for key, label in (("notice", "note"), ("last_error", "last error")):
        if values.get(key):
            lines.append(f"  {label}: {values[key]}")
    return lines


def describe_server(server: Mapping[str, Any]) -> str:
    """``serving nbd+unix:///?socket=/run/vm1.sock; 2 connections``, with ``; tls
    require`` when TLS is on, then a line per connection."""
    where = ", ".join(str(uri) for uri in server.get("listening", [])) or "nowhere"
    tls = server.get("tls", "off")
    note = f"; tls {tls}" if tls != "off" else ""
    connections = plural(int(server.get("connections", 0)), "connection")
    lines = [f"serving {where}{note}; {connections}"]
    lines += [f"  {describe_client(client)}" for client in server.get("clients", [])]
    return "\n".join(lines)


def describe_client(client: Mapping[str, Any]) -> str:
    """``unix client #3: export 'disk', tls TLSv1.3, client CN=name`` (or ``plaintext``)."""
    export = client.get("export")
    what = f"export {printable(str(export))!r}" if export is not None else "in the handshake"
    tls = f"tls {client['tls']}" if client.get("tls") else "plaintext"
    if client.get("client_certificate"):
        tls += f", client {printable(str(client['client_certificate']))}"
    return f"{printable(str(client.get('peer', '?')))}: {what}, {tls}"


def describe_scratch(scratch: Mapping[str, Any]) -> str:
    """``tmp/: scratch directory, 3 files, 12 MiB``."""
    count = plural(scratch["files"], "file")
    return f"{scratch['name']}/: scratch directory, {count}, {format_size(scratch['bytes'])}"


def report_lines(report: Report) -> str:
    lines: list[str] = []
    for values in report.devices:
        lines += device_lines(values)
    for scratch in report.scratch:
        lines.append(describe_scratch(scratch))
    if report.server is not None:
        lines.append(describe_server(report.server))
    return "\n".join(lines) if lines else f"{report.path}: no devices"


def heading(report: Report) -> str:
    """``/mnt (mount, pid 4242):``, for the listing of every mount and server."""
    kind = "mount" if report.source == "mount" else "server"
    pid = f", pid {report.pid}" if report.pid is not None else ""
    where = report.path or "(no control socket)"
    return f"{where} ({kind}{pid}):"


def listing_lines(reports: list[Report]) -> str:
    if not reports:
        return "no blockfuse mounts or servers"
    out = []
    for report in reports:
        out.append(heading(report))
        body = f"cannot ask it: {report.error}" if report.error else report_lines(report)
        out += ["  " + line for line in body.splitlines()]
    return "\n".join(out)


# --- as JSON -------------------------------------------------------------------------------


def report_json(report: Report) -> dict[str, Any]:
    out: dict[str, Any] = {
        "source": report.source,
        "path": report.path,
        "pid": report.pid,
        "devices": [typed(values) for values in report.devices],
    }
    if report.source == "mount":
        out["scratch"] = report.scratch
    else:
        out["server"] = report.server
    if report.error:
        out["error"] = report.error
    return out


def typed(values: Mapping[str, str]) -> dict[str, Any]:
    """One device's status with numbers as numbers, ``read_only`` a boolean, ``""`` as
    null, and every key of its groups (``KEYS``) present."""
    groups = ["device", *(g for g, mark in MARKS.items() if mark in values)]
    out: dict[str, Any] = {key: None for g in groups for key in KEYS[g]}
    for key, value in values.items():
        if key in BOOL_KEYS:
            out[key] = value == "yes"
        elif value == "":
            out[key] = None
        elif key in INT_KEYS:
            out[key] = int(value) if value.lstrip("-").isdigit() else None
        else:
            out[key] = value
    return out
