"""Telling systemd how a front end is doing: ``sd_notify(3)``, without libsystemd.

Under a ``Type=notify`` unit systemd sets ``NOTIFY_SOCKET`` to a Unix datagram socket:
a path, or ``@name`` for one in the abstract namespace (a leading NUL byte instead of
the ``@``).  A front end sends ``READY=1`` once it serves (a mount is mounted, a server
listens, with a ``STATUS=`` line saying what it serves), and ``STOPPING=1`` at the
first signal.  Without ``NOTIFY_SOCKET`` nothing is sent; a socket that cannot be
reached costs one warning line (systemd then says the unit failed to start in time),
never the front end.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

ENV = "NOTIFY_SOCKET"


def notify_address(value: str) -> str | None:
    """The address ``NOTIFY_SOCKET`` names (``@`` for the abstract namespace), or
    ``None`` for one we cannot use (empty; ``vsock:``, which systemd also allows)."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(*lines: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``lines`` (``READY=1``, ``STATUS=...``) as one datagram to the service
    manager; whether it was sent (``False`` without ``NOTIFY_SOCKET``)."""
    value = (os.environ if env is None else env).get(ENV, "")
    if not value:
        return False
    address = notify_address(value)
    if address is None:
        log.warning("cannot tell systemd %s: %s=%s is not a Unix socket", lines[0], ENV, value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode())
    except OSError as exc:
        log.warning("cannot tell systemd %s (%s=%s): %s", lines[0], ENV, value, exc.strerror or exc)
        return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}")


_stopping_sent = False


def stopping() -> bool:
    """``STOPPING=1``, once per process (the first signal, or an outside ``umount``)."""
    global _stopping_sent
    if _stopping_sent:
        return False
    _stopping_sent = True
    return notify("STOPPING=1", "STATUS=stopping: flushing and closing the devices")
