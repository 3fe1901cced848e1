"""Opening NBD connections: streams, handshakes, and the tiered entry points.

async with open_nbd_client(address) as client: ...          # owns its nursery
client = await connect_nbd(nursery, address)                # reader runs in nursery
client = await wrap_nbd_stream(nursery, stream, "disk")     # any trio stream (tests)
exports = await list_exports(address)                       # NBD_OPT_LIST (+ INFO)

An ``nbds`` address speaks TLS (STARTTLS first, see tls.py) or fails; ``connect_nbd``
takes the ``TLSClient`` to use (a device makes one and reconnects with it), or makes one
from the address.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import trio

from ..errors import BlockError
from ..nbd.events import ExportInfo, ExportList, ExportRefused, Negotiated, OptionRefused
from ..nbd.handshake import ClientHandshake
from ..nbd.uri import Address
from .client import DEFAULT_TIMEOUT, NBDClient, quietly
from .handshake import (
    ConnectionLost,
    ExportUnusable,
    HandshakeRefused,
    Stalled,
    TLSFailed,
    refusal_message,
    run_handshake,
)
from .tls import TLSClient

CONNECT_TIMEOUT = 10.0
"""Seconds a TCP or Unix-socket connect may take (less if the caller's deadline is nearer)."""
LIST_TIMEOUT = DEFAULT_TIMEOUT
"""Seconds ``list_exports`` may take in all, the size probes of size-0 exports included."""


async def open_stream(address: Address) -> trio.abc.Stream:
    """A connected stream to the server; raises ``ConnectionLost`` when it cannot connect."""
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            if address.socket:
                return await trio.open_unix_socket(address.socket)
            assert address.host is not None
            return await trio.open_tcp_stream(address.host, address.port)
    except trio.TooSlowError:
        raise ConnectionLost(f"cannot connect to {address.server}: timed out") from None
    except OSError as exc:
        raise ConnectionLost(f"cannot connect to {address.server}: {why(exc)}") from exc


def why(exc: OSError) -> str:
    """The reason of a failed connect; trio's TCP connect keeps its attempts' in a group."""
    if exc.strerror:
        return exc.strerror
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        reasons = {
            os.strerror(e.errno) for e in cause.exceptions if isinstance(e, OSError) and e.errno
        }
        if reasons:
            return ", ".join(sorted(reasons))
    return str(exc)


async def wrap_nbd_stream(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    export: str,
    *,
    server: str = "server",
    export_name: bool = False,
    request_timeout: float = DEFAULT_TIMEOUT,
    tls: TLSClient | None = None,
) -> NBDClient:
    """Negotiate ``export`` over ``stream`` within ``request_timeout`` seconds (the bound
    of each request from then on too) and start its reader task in ``nursery``.  With
    ``tls``, STARTTLS first and everything else over TLS (or a failure)."""
    hs = ClientHandshake.go(export, export_name=export_name, tls=tls is not None)
    deadline = trio.current_time() + request_timeout
    upgrade = tls.start if tls is not None else None
    outcome, stream = await run_handshake(stream, hs, server, deadline=deadline, upgrade=upgrade)
    if isinstance(outcome, OptionRefused | ExportRefused):
        await quietly(stream.aclose())  # over TLS: close_notify after the ABORT or DISC
    if isinstance(outcome, OptionRefused):
        message = refusal_message(outcome, server, export, tls=tls is not None)
        raise HandshakeRefused(message, outcome)
    if isinstance(outcome, ExportRefused):
        raise ExportUnusable(f"{server}: {outcome.reason}")
    assert isinstance(outcome, Negotiated)
    client = NBDClient(stream, outcome, server, timeout=request_timeout)
    nursery.start_soon(client.run_reader, hs.trailing_data())
    return client


async def connect_nbd(
    nursery: trio.Nursery,
    address: Address,
    *,
    request_timeout: float = DEFAULT_TIMEOUT,
    tls: TLSClient | None = None,
) -> NBDClient:
    """Connect to ``address`` and negotiate its export within ``request_timeout`` seconds
    (the bound of each request from then on too); the reader runs in ``nursery``.  An
    ``nbds`` address uses ``tls`` (made from the address if not given).

    A server that answers GO with size 0 (nbd-server 3.24 in daemon mode can, as it opens
    the export only later) is asked again with NBD_OPT_EXPORT_NAME, which reports the size.
    """
    deadline = trio.current_time() + request_timeout
    tls = tls_for(address, tls)
    with trio.move_on_at(deadline):
        client = await _connect(nursery, address, False, request_timeout, tls)
        if client.export.size == 0:
            await client.aclose()
            client = await _connect(nursery, address, True, request_timeout, tls)
        return client
    raise Stalled(f"{address.server}: no answer within {request_timeout:g} s while connecting")


def tls_for(address: Address, tls: TLSClient | None = None) -> TLSClient | None:
    """``tls``, or one made for an ``nbds`` address; ``None`` for plaintext."""
    if address.tls is None or tls is not None:
        return tls
    return TLSClient.for_address(address)


async def _connect(
    nursery: trio.Nursery,
    address: Address,
    export_name: bool,
    request_timeout: float,
    tls: TLSClient | None,
) -> NBDClient:
    stream = await open_stream(address)
    try:
        return await wrap_nbd_stream(
            nursery,
            stream,
            address.export,
            server=address.server,
            export_name=export_name,
            request_timeout=request_timeout,
            tls=tls,
        )
    except BaseException:
        await quietly(stream.aclose())
        raise


@asynccontextmanager
async def open_nbd_client(
    address: Address, *, request_timeout: float = DEFAULT_TIMEOUT
) -> AsyncIterator[NBDClient]:
    """A connection for the body of the block; closed (with DISC) when it ends."""
    async with trio.open_nursery() as nursery:
        client = await connect_nbd(nursery, address, request_timeout=request_timeout)
        try:
            yield client
        finally:
            await client.aclose()


async def list_exports(address: Address, *, details: bool = True) -> list[ExportInfo]:
    """The server's exports (with ``NBD_OPT_INFO`` details when ``details``), all within
    ``LIST_TIMEOUT`` seconds."""
    with trio.move_on_after(LIST_TIMEOUT):
        return await _list_exports(address, details)
    raise Stalled(f"{address.server}: listing its exports took more than {LIST_TIMEOUT:g} s")


async def _list_exports(address: Address, details: bool) -> list[ExportInfo]:
    tls = tls_for(address)
    hs = ClientHandshake.list(details=details, tls=tls is not None)
    upgrade = tls.start if tls is not None else None
    stream = await open_stream(address)
    try:
        outcome, stream = await run_handshake(stream, hs, address.server, upgrade=upgrade)
    finally:
        await quietly(stream.aclose())
    if isinstance(outcome, OptionRefused):
        message = refusal_message(outcome, address.server, None, tls=tls is not None)
        raise HandshakeRefused(message, outcome)
    assert isinstance(outcome, ExportList)
    return [await _with_true_size(address, e, tls) for e in outcome.exports]


async def _with_true_size(
    address: Address, export: ExportInfo, tls: TLSClient | None
) -> ExportInfo:
    """nbd-server 3.24 reports size 0 in NBD_INFO_EXPORT; EXPORT_NAME tells the truth.

    A server that refuses that second connection (``nbd-server -d`` serves one session)
    leaves the size unknown (``None``).  The failure is caught inside the nursery, so it
    leaves as itself, never wrapped in an exception group."""
    if export.size != 0:
        return export
    async with trio.open_nursery() as nursery:
        try:
            where = replace(address, export=export.name)
            client = await _connect(nursery, where, True, LIST_TIMEOUT, tls)
        except BlockError:
            return replace(export, size=None)
        await client.aclose()
    return replace(export, size=client.export.size)


__all__ = ["ConnectionLost", "HandshakeRefused", "NBDClient", "TLSClient", "TLSFailed"]
