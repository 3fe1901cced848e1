"""Running a server: the NBD server and its control socket on a set of exports, until a
signal (``blockfuse serve``) or until the mount it serves beside stops (``mount --serve``).

    async with running(exports, listening, control) as serving:   # an Alongside
        ...                                                         # clients are served
    # left: stopped (see NBDServer.shutdown), the socket files removed

``serve_exports`` is all of ``blockfuse serve``: run until the first signal, stop the
server (new requests get ESHUTDOWN, those in flight get ``GRACE`` seconds), then flush
every device through its own cursor and close it, with the signals still watched (the
second hurries, the third aborts: ``lifecycle.Shutdown``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TextIO

import trio

from ..block import FlushCursor
from ..lifecycle import Shutdown, flush_and_close, watch_signals
from ..malloc import keep_request_buffers
from ..nbd.haggling import TLSPolicy
from ..transport.connection import Limits
from ..transport.server import NBDServer
from ..transport.tlsserver import ServerTLS
from .control import Control
from .exports import Export, ServeBackend
from .listen import Listening

log = logging.getLogger(__name__)

GRACE = 10.0
"""Seconds the requests in flight get to finish once the server stops."""


class Serving:
    """A running server (``running``): stopped by ``stop``, hurried by ``hurry``."""

    def __init__(self, server: NBDServer, control: Control | None, grace: float) -> None:
        self.server = server
        self._control = control
        self._grace = grace
        self._stopped = False

    async def stop(self) -> None:
        # Never by cancelling the nursery of ``running``: the body of its block (a whole
        # mount) runs inside it and would be cancelled with it.
        if not self._stopped:
            self._stopped = True
            await self.server.shutdown(self._grace)
            if self._control is not None:
                self._control.stop()

    def hurry(self) -> None:
        self.server.hurry()


@asynccontextmanager
async def running(
    exports: Sequence[Export],
    listening: Listening,
    control: Listening | None = None,
    *,
    listing: bool = True,
    limits: Limits | None = None,
    grace: float = GRACE,
    tls: ServerTLS | None = None,
) -> AsyncIterator[Serving]:
    """Serve ``exports`` on ``listening`` (and answer on ``control``, one listener) for
    the body; the server is stopped when the body ends, and the socket files removed.
    ``tls``: the TLS policy and certificates (none: no TLS)."""
    server = NBDServer(ServeBackend(exports), listing=listing, limits=limits, tls=tls)
    failure: Exception | None = None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listening.listeners)
            answers = None
            if control is not None:
                answers = Control(exports, server_facts(server, listening))
                await nursery.start(answers.serve, control.listeners[0])
            serving = Serving(server, answers, grace)
            try:
                yield serving
            except Exception as exc:  # leaves the block as itself, not in an exception group
                failure = exc
            finally:
                with trio.CancelScope(shield=True):
                    await serving.stop()
    finally:
        listening.remove_files()
        if control is not None:
            control.remove_files()
    if failure is not None:
        raise failure


def server_facts(server: NBDServer, listening: Listening) -> Callable[[], dict[str, object]]:
    policy = server.tls.policy if server.tls is not None else TLSPolicy.OFF

    def now() -> dict[str, object]:
        uris = [a.uri(tls=policy is TLSPolicy.REQUIRE) for a in listening.addresses]
        return {
            "listening": uris,
            "tls": policy.value,
            "connections": server.connections,
            "served": server.served,
            "clients": server.clients(),
        }

    return now


async def serve_exports(
    exports: Sequence[Export],
    listening: Listening,
    control: Listening | None,
    out: TextIO,
    *,
    listing: bool = True,
    on_ready: Callable[[], None] | None = None,
    grace: float = GRACE,
    tls: ServerTLS | None = None,
) -> list[str]:
    """Serve until a signal, stop, then flush and close every device; the problems met
    while flushing, one line each (empty when all went well)."""
    keep_request_buffers()
    shutdown = Shutdown([e.bytes.device for e in exports], out)
    cursors = [FlushCursor(e.bytes.device) for e in exports]
    async with trio.open_nursery() as nursery:
        await nursery.start(watch_signals, shutdown)
        try:
            async with running(
                exports, listening, control, listing=listing, grace=grace, tls=tls
            ) as serving:
                shutdown.on_hurry(serving.hurry)
                if on_ready is not None:
                    on_ready()
                await shutdown.requested.wait()
        finally:  # however the serving ended, the devices are flushed and closed
            with trio.CancelScope(shield=True):
                devices = [(e.name, e.bytes.device) for e in exports]
                problems = await flush_and_close(devices, cursors)
        nursery.cancel_scope.cancel()
    return problems
