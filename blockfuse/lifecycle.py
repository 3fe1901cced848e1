"""How a front end ends: the signals that stop it, and the flush and close of its devices.

Both front ends (a mount, a server) run until SIGINT, SIGTERM or SIGHUP, then stop
taking requests and close their devices, which may take a while (a mirror stops its
copier at a chunk edge, a slow NBD server answers its flush).  ``Shutdown`` counts the
signals for the whole life of the front end:

    1st  stop():   stop serving (unmount; stop accepting, ESHUTDOWN); then devices close
    2nd  hurry():  one line says so; every device's ``hurry_close``, and every hook
    3rd  abort():  one line says so; the process exits at once (status 1): a copy map
                   keeps its last save, which is true by its own rule

``Alongside`` is another front end on the same devices (``mount --serve``'s NBD server):
it is stopped before the devices close, and hurried with them.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Sequence
from typing import Protocol, TextIO

import trio

from . import notify
from .block import BlockDevice, FlushCursor
from .errors import BlockError

log = logging.getLogger(__name__)

STILL_CLOSING = "still closing devices; press Ctrl-C again to abort"
ABORTED = (
    "aborted while closing devices: what they had not flushed may be lost "
    "(copy maps keep their last save)"
)
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""SIGHUP too: a closed terminal or a dropped ssh session must not leave a front end."""


class Alongside(Protocol):
    """Another front end serving the same devices, run by the one that owns them."""

    async def stop(self) -> None:
        """Stop serving; return once nothing of it touches the devices any more."""
        ...

    def hurry(self) -> None:
        """A stop under way should end now (a second signal)."""
        ...


class Shutdown:
    """The signals that end a front end, counted for its whole life (see the module
    text).  Subclasses say what stopping and aborting mean; ``requested`` is set at the
    first signal."""

    def __init__(self, devices: Sequence[BlockDevice], out: TextIO) -> None:
        self._devices = devices
        self._out = out
        self._hurry_hooks: list[Callable[[], None]] = []
        self.signals = 0
        self.requested = trio.Event()

    def on_hurry(self, hook: Callable[[], None]) -> None:
        self._hurry_hooks.append(hook)

    def got(self, signum: int) -> None:
        self.signals += 1
        if self.signals == 1:
            log.info("got %s: stopping", signal.Signals(signum).name)
            notify.stopping()
            self.requested.set()
            self.stop()
        elif self.signals == 2:
            self.say(STILL_CLOSING)
            self.hurry()
        else:
            self.say(ABORTED)
            self.abort()
            os._exit(1)

    def stop(self) -> None:
        """Beyond setting ``requested``: nothing by default."""

    def hurry(self) -> None:
        for hook in self._hurry_hooks:
            hook()
        for device in self._devices:
            device.hurry_close()

    def abort(self) -> None:
        """Just before the process exits at the third signal: nothing by default."""

    def say(self, line: str) -> None:
        print(f"blockfuse: {line}", file=self._out, flush=True)


async def watch_signals(
    shutdown: Shutdown, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(*SIGNALS) as signals:
        task_status.started()
        async for signum in signals:
            shutdown.got(signum)


async def flush_and_close(
    devices: Sequence[tuple[str, BlockDevice]], cursors: Sequence[FlushCursor]
) -> list[str]:
    """Flush every device through its front end's own cursor (so that an error any of
    its files or connections was told of is reported here too), then close it; the
    problems found, one line each.  systemd is told the front end is stopping (if the
    first signal did not tell it: an outside ``umount``)."""
    notify.stopping()
    problems = []
    for (name, device), cursor in zip(devices, cursors, strict=True):
        try:
            await cursor.flush()
        except BlockError as exc:
            problems.append(f"flushing {name} failed: {exc}")
        await device.aclose()
    return problems
