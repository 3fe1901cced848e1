"""Writing the server's messages to one client: whole, in order, batched, bounded.

One task at a time owns the stream; a reply handed over meanwhile is queued and the
owner writes it too.  So replies that become ready together leave in one ``writev``
(the client is woken once for them), and a task answering a request never waits for
the stream::

    task A: write(a) -> owns the stream: writev(a) ... (the socket is full: awaits)
    task B: write(b) -> queued, returns at once
    task C: write(c) -> queued, returns at once
    task A:             ... a is out: writev(b, c); nothing queued: the stream is free

Each message's ``on_written`` is called once its bytes have left (the request's
reservation is given back then, so the queue is bounded by the budgets), or once it is
clear they never will.  The owner hands over nothing: the stream is free only when the
queue is empty, so no newcomer can start a message while another is half written (a
hand-over to a waiting task once let one in).  A write that cannot go out at once is
shielded from cancellation (half a message cannot be taken back) and bounded instead:
a client that takes nothing for ``timeout`` seconds breaks the connection (``Stalled``),
and so does the cut-off (``cut_off_at``: a deadline the connection sets when it must end
soon whatever its client reads, as when the server hurries to shut down).
"""

from __future__ import annotations

import contextlib
import math
import socket
from collections.abc import Callable, Sequence

import trio

from ..errors import BlockError
from .handshake import ConnectionLost, Stalled
from .sender import STREAM_ERRORS, Part, write_without_blocking

COALESCE = 64 << 10
"""Parts smaller than this are joined before a stream that is not a socket gets them:
over TLS every ``send_all`` is a TLS record of its own and a trip through trio's
``SSLStream`` (a 1 MiB READ reply was three: its 20-byte header, its 8-byte offset, its
data; 16 small replies written together were 32)."""


UNIX_SEND_BUFFER = 2 << 20
"""``SO_SNDBUF`` asked for on a Unix socket (the kernel doubles it, and caps it at
``net.core.wmem_max``).  With the default 208 KiB a 1 MiB READ reply took a ``writev``
and several ``send`` + ``wait_writable`` trips; with this, a reply leaves in one
``writev``, and replies ready together in one: server CPU per 1 MiB READ (fio, depth 4)
went from ~930 to ~610 µs, per 256 KiB READ (nbdcopy, 4 connections) from ~330 to ~180
µs (~215 µs asking for 1 MiB).  What the kernel may then hold for a client that does
not read, 4 MiB per connection, is what TCP's autotuning allows a TCP socket by default
(``net.ipv4.tcp_wmem``), so TCP sockets are left to it."""


def widen_send_buffer(sock: trio.socket.SocketType) -> None:
    """``UNIX_SEND_BUFFER`` for a Unix socket (nothing for others, or if refused)."""
    if sock.family == socket.AF_UNIX:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SEND_BUFFER)


def coalesced(parts: list[Part], limit: int = COALESCE) -> list[Part]:
    """``parts`` with each run of small ones (together under ``limit`` bytes) joined into
    one; large parts are passed on as they are (no copy)."""
    out: list[Part] = []
    run: list[Part] = []
    size = 0
    for part in parts:
        if run and (len(part) >= limit or size + len(part) > limit):
            out.append(run[0] if len(run) == 1 else b"".join(run))
            run, size = [], 0
        if len(part) >= limit:
            out.append(part)
        else:
            run.append(part)
            size += len(part)
    if run:
        out.append(run[0] if len(run) == 1 else b"".join(run))
    return out


class MessageWriter:
    """Writes whole messages to one stream, in the order handed over (see the module)."""

    def __init__(self, stream: trio.abc.Stream, fd: int | None, peer: str, timeout: float) -> None:
        self._stream = stream
        self._fd = fd
        self._peer = peer
        self._timeout = timeout
        self._busy = False
        self._queue: list[tuple[Sequence[Part], Callable[[], None]]] = []
        self._broken: BlockError | None = None
        self._cut_off = math.inf
        self._cut_off_why = ""
        self._shield: trio.CancelScope | None = None

    def switch_to(self, stream: trio.abc.Stream) -> None:
        """Write to ``stream`` from now on, through ``send_all`` (the TLS stream after
        STARTTLS); only between messages."""
        assert not self._busy and not self._queue
        self._stream, self._fd = stream, None

    def cut_off_at(self, deadline: float, why: str) -> None:
        """Writes end at ``deadline`` (trio time) whatever they are in the middle of, the
        one under way too: the stream is then broken (``Stalled(why)``).  ``math.inf``
        lifts the cut-off."""
        self._cut_off, self._cut_off_why = deadline, why
        if self._shield is not None:
            self._shield.deadline = deadline

    async def write(
        self, parts: Sequence[Part], on_written: Callable[[], None] = lambda: None, *,
        batch: bool = False,
    ) -> None:  # fmt: skip
        """Queue ``parts`` as one message, and write the queue unless another task is at
        it; with ``batch`` the other ready tasks first get to queue theirs.  Raises
        ``ConnectionLost`` (``Stalled``: the client took nothing for the timeout) when
        the stream fails under this task.  A message begun is finished even if the
        caller is cancelled; ``on_written`` is called once, written or not."""
        if self._broken is not None:
            on_written()
            raise self._broken
        self._queue.append((parts, on_written))
        if self._busy:
            return
        self._busy = True
        try:
            if batch:
                await trio.lowlevel.cancel_shielded_checkpoint()
            while self._queue:
                await self._write_queued()
        finally:
            self._busy = False

    async def _write_queued(self) -> None:
        messages, self._queue = self._queue, []
        try:
            rest = self._write_now([part for parts, _ in messages for part in parts])
            if rest:
                await self._write_shielded(rest)
        except BlockError as exc:
            self._broken = exc
            for _, done in self._queue:  # nobody will write them now
                done()
            self._queue.clear()
            raise
        finally:
            for _, done in messages:
                done()

    def _write_now(self, parts: list[Part]) -> list[Part]:
        """What the socket takes at once (no await: the common case); what is left.  A
        stream that is not a socket (TLS) gets the small parts joined (``coalesced``)."""
        if self._fd is None:
            return coalesced(parts)
        try:
            return write_without_blocking(self._fd, parts)
        except OSError as exc:
            raise ConnectionLost(f"connection to {self._peer} lost: {exc}") from exc

    async def _write_shielded(self, parts: list[Part]) -> None:
        """``parts`` whole even if the caller is cancelled, unless the cut-off comes."""
        with trio.CancelScope(shield=True, deadline=self._cut_off) as shield:
            self._shield = shield
            try:
                await self._write(parts)
            finally:
                self._shield = None
        if shield.cancelled_caught:
            raise Stalled(self._cut_off_why)

    async def _write(self, parts: list[Part]) -> None:
        try:
            for part in parts:
                with trio.move_on_after(self._timeout) as scope:
                    await self._stream.send_all(part)
                if scope.cancelled_caught:
                    raise Stalled(f"{self._peer} took nothing we sent for {self._timeout:g} s")
        except STREAM_ERRORS as exc:
            raise ConnectionLost(f"connection to {self._peer} lost: {exc}") from exc
