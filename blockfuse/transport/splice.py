"""A WRITE's payload from the socket straight into the file it goes to, through a pipe.

On a socket, the payload of a large WRITE of a raw file's whole sectors
(``Handler.write_target``) need not be received into a buffer first: ``splice(2)``
moves the socket's pages into a pipe without copying them, and from the pipe into the
file's page cache with one copy, where ``readv`` then ``pwritev`` copy twice.  In a
throwaway prototype (a process sending 1 MiB messages over a Unix socket pair, the
receiver writing each into a file on tmpfs) the receiver spent 483-512 µs of CPU per MiB
instead of 618-621, and a MiB went across in 553-648 µs instead of 1100-1115: the
sender, too, is done with its pages sooner.

The bytes the core had already buffered go first (``pwrite``).  Then each splice into
the pipe (at most its capacity: ``PIPE_SIZE`` where the system allows, else its
default) is written out of it before the next, so the pipe holds at most one splice's
bytes and nothing piles up here.  After an error writing the file the rest of the
payload is still taken from the socket, read out of the pipe and dropped, so that the
stream stays in step; the error is the request's reply.  A socket the kernel cannot
splice from (``EINVAL``) is read with ``readv`` into the connection's receive buffer
instead, for the rest of the connection.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Awaitable, Callable

import trio

from ..filerange import FileRange
from ..nbd.events import PeerClosed
from ..nbd.server import ServerCore
from ..threads import SLOW_CALL, thread_sleeps

SPLICE_MIN = 64 << 10
"""WRITEs this large have their payload spliced where they can; a smaller payload
mostly came with its header, already buffered."""
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031
BURST = 16
"""Splices in a row before a trip through the scheduler, as ``connection.BURST``."""


class PayloadSplicer:
    """Moves diverted WRITE payloads from one connection's socket into files."""

    def __init__(self, fd: int, scratch: memoryview) -> None:
        self._fd = fd
        self._scratch = scratch
        """The connection's receive buffer: what ``readv`` reads into where the socket
        cannot be spliced from, and what bytes dropped after an error are read into."""
        self._pipe: tuple[int, int] | None = None
        self._splices = True

    def close(self) -> None:
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    async def move(
        self, core: ServerCore, into: FileRange, wait: Callable[[], Awaitable[None]]
    ) -> OSError | None:
        """The rest of the payload ``core.divert_payload`` handed out, written into
        ``into`` in order (``wait`` until the socket is readable when nothing has come);
        the error writing it, if one (the rest was then dropped).  Raises ``PeerClosed``
        if the client closes the connection before the payload is whole."""
        at, error = into.offset, None
        while (piece := core.buffered_payload()) is not None:
            at, error = _write(into.fd, piece, at, error)
        burst = 0
        while left := core.payload_left:
            burst += 1
            if burst >= BURST:
                burst = 0
                await trio.lowlevel.checkpoint()
            try:
                at, error = self._receive(core, left, into, at, error)
            except BlockingIOError:
                burst = 0
                await wait()
        return error

    def _receive(
        self, core: ServerCore, left: int, into: FileRange, at: int, error: OSError | None
    ) -> tuple[int, OSError | None]:
        """What one call takes from the socket, written at ``at`` (after an error,
        dropped); the next position and the error.  ``BlockingIOError``: nothing came."""
        if self._splices:
            try:
                n = os.splice(self._fd, self._pipe_in(), left, flags=os.SPLICE_F_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._splices = False  # not a socket the kernel splices from
                return at, error
            self._check_more(core, n)
            return self._drain(n, into, at, error)
        piece = self._scratch[: min(left, len(self._scratch))]
        n = os.readv(self._fd, [piece])
        self._check_more(core, n)
        return _write(into.fd, piece[:n], at, error)

    def _check_more(self, core: ServerCore, n: int) -> None:
        if n == 0:
            raise PeerClosed("the client closed the connection in the middle of a WRITE payload")
        core.payload_received(n)

    def _pipe_in(self) -> int:
        if self._pipe is None:
            self._pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            with contextlib.suppress(OSError):  # over a limit: the default size works too
                fcntl.fcntl(self._pipe[1], F_SETPIPE_SZ, PIPE_SIZE)
        return self._pipe[1]

    def _drain(
        self, n: int, into: FileRange, at: int, error: OSError | None
    ) -> tuple[int, OSError | None]:
        """The ``n`` bytes in the pipe into the file at ``at`` (after an error: dropped)."""
        assert self._pipe is not None
        fd = into.fd
        out = self._pipe[0]
        while n:
            if error is None:
                try:
                    m = self._write_out(out, fd, n, at, into)
                except OSError as exc:
                    error = exc
                    continue
                if m == 0:
                    error = OSError(errno.EIO, "the file took no more bytes")
                    continue
                at += m
            else:
                m = os.readv(out, [self._scratch[:n]])
            n -= m
        return at, error

    def _write_out(self, pipe: int, fd: int, n: int, at: int, into: FileRange) -> int:
        """One splice from the pipe into the file; one that blocked in the kernel for
        longer than ``SLOW_CALL`` is told to the lender (``FileRange.blocked``)."""
        started, sleeps = time.monotonic(), thread_sleeps()
        m = os.splice(pipe, fd, n, offset_dst=at)
        if time.monotonic() - started > SLOW_CALL and thread_sleeps() > sleeps:
            into.blocked()
        return m


def _write(fd: int, data: memoryview, at: int, error: OSError | None) -> tuple[int, OSError | None]:
    """``data`` written at ``at`` unless an error came before; the next position and the
    error."""
    while data and error is None:
        try:
            n = os.pwritev(fd, [data], at)
        except OSError as exc:
            return at, exc
        if n == 0:
            return at, OSError(errno.EIO, "the file took no more bytes")
        data, at = data[n:], at + n
    return at, error
