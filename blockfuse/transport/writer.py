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
a client that takes nothing for ``timeout`` seconds breaks the connection (``Stalled``;
what is left goes in pieces of ``PROGRESS_PIECE`` bytes, each within the timeout, so a
client that reads a large reply slowly but steadily is not dropped),
and so does the cut-off (``cut_off_at``: a deadline the connection sets when it must end
soon whatever its client reads, as when the server hurries to shut down).

A message may also be held (``hold``): queued without being written, it leaves with the
next ``write`` or ``flush``.  The connection's reader holds the replies it makes itself
and flushes before it waits; what is held when the connection ends is dropped
(``drop_held``: each message's ``on_written`` still called).

A part may be a ``FileRange`` (a large READ's data lent by a file device): on a socket
it is sent from the file by ``os.sendfile``, which hands the page cache's pages to the
socket (a 1 MiB READ reply cost ~50-80 µs of the server's CPU instead of ~410-440 for a
read into a buffer and a ``writev``, in a micro benchmark on the dev VM).  Its bytes are
read only then, so a failure to read them comes after the reply's header has gone: the
reply cannot be finished or taken back, and the connection is dropped (``ConnectionLost``);
the lender is told (``failed``) and lends no more, so a client's retry of that READ gets
an error reply.  A stream that is not a socket gets the range read into bytes first.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import cast

import trio

from ..errors import BlockError
from ..filerange import FileRange
from .handshake import ConnectionLost, Stalled
from .sender import (
    PROGRESS_PIECE,
    STREAM_ERRORS,
    Part,
    in_pieces,
    still_open,
    write_without_blocking,
)

Outgoing = Part | FileRange
"""A part of a message: bytes, or a range of a file sent from the file."""

FILE_ERRNOS = frozenset(
    {errno.EIO, errno.ENXIO, errno.ESTALE, errno.EINVAL, errno.EOVERFLOW, errno.EOPNOTSUPP,
     errno.ENOSYS}
)  # fmt: skip
"""What ``sendfile`` raises about the file, and will raise again for it: the lender is
told and lends no more.  Anything else (the socket's errors, TCP's among them; ENOMEM)
ends the connection only."""

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
        self._queue: list[tuple[Sequence[Outgoing], Callable[[], None]]] = []
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
        self, parts: Sequence[Outgoing], on_written: Callable[[], None] = lambda: None, *,
        batch: bool = False,
    ) -> None:  # fmt: skip
        """Queue ``parts`` as one message, and write the queue unless another task is at
        it; with ``batch`` the other ready tasks first get to queue theirs.  Raises
        ``ConnectionLost`` (``Stalled``: the client took nothing for the timeout) when
        the stream fails under this task.  A message begun is finished even if the
        caller is cancelled; ``on_written`` is called once, written or not."""
        self.hold(parts, on_written)
        if not self._busy:
            await self._write_queue(batch)

    def hold(self, parts: Sequence[Outgoing], on_written: Callable[[], None]) -> None:
        """Queue ``parts`` as one message without writing it: the next ``write`` or
        ``flush`` writes it with the others queued (the replies a connection's reader
        makes itself, until it next waits).  Raises as ``write`` does once the stream
        is broken."""
        if self._broken is not None:
            on_written()
            raise self._broken
        self._queue.append((parts, on_written))

    async def flush(self) -> None:
        """Write what is queued, unless another task is at it (which writes it too)."""
        if self._queue and not self._busy:
            await self._write_queue(batch=False)

    def drop_held(self) -> None:
        """What is queued will not be written (its connection is ending): each message's
        ``on_written`` is called.  Nothing while another task writes: it takes the queue."""
        if not self._busy:
            messages, self._queue = self._queue, []
            call_each(done for _, done in messages)

    async def _write_queue(self, batch: bool) -> None:
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
        except BaseException as exc:
            # the stream is broken, or in an unknown state (a bug): nothing more goes out
            self._broken = exc if isinstance(exc, BlockError) else ConnectionLost(str(exc))
            messages += self._queue  # nobody will write them now
            self._queue = []
            raise
        finally:
            call_each(done for _, done in messages)

    def _write_now(self, parts: list[Outgoing]) -> list[Outgoing]:
        """What the socket takes at once (no await: the common case); what is left.  A
        stream that is not a socket (TLS) gets the small parts joined (``coalesced``)."""
        ranges = FileRange in map(type, parts)  # every reply comes here: no Python loop
        if self._fd is None:
            out = coalesced(read_ranges(parts) if ranges else cast(list[Part], parts))
            return cast(list[Outgoing], out)
        try:
            if ranges:
                return send_without_blocking(self._fd, parts)
            return cast(list[Outgoing], write_without_blocking(self._fd, cast(list[Part], parts)))
        except OSError as exc:
            raise ConnectionLost(f"connection to {self._peer} lost: {exc}") from exc

    async def _write_shielded(self, parts: list[Outgoing]) -> None:
        """``parts`` whole even if the caller is cancelled, unless the cut-off comes."""
        with trio.CancelScope(shield=True, deadline=self._cut_off) as shield:
            self._shield = shield
            try:
                await self._write(parts)
            finally:
                self._shield = None
        if shield.cancelled_caught:
            raise Stalled(self._cut_off_why)

    async def _write(self, parts: list[Outgoing]) -> None:
        """``parts`` in pieces (``PROGRESS_PIECE``), each taken within the timeout."""
        try:
            for piece in (piece for part in parts for piece in pieces_of(part)):
                with trio.move_on_after(self._timeout) as scope:
                    if isinstance(piece, FileRange):
                        await self._send_file(piece)
                    else:
                        await self._stream.send_all(piece)
                if scope.cancelled_caught:
                    raise Stalled(f"{self._peer} took nothing we sent for {self._timeout:g} s")
        except STREAM_ERRORS as exc:
            raise ConnectionLost(f"connection to {self._peer} lost: {exc}") from exc

    async def _send_file(self, rest: FileRange) -> None:
        """All of ``rest`` from its file, waiting for the socket as it fills."""
        fd = self._fd
        assert fd is not None  # a range reaches here only on a socket (``_write_now``)
        sock = getattr(self._stream, "socket", None)
        left: FileRange | None = rest
        while left is not None:
            await trio.lowlevel.wait_writable(fd)
            if not still_open(sock, fd):  # its number may be another file's by now
                raise trio.ClosedResourceError("the connection was closed")
            left = send_file_without_blocking(fd, left)


def pieces_of(part: Outgoing) -> list[Outgoing]:
    """``part`` in pieces of at most ``PROGRESS_PIECE`` bytes (``sender.in_pieces``)."""
    if not isinstance(part, FileRange):
        return cast(list[Outgoing], in_pieces(part))
    step = PROGRESS_PIECE
    return [part.piece(at, min(step, part.length - at)) for at in range(0, part.length, step)]


def call_each(callbacks: Iterable[Callable[[], None]]) -> None:
    """Call every one, even after one raised (the first error is raised at the end):
    each gives back what its message held (a buffer, a lent file range)."""
    first: BaseException | None = None
    for callback in callbacks:
        try:
            callback()
        except BaseException as exc:
            first = first or exc
    if first is not None:
        raise first


def send_without_blocking(fd: int, parts: list[Outgoing]) -> list[Outgoing]:
    """``write_without_blocking`` for parts among which are file ranges: what the socket
    ``fd`` takes now, in order; what is left to send."""
    start = 0
    for index, part in enumerate(parts):
        if not isinstance(part, FileRange):
            continue
        if index > start and (rest := write_bytes(fd, parts[start:index])):
            return [*rest, *parts[index:]]
        left = send_file_without_blocking(fd, part)
        if left is not None:
            return [left, *parts[index + 1 :]]
        start = index + 1
    return write_bytes(fd, parts[start:]) if start < len(parts) else []


def write_bytes(fd: int, parts: list[Outgoing]) -> list[Outgoing]:
    """``write_without_blocking`` of parts that are all bytes (no file range among them)."""
    return cast(list[Outgoing], write_without_blocking(fd, cast(list[Part], parts)))


def send_file_without_blocking(fd: int, rest: FileRange) -> FileRange | None:
    """What the socket ``fd`` takes now of ``rest``, from its file; what is left
    (``None``: nothing).  A failure of the socket raises ``OSError``; one of the file
    is told to the range's lender and raises ``ConnectionLost`` (module text)."""
    while rest.length:
        try:
            n = os.sendfile(fd, rest.fd, rest.offset, rest.length)
        except BlockingIOError:
            return rest
        except OSError as exc:
            if exc.errno not in FILE_ERRNOS:
                raise
            raise file_failed(rest, exc) from exc
        if n == 0:
            raise file_failed(rest, OSError(errno.EIO, f"the file ended at byte {rest.offset}"))
        rest = rest.after(n)
    return None


def read_ranges(parts: list[Outgoing]) -> list[Part]:
    """``parts`` with every file range read into bytes (for a stream that is not a socket)."""
    out: list[Part] = []
    for part in parts:
        if not isinstance(part, FileRange):
            out.append(part)
            continue
        try:
            data = os.pread(part.fd, part.length, part.offset)
        except OSError as exc:
            raise file_failed(part, exc) from exc
        if len(data) < part.length:
            raise file_failed(
                part, OSError(errno.EIO, f"the file ended before byte {part.offset + part.length}")
            )
        out.append(data)
    return out


def file_failed(part: FileRange, exc: OSError) -> ConnectionLost:
    """Reading a range's file for a reply failed: its lender is told; the connection goes."""
    part.failed(exc)
    return ConnectionLost(
        f"reading the file for a READ reply failed ({exc}); the reply was begun, so the "
        f"connection was dropped"
    )
