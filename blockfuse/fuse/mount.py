"""Mounting: the pyfuse3 session, the signals that end it, and a clean shutdown.

pyfuse3 holds one session per process.  ``serve`` mounts, runs the request loop until a
signal (SIGINT/SIGTERM/SIGHUP) or an outside ``umount``, then unmounts, flushes every
device and closes it.  Nothing that happens in between may leave the mount behind, and
signals are watched until the very end (``MountShutdown``, on ``lifecycle.Shutdown``,
which the NBD server shares).  The mountpoint's own checks are ``mountpoint.py``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO

import pyfuse3
import trio

from ..block import FlushCursor
from ..lifecycle import Alongside, Shutdown, flush_and_close, watch_signals
from ..malloc import keep_request_buffers
from . import fastloop
from .flatfile import FlatFile
from .mountpoint import FSNAME, MountError, unmount_command, warn_about_loop_devices
from .ops import BlockFS
from .scratch import ScratchDir

log = logging.getLogger(__name__)

MIN_WORKERS = 16
"""pyfuse3 ends a worker when more than ``min_tasks`` are idle, and each new worker
allocates a receive buffer of about 1 MiB: with the default of 1, a queue depth of 16
churned tasks and buffers on every request (fio 4K reads at depth 16 ran slower than at
depth 1).  The kernel keeps up to 12 background requests in flight (max_background), so
16 idle workers cover it."""
MAX_WORKERS = 64
"""Bounds the receive buffers held (about 1 MiB each) and so the mount's memory."""


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


async def close_files(files: Sequence[FlatFile], cursors: Sequence[FlushCursor]) -> list[str]:
    """Flush every device through the mount's own cursor, then close it (the problems
    found, one line each)."""
    return await flush_and_close([(f.name, f.device) for f in files], cursors)


class MountShutdown(Shutdown):
    """The signals that end a mount (``lifecycle.Shutdown``): the first unmounts; the
    third aborts after a lazy unmount, so no dead mount is left behind."""

    def __init__(self, mountpoint: str, files: Sequence[FlatFile], out: TextIO) -> None:
        super().__init__([f.device for f in files], out)
        self._mountpoint = mountpoint
        self.serving = False
        """The request loop runs: ``pyfuse3.terminate`` can end it."""

    def stop(self) -> None:
        if self.serving:
            pyfuse3.terminate()

    def abort(self) -> None:
        if self.serving:
            subprocess.run(unmount_command(self._mountpoint), capture_output=True, check=False)


@contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """What is written to file descriptor 2 in the body (fusermount3 says why a mount
    failed there, not to us), as lines once the body ends; echoed if nothing failed."""
    lines: list[str] = []
    with tempfile.TemporaryFile(mode="w+") as sink:
        saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(sink.fileno(), 2)
        failed = True
        try:
            yield lines
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(line for line in sink.read().splitlines() if line.strip())
            if not failed and lines:
                print("\n".join(lines), file=sys.stderr)


def mount_failure(mountpoint: str, exc: BaseException, said: list[str]) -> str:
    """One line that says why mounting failed, and what to do."""
    why = said[-1] if said else str(exc)
    if not os.path.exists("/dev/fuse"):
        hint = "no /dev/fuse: load the fuse module (modprobe fuse)"
    elif any(word in why for word in ("permitted", "denied", "allow_other")):
        hint = (
            "mounting needs root, or a user who may run fusermount3; --allow-other also "
            "needs user_allow_other in /etc/fuse.conf"
        )
    else:
        hint = ""
    return f"cannot mount on {mountpoint}: {why}" + (f" ({hint})" if hint else "")


async def serve(
    mountpoint: str,
    files: Sequence[FlatFile],
    *,
    read_only: bool = False,
    allow_other: bool = False,
    on_ready: Callable[[], None] | None = None,
    scratch: Sequence[ScratchDir] = (),
    alongside: Alongside | None = None,
) -> list[str]:
    """Mount, serve until a signal or an outside unmount, then flush and close everything.

    Returns the problems met while flushing (empty when all went well); raises
    ``MountError`` (the devices closed) if the kernel refuses the mount.  Scratch
    directories are dropped unflushed: their files end with the mount.  ``alongside``
    (an NBD server on the same devices) is stopped after the unmount, before the
    devices close, and hurried by a second signal.
    """
    shutdown = MountShutdown(mountpoint, files, sys.stderr)
    if alongside is not None:
        shutdown.on_hurry(alongside.hurry)
    failure: MountError | None = None
    problems: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(watch_signals, shutdown)
        try:
            problems = await _mount_and_serve(
                mountpoint, files, scratch, shutdown, on_ready, alongside,
                read_only=read_only, allow_other=allow_other,
            )  # fmt: skip
        except MountError as exc:
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return problems


async def _mount_and_serve(
    mountpoint: str,
    files: Sequence[FlatFile],
    scratch: Sequence[ScratchDir],
    shutdown: MountShutdown,
    on_ready: Callable[[], None] | None,
    alongside: Alongside | None,
    *,
    read_only: bool,
    allow_other: bool,
) -> list[str]:
    ops = BlockFS(files, read_only=read_only, scratch=scratch)
    cursors = [FlushCursor(f.device) for f in files]
    keep_request_buffers()
    mount_root = str(await trio.Path(mountpoint).resolve())  # now: later it cannot answer
    options = mount_options(read_only=read_only, allow_other=allow_other)
    try:
        with captured_stderr() as said:
            pyfuse3.init(ops, mountpoint, options)
    except (RuntimeError, OSError) as exc:
        with trio.CancelScope(shield=True):
            if alongside is not None:
                await alongside.stop()
            await close_all(files, scratch)
        raise MountError(mount_failure(mountpoint, exc, said)) from exc
    fast_wait = fastloop.install()
    try:
        shutdown.serving = True
        if on_ready is not None:
            on_ready()
        if not shutdown.signals:  # one that came while mounting ends it at once
            await pyfuse3.main(min_tasks=MIN_WORKERS, max_tasks=MAX_WORKERS)
    finally:
        fastloop.uninstall(fast_wait)
        busy = warn_about_loop_devices(mount_root)
        pyfuse3.close(unmount=True)
        shutdown.serving = False
        with trio.CancelScope(shield=True):
            if alongside is not None:
                await alongside.stop()
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
