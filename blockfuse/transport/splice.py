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
bytes and nothing piles up here.  Each write into the file holds the sectors it
touches against every other writer while it runs, and no longer
(``WriteTarget.hold``): a payload on its way holds nothing while its client is slow
to send it, and another front end's read-modify-write never straddles one of its
writes.

After an error writing the file the rest of the payload is still taken from the
socket, read out of the pipe and dropped, so that the stream stays in step; the error
is the request's reply.  A socket the kernel cannot splice from (``EINVAL``) is read
with ``readv`` into the connection's receive buffer instead, for the rest of the
connection; so is one whose file takes no splice into it (``EINVAL`` too: a filesystem
without ``splice_write``), whose device then lends no more ranges to write into.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import trio

from ..nbd.events import PeerClosed
from ..nbd.server import ServerCore
from ..rangelock import Hold
from ..threads import SLOW_CALL, thread_sleeps

log = logging.getLogger(__name__)

SPLICE_MIN = 64 << 10
"""WRITEs this large have their payload spliced where they can; a smaller payload
mostly came with its header, already buffered."""
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031
BURST = 16
"""Splices in a row before a trip through the scheduler, as ``connection.BURST``."""
CLOSED_MID_PAYLOAD = "the client closed the connection in the middle of a WRITE payload"

Source = TypeVar("Source", memoryview, int)
"""What a write into the file takes its bytes from: a buffer, or the pipe's fd."""


class WriteTarget(Protocol):
    """Where a WRITE's payload goes straight (``Handler.write_target``): ``length`` bytes
    of the open file ``fd`` from byte ``offset``, the caller's until ``release``."""

    fd: int
    offset: int
    length: int

    def hold_now(self, at: int, n: int) -> Hold | None:
        """The sectors bytes ``at`` to ``at + n`` of the file touch, held against every
        other writer, if nobody holds or waits for any of them; else ``None``."""
        ...

    async def hold(self, at: int, n: int) -> Hold:
        """The same, once every writer that asked for any of them before is done."""
        ...

    def unhold(self, hold: Hold) -> None: ...

    def blocked(self) -> None:
        """A write into it blocked in the kernel for longer than ``SLOW_CALL``."""
        ...

    def refused(self, exc: OSError) -> None:
        """The file takes no splice into it (``exc``: ``EINVAL``); its bytes are
        written with ``pwrite`` instead."""
        ...

    def release(self) -> None: ...


class _Move:
    """One payload on its way into its target: where its next byte goes, and the first
    error writing it (after which the rest is dropped)."""

    __slots__ = ("at", "error", "into")

    def __init__(self, into: WriteTarget) -> None:
        self.into = into
        self.at = into.offset
        self.error: OSError | None = None


class PayloadSplicer:
    """Moves diverted WRITE payloads from one connection's socket into files."""

    def __init__(self, fd: int, scratch: memoryview) -> None:
        self._fd = fd
        self._scratch = scratch
        """The connection's receive buffer: what ``readv`` reads into where the socket
        cannot be spliced from, and what bytes dropped after an error are read into."""
        self._pipe: tuple[int, int] | None = None
        self._splices = True

    def ready(self) -> bool:
        """Whether it can move a payload: its pipe made (``False`` where the system
        refuses one, out of descriptors: payloads are then received as usual)."""
        try:
            self._pipe_in()
        except OSError as exc:
            log.warning("no pipe for a WRITE's payload (%s): receiving it as usual", exc)
            return False
        return True

    def close(self) -> None:
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    async def move(
        self, core: ServerCore, into: WriteTarget, wait: Callable[[], Awaitable[None]]
    ) -> OSError | None:
        """The rest of the payload ``core.divert_payload`` handed out, written into
        ``into`` in order (``wait`` until the socket is readable when nothing has come);
        the error writing it, if one (the rest was then dropped).  Raises ``PeerClosed``
        if the client closes the connection before the payload is whole."""
        move = _Move(into)
        while (piece := core.buffered_payload()) is not None:
            await self._put(move, piece)
        burst = 0
        while left := core.payload_left:
            burst += 1
            if burst >= BURST:
                burst = 0
                await trio.lowlevel.checkpoint()
            try:
                if self._splices:
                    n = os.splice(self._fd, self._pipe_in(), left, flags=os.SPLICE_F_NONBLOCK)
                else:
                    n = self._read(left)
            except BlockingIOError:
                burst = 0
                await wait()
                continue
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self._splices:
                    raise
                self._splices = False  # not a socket the kernel splices from
                continue
            if n == 0:
                raise PeerClosed(CLOSED_MID_PAYLOAD)
            core.payload_received(n)
            if self._splices:
                await self._drain(move, n)
            else:
                await self._put(move, self._scratch[:n])
        return move.error

    def _read(self, left: int) -> int:
        """Bytes from the socket into the receive buffer, at most ``left``."""
        return os.readv(self._fd, [self._scratch[: min(left, len(self._scratch))]])

    async def _put(self, move: _Move, data: memoryview) -> None:
        """Bytes already in memory into the file (those that came with the header; all
        of them where nothing is spliced); after an error, dropped."""
        while data and move.error is None:
            data = data[await self._write(move, len(data), _pwrite, data) :]

    def _pipe_in(self) -> int:
        if self._pipe is None:
            self._pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            with contextlib.suppress(OSError):  # over a limit: the default size works too
                fcntl.fcntl(self._pipe[1], F_SETPIPE_SZ, PIPE_SIZE)
        return self._pipe[1]

    async def _drain(self, move: _Move, n: int) -> None:
        """The ``n`` bytes in the pipe into the file (after an error: dropped).  Where
        the file takes no splice (``EINVAL``), they are read out of the pipe and written,
        the rest of the payload is read from the socket into the buffer, and the target
        is told (``WriteTarget.refused``)."""
        assert self._pipe is not None
        out = self._pipe[0]
        while n and move.error is None:
            n -= await self._write(move, n, _splice_from, out)
            refusal = move.error
            if refusal is not None and refusal.errno == errno.EINVAL:
                self._splices = False  # the bytes are still in the pipe: written below
                move.error = None
                move.into.refused(refusal)
                break
        while n:
            m = os.readv(out, [self._scratch[: min(n, len(self._scratch))]])
            await self._put(move, self._scratch[:m])  # after an error: dropped
            n -= m

    async def _write(
        self, move: _Move, n: int, call: Callable[[int, Source, int, int], int], source: Source
    ) -> int:
        """``call(fd, source, n, at)``, which writes at most ``n`` bytes of ``source``
        at byte ``at`` of the file ``fd``, run holding the sectors they touch; the bytes
        it wrote, 0 after an error (which ``move`` keeps).  One that blocked in the
        kernel for longer than ``SLOW_CALL`` is told to the target
        (``WriteTarget.blocked``)."""
        into, at = move.into, move.at
        hold = into.hold_now(at, n) or await into.hold(at, n)
        try:
            started, sleeps = time.monotonic(), thread_sleeps()
            m = call(into.fd, source, n, at)
            if time.monotonic() - started > SLOW_CALL and thread_sleeps() > sleeps:
                into.blocked()
        except OSError as exc:
            move.error = exc
            return 0
        finally:
            into.unhold(hold)
        if m == 0:
            move.error = OSError(errno.EIO, "the file took no more bytes")
        move.at += m
        return m


def _pwrite(fd: int, data: memoryview, n: int, at: int) -> int:
    """The ``n`` bytes of ``data`` into the file ``fd`` at byte ``at``."""
    return os.pwrite(fd, data[:n], at)


def _splice_from(fd: int, pipe: int, n: int, at: int) -> int:
    """At most ``n`` bytes from the pipe into the file ``fd`` at byte ``at``."""
    return os.splice(pipe, fd, n, offset_dst=at)
