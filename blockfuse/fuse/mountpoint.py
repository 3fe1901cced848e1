"""The mountpoint: what is mounted where (from /proc/self/mountinfo), whether a blockfuse
mount there answers, and what must be done before mounting (create the directory, clear
a stale mount).  Nothing here touches a mountpoint whose process might not answer
without a bounded wait (``answers``).
"""

from __future__ import annotations

import enum
import errno
import glob
import logging
import os
import re
import shutil
import subprocess
import threading

log = logging.getLogger(__name__)

FSNAME = "blockfuse"


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
    """Do what ``check_mountpoint`` found necessary (and warn that a directory that is not
    empty hides its files while mounted); raises ``MountError``."""
    if need is Prepare.NOTHING:
        warn_if_not_empty(path)
    if need is Prepare.CREATE:
        try:
            os.mkdir(path)
        except OSError as exc:
            raise MountError(f"cannot create {path}: {exc.strerror}") from exc
    elif need is Prepare.CLEAR_STALE:
        clear_stale(path)


def warn_if_not_empty(path: str) -> None:
    try:
        count = len(os.listdir(path))
    except OSError:
        return
    if count:
        entries = "its 1 entry stays" if count == 1 else f"its {count} entries stay"
        log.warning("%s is not empty: %s hidden under the mount until unmounted", path, entries)


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
