"""Mounting: the mountpoint's checks, the pyfuse3 session, and a clean shutdown.

pyfuse3 holds one session per process.  ``serve`` mounts, runs the request loop until a
signal (SIGINT/SIGTERM) or an outside ``umount``, then unmounts, flushes every device and
closes it.  Nothing that happens in between may leave the mount behind.
"""

from __future__ import annotations

import enum
import errno
import glob
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence

import pyfuse3
import trio

from ..block import FlushCursor
from ..errors import BlockError
from .flatfile import FlatFile
from .malloc import keep_request_buffers
from .ops import BlockFS
from .scratch import ScratchDir

log = logging.getLogger(__name__)

FSNAME = "blockfuse"

MIN_WORKERS = 16
"""pyfuse3 ends a worker when more than ``min_tasks`` are idle, and each new worker
allocates a receive buffer of about 1 MiB: with the default of 1, a queue depth of 16
churned tasks and buffers on every request (fio 4K reads at depth 16 ran slower than at
depth 1).  The kernel keeps up to 12 background requests in flight (max_background), so
16 idle workers cover it."""
MAX_WORKERS = 64
"""Bounds the receive buffers held (about 1 MiB each) and so the mount's memory."""


class MountError(Exception):
    """The mountpoint cannot be used; the message says what to do."""


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape_mountinfo(field: str) -> str:
    r"""A mountinfo path: ``\040`` is a space (and so on); other bytes are as they are."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def resolved(path: str) -> str:
    """``path`` made absolute with its directories resolved, without touching ``path``
    itself: a mountpoint whose FUSE process is stopped would never answer."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(parent), name)


def mount_entry(path: str) -> tuple[str, str] | None:
    """``(type, source)`` of the mount exactly at ``path``, from /proc/self/mountinfo."""
    real = resolved(path)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if unescape_mountinfo(fields[4]) == real:
                found = fields[sep + 1], fields[sep + 2]  # the last mount is the visible one
    return found


def mount_type(path: str) -> str | None:
    """The filesystem type mounted exactly at ``path``."""
    entry = mount_entry(path)
    return entry[0] if entry else None


def mount_pid(path: str) -> int | None:
    """The PID of the blockfuse serving the mount at ``path`` (its fsname), if it says."""
    entry = mount_entry(path)
    if entry is None or not entry[1].startswith(f"{FSNAME}:"):
        return None
    tail = entry[1].removeprefix(f"{FSNAME}:")
    return int(tail) if tail.isdigit() else None


def unmount_command(path: str, *, lazy: bool = True) -> list[str]:
    """The command that unmounts ``path`` (lazily: even while something still uses it)."""
    if shutil.which("fusermount3"):
        return ["fusermount3", "-u", *(["-z"] if lazy else []), path]
    return ["umount", *(["-l"] if lazy else []), path]


def clear_stale(path: str) -> None:
    cmd = unmount_command(path)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise MountError(
            f"{path} holds a stale mount left by a blockfuse that died, and clearing it failed "
            f"({result.stderr.strip()}); clear it with: {' '.join(cmd)}"
        )
    log.warning("cleared a stale mount at %s left by a blockfuse that died", path)


PROBE_SECONDS = 2.0
"""How long a mount may take to list its root before it counts as not answering."""


def answers(path: str, timeout: float = PROBE_SECONDS) -> bool | None:
    """Whether the FUSE mount at ``path`` answers: True; False if its process died
    (ENOTCONN); None if nothing came back within ``timeout`` (the process is stopped or
    stuck), found in a thread so that the caller does not hang with it."""
    outcome: list[bool] = []

    def probe() -> None:
        try:
            os.listdir(path)
        except OSError as exc:
            outcome.append(exc.errno != errno.ENOTCONN)
        else:
            outcome.append(True)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else None


class Prepare(enum.Enum):
    """What a mountpoint needs before mounting, found by ``check_mountpoint``."""

    NOTHING = "nothing"
    CREATE = "create the directory"
    CLEAR_STALE = "clear a stale blockfuse mount"


def is_ours(path: str) -> bool:
    return mount_type(path) == "fuse." + FSNAME


def check_mountpoint(path: str) -> Prepare:
    """What ``path`` needs to be mounted on; raises ``MountError`` and changes nothing.

    The mount table is read before ``path`` is touched: a blockfuse there that is
    stopped would never answer a ``stat``."""
    if is_ours(path):
        return ours_already(path)
    try:
        os.stat(path)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.exists(parent):
            raise MountError(
                f"cannot create {path}: {parent} does not exist (only the last directory "
                f"is created; run: mkdir -p {parent})"
            ) from None
        if not os.path.isdir(parent):
            raise MountError(f"cannot create {path}: {parent} is not a directory") from None
        return Prepare.CREATE
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise MountError(f"cannot use {path} as a mountpoint: {exc.strerror}") from exc
        return stale_mount(path)
    if not os.path.isdir(path):
        raise MountError(f"{path} is not a directory")
    fstype = mount_type(path)
    if fstype is not None:
        raise MountError(f"{path} is already a mount point ({fstype}); choose another directory")
    return Prepare.NOTHING


def ours_already(path: str) -> Prepare:
    """A blockfuse mount is at ``path``: stale (to clear), or live (refused)."""
    state = answers(path)
    if state is False:
        return Prepare.CLEAR_STALE
    if state is None:
        raise MountError(
            f"{path} is mounted by a blockfuse that does not answer (stopped, or stuck); "
            f"unmount it with: blockfuse umount {path}"
        )
    raise MountError(
        f"{path} is already mounted by a running blockfuse; stop that process, "
        f"or run: blockfuse umount {path}"
    )


def stale_mount(path: str) -> Prepare:
    """A mount at ``path`` lost its process: ours to clear, or someone else's to report."""
    if is_ours(path):
        return Prepare.CLEAR_STALE
    raise MountError(
        f"{path} holds a dead {mount_type(path) or 'FUSE'} mount that blockfuse did not make; "
        f"clear it with: {' '.join(unmount_command(path))}"
    )


def prepare_mountpoint(path: str, need: Prepare) -> None:
    """Do what ``check_mountpoint`` found necessary; raises ``MountError``."""
    if need is Prepare.CREATE:
        try:
            os.mkdir(path)
        except OSError as exc:
            raise MountError(f"cannot create {path}: {exc.strerror}") from exc
    elif need is Prepare.CLEAR_STALE:
        clear_stale(path)


def mount_options(*, read_only: bool, allow_other: bool) -> set[str]:
    # An fsname that names a directory in the cwd would be shown as that path.  The PID
    # tells ``blockfuse umount`` which process to wait for.
    options = set(pyfuse3.default_options) | {
        f"fsname={FSNAME}:{os.getpid()}",
        f"subtype={FSNAME}",
    }
    if read_only:
        options.add("ro")
    if allow_other:
        options.add("allow_other")
    return options


async def _terminate_on_signal(
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    # SIGHUP too: a closed terminal or a dropped ssh session must not leave a stale mount.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            log.info("got %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def loop_devices_using(mount_root: str) -> list[str]:
    """The loop devices whose backing file lies under ``mount_root`` (from sysfs).

    ``mount_root`` must be an absolute, resolved path: resolving it here would stat the
    mount, and from inside the serving process, once it has stopped answering, that hangs.
    """
    root = mount_root.rstrip("/") + "/"
    found = []
    for entry in sorted(glob.glob("/sys/block/loop*/loop/backing_file")):
        try:
            with open(entry) as f:
                backing = f.read().strip()
        except OSError:
            continue
        if backing.startswith(root):
            found.append("/dev/" + entry.split("/")[3])
    return found


def warn_about_loop_devices(mount_root: str) -> list[str]:
    return [
        f"{dev} still uses a file under {mount_root} and fails all I/O from now on; "
        f"detach it first next time (losetup -d {dev})"
        for dev in loop_devices_using(mount_root)
    ]


async def close_files(files: Sequence[FlatFile], cursors: Sequence[FlushCursor]) -> list[str]:
    """Flush every device through the mount's own cursor (so that an error any open file
    was told of during the mount is reported here too), then close it; the problems
    found, one line each."""
    problems = []
    for f, cursor in zip(files, cursors, strict=True):
        try:
            await cursor.flush()
        except BlockError as exc:
            problems.append(f"flushing {f.name} failed: {exc}")
        await f.device.aclose()
    return problems


async def serve(
    mountpoint: str,
    files: Sequence[FlatFile],
    *,
    read_only: bool = False,
    allow_other: bool = False,
    on_ready: Callable[[], None] | None = None,
    scratch: Sequence[ScratchDir] = (),
) -> list[str]:
    """Mount, serve until a signal or an outside unmount, then flush and close everything.

    Returns the problems met while flushing (empty when all went well).  Scratch
    directories are dropped unflushed: their files end with the mount.
    """
    ops = BlockFS(files, read_only=read_only, scratch=scratch)
    cursors = [FlushCursor(f.device) for f in files]
    keep_request_buffers()
    mount_root = str(await trio.Path(mountpoint).resolve())  # now: later it cannot answer
    try:
        pyfuse3.init(ops, mountpoint, mount_options(read_only=read_only, allow_other=allow_other))
    except (RuntimeError, OSError) as exc:
        with trio.CancelScope(shield=True):
            await close_all(files, scratch)
        raise MountError(f"mounting on {mountpoint} failed: {exc} (is /dev/fuse there?)") from exc
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(_terminate_on_signal)
            if on_ready is not None:
                on_ready()
            await pyfuse3.main(min_tasks=MIN_WORKERS, max_tasks=MAX_WORKERS)
            nursery.cancel_scope.cancel()
    finally:
        busy = warn_about_loop_devices(mount_root)
        pyfuse3.close(unmount=True)
        with trio.CancelScope(shield=True):
            problems = busy + await close_all(files, scratch, cursors)
    return problems


async def close_all(
    files: Sequence[FlatFile],
    scratch: Sequence[ScratchDir],
    cursors: Sequence[FlushCursor] | None = None,
) -> list[str]:
    problems = await close_files(files, cursors or [FlushCursor(f.device) for f in files])
    for directory in scratch:
        await directory.aclose()
    return problems
