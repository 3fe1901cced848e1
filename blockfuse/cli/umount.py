"""``blockfuse umount``: unmount, then wait until that blockfuse has closed its devices."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from ..fuse.mountpoint import (
    FSNAME,
    is_ours,
    loop_devices_using,
    mount_pid,
    mount_type,
    resolved,
    unmount_command,
)
from .common import EXIT_OK, CommandError

UMOUNT_WAIT_SECONDS = 120.0
"""How long ``umount`` waits for the blockfuse it unmounted to close its devices (a
mirror stops its copier within 10 s, then flushes both sides)."""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    umount = sub.add_parser(
        "umount",
        help="unmount a blockfuse mount",
        description=(
            "Unmount a blockfuse mount (a live one's blockfuse flushes and exits; a stale "
            "one, left by a killed blockfuse, is cleared). Other filesystems are refused."
        ),
    )
    umount.add_argument("mountpoint")


def cmd_umount(args: argparse.Namespace) -> int:
    path = args.mountpoint
    try:
        fstype = mount_type(path)
    except OSError as exc:
        raise CommandError(f"cannot read the mount table: {exc}") from exc
    if fstype is None:
        raise CommandError(f"{path} is not mounted{inside_mount(path)}")
    if not is_ours(path):
        raise CommandError(f"{path} is a mount of type {fstype}, not {FSNAME}'s; leaving it alone")
    # Never touch the mountpoint itself: a stopped blockfuse would not answer.  Unmounting
    # a live mount ends its blockfuse (it flushes and exits); a stale one is just cleared.
    pid = mount_pid(path)
    result = subprocess.run(unmount_command(path, lazy=False), capture_output=True, text=True)
    if result.returncode != 0:
        raise CommandError(f"unmounting {path} failed: {result.stderr.strip()}{why_busy(path)}")
    if pid is not None:
        wait_for_exit(pid, path)
    return EXIT_OK


def inside_mount(path: str) -> str:
    """``"; it is inside the blockfuse mount M: run: blockfuse umount M"`` if a blockfuse
    mount holds ``path`` (``./mnt/disk``), else ``""``; found from the mount table alone."""
    shown = path.rstrip("/") or "/"
    real = resolved(path)
    while real != "/":
        real = os.path.dirname(real)
        shown = os.path.dirname(shown) or real
        if is_ours(real):
            return f"; it is inside the blockfuse mount {shown}: run: blockfuse umount {shown}"
    return ""


def wait_for_exit(pid: int, path: str, limit: float = UMOUNT_WAIT_SECONDS) -> None:
    """Wait until blockfuse ``pid`` has closed its devices (flushed, maps saved) and
    exited, so that a new mount can open them at once."""
    started = time.monotonic()
    told = False
    while is_blockfuse(pid):
        if process_state(pid) in ("T", "t"):
            print(f"blockfuse: pid {pid} is stopped; it closes its devices once continued "
                  f"(kill -CONT {pid})", file=sys.stderr)  # fmt: skip
            return
        waited = time.monotonic() - started
        if waited > limit:
            raise CommandError(
                f"{path} is unmounted, but blockfuse (pid {pid}) is still closing its "
                f"devices after {limit:.0f} s; wait for it before mounting them again"
            )
        if waited > 1 and not told:
            print(f"blockfuse: waiting for pid {pid} to flush and close its devices",
                  file=sys.stderr)  # fmt: skip
            told = True
        time.sleep(0.05)


def is_blockfuse(pid: int) -> bool:
    """Whether ``pid`` runs and is a blockfuse (not a later process given the number)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"blockfuse" in f.read() and process_state(pid) not in ("Z", "X", "")
    except OSError:
        return False


def process_state(pid: int) -> str:
    """The one-letter state of ``pid`` from /proc (R, S, D, T, Z...; "" if gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return ""


def why_busy(path: str) -> str:
    """The loop devices that keep ``path`` busy, with how to detach them ("" if none)."""
    devices = loop_devices_using(resolved(path))
    if not devices:
        return ""
    verb = "uses" if len(devices) == 1 else "use"
    return f" ({', '.join(devices)} still {verb} it; detach first: losetup -d {' '.join(devices)})"
