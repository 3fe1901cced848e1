"""One NBD connection over trio: requests from many tasks, read by their callers or one
reader task.

    async with open_nbd_client(parse_uri("nbd+unix:///disk?socket=/run/s")) as client:
        await client.pread(buf, 0)

Invariants (pyfuse3 calls in from up to 99 tasks at once):

- Requests are queued whole on the out-queue and written in order by one sender at a
  time, with cancellation shielded from the first piece the socket does not take at
  once (sender.py), so a cancelled caller never leaves half a request on the wire.  A
  send that makes no progress for ``timeout`` seconds (a server that stopped reading),
  or is still going at its caller's deadline, drops the connection instead of holding
  its shield longer.
- One task at a time reads the connection and completes calls: a request alone on the
  connection is read by its own caller, others by the reader task (the turn, and how
  it changes hands without a reply ever left unread: receiver.py).  Dropping the
  connection (``_drop``) fails every call at once; a caller waits on its call's event.
  A call stays registered until its reply is done, even if its caller was cancelled,
  so late data lands in a buffer nobody reads any more, never elsewhere.
- Every call has a deadline (by default ``timeout`` seconds after its operation began).
  The reader task's waits, parked or reading, end at the earliest deadline it knows of
  (watchdog.py); a call still unanswered then means the server stalled: the connection
  is dropped with ``Stalled`` (ETIMEDOUT), whether or not anybody still waits for that
  call, and whoever reads it.  So no caller waits past its deadline, whatever the
  server does (or does not do).
- When the connection breaks (EOF, reset, a protocol violation, a stall) the reader
  task, or the caller that found it, records why and fails every waiting call with
  that error; the reader closes the socket (a hard disconnect, which the spec asks for
  after a violation) and ends; later requests fail at once.  The reader never raises
  into its nursery: the error is delivered to every caller instead.
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
The out-queue's sender (sender.py), the receive side (receiver.py) and the deadlines'
bookkeeping (watchdog.py) are modules of their own; what stays here is the calls, their
delivery, failing them, and closing.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass

import trio

from ..errors import BlockError, Disconnected, ProtocolError, RequestFailed
from ..nbd.constants import NO_CMD_FLAGS, Cmd, CmdFlag, TxFlag
from ..nbd.events import (
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
from .calls import Call, split
from .handshake import ConnectionLost
from .receiver import Receiver, Turn
from .sender import STREAM_ERRORS, Sender

BREAKAGE = (ProtocolError, ConnectionLost, *STREAM_ERRORS)
"""What reading a broken connection raises (``PeerClosed`` is a ``ProtocolError``)."""

DEFAULT_TIMEOUT = 30.0
"""Seconds a request may wait for its answer, as the Linux kernel's NBD client allows."""
CLOSE_TIMEOUT = 5.0
"""Seconds ``aclose`` waits for requests in flight to be answered (and DISC to leave)."""

ZERO_SPLIT = 1 << 30
"""Payload-less requests (TRIM, WRITE_ZEROES, BLOCK_STATUS) are split at 1 GiB."""


@dataclass(frozen=True)
class Statistics:
    """How the replies of one connection were read."""

    alone: int
    """Requests sent alone on the connection and read by their own caller."""
    by_reader: int
    """Replies read by the reader task."""
    handovers: int
    """Times a caller reading its own reply handed the connection to the reader task
    with requests in flight (others came meanwhile, or it was cancelled)."""


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
        fd = sock.fileno() if isinstance(sock, trio.socket.SocketType) else None
        self._sender = Sender(stream, fd, server, timeout, self._drop)
        self._calls: dict[int, Call] = {}
        self._receiver = Receiver(
            stream, fd, self._tx, self._calls, self._sender, server, self._deliver
        )
        self._reader_scope = trio.CancelScope()
        self._disc_due = False
        self._broken: BlockError | None = None
        self._closed = False
        self._shutting_down = False
        self._reader_done = trio.Event()
        self._alone = 0
        self._by_reader = 0
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

    def statistics(self) -> Statistics:
        return Statistics(self._alone, self._by_reader, self._receiver.handovers)

    # --- the reader task ------------------------------------------------------------------

    async def run_reader(self, trailing: bytes = b"") -> None:
        """Read replies until the connection ends; never raises (see the module text)."""
        try:
            with self._reader_scope, self._breaking():
                if trailing:
                    self._receiver.feed(trailing, eof=False)
                await self._receiver.serve()
        finally:
            self._fail(Disconnected(f"connection to {self.server} is closed"), None)
            with trio.CancelScope(shield=True):
                await quietly(self._stream.aclose())
            self._reader_done.set()

    @contextlib.contextmanager
    def _breaking(self) -> Iterator[None]:
        """What a broken connection raises while reading becomes the error every call
        fails with (the first one found)."""
        try:
            yield
        except BREAKAGE as exc:
            self._fail(self._breakage(exc), exc)

    def _breakage(self, exc: BaseException) -> BlockError:
        """The error a broken connection's exception means for the calls on it."""
        if self._closed and isinstance(exc, trio.ClosedResourceError):  # by ``aclose``
            return Disconnected(f"connection to {self.server} is closed")
        if isinstance(exc, PeerClosed):
            return ConnectionLost(f"{self.server}: {exc}")
        if isinstance(exc, ProtocolError):
            return ProtocolError(f"{self.server}: {exc}")
        if isinstance(exc, ConnectionLost):
            return exc
        return ConnectionLost(f"connection to {self.server} lost: {exc}")

    def _deliver(self, event: ReplyEvent) -> None:
        """Hand one event to its call; calls already failed (broken connection) are skipped."""
        call = self._calls.get(event.cookie)
        if call is None:
            return
        if type(event) is Done:
            self._complete(call, event)
        elif isinstance(event, ReadData):
            assert call.sink is not None
            start = event.offset - call.offset
            call.sink[start : start + len(event.data)] = event.data
        elif isinstance(event, ReadHole):
            assert call.sink is not None
            start = event.offset - call.offset
            call.sink[start : start + event.length] = bytes(event.length)
        elif isinstance(event, BlockStatus) and event.context == self._tx.allocation_context:
            call.extents.extend(event.extents)

    def _complete(self, call: Call, done: Done) -> None:
        del self._calls[done.cookie]
        call.result = done
        if call.cmd in WRITES and not done.error:
            self._acked_writes += 1
        if self._receiver.turn is Turn.READER:
            self._by_reader += 1
        call.done.set()
        if done.error == errno.ESHUTDOWN:
            self._server_shutting_down()
        if self._disc_due and not self._calls:
            self._send_disc_now()

    def _server_shutting_down(self) -> None:
        """ESHUTDOWN: take no new requests, and send DISC once the others are answered."""
        if self._broken is None:
            self._broken = ConnectionLost(f"{self.server} is shutting down (ESHUTDOWN)")
            self._shutting_down = self._disc_due = True

    def _send_disc_now(self) -> None:
        """Queue DISC; whoever reads sends it right after the current batch of replies."""
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

    async def request(
        self,
        cmd: Cmd,
        offset: int = 0,
        length: int = 0,
        flags: CmdFlag = NO_CMD_FLAGS,
        *,
        payload: memoryview | None = None,
        sink: memoryview | None = None,
    ) -> Call:
        """One request, answered (or its failure raised): alone on the connection its
        caller reads the reply itself (receiver.py), else the reader task does."""
        if self._closed or self._broken is not None:
            self._check_usable()
        await trio.lowlevel.checkpoint_if_cancelled()  # nothing queued for a cancelled caller
        now = trio.current_time()
        receiver = self._receiver
        if not receiver.take(now):
            call = await self.submit(cmd, offset, length, flags, payload=payload, sink=sink)
            await self.wait([call])
            return call
        try:
            call = self._register(cmd, offset, length, flags, payload, sink, now)
            if not self._sender.send_at_once():
                await self._sender.send(batch=False)
            alone = receiver.sent()  # else others came while it was sent: the reader reads
            if alone:
                try:
                    await receiver.read_own(call)
                except BREAKAGE as exc:  # found by this caller: the reader task closes
                    self._fail(self._breakage(exc), exc)
                    self._reader_scope.cancel()
        finally:
            receiver.give_back()
        if not alone:
            await self.wait([call])
            return call
        self._alone += 1
        if self._sender.queued:
            await self._sender.send_if_idle()  # a DISC due after the last reply
        if error := call.error or self._request_error(call):
            raise error
        return call

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
        await trio.lowlevel.checkpoint_if_cancelled()
        call = self._register(cmd, offset, length, flags, payload, sink, trio.current_time())
        self._receiver.queued()
        if not self._sender.busy:
            await self._sender.send(batch=len(self._calls) > 1)
        return call

    def _register(
        self,
        cmd: Cmd,
        offset: int,
        length: int,
        flags: CmdFlag,
        payload: memoryview | None,
        sink: memoryview | None,
        now: float,
    ) -> Call:
        """A call for the request (made at ``now``), in flight and watched; the request
        queued."""
        cookie, header = self._tx.request(cmd, offset, length, flags)
        call = Call(cookie, cmd, offset, length, now + self.timeout, sink)
        self._calls[cookie] = call
        self._receiver.watchdog.watch(call.deadline)
        self._sender.queue(header, payload)
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
        if 0 < len(buf) <= self._tx.max_payload:
            await self.request(Cmd.READ, offset, len(buf), sink=buf)
        else:
            await self._vectored(Cmd.READ, [buf], offset, NO_CMD_FLAGS)

    async def preadv(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Fill ``bufs`` one after another from ``offset``; all pieces in flight at once."""
        if len(bufs) == 1:
            await self.pread(bufs[0], offset)
        else:
            await self._vectored(Cmd.READ, bufs, offset, NO_CMD_FLAGS)

    async def pwrite(self, data: memoryview, offset: int, *, fua: bool = False) -> None:
        flags = CmdFlag.FUA if fua else NO_CMD_FLAGS
        if 0 < len(data) <= self._tx.max_payload:
            await self.request(Cmd.WRITE, offset, len(data), flags, payload=data)
        else:
            await self._vectored(Cmd.WRITE, [data], offset, flags)

    async def pwritev(self, bufs: Sequence[memoryview], offset: int, *, fua: bool = False) -> None:
        """Write ``bufs`` in order from ``offset``, split at the server's maximum payload."""
        if len(bufs) == 1:
            await self.pwrite(bufs[0], offset, fua=fua)
        else:
            await self._vectored(Cmd.WRITE, bufs, offset, CmdFlag.FUA if fua else NO_CMD_FLAGS)

    async def _vectored(
        self, cmd: Cmd, bufs: Sequence[memoryview], offset: int, flags: CmdFlag
    ) -> None:
        """READ into, or WRITE from, ``bufs`` in pieces of at most ``max_payload``."""
        pieces = []
        for buf in bufs:
            for off, n in split(offset, len(buf), self.max_payload):
                pieces.append((off, n, buf[off - offset : off - offset + n]))
            offset += len(buf)
        data = "payload" if cmd is Cmd.WRITE else "sink"
        if len(pieces) == 1:
            off, n, piece = pieces[0]
            await self.request(cmd, off, n, flags, **{data: piece})
            return
        calls = [await self.submit(cmd, off, n, flags, **{data: p}) for off, n, p in pieces]
        await self.wait(calls)

    async def flush(self) -> None:
        covered = self._acked_writes
        await self.request(Cmd.FLUSH)
        self._flushed_writes = max(self._flushed_writes, covered)

    async def trim(self, offset: int, length: int) -> None:
        await self._ranged(Cmd.TRIM, offset, length, NO_CMD_FLAGS)

    async def zero(self, offset: int, length: int, *, no_hole: bool = False) -> None:
        flags = CmdFlag.NO_HOLE if no_hole else NO_CMD_FLAGS
        await self._ranged(Cmd.WRITE_ZEROES, offset, length, flags)

    async def _ranged(self, cmd: Cmd, offset: int, length: int, flags: CmdFlag) -> None:
        pieces = split(offset, length, ZERO_SPLIT)
        if len(pieces) == 1:
            await self.request(cmd, offset, length, flags)
            return
        await self.wait([await self.submit(cmd, off, n, flags) for off, n in pieces])

    async def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``(length, flags)`` of ``base:allocation`` from ``offset`` on; may stop short."""
        call = await self.request(Cmd.BLOCK_STATUS, offset, min(length, ZERO_SPLIT))
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


async def quietly(aw: Awaitable[object]) -> None:
    with contextlib.suppress(*STREAM_ERRORS):
        await aw
