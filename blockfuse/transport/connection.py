"""One client connection of the NBD server: its handshake, its reader, and the tasks that
answer its requests.  It only moves bytes: the server core (``nbd/server.py``) decides
what they mean, and a ``Handler`` from the front end does each request.

Invariants:

- Only the reader feeds the core and reads the socket.  Before it reads on, it reserves
  what the request it just got needs (``budget.py``): a slot of the connection's, and
  the request's bytes of the connection's budget and of the server's; a request it
  refuses holds a slot too, until its refusal is written.  A client that
  sends faster than its requests are answered is held back by TCP: the connection holds
  at most ``Limits.requests`` requests and ``Limits.connection_bytes`` bytes.
- Each request runs in a task of the connection's nursery and sends its reply when it
  is done, so replies leave in the order requests complete; one the handler can answer
  at once (``Handler.answer_now``: a READ of a file's cached data, a WRITE into its page
  cache) is answered by the reader itself, on a socket, and its reply is held until the
  reader would wait (for the client's bytes, or for a slot or budget its held replies
  may be holding), so that the replies to what one read brought leave in one
  ``writev``: fio 4 KiB random writes at depth 16 cost the server ~5 µs less of CPU per
  request (42.6 µs instead of 47.7, medians of 3 interleaved rounds).  A large WRITE
  whose range the handler lends as a file's (``Handler.write_target``) has its payload
  moved from the socket into that file by the reader (``splice.py``), under the same
  payload deadline; its reply is held the same way.  Messages are written whole and
  in the order they were handed over, never cut or interleaved (``writer.py``); a
  client that takes nothing we send for ``Limits.send_timeout`` seconds is dropped,
  and so is one whose WRITE payload is not whole ``Limits.payload_timeout`` seconds
  after its room was reserved (it holds budget that other clients may be waiting for).
- The handshake must end within ``Limits.handshake_timeout`` seconds, a TLS handshake
  after STARTTLS and the writing of every reply included (``tlsserver.py``).  From the
  TLS handshake on, the connection reads and writes the TLS stream only (never the
  socket's fd again), and the core reads nothing the client sent before STARTTLS's ACK
  left as TLS (``nbd/server.py``).
- How a connection ends: after NBD_CMD_DISC the requests in flight are answered, then
  it closes.  A protocol violation, the client closing, a stall or a broken stream end
  it at once: the requests in flight are cancelled (as a device call may be) and the
  socket closed, a hard disconnect, which the spec asks for; no other connection is
  touched.  While the server shuts down, new requests get ESHUTDOWN (new options
  ERR_SHUTDOWN) and the connection closes once nothing is in flight; when it hurries,
  the connection is cancelled and a reply being written is cut off ``HURRIED_WRITE``
  seconds later, so a client that does not read cannot hold the shutdown.
- Nothing leaves ``run`` but cancellation; why the connection ended is logged.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from ..errors import BlockError, ProtocolError
from ..nbd.constants import Cmd
from ..nbd.events import (
    NEED_DATA,
    START_TLS,
    ClientGone,
    Closing,
    ExportInfo,
    NeedData,
    PayloadComing,
    PeerClosed,
    Reply,
    Request,
    RequestRefused,
    ServerEvent,
    ServerReady,
    ServerReply,
)
from ..nbd.haggling import TLSPolicy
from ..nbd.replies import Part
from ..nbd.server import ServerCore
from .budget import ByteBudget, Reservation
from .handshake import ConnectionLost, Stalled
from .pool import MAX_POOLED, MIN_POOLED, BufferPool
from .sender import STREAM_ERRORS
from .splice import SPLICE_MIN, PayloadSplicer, WriteTarget
from .tlsserver import ServerTLS, TLSHandshakeFailed, TLSSession
from .workers import Workers
from .writer import MessageWriter, widen_send_buffer

log = logging.getLogger(__name__)

RECEIVE_SIZE = 1 << 17
BURST = 16
CLOSE_TIMEOUT = 5.0
HURRIED_WRITE = 2.0
"""Seconds a reply being written still gets once the server hurries to shut down."""
SHUTTING_DOWN = "the server is shutting down"


RESERVES_LENGTH = frozenset({int(Cmd.READ), int(Cmd.WRITE)})
"""Requests that hold their length's bytes of budget: a READ's reply, a WRITE's payload
(one that came with its header; others reserved before it was read)."""


def own_payload(req: Request) -> Request:
    """``req`` with a payload of its own where it is a view of a larger piece received
    (a WRITE that came with its payload, without ``PayloadComing``): a request that waits
    must not keep the whole piece alive, only the bytes its budget counts."""
    data = req.data
    if isinstance(data, memoryview) and isinstance(data.obj, bytes) and len(data.obj) > len(data):
        return Request(req.cookie, req.cmd, req.flags, req.offset, req.length, bytes(data))
    return req


def payload_stalled(length: int, timeout: float) -> Stalled:
    return Stalled(f"the payload of a {length}-byte WRITE did not come within {timeout:g} s")


@dataclass(frozen=True)
class ExportTable:
    """The exports a new connection sees (sizes as they are now); ``default`` names the
    one that the empty name opens."""

    exports: tuple[ExportInfo, ...]
    default: str | None = None


class Handler(Protocol):
    """Does the requests of one connection on one export (the front end's side)."""

    async def handle(self, request: Request) -> ServerReply:
        """The reply to ``request``; a device's error becomes an error reply, so this
        raises nothing but cancellation (which may leave a write partly done)."""
        ...

    def answer_now(self, request: Request) -> ServerReply | None:
        """The reply to ``request`` if it can be made at once (no waiting, no blocking
        call), else ``None``: ``handle`` is then awaited for it, in a task of its own."""
        ...

    def written(self, reply: ServerReply) -> None:
        """``reply`` (one of ``handle``'s) has been written, or never will be: nothing
        reads its buffers any more."""
        ...

    async def write_target(self, request: Request) -> WriteTarget | None:
        """Where the payload of ``request``, a WRITE whose payload has not been read,
        may be written straight from the socket, or ``None``.  The range is the
        caller's to ``release`` once the payload is in it (or never will be)."""
        ...

    def write_failed(self, request: Request, exc: OSError) -> Reply:
        """The reply to a WRITE whose payload could not be written into its
        ``write_target``."""
        ...


class Backend(Protocol):
    """What a server serves."""

    async def table(self) -> ExportTable:
        """The exports as a new connection sees them (called once per connection)."""
        ...

    def open(self, ready: ServerReady, peer: str, *, sends_files: bool = False) -> Handler:
        """A handler for a connection that negotiated ``ready`` (one per connection: its
        own flush cursor).  With ``sends_files`` its replies may carry ``FileRange``
        data (the connection writes to a socket, which sends them from the file)."""
        ...


@dataclass(frozen=True)
class Limits:
    """The bounds of ours on what clients may make the server hold, or wait for."""

    handshake_timeout: float = 10.0
    send_timeout: float = 60.0
    payload_timeout: float = 30.0
    """Seconds a WRITE's payload may take to arrive once room for it is reserved."""
    requests: int = 16
    """Requests in flight per connection (qemu-nbd's number)."""
    connection_bytes: int = 64 << 20
    server_bytes: int = 256 << 20
    """Payload bytes in flight, per connection and in the whole server."""
    connections: int = 256


Job = tuple[Request, Handler, Reservation]
"""A request for a worker: what it asks, who does it, what it holds until answered."""


class Connection:
    """One client; ``run`` serves it to its end (see the module text)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        backend: Backend,
        *,
        peer: str,
        limits: Limits,
        server_budget: ByteBudget,
        listing: bool = True,
        tls: ServerTLS | None = None,
        payloads: BufferPool | None = None,
    ) -> None:
        self.peer = peer
        self._payloads = payloads or BufferPool()
        self._stream = stream
        self._backend = backend
        self._limits = limits
        self._listing = listing
        self._tls = tls
        sock = getattr(stream, "socket", None)
        self._fd: int | None = None
        if isinstance(sock, trio.socket.SocketType):
            self._fd = sock.fileno()
            widen_send_buffer(sock)
        self._view = memoryview(bytearray(RECEIVE_SIZE))
        self._splicer = PayloadSplicer(self._fd, self._view) if self._fd is not None else None
        """Moves large WRITE payloads from the socket into files (``splice.py``)."""
        self._burst = 0
        self._writer = MessageWriter(stream, self._fd, peer, limits.send_timeout)
        self._slots = ByteBudget(limits.requests)
        self._budgets = (ByteBudget(limits.connection_bytes), server_budget)
        self._scope = trio.CancelScope()
        self._core: ServerCore | None = None
        self._workers: Workers[Job] | None = None
        self._payload: Reservation | None = None
        self._unanswered = 0
        self.shutting_down = False
        self._hurried = False
        self.export: str | None = None
        self.session: TLSSession | None = None
        """The TLS session, once STARTTLS's handshake succeeded."""
        self.why = "served"
        """Why the connection ended (for the log)."""

    # --- life ---------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            with self._scope:
                await self._serve()
        finally:
            self._release_payload()  # a WRITE whose payload never came whole
            if self._splicer is not None:
                self._splicer.close()
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                await self._stream.aclose()
            log.debug("%s: %s", self.peer, self.why)

    async def _serve(self) -> None:
        try:
            ready = await self._handshake()
            if ready is not None:
                await self._transmit(ready)
        except PeerClosed as exc:
            self.why = str(exc)
        except ProtocolError as exc:
            self._dropped(f"broke the protocol: {exc}")
        except (Stalled, TLSHandshakeFailed) as exc:
            self._dropped(str(exc))
        except ConnectionLost as exc:
            self.why = str(exc)
        except STREAM_ERRORS as exc:
            self.why = f"connection lost: {exc}"

    def facts(self) -> dict[str, str | None]:
        """What ``blockfuse status`` shows of this connection (see ``NBDServer.clients``)."""
        session = self.session
        return {
            "peer": self.peer,
            "export": self.export,
            "tls": session.version if session is not None else None,
            "client_certificate": session.client if session is not None else None,
        }

    def _dropped(self, why: str) -> None:
        """The client misbehaved (a violation, a stall): say so once, in one line."""
        self.why = why
        log.warning("NBD client %s dropped: %s", self.peer, why)

    def cancel(self, why: str) -> None:
        """End the connection now (requests in flight are cancelled)."""
        self.why = why
        self._scope.cancel()

    def hurry(self, why: str) -> None:
        """``cancel``, and a reply being written gets ``HURRIED_WRITE`` seconds more: a
        client that does not take it then is dropped mid-reply."""
        self._hurried = True
        deadline = trio.current_time() + HURRIED_WRITE
        self._writer.cut_off_at(deadline, f"{self.peer} did not take its replies in time")
        self.cancel(why)

    def shut_down(self) -> None:
        """The server is going away: ESHUTDOWN from now on, and close once idle."""
        self.shutting_down = True
        if self._core is not None:
            self._core.shut_down()
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        core = self._core
        if not self.shutting_down or core is None or not core.transmitting:
            return
        if self._unanswered == 0 and core.at_rest:
            self.cancel("closed: the server is shutting down")

    # --- handshake ----------------------------------------------------------------------

    async def _handshake(self) -> ServerReady | None:
        table = await self._backend.table()
        policy = self._tls.policy if self._tls is not None else TLSPolicy.OFF
        core = ServerCore(
            table.exports,
            default=table.default,
            listing=self._listing,
            tls=policy,
            allocate=self._payload_buffer,
        )
        self._core = core
        if self.shutting_down:
            core.shut_down()
        timeout = self._limits.handshake_timeout
        deadline = trio.current_time() + timeout
        why = f"no handshake within {timeout:g} s"
        self._cut_off_writes(deadline, why)  # its replies too must be out by then
        with trio.move_on_at(deadline):
            ready = await self._haggle(core)
            self._cut_off_writes(math.inf, "")
            return ready
        self._dropped(why)
        return None

    def _payload_buffer(self, n: int) -> bytearray:
        return self._payloads.take(n) or bytearray(n)

    def _reuse_payload(self, req: Request) -> None:
        """A WRITE answered with success: its payload's buffer (if pooled) may be used
        again.  After a failure it is dropped: a device may still hold it."""
        buf = req.data.obj if isinstance(req.data, memoryview) else None
        if isinstance(buf, bytearray) and MIN_POOLED <= req.length <= MAX_POOLED:
            self._payloads.give_back(buf)

    def _cut_off_writes(self, deadline: float, why: str) -> None:
        """Writes end by ``deadline`` (``math.inf``: no cut-off); a hurry's cut-off stays."""
        if not self._hurried:
            self._writer.cut_off_at(deadline, why)

    async def _haggle(self, core: ServerCore) -> ServerReady | None:
        while True:
            event = core.next_event()
            if isinstance(event, ServerReady):  # before its reply leaves (for the status)
                self.export = event.export.name
            if isinstance(event, ClientGone):  # the ACK of ABORT: the client may not wait
                with contextlib.suppress(ConnectionLost):
                    await self._writer.write([core.data_to_send()])
                self.why = "the client aborted the handshake"
                return None
            if out := core.data_to_send():
                await self._writer.write([out])
            if event is NEED_DATA:
                await self._receive(core)
            elif event is START_TLS:
                await self._start_tls(core)
            elif isinstance(event, ServerReady):
                return event
            else:
                assert isinstance(event, Closing)
                self.why = f"closed: {event.reason}"
                return None

    async def _start_tls(self, core: ServerCore) -> None:
        """STARTTLS's ACK is out: the TLS handshake, then the TLS stream for the rest."""
        assert self._tls is not None
        session = await self._tls.accept(self._stream)
        self.session = session
        self._stream = session.stream
        self._fd = None
        if self._splicer is not None:
            self._splicer.close()
            self._splicer = None
        self._writer.switch_to(session.stream)
        core.tls_started()

    async def _receive(self, core: ServerCore) -> None:
        """Feed the core what the client sent, waiting for it if nothing has come.

        On a socket the reads are direct (``os.readv``; a WRITE's payload straight into
        its buffer) and take a trip through the scheduler only to wait, or after
        ``BURST`` reads in a row so that the tasks answering requests get to run: a
        ``receive_some`` costs two such trips, and this runs once per request."""
        if self._fd is None:
            await self._flush()
            core.receive_data(await self._stream.receive_some(RECEIVE_SIZE))
            return
        self._burst += 1
        if self._burst >= BURST:
            self._burst = 0
            await self._flush()
            await trio.lowlevel.checkpoint()
        target = core.payload_target()
        into = target if target is not None else self._view
        try:
            n = os.readv(self._fd, [into])
        except BlockingIOError:
            await self._wait_for_client()
            return
        if n and target is not None:
            core.payload_received(n)
            return
        if not n:  # the end of the stream: what was answered goes out before it ends
            await self._flush()
        core.receive_data(into[:n].tobytes())

    async def _wait_for_client(self) -> None:
        """Until the socket has bytes; what the reader answered goes out first."""
        assert self._fd is not None
        self._burst = 0
        await self._flush()
        await trio.lowlevel.wait_readable(self._fd)

    # --- transmission -------------------------------------------------------------------

    async def _transmit(self, ready: ServerReady) -> None:
        assert self._core is not None
        handler = self._backend.open(ready, self.peer, sends_files=self._fd is not None)
        failure: Exception | None = None
        try:
            async with trio.open_nursery() as tasks:
                self._workers = Workers(tasks, self._limits.requests, self._answer)
                try:
                    await self._read_requests(self._core, handler)
                    self._workers.close()  # they answer what is in flight, then end
                except (ProtocolError, ConnectionLost, *STREAM_ERRORS) as exc:
                    failure = exc  # raised out of the nursery as itself, not in a group
                    tasks.cancel_scope.cancel()
        finally:
            for _, _, reservation in self._workers.unstarted() if self._workers else ():
                reservation.release()  # cancelled before a task took them
        if failure is not None:
            raise failure
        self.why = "the client disconnected (NBD_CMD_DISC)"

    async def _read_requests(self, core: ServerCore, handler: Handler) -> None:
        """Requests until the client is gone.  Replies the reader makes itself are
        written before it next waits (``_receive``, ``_reserve``) or leaves."""
        try:
            while True:
                event = core.next_event()
                while isinstance(event, PayloadComing):  # a spliced one: the next may be too
                    event = await self._take_payload(core, event.length, handler)
                if event is NEED_DATA:
                    await self._receive(core)
                elif isinstance(event, Request):
                    await self._dispatch(event, handler)
                elif isinstance(event, RequestRefused):
                    await self._refuse(Reply(event.cookie, event.error, event.message))
                else:
                    assert isinstance(event, ClientGone)
                    await self._flush()
                    return
        finally:
            self._writer.drop_held()  # the connection is ending: they will not be written

    async def _take_payload(
        self, core: ServerCore, length: int, handler: Handler
    ) -> ServerEvent | NeedData:
        """Room for a WRITE's payload, then the payload, whole within the payload timeout
        (else ``Stalled``: it holds budget other clients wait for); the event after it.
        A payload that came with its header needs no deadline: without that cancel scope
        a 4 KiB WRITE at depth 16 costs the server ~44 µs of CPU instead of 55-65.  A
        large one may go from the socket straight into its file (``_splice_payload``)."""
        self._payload = await self._reserve(length)
        splicer = self._splicer
        if splicer is not None and length >= SPLICE_MIN and not self.shutting_down:
            req = core.incoming_write() if splicer.ready() else None
            if req is not None and (into := await handler.write_target(req)) is not None:
                return await self._splice_payload(core, req, into, handler)
        if (event := core.next_event()) is not NEED_DATA:
            return event
        timeout = self._limits.payload_timeout
        with trio.move_on_after(timeout):
            while (event := core.next_event()) is NEED_DATA:
                await self._receive(core)
            return event
        raise payload_stalled(length, timeout)

    async def _splice_payload(
        self, core: ServerCore, req: Request, into: WriteTarget, handler: Handler
    ) -> ServerEvent | NeedData:
        """The WRITE done by moving its payload from the socket into ``into`` (whole
        within the payload timeout); its reply held as the reader's own; the next event."""
        assert self._splicer is not None
        core.divert_payload()
        timeout = self._limits.payload_timeout
        try:
            with trio.move_on_after(timeout) as waited:
                error = await self._splicer.move(core, into, self._wait_for_client)
        finally:
            into.release()
        if waited.cancelled_caught:
            raise payload_stalled(req.length, timeout)
        reply = Reply(req.cookie) if error is None else handler.write_failed(req, error)
        reservation, self._payload = self._payload, None
        assert reservation is not None
        self._unanswered += 1
        self._hold(reply, reservation, handler)
        return core.next_event()

    async def _reserve(self, n: int) -> Reservation:
        reservation = Reservation(self._slots, self._budgets)
        if not reservation.take_now(n):
            await self._flush()  # the reader's own replies may hold what it waits for
            await reservation.take(n)
        return reservation

    def _release_payload(self) -> None:
        if self._payload is not None:
            self._payload.release()
            self._payload = None

    async def _dispatch(self, req: Request, handler: Handler) -> None:
        if self.shutting_down:
            await self._refuse(Reply(req.cookie, errno.ESHUTDOWN, SHUTTING_DOWN))
            return
        reservation = self._payload or await self._reserve(
            req.length if req.cmd in RESERVES_LENGTH else 0
        )
        self._payload = None
        self._unanswered += 1
        reply = handler.answer_now(req) if self._fd is not None else None
        if reply is not None:
            self._replied(req, reply)
            self._hold(reply, reservation, handler)
            return
        assert self._workers is not None
        self._workers.submit((own_payload(req), handler, reservation))

    async def _answer(self, job: Job) -> None:
        req, handler, reservation = job
        try:
            reply = await handler.handle(req)
        except Exception:
            log.exception("NBD request %s failed unexpectedly", req)
            reply = Reply(req.cookie, errno.EIO, "internal error")
        except BaseException:  # cancelled: the connection is ending, nothing is sent
            self._answered(reservation)
            raise
        self._replied(req, reply)
        await self._send(reply, reservation, handler)

    def _replied(self, req: Request, reply: ServerReply) -> None:
        """``reply`` is ``req``'s: a WRITE's payload may be used again after a success."""
        if req.cmd == Cmd.WRITE and isinstance(reply, Reply) and not reply.error:
            self._reuse_payload(req)

    async def _refuse(self, reply: Reply) -> None:
        """A reply from the reader itself, after those queued before it.  It holds a slot
        until it is written, as a request does, so that refusals a client does not read
        hold the reader back instead of piling up."""
        self._release_payload()
        reservation = await self._reserve(0)
        self._unanswered += 1
        await self._send(reply, reservation)

    async def _send(
        self, reply: ServerReply, reservation: Reservation | None, handler: Handler | None = None
    ) -> None:
        """Hand the reply to the writer; its reservation is given back once it is out
        (and its buffers to ``handler``)."""
        parts, written = self._message(reply, reservation, handler)
        try:
            await self._writer.write(parts, written, batch=self._unanswered > 1)
        except BlockError as exc:
            self._write_failed(exc)

    def _hold(self, reply: ServerReply, reservation: Reservation, handler: Handler) -> None:
        """``_send`` for the reader's own replies: queued, to leave with the others it
        makes before it next waits (``_flush``)."""
        parts, written = self._message(reply, reservation, handler)
        try:
            self._writer.hold(parts, written)
        except BlockError as exc:
            self._write_failed(exc)

    async def _flush(self) -> None:
        """Write the reader's own replies; it does before every wait (a client that waits
        for them sends nothing more)."""
        try:
            await self._writer.flush()
        except BlockError as exc:
            self._write_failed(exc)

    def _message(
        self, reply: ServerReply, reservation: Reservation | None, handler: Handler | None
    ) -> tuple[list[Part], Callable[[], None]]:
        """The reply's parts, and what gives back what it holds once it is written."""
        assert self._core is not None

        def written() -> None:
            self._answered(reservation)
            if handler is not None:
                handler.written(reply)

        try:
            return self._core.send(reply), written
        except BaseException:
            written()  # what the reply holds goes back (a lent file range, a buffer)
            raise

    def _write_failed(self, exc: BlockError) -> None:
        if isinstance(exc, Stalled):
            self._dropped(str(exc))
        else:
            self.why = str(exc)
        self._scope.cancel()

    def _answered(self, reservation: Reservation | None) -> None:
        if reservation is not None:
            reservation.release()
        self._unanswered -= 1
        self._close_if_idle()
