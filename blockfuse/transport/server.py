"""The NBD server over trio: accepting on listeners, one task per connection, shutdown.

    server = NBDServer(backend)                     # backend: the exports and handlers
    await nursery.start(server.serve, listeners)    # accept until shutdown
    await server.handle_stream(stream)              # one connection, any stream (tests)
    await server.shutdown(grace)                    # what SIGTERM does

What each connection does and how it ends is ``connection.py``; what bounds memory is
``budget.py`` (per connection, and ``Limits.server_bytes`` for the whole server, however
many clients connect).  At most ``Limits.connections`` connections are served at once;
one more is accepted and closed at once, so a client is told rather than left waiting.

Shutdown, in order: stop accepting (the listeners close); every connection answers new
requests with ESHUTDOWN and new options with ERR_SHUTDOWN, and closes once nothing is in
flight; after ``grace`` seconds (or at ``hurry``) the rest are cancelled.  Then the
caller flushes and closes the devices: nothing of ours touches them any more.
"""

from __future__ import annotations

import errno
import itertools
import logging
from collections.abc import Sequence

import trio

from .budget import ByteBudget
from .connection import Backend, Connection, Limits
from .pool import BufferPool
from .tlsserver import ServerTLS

log = logging.getLogger(__name__)

ACCEPT_RETRY = 0.1
"""Seconds to wait before accepting again when the process is out of descriptors."""
RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}

Listener = trio.abc.Listener[trio.abc.Stream]


class NBDServer:
    def __init__(
        self,
        backend: Backend,
        *,
        listing: bool = True,
        limits: Limits | None = None,
        tls: ServerTLS | None = None,
    ) -> None:
        self._backend = backend
        self._listing = listing
        self.tls = tls
        self.limits = limits or Limits()
        self._budget = ByteBudget(self.limits.server_bytes)
        self._payloads = BufferPool()
        """WRITE payload buffers, shared by the connections (``pool.py``)."""
        self._connections: dict[Connection, None] = {}
        """The connections being served, oldest first (a dict as an ordered set)."""
        self._numbers = itertools.count(1)
        self._accepting = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._all_closed = trio.Event()
        self.shutting_down = False
        self.served = 0
        """Connections accepted so far."""

    @property
    def connections(self) -> int:
        return len(self._connections)

    def clients(self) -> list[dict[str, str | None]]:
        """Each connection, oldest first: its peer, its export (once opened), its TLS
        version and the client certificate's subject (when verified); nothing secret."""
        return [conn.facts() for conn in self._connections]

    async def serve(
        self,
        listeners: Sequence[Listener],
        *,
        task_status: trio.TaskStatus[NBDServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on ``listeners`` and serve every connection; returns once ``shutdown``
        ended them all.  The listeners are closed when accepting stops."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._accept_all, listeners)
            task_status.started(self)

    async def handle_stream(self, stream: trio.abc.Stream, peer: str | None = None) -> None:
        """Serve one connection on ``stream`` to its end (a test's memory stream, stdin)."""
        self.served += 1
        conn = Connection(
            stream,
            self._backend,
            peer=peer or f"client #{next(self._numbers)}",
            limits=self.limits,
            server_budget=self._budget,
            listing=self._listing,
            tls=self.tls,
            payloads=self._payloads,
        )
        if self.shutting_down:
            conn.shut_down()
        self._connections[conn] = None
        try:
            await conn.run()
        except Exception:  # a bug of ours: it costs this connection, not every other one
            log.exception("NBD connection of %s failed unexpectedly and was closed", conn.peer)
        finally:
            self._connections.pop(conn, None)
            if self.shutting_down and not self._connections:
                self._all_closed.set()

    async def _accept_all(self, listeners: Sequence[Listener]) -> None:
        with self._accepting:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept, listener)

    async def _accept(self, listener: Listener) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in RESOURCE_ERRNOS:
                        raise
                    log.warning("cannot accept NBD connections: %s; retrying", exc.strerror)
                    await trio.sleep(ACCEPT_RETRY)
                    continue
                self._start(stream)

    def _start(self, stream: trio.abc.Stream) -> None:
        assert self._nursery is not None
        if len(self._connections) >= self.limits.connections:
            log.warning("refused an NBD connection: %d are open already", self.limits.connections)
            self._nursery.start_soon(stream.aclose)
            return
        self._nursery.start_soon(self.handle_stream, stream, peer_name(stream, next(self._numbers)))

    # --- shutdown -------------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Stop accepting; ESHUTDOWN to new requests; idle connections close."""
        self.shutting_down = True
        self._accepting.cancel()
        for conn in list(self._connections):
            conn.shut_down()
        if not self._connections:
            self._all_closed.set()

    def hurry(self) -> None:
        """End every connection now (the requests in flight are cancelled, a reply being
        written is cut off soon after: ``Connection.hurry``)."""
        for conn in list(self._connections):
            conn.hurry("closed: the server shut down before its requests were answered")

    async def shutdown(self, grace: float) -> None:
        """``begin_shutdown``, then wait ``grace`` seconds at most for the connections to
        end, then ``hurry``; returns once none is left."""
        self.begin_shutdown()
        with trio.move_on_after(grace):
            await self._all_closed.wait()
        self.hurry()
        await self._all_closed.wait()


def peer_name(stream: trio.abc.Stream, number: int) -> str:
    """``127.0.0.1:40212``, or ``unix client #3`` (a Unix socket's peer has no name)."""
    sock = getattr(stream, "socket", None)
    try:
        address = sock.getpeername() if sock is not None else None
    except OSError:
        address = None
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return f"unix client #{number}"
