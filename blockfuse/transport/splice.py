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
(``WriteTarget.write``): a payload on its way holds nothing while its client is slow
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
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from ..nbd.events import PeerClosed
from ..nbd.server import ServerCore
from ..threads import SLOW_CALL, thread_sleeps

log = logging.getLogger(__name__)

SPLICE_MIN = 64 << 10
"""WRITEs this large have their payload spliced where they can; a smaller payload
mostly came with its header, already buffered."""
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = 1031
BURST = 16
"""Splices in a row before a trip through the scheduler, as ``connection.BURST``."""


class WriteTarget(Protocol):
    """Where a WRITE's payload goes straight (``Handler.write_target``): ``length`` bytes
    of the open file ``fd`` from byte ``offset``, the caller's until ``release``."""

    fd: int
    offset: int
    length: int

    async def write(self, at: int, n: int, call: Callable[[], int]) -> int:
        """``call()``, which writes at most ``n`` bytes at byte ``at`` of the file and
        says how many, run while no other writer has any of the sectors they touch."""
        ...

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
                await self._receive(core, left, move)
            except BlockingIOError:
                burst = 0
                await wait()
        return move.error

    async def _receive(self, core: ServerCore, left: int, move: _Move) -> None:
        """What one call takes from the socket, on its way into the file (after an
        error: dropped).  ``BlockingIOError``: nothing came."""
        if not self._splices:
            piece = self._scratch[: min(left, len(self._scratch))]
            n = os.readv(self._fd, [piece])
            self._check_more(core, n)
            await self._put(move, piece[:n])
            return
        try:
            n = os.splice(self._fd, self._pipe_in(), left, flags=os.SPLICE_F_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._splices = False  # not a socket the kernel splices from
            return
        self._check_more(core, n)
        await self._drain(move, n)

    def _check_more(self, core: ServerCore, n: int) -> None:
        if n == 0:
            raise PeerClosed("the client closed the connection in the middle of a WRITE payload")
        core.payload_received(n)

    async def _put(self, move: _Move, data: memoryview) -> None:
        """Bytes already in memory into the file (those that came with the header; all
        of them where nothing is spliced); after an error, dropped."""
        while data and move.error is None:
            write = functools.partial(os.pwrite, move.into.fd, data, move.at)
            data = data[await self._write(move, len(data), write) :]

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
        while n:
            if move.error is None and self._splices:
                write = functools.partial(os.splice, out, move.into.fd, n, offset_dst=move.at)
                n -= await self._write(move, n, write)
                refusal = move.error
                if refusal is not None and refusal.errno == errno.EINVAL:
                    self._splices = False  # the bytes are still in the pipe: written below
                    move.error = None
                    move.into.refused(refusal)
                continue
            piece = self._scratch[: min(n, len(self._scratch))]
            m = os.readv(out, [piece])
            await self._put(move, piece[:m])  # after an error: dropped
            n -= m

    async def _write(self, move: _Move, n: int, call: Callable[[], int]) -> int:
        """``call()``, which writes at most ``n`` bytes at ``move.at``, run holding its
        sectors (``WriteTarget.write``); the bytes it wrote, 0 after an error (which
        ``move`` keeps)."""
        try:
            m = await move.into.write(move.at, n, functools.partial(_timed, call, move.into))
        except OSError as exc:
            move.error = exc
            return 0
        if m == 0:
            move.error = OSError(errno.EIO, "the file took no more bytes")
        move.at += m
        return m


def _timed(call: Callable[[], int], into: WriteTarget) -> int:
    """``call()``; one that blocked in the kernel for longer than ``SLOW_CALL`` is told
    to the target (``WriteTarget.blocked``)."""
    started, sleeps = time.monotonic(), thread_sleeps()
    m = call()
    if time.monotonic() - started > SLOW_CALL and thread_sleeps() > sleeps:
        into.blocked()
    return m
