"""pyfuse3's worker loop without three scheduler passes per request when one is queued.

pyfuse3 3.5's worker loop (``_session_loop`` in ``internal.pxi``) reads each request so::

    await _wait_fuse_readable()      # a module-wide trio.Lock, then wait_readable(fd)
    fuse_session_receive_buf(...)    # a *blocking* read of /dev/fuse

The lock keeps the blocking read safe: one worker at a time waits for the fd, and it
reads before any other worker runs again, so no worker ever reads an empty /dev/fuse
(which would block the whole event loop until the next request).  But every request
pays for the lock, an epoll re-arm and three trips through trio's scheduler, even when
the kernel holds a queue of them: measured, a 40-line pyfuse3 passthrough was capped at
0.4x qemu-storage-daemon's FUSE export on 4 KiB random reads at depth 16, ~32 µs of
server CPU per request against qsd's 8-17.

``install`` replaces ``pyfuse3._wait_fuse_readable`` (a module global that the compiled
loop looks up on every call) with ``FastWait``, which first asks the kernel with a
zero-timeout ``poll`` whether a request is queued:

- queued: return at once; the worker reads it without yielding (nothing else can run
  between the poll and the read, so nobody can take the request first);
- not queued, and on every 16th call whatever the poll says (so that a worker kept
  busy by a stream of requests still lets the other tasks run): the original wait;
- after the original wait returns, poll again before saying "readable": while this
  worker waited, another may have taken the request on the fast path, and a read of
  an empty /dev/fuse would stall the loop.

The original wait still counts the worker as idle while it waits (pyfuse3 starts and
ends workers by that count), so the pool of workers behaves as before.  Only the
pyfuse3 versions in ``VERIFIED`` get this (they were read and measured); any other
keeps the stock loop, with a one-line notice.  ``BLOCKFUSE_STOCK_FUSE_LOOP=1`` in the
environment turns it off.  ``docs/pyfuse3-wait-proposal.md`` proposes the change for
pyfuse3 itself.
"""

from __future__ import annotations

import logging
import os
import select
from collections.abc import Awaitable, Callable

import pyfuse3

log = logging.getLogger(__name__)

VERIFIED = frozenset({"3.5.0"})
"""pyfuse3 versions whose worker loop this module was checked against."""
SLOW_EVERY = 16
"""Every this many calls, the original wait runs even when a request is queued."""
OFF_SWITCH = "BLOCKFUSE_STOCK_FUSE_LOOP"

Wait = Callable[[], Awaitable[bool]]


class FastWait:
    """A drop-in ``_wait_fuse_readable``: see the module text."""

    def __init__(self, fd: int, original: Wait) -> None:
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._original = original
        self._calls = 0
        self.fast = 0
        """How many calls returned without waiting (for tests and measurements)."""

    def _queued(self) -> bool:
        """Whether a read would not block: a request, or an error the read will report."""
        return bool(self._poll.poll(0))

    async def __call__(self) -> bool:
        self._calls += 1
        if self._calls % SLOW_EVERY and self._queued():
            self.fast += 1
            return True
        while await self._original():
            if self._queued():
                return True
        return False


def fuse_fd() -> int | None:
    """The file descriptor of /dev/fuse in this process, if there is exactly one."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                found.append(int(name))
        except OSError:
            continue
    return found[0] if len(found) == 1 else None


def install() -> FastWait | None:
    """Put ``FastWait`` in place of pyfuse3's wait (after ``pyfuse3.init``); ``None``, with
    the reason logged, where the stock loop stays."""
    if os.environ.get(OFF_SWITCH, "") not in ("", "0"):
        return None
    version = getattr(pyfuse3, "__version__", "?")
    original = getattr(pyfuse3, "_wait_fuse_readable", None)
    fd = fuse_fd()
    if version not in VERIFIED or original is None or fd is None:
        log.warning(
            "pyfuse3 %s: using its stock request loop (the faster one is checked against "
            "pyfuse3 %s only)",
            version,
            ", ".join(sorted(VERIFIED)),
        )
        return None
    wait = FastWait(fd, original)
    setattr(pyfuse3, "_wait_fuse_readable", wait)  # noqa: B010 - a module global by name
    return wait


def uninstall(wait: FastWait | None) -> None:
    if wait is not None:
        setattr(pyfuse3, "_wait_fuse_readable", wait._original)  # noqa: B010
