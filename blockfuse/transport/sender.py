"""The out-queue of one NBD connection and the one task at a time that sends it.

Requests are queued whole (a header, then a WRITE's payload) and written in order by one
sender at a time, with cancellation shielded, so a cancelled caller never leaves half a
request on the wire.  On a socket, what the kernel takes without blocking goes out in
one ``writev`` of up to ``IOV_MAX`` pieces (``write_without_blocking``, which the
server's writer shares), before any checkpoint: when it takes the whole queue (the usual
case) there is nothing to shield, and no shield is made.  The shield must not become a
hang: each piece that cannot be written at once must be taken by the server within
``timeout`` seconds, and before the sending caller's own deadline (``until``), or the
connection is given up (``on_broken`` with ``Stalled``: half a request cannot be taken
back, so the connection goes with it).  A large piece counts in parts of
``PROGRESS_PIECE`` bytes: taking each one in time is progress.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import trio

from ..errors import BlockError
from .handshake import ConnectionLost, Stalled

IOV_MAX = 512
STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

Part = bytes | bytearray | memoryview


class Sender:
    def __init__(
        self,
        stream: trio.abc.SendStream,
        fd: int | None,
        server: str,
        timeout: float,
        on_broken: Callable[[BlockError], None],
    ) -> None:
        self._stream = stream
        self._fd = fd
        self._socket: trio.socket.SocketType | None = getattr(stream, "socket", None)
        self._server = server
        self._timeout = timeout
        self._on_broken = on_broken
        self._queue: list[Part] = []
        self.busy = False
        """A sender is at work: what is queued now leaves with it."""
        self._idle: trio.Event | None = None

    def queue(self, part: Part, then: Part | None = None) -> None:
        """``part`` (and ``then``, a WRITE's payload after its header) at the end."""
        self._queue.append(part)
        if then is not None:
            self._queue.append(then)

    @property
    def queued(self) -> bool:
        """Something waits to be sent."""
        return bool(self._queue)

    def clear(self) -> None:
        """Forget what is queued (the connection is broken)."""
        self._queue.clear()

    def send_at_once(self) -> bool:
        """Write the queue now, if no sender is at work, as far as the socket takes it
        without blocking; whether all of it went (what did not waits for ``send``)."""
        if self.busy or self._fd is None:
            return False
        parts, self._queue = self._queue, []
        if rest := self._send_now(parts):
            self._queue[:0] = rest
        return not self._queue

    async def send(self, *, batch: bool, until: float | None = None) -> None:
        """Send the queue (and what is queued meanwhile), by ``until`` at the latest (by
        default the caller's deadline).  With ``batch`` the other ready tasks first get
        to queue theirs, so a burst leaves in one ``writev``."""
        if until is None:  # before any checkpoint: a cancel there makes it -inf
            until = trio.current_effective_deadline()
        self.busy = True
        try:
            if batch:
                await trio.lowlevel.cancel_shielded_checkpoint()
            parts, self._queue = self._queue, []
            rest = self._send_now(parts)
            if rest or self._queue:
                with trio.CancelScope(shield=True):
                    await self._send_all(rest, until)
        finally:
            self.busy = False
            if self._idle is not None:
                self._idle.set()
                self._idle = None

    async def _send_all(self, rest: list[Part], until: float) -> None:
        """``rest``, then whatever is queued meanwhile (shielded by the caller)."""
        if rest:
            await self._send(rest, until)
        while self._queue:
            parts, self._queue = self._queue, []
            if rest := self._send_now(parts):
                await self._send(rest, until)

    async def send_if_idle(self) -> None:
        """Send what is due (a DISC) unless a sender is at work; bounded by ``timeout``
        only: the caller's deadline is not this notice's (a cancel makes it ``-inf``)."""
        if self._queue and not self.busy:
            await self.send(batch=False, until=math.inf)

    async def send_after_current(self, until: float | None = None) -> None:
        """Send everything queued, after the send under way (if any) has ended."""
        while self.busy:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()
        if self._queue:
            await self.send(batch=False, until=until)

    def _send_now(self, parts: list[Part]) -> list[Part]:
        """Write what the socket takes without blocking; what is left to send."""
        if self._fd is None:
            return parts
        if not still_open(self._socket, self._fd):
            self._lost(trio.ClosedResourceError("the connection was closed"))
            return []
        try:
            return write_without_blocking(self._fd, parts)
        except OSError as exc:
            self._lost(exc)
            return []

    async def _send(self, parts: list[Part], until: float) -> None:
        try:
            for piece in (piece for part in parts for piece in in_pieces(part)):
                started = trio.current_time()
                with trio.move_on_at(min(started + self._timeout, until)) as scope:
                    await self._stream.send_all(piece)
                if scope.cancelled_caught:
                    waited = trio.current_time() - started
                    took = f"{self._server}: took nothing we sent for {waited:g} s"
                    self._on_broken(Stalled(f"{took}; the connection was dropped"))
                    return
        except STREAM_ERRORS as exc:
            self._lost(exc)

    def _lost(self, exc: BaseException) -> None:
        error = ConnectionLost(f"connection to {self._server} lost: {exc}")
        error.__cause__ = exc
        self._on_broken(error)


PROGRESS_PIECE = 256 << 10
"""What cannot go out at once is sent in pieces of at most this many bytes, each within
the timeout: a peer that takes nothing for that long has stalled, one that reads a
large message slowly but steadily (a 32 MiB one at 1 MB/s) has not."""


def in_pieces(part: Part) -> list[memoryview]:
    """``part`` as views of at most ``PROGRESS_PIECE`` bytes, in order."""
    view = memoryview(part)
    if len(view) <= PROGRESS_PIECE:
        return [view]
    return [view[at : at + PROGRESS_PIECE] for at in range(0, len(view), PROGRESS_PIECE)]


def still_open(sock: trio.socket.SocketType | None, fd: int) -> bool:
    """Whether ``sock`` still has the number ``fd``.  A socket closed since a checkpoint
    (``aclose``, a connection dropped at a deadline) may have left its number to another
    file or connection, which must neither get our bytes nor have its bytes read as ours
    (receiver.py's module text)."""
    return sock is not None and sock.fileno() == fd


def write_without_blocking(fd: int, parts: list[Part]) -> list[Part]:
    """Write what the socket ``fd`` takes now, in one ``writev`` of up to ``IOV_MAX``
    parts; what is left to send.  Raises ``OSError`` (never ``BlockingIOError``)."""
    try:
        sent = os.writev(fd, parts[:IOV_MAX])
    except BlockingIOError:
        return parts
    if len(parts) == 1 and sent == len(parts[0]):
        return []
    out: list[Part] = []
    for part in parts:
        if out:
            out.append(part)
        elif sent >= len(part):
            sent -= len(part)
        else:
            out.append(memoryview(part)[sent:])
            sent = 0
    return out
