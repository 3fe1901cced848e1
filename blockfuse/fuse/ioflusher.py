"""``PR_SET_IO_FLUSHER``: the mount process as part of the I/O path (Linux 5.6+).

A loop device on one of our own flat files sends its writeback through this process:
the kernel, short of memory, writes dirty pages of the loop device, which become FUSE
requests that we must answer, perhaps by allocating memory, which waits for the
writeback... a deadlock.  A process marked an IO flusher allocates without recursing
into I/O (``PF_MEMALLOC_NOIO``) and is not throttled with the writers it serves, as
the loop driver and nbd-client do for themselves.  The flag is per thread and every
thread started later inherits it, so it is set before the mount starts any.  It needs
``CAP_SYS_RESOURCE``; without it the mount goes on, and says so in one line once it
is mounted (a mount that fails says only why it failed).
"""

from __future__ import annotations

import ctypes
import errno
import logging

log = logging.getLogger(__name__)

PR_SET_IO_FLUSHER = 57


def set_io_flusher() -> str | None:
    """Mark this process an IO flusher: ``None`` if done, else why not (one line)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0
    except (OSError, AttributeError) as exc:
        return f"cannot set PR_SET_IO_FLUSHER ({exc})"
    if not failed:
        return None
    err = ctypes.get_errno()
    why, fix = {
        errno.EPERM: (
            "this process lacks CAP_SYS_RESOURCE",
            " (run the mount as root with CAP_SYS_RESOURCE, e.g. outside a container that "
            "drops it)",
        ),
        errno.EINVAL: ("the kernel is older than 5.6", " (a kernel of 5.6 or later has the fix)"),
    }.get(err, (errno.errorcode.get(err, str(err)), ""))
    return (
        f"not an IO flusher (PR_SET_IO_FLUSHER: {why}): a loop device on a flat file of "
        f"this mount may deadlock under memory pressure{fix}"
    )


def report(problem: str | None) -> None:
    """Say how ``set_io_flusher`` went, in the log."""
    if problem is None:
        log.debug("this process is an IO flusher (PR_SET_IO_FLUSHER)")
    else:
        log.warning("%s", problem)
