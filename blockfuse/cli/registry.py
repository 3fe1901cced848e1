"""Finding every blockfuse on the host, for ``blockfuse status`` with no argument.

Mounts need no help: each is in the mount table with the fsname ``blockfuse:PID``
(``mounts``).  A server registers itself in the runtime directory while it runs::

    /run/blockfuse/serve-4242.json    {"pid": 4242, "source": "server",
                                       "control": "/home/me/vm1.ctl", "started": "..."}

written atomically once the server is ready, removed when it stops.  The directory is
``$BLOCKFUSE_RUNTIME_DIR`` if set, else ``/run/blockfuse`` for root, else
``$XDG_RUNTIME_DIR/blockfuse``, else ``/tmp/blockfuse-UID``.  An entry whose process is
gone (killed with -9) or is not a blockfuse is stale: skipped, and removed when
permitted.  A server with no control socket of its own (TCP or socket activation only)
gets one there: ``serve-PID.ctl``.  Registering never stops a server: a directory that
cannot be written costs one warning line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..fuse.mountpoint import FSNAME, unescape_mountinfo

log = logging.getLogger(__name__)

ENV = "BLOCKFUSE_RUNTIME_DIR"


@dataclass(frozen=True)
class Found:
    """One blockfuse: a mount (``path`` is its mountpoint) or a server (``path`` is its
    control socket, ``""`` if it has none)."""

    source: str
    path: str
    pid: int | None


def runtime_dir(env: dict[str, str] | None = None) -> str:
    env = dict(os.environ) if env is None else env
    if env.get(ENV):
        return env[ENV]
    if os.geteuid() == 0:
        return "/run/blockfuse"
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], "blockfuse")
    return f"/tmp/blockfuse-{os.getuid()}"


def default_control() -> str:
    """The control socket of a server that names none (see the module text)."""
    return os.path.join(runtime_dir(), f"serve-{os.getpid()}.ctl")


def ensure_runtime_dir() -> str | None:
    """The runtime directory, made if missing (mode 0755); ``None`` (one warning) if it
    cannot be."""
    path = runtime_dir()
    try:
        os.makedirs(path, mode=0o755, exist_ok=True)
    except OSError as exc:
        log.warning("cannot use the runtime directory %s: %s", path, exc.strerror or exc)
        return None
    return path


def entry_path(pid: int) -> str:
    return os.path.join(runtime_dir(), f"serve-{pid}.json")


@contextlib.contextmanager
def registered(control: str | None) -> Iterator[None]:
    """This server listed in the runtime directory for the body of the block."""
    path = entry_path(os.getpid())
    record = {
        "pid": os.getpid(),
        "source": "server",
        "control": os.path.abspath(control) if control else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    written = ensure_runtime_dir() is not None and _write(path, record)
    try:
        yield
    finally:
        if written:
            with contextlib.suppress(OSError):
                os.unlink(path)


def _write(path: str, record: dict[str, Any]) -> bool:
    directory = os.path.dirname(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".serve-")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot register in %s: %s", directory, exc.strerror or exc)
        return False
    return True


def servers() -> list[Found]:
    """Every registered server that still runs, oldest first."""
    directory = runtime_dir()
    try:
        names = sorted(n for n in os.listdir(directory) if n.startswith("serve-"))
    except OSError:
        return []
    found = []
    for name in names:
        if not name.endswith(".json"):
            continue
        path = os.path.join(directory, name)
        record = _read(path)
        pid = record.get("pid") if record else None
        if not isinstance(pid, int) or not is_blockfuse(pid):
            with contextlib.suppress(OSError):
                os.unlink(path)  # stale: its server is gone
            continue
        control = record.get("control") if record else None
        found.append(Found("server", str(control or ""), pid))
    return found


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def mounts(mountinfo: str = "/proc/self/mountinfo") -> list[Found]:
    """Every blockfuse mount in the mount table, in its order."""
    found = []
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.readlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        sep = fields.index("-")
        fstype, source = fields[sep + 1], fields[sep + 2]
        if fstype != f"fuse.{FSNAME}":
            continue
        tail = source.removeprefix(f"{FSNAME}:")
        pid = int(tail) if tail.isdigit() else None
        found.append(Found("mount", unescape_mountinfo(fields[4]), pid))
    return found


def is_blockfuse(pid: int) -> bool:
    """Whether ``pid`` runs and is a blockfuse (not a later process given the number)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"blockfuse" in f.read()
    except OSError:
        return False
