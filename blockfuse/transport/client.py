"""One NBD connection over trio: requests from many tasks, one reader task.

    async with open_nbd_client(parse_uri("nbd+unix:///disk?socket=/run/s")) as client:
        await client.pread(buf, 0)

Invariants (pyfuse3 calls in from up to 99 tasks at once):

- Requests are queued whole on the out-queue and written in order by one sender at a
  time with cancellation shielded (sender.py), so a cancelled caller never leaves half a
  request on the wire.  A send that makes no progress for ``timeout`` seconds (a server
  that stopped reading), or is still going at its caller's deadline, drops the
  connection instead of holding its shield longer.
- Only the reader task feeds the core and only it completes calls, except that dropping
  the connection (``_drop``) fails every call at once; a caller waits on its call's
  event.  A call stays registered until its reply is done, even if its caller was
  cancelled, so late data lands in a buffer nobody reads any more, never elsewhere.
- Every call has a deadline (by default ``timeout`` seconds after its operation began).
  The reader's waits end at the earliest deadline it knows of (watchdog.py); a call
  still unanswered
  then means the server stalled: the connection is dropped with ``Stalled`` (ETIMEDOUT),
  whether or not anybody still waits for that call.  So no caller waits past its
  deadline, whatever the server does (or does not do).
- When the connection breaks (EOF, reset, a protocol violation, a stall) the reader
  records why, fails every waiting call with that error, closes the socket (a hard
  disconnect, which the spec asks for after a violation) and ends; later requests fail
  at once.  The reader never raises into its nursery: the error is delivered to every
  caller instead.
- A server that answers ``NBD_ESHUTDOWN`` gets a soft disconnect: no new requests, the
  others answered, then ``NBD_CMD_DISC``.
- ``aclose`` takes at most ``CLOSE_TIMEOUT`` seconds (to let requests in flight be
  answered and send DISC), then closes the socket and ends the reader: bounded whatever
  the server does.
- ``has_unflushed_writes`` tells whether the server acknowledged writes that no
  successful FLUSH has covered since: if the connection is lost then, they may be lost
  with it (a FLUSH on another connection need not cover them).

Entry points in tiers live in connect.py: ``open_nbd_client`` (owns its nursery),
``connect_nbd(nursery, address)`` and ``wrap_nbd_stream(nursery, stream, export)``.
The out-queue's sender (sender.py) and the deadlines' bookkeeping (watchdog.py) are
modules of their own; what stays here is what the invariants above tie together (the
calls, the reader that completes them, and closing), hence its length.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass, field

import trio

from ..errors import BlockError, Disconnected, ProtocolError, RequestFailed
from ..nbd.constants import NO_CMD_FLAGS, Cmd, CmdFlag, TxFlag
from ..nbd.events import (
    NEED_DATA,
    BlockStatus,
    Done,
    ExportInfo,
    Negotiated,
    PeerClosed,
    ReadData,
    ReadHole,
    ReplyEvent,
)
from ..nbd.transmission import WRITES, ClientTransmission
from ..units import printable
from .handshake import ConnectionLost, Stalled
from .sender import STREAM_ERRORS, Sender
from .watchdog import Watchdog

DEFAULT_TIMEOUT = 30.0
"""Seconds a request may wait for its answer, as the Linux kernel's NBD client allows."""
CLOSE_TIMEOUT = 5.0
"""Seconds ``aclose`` waits for requests in flight to be answered (and DISC to leave)."""

RECEIVE_SIZE = 1 << 17
BURST = 16

ZERO_SPLIT = 1 << 30
"""Payload-less requests (TRIM, WRITE_ZEROES, BLOCK_STATUS) are split at 1 GiB."""


@dataclass
class Call:
    """One request on the wire; ``sink`` receives a READ's data."""

    cookie: int
    cmd: Cmd
    offset: int
    length: int
    deadline: float
    """``trio.current_time()`` by which the reply must be complete, or the connection is
    given up."""
    sink: memoryview | None = None
    done: trio.Event = field(default_factory=trio.Event)
    result: Done | None = None
    extents: list[tuple[int, int]] = field(default_factory=list)
    error: BaseException | None = None


class NBDClient:
    """A negotiated connection; see the module text for what holds under concurrency."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        negotiated: Negotiated,
        server: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._stream = stream
        self._tx = ClientTransmission(negotiated)
        self.server = server
        self.timeout = timeout
        sock = getattr(stream, "socket", None)
        self._fd = sock.fileno() if isinstance(sock, trio.socket.SocketType) else None
        self._sender = Sender(stream, self._fd, server, timeout, self._drop)
        self._watchdog = Watchdog()
        self._reader_scope = trio.CancelScope()
        self._disc_due = False
        self._calls: dict[int, Call] = {}
        self._broken: BlockError | None = None
        self._closed = False
        self._shutting_down = False
        self._reader_done = trio.Event()
        self._acked_writes = 0
        """WRITE, TRIM and WRITE_ZEROES requests the server answered with success."""
        self._flushed_writes = 0
        """How many of those a successful FLUSH covers (acknowledged before it was sent)."""

    @property
    def export(self) -> ExportInfo:
        return self._tx.export

    @property
    def max_payload(self) -> int:
        return self._tx.max_payload

    @property
    def has_block_status(self) -> bool:
        return self._tx.allocation_context is not None

    @property
    def broken(self) -> BlockError | None:
        """Why the connection is unusable, or ``None`` while it works."""
        return self._broken

    @property
    def stream(self) -> trio.abc.Stream:
        """What the connection runs over (a ``TLSStream`` for TLS: see tls.py)."""
        return self._stream

    def can(self, flag: TxFlag) -> bool:
        return self._tx.can(flag)

    @property
    def has_unflushed_writes(self) -> bool:
        """Whether writes were acknowledged that no successful FLUSH has covered yet."""
        return self._acked_writes > self._flushed_writes

    # --- the reader task ------------------------------------------------------------------

    async def run_reader(self, trailing: bytes = b"") -> None:
        """Read replies until the connection ends; never raises (see the module text)."""
        try:
            with self._reader_scope:
                if trailing:
                    self._feed(trailing, eof=False)
                if self._fd is not None:
                    await self._receive_fd(self._fd)
                else:
                    await self._receive_some()
        except PeerClosed as exc:
            self._fail(ConnectionLost(f"{self.server}: {exc}"), exc)
        except ProtocolError as exc:
            self._fail(ProtocolError(f"{self.server}: {exc}"), exc)
        except ConnectionLost as exc:
            self._fail(exc, exc)
        except STREAM_ERRORS as exc:
            self._fail(ConnectionLost(f"connection to {self.server} lost: {exc}"), exc)
        finally:
            self._fail(Disconnected(f"connection to {self.server} is closed"), None)
            with trio.CancelScope(shield=True):
                await quietly(self._stream.aclose())
            self._reader_done.set()

    async def _receive_some(self) -> None:
        while True:
            with self._watching() as wait:
                data = await self._stream.receive_some(RECEIVE_SIZE)
            if wait.cancelled_caught:
                continue
            self._feed(data)
            await self._sender.send_if_idle()
            if not data:
                raise ConnectionLost(f"{self.server} closed the connection")

    async def _receive_fd(self, fd: int) -> None:
        """Like ``_receive_some``, but reading the socket directly while data flows.

        READ data goes straight into the caller's buffer (``payload_target``), and up to
        ``BURST`` reads in a row happen without a trip through the scheduler; the task
        waits for the socket (a checkpoint) only when it has nothing more to read.
        """
        view = memoryview(bytearray(RECEIVE_SIZE))
        while True:
            for _ in range(BURST):
                try:
                    n = self._read_once(fd, view)
                except BlockingIOError:
                    break
                if not n:
                    raise ConnectionLost(f"{self.server} closed the connection")
            await self._sender.send_if_idle()
            with self._watching():
                await trio.lowlevel.wait_readable(fd)

    @contextlib.contextmanager
    def _watching(self) -> Iterator[trio.CancelScope]:
        """A wait of the reader's that ends at the earliest deadline; the deadlines are
        checked before and after it (``Stalled`` if a call is past its own)."""
        self._check_deadlines()
        with self._watchdog.waiting() as scope:
            yield scope
        self._check_deadlines()

    def _check_deadlines(self) -> None:
        late = self._watchdog.overdue(self._calls.values())
        if late:
            more = f" and {len(late) - 1} more" if len(late) > 1 else ""
            raise Stalled(
                f"{self.server}: no reply by the deadline to {describe(late[0])}{more}; "
                f"the connection was dropped"
            )

    def _read_once(self, fd: int, view: memoryview) -> int:
        target = self._tx.payload_target()
        if target is None:
            n = os.readv(fd, [view])
            self._feed(view[:n].tobytes())
            return n
        cookie, offset, remaining = target
        call = self._calls.get(cookie)
        if call is None or call.sink is None:  # failed already: read and drop the bytes
            dest = view[: min(remaining, len(view))]
        else:
            start = offset - call.offset
            dest = call.sink[start : start + remaining]
        n = os.readv(fd, [dest])
        if n:
            self._tx.payload_received(n)
        if n == remaining or not n:
            self._feed(b"", eof=not n)
        return n

    def _feed(self, data: bytes | bytearray, *, eof: bool = True) -> None:
        if data or eof:
            self._tx.receive_data(data)
        while (event := self._tx.next_event()) is not NEED_DATA:
            self._deliver(event)

    def _deliver(self, event: ReplyEvent) -> None:
        """Hand one event to its call; calls already failed (broken connection) are skipped."""
        call = self._calls.get(event.cookie)
        if call is None:
            return
        if isinstance(event, ReadData):
            assert call.sink is not None
            start = event.offset - call.offset
            call.sink[start : start + len(event.data)] = event.data
        elif isinstance(event, ReadHole):
            assert call.sink is not None
            start = event.offset - call.offset
            call.sink[start : start + event.length] = bytes(event.length)
        elif isinstance(event, BlockStatus):
            if event.context == self._tx.allocation_context:
                call.extents.extend(event.extents)
        elif isinstance(event, Done):
            del self._calls[event.cookie]
            call.result = event
            if not event.error and call.cmd in WRITES:
                self._acked_writes += 1
            call.done.set()
            if event.error == errno.ESHUTDOWN:
                self._server_shutting_down()
            if self._disc_due and not self._calls:
                self._send_disc_now()

    def _server_shutting_down(self) -> None:
        """ESHUTDOWN: take no new requests, and send DISC once the others are answered."""
        if self._broken is None:
            self._broken = ConnectionLost(f"{self.server} is shutting down (ESHUTDOWN)")
            self._shutting_down = self._disc_due = True

    def _send_disc_now(self) -> None:
        """Queue DISC; the reader sends it right after the current batch of replies."""
        self._disc_due = False
        self._sender.queue(self._tx.disconnect())

    def _drop(self, error: BlockError) -> None:
        """Give up on the connection from outside the reader: fail every call, and end
        the reader (which closes the socket)."""
        self._fail(error, error.__cause__)
        self._reader_scope.cancel()

    def _fail(self, error: BlockError, cause: BaseException | None) -> None:
        if self._broken is None:
            error.__cause__ = cause
            self._broken = error
        self._sender.clear()
        for call in self._calls.values():
            call.error = self._broken
            call.done.set()
        self._calls.clear()

    # --- requests -------------------------------------------------------------------------

    async def submit(
        self,
        cmd: Cmd,
        offset: int = 0,
        length: int = 0,
        flags: CmdFlag = NO_CMD_FLAGS,
        *,
        payload: memoryview | None = None,
        sink: memoryview | None = None,
    ) -> Call:
        """Queue one request for the wire; its reply completes the returned call within
        ``timeout`` seconds, or the connection is dropped (the call fails with ``Stalled``).

        Requests are queued in order and written by one sender at a time (with
        cancellation shielded, so no request is ever half sent).  When others are in
        flight the sender first lets the other ready tasks queue theirs, so a burst of
        requests leaves in one ``writev``.
        """
        self._check_usable()
        cookie, header = self._tx.request(cmd, offset, length, flags)
        call = Call(cookie, cmd, offset, length, trio.current_time() + self.timeout, sink)
        self._calls[cookie] = call
        self._watchdog.watch(call.deadline)
        self._sender.queue(header)
        if payload is not None:
            self._sender.queue(payload)
        if not self._sender.busy:
            until = trio.current_effective_deadline()  # the caller's, outside the shield
            await self._sender.send(batch=len(self._calls) > 1, until=until)
        return call

    def _check_usable(self) -> None:
        if self._closed:
            raise Disconnected(f"connection to {self.server} is closed")
        if self._broken is not None:
            raise self._broken

    async def wait(self, calls: Sequence[Call]) -> None:
        """Wait for every call; raise the first failure (after all have ended)."""
        first: BaseException | None = None
        for call in calls:
            await call.done.wait()
            first = first or call.error or self._request_error(call)
        if first is not None:
            raise first

    def _request_error(self, call: Call) -> BlockError | None:
        done = call.result
        if done is None or not done.error:
            return None
        text = printable(done.message) or os.strerror(done.error)
        if done.error == errno.ESHUTDOWN:
            return ConnectionLost(f"{self.server} is shutting down: {text}")
        return RequestFailed(done.error, f"{self.server}: {text}")

    # --- operations -----------------------------------------------------------------------

    async def pread(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from byte ``offset``."""
        await self.preadv([buf], offset)

    async def preadv(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Fill ``bufs`` one after another from ``offset``; all pieces in flight at once."""
        await self._vectored(Cmd.READ, bufs, offset, NO_CMD_FLAGS)

    async def pwrite(self, data: memoryview, offset: int, *, fua: bool = False) -> None:
        await self.pwritev([data], offset, fua=fua)

    async def pwritev(self, bufs: Sequence[memoryview], offset: int, *, fua: bool = False) -> None:
        """Write ``bufs`` in order from ``offset``, split at the server's maximum payload."""
        await self._vectored(Cmd.WRITE, bufs, offset, CmdFlag.FUA if fua else NO_CMD_FLAGS)

    async def _vectored(
        self, cmd: Cmd, bufs: Sequence[memoryview], offset: int, flags: CmdFlag
    ) -> None:
        """READ into, or WRITE from, ``bufs`` in pieces of at most ``max_payload``."""
        calls = []
        for buf in bufs:
            for off, n in split(offset, len(buf), self.max_payload):
                piece = buf[off - offset : off - offset + n]
                data = {"payload": piece} if cmd is Cmd.WRITE else {"sink": piece}
                calls.append(await self.submit(cmd, off, n, flags, **data))
            offset += len(buf)
        await self.wait(calls)

    async def flush(self) -> None:
        covered = self._acked_writes
        await self.wait([await self.submit(Cmd.FLUSH)])
        self._flushed_writes = max(self._flushed_writes, covered)

    async def trim(self, offset: int, length: int) -> None:
        await self._ranged(Cmd.TRIM, offset, length, NO_CMD_FLAGS)

    async def zero(self, offset: int, length: int, *, no_hole: bool = False) -> None:
        flags = CmdFlag.NO_HOLE if no_hole else NO_CMD_FLAGS
        await self._ranged(Cmd.WRITE_ZEROES, offset, length, flags)

    async def _ranged(self, cmd: Cmd, offset: int, length: int, flags: CmdFlag) -> None:
        pieces = split(offset, length, ZERO_SPLIT)
        await self.wait([await self.submit(cmd, off, n, flags) for off, n in pieces])

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``(length, flags)`` of ``base:allocation`` from ``offset`` on; may stop short."""
        call = await self.submit(Cmd.BLOCK_STATUS, offset, min(length, ZERO_SPLIT))
        await self.wait([call])
        return call.extents

    async def aclose(self) -> None:
        """Send ``NBD_CMD_DISC`` once requests are answered, and close; never fails, and
        takes at most ``CLOSE_TIMEOUT`` seconds whatever the server does.

        On a broken connection there is nothing to wait for, unless the server is only
        shutting down (ESHUTDOWN): then its other answers are awaited and DISC is sent.
        Calls still unanswered when the time is up fail with ``Disconnected``."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self._wait_idle()
                if self._broken is None or self._disc_due:
                    self._send_disc_now()
                await self._sender.send_after_current(until=trio.current_effective_deadline())
            self._reader_scope.cancel()
            await quietly(self._stream.aclose())
            with trio.move_on_after(CLOSE_TIMEOUT):
                await self._reader_done.wait()

    async def _wait_idle(self) -> None:
        while self._calls and (self._broken is None or self._shutting_down):
            await next(iter(self._calls.values())).done.wait()


def describe(call: Call) -> str:
    """``'a READ of 4096 bytes at 0'``, for messages."""
    if call.cmd in (Cmd.FLUSH, Cmd.DISC):
        return f"a {call.cmd.name}"
    return f"a {call.cmd.name} of {call.length} bytes at {call.offset}"


async def quietly(aw: Awaitable[object]) -> None:
    with contextlib.suppress(*STREAM_ERRORS):
        await aw


def split(offset: int, length: int, limit: int) -> list[tuple[int, int]]:
    """``(offset, length)`` pieces of at most ``limit`` bytes covering the range."""
    return [
        (off, min(limit, offset + length - off)) for off in range(offset, offset + length, limit)
    ]
